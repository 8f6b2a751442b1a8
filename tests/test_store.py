"""aebench.tracking.store on its own: an interrupt during a store write, a store MLflow refuses,
a damaged store found on open."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from conftest import store_folder

from aebench import cli, tracking
from aebench.tracking import store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def made_store() -> Path:
    """A store with its experiment (creating one costs seconds): copy it before writing."""
    before = mlflow.get_tracking_uri()
    with store_folder() as folder, pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        tracking.open_store()
        mlflow.set_tracking_uri(before)
        yield folder / "mlflow.db"


@pytest.fixture
def store_copy(made_store: Path, tmp_path: Path, monkeypatch) -> Path:
    db = tmp_path / "mlflow.db"
    shutil.copy(made_store, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    yield db
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", ""))


# A stage (cli.run) that opens an evaluation run and logs one replica into it; a SQLAlchemy
# event (its public hook) sends the stage SIGINT while it runs the first statement that starts
# with $KILL_AT, i.e. in the middle of MLflow's write. The interrupt used to land inside
# SQLAlchemy: the interrupted connection was closed with its cursor alive, so the process held
# its own sqlite file, end_run(KILLED) waited 20 s and failed: `database is locked`, exit 1,
# runs left RUNNING.
STAGE = textwrap.dedent("""
    import os, signal, sqlalchemy
    from aebench import cli, tracking

    def main(args):
        experiment_id = tracking.open_store()
        with tracking.evaluation_run(experiment_id):
            killed = []

            def kill(conn, cursor, statement, *rest):
                if statement.startswith(os.environ["KILL_AT"]) and not killed:
                    killed.append(statement)
                    os.kill(os.getpid(), signal.SIGINT)
            sqlalchemy.event.listen(sqlalchemy.engine.Engine, "after_cursor_execute", kill)
            tracking.log_evaluation("deep3", 0, "0" * 64, {"mse": 0.1})
            tracking.log_evaluation("deep3", 1, "0" * 64, {"mse": 0.1})

    cli.run(main, "python -m stages.evaluate")
""")


@pytest.mark.parametrize("statement", ["INSERT INTO tags", "SELECT runs."])
def test_ctrl_c_inside_a_store_write_is_an_interruption_and_ends_the_runs_killed(
        store_copy, tmp_path, statement):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    env = {**os.environ, "KILL_AT": statement, "PYTHONPATH": str(ROOT)}
    env.pop("AEBENCH_DEBUG", None)
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.stderr.strip().splitlines()[-1:] == ["interrupted: stages.evaluate (SIGINT)"]
    assert done.returncode == 130
    with sqlite3.connect(store_copy) as db:
        runs = dict(db.execute("select name, status from runs"))
    # the write under way when Ctrl-C came was finished, then every run ended KILLED
    assert runs == {"evaluate": "KILLED", "deep3-r0-eval": "KILLED"}


def test_a_store_error_raised_while_an_interrupt_is_handled_gives_way_to_it():
    interrupt = cli.Interrupted(signal.SIGINT)
    with pytest.raises(cli.Interrupted) as caught:
        try:
            raise interrupt
        except KeyboardInterrupt:
            with store.store_errors():  # the cleanup's end_run(KILLED), failing
                raise sqlite3.OperationalError("database is locked")  # noqa: B904 - in it
    assert caught.value is interrupt
    # the same error with no interrupt under way is a store error
    with pytest.raises(tracking.TrackingError, match="database is locked"):
        with store.store_errors():
            raise sqlite3.OperationalError("database is locked")


def test_a_signal_inside_a_local_store_call_acts_when_the_call_ends(store_copy):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with store.store_errors():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")  # the rest of the MLflow call still runs
    assert steps == ["after the signal"]


def test_over_http_a_signal_acts_at_once(monkeypatch):
    monkeypatch.setattr(mlflow, "get_tracking_uri", lambda: "http://127.0.0.1:1")
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with store.store_errors():
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the signal")
    assert steps == []


def test_a_file_store_mlflow_refuses_is_one_line_with_whole_words(tmp_path, monkeypatch):
    uri = (tmp_path / "nowhere" / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(tracking.TrackingError) as err:
        tracking.open_store()
    assert str(err.value) == (
        f"cannot open the MLflow tracking store {uri}: The filesystem tracking backend (e.g., "
        "'./mlruns') is in maintenance mode and will not receive further updates; use a sqlite "
        "store (sqlite:///PATH/mlflow.db; `mlflow migrate-filestore` moves a file store's runs "
        "there), or set MLFLOW_ALLOW_FILE_STORE=true (AEBENCH_DEBUG=1 for the traceback)")
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("text, short", [
    ("One. Two three four. Five six seven eight nine.", "One. Two three four."),
    ("one two three four five six seven eight nine ten", "one two three four…"),
    ("short", "short"),
])
def test_a_long_reason_is_cut_after_a_sentence_else_a_word(text, short):
    assert store.shortened(text, 24) == short


def damage(db: Path, table: str) -> None:
    """Garbage over the first page of `table` (a page MLflow does not read to open a store)."""
    with sqlite3.connect(db) as con:
        page = con.execute("select rootpage from sqlite_master where name = ?",
                           (table,)).fetchone()[0]
        size = con.execute("pragma page_size").fetchone()[0]
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(bytes(range(256)) * (size // 256))


def test_a_store_damaged_at_a_page_is_named_on_open(store_copy):
    tracking.open_store()  # whole: opens
    damage(store_copy, "metrics")
    with pytest.raises(tracking.TrackingError) as err:
        tracking.open_store()
    line = str(err.value)
    assert line.startswith(f"MLflow tracking store sqlite:///{store_copy}: damaged (sqlite's "
                           "quick_check: ")
    assert line.endswith(f"); move {store_copy} aside (the next run starts a new store) or put "
                         "back a copy")
    assert "\n" not in line


def test_a_store_over_the_checked_size_opens_unchecked(store_copy, monkeypatch):
    damage(store_copy, "metrics")
    monkeypatch.setattr(store, "QUICK_CHECK_MAX_BYTES", store_copy.stat().st_size - 1)
    tracking.open_store()  # the metrics table is not read to open it
