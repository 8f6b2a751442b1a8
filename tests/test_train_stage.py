"""The train stage: the session's project (conftest) trained deep3 and convnoisy in-process, two
replicas each; these tests read what it wrote, and run the failures on copies of it."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, TINY_MODELS, TRAIN_LIMIT, dvc_args, run_stage
from test_workers import FlakyConfig, alive, flaky

from aebench import constants, kinds, tracking, training, workers
from aebench.config import MAX_EPOCHS, ConfigError

CURVE_HEADER = ["epoch", "test_mse", "test_mse_std", "train_loss", "train_loss_std"]


def replica_run(client, project, name: str, r: int):
    """The MLflow run of replica r of model `name`, found as evaluate finds it: by the sha256
    of its checkpoint."""
    sha = tracking.sha256_file(project.root / f"data/models/{name}/r{r}.pt")
    model_id = tracking.find_logged_model(name, sha)
    assert model_id, f"{name}-r{r}: no logged model with the checkpoint's sha256"
    return client.get_run(client.get_logged_model(model_id).source_run_id)


def set_params(root: Path, change) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    change(params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_every_replica_is_written_with_what_built_it(project):
    for name, entry in TINY_MODELS.items():
        folder = project.root / "data/models" / name
        assert sorted(p.name for p in folder.iterdir()) == ["r0.pt", "r1.pt"]  # no temp files
        for r in range(2):
            ckpt = torch.load(folder / constants.replica_file(r), weights_only=True)
            assert {k: ckpt[k] for k in ("name", "replica", "seed", "device")} == \
                {"name": name, "replica": r, "seed": r, "device": "cpu"}
            assert ckpt["config"] == kinds.validate_model(name, entry).model_dump()
        first, second = (torch.load(folder / f"r{r}.pt", weights_only=True)["state_dict"]
                         for r in range(2))
        assert not all(torch.equal(first[k], second[k]) for k in first)  # two seeds


def test_curve_is_mean_and_std_over_replicas_at_six_digits(project, mlflow_client):
    for name in TINY_MODELS:
        with open(project.root / "plots/curves" / f"{name}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == CURVE_HEADER
        assert [row[0] for row in rows[1:]] == ["1", "2"]  # one row per epoch
        digits = [len(Decimal(cell).as_tuple().digits) for row in rows[1:] for cell in row[1:]]
        assert max(digits) == 6, rows  # rounded to 6 significant digits, not fewer
        # the mean and std of the replicas' own test mse, as their MLflow runs logged it
        runs = [replica_run(mlflow_client, project, name, r) for r in range(2)]
        per_replica = [mlflow_client.get_metric_history(run.info.run_id, "test_mse")[-1].value
                       for run in runs]
        last = dict(zip(CURVE_HEADER, map(float, rows[-1]), strict=True))
        mean = sum(per_replica) / 2
        assert last["test_mse"] == pytest.approx(mean, rel=1e-5)
        assert last["test_mse_std"] == pytest.approx(abs(per_replica[0] - mean) * 2 ** 0.5,
                                                     rel=1e-3)  # ddof 1


def test_training_is_recorded_in_mlflow(project, mlflow_client):
    for name in TINY_MODELS:
        for r in range(2):
            child = replica_run(mlflow_client, project, name, r)
            assert child.info.run_name == f"{name}-r{r}" and child.info.status == "FINISHED"
            assert child.data.params["seed"] == str(r)
            history = mlflow_client.get_metric_history(child.info.run_id, "test_mse")
            assert [m.step for m in history] == [1, 2]
        parent = mlflow_client.get_run(child.data.tags["mlflow.parentRunId"])
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        params = parent.data.params
        assert params["n_train"] == str(TRAIN_LIMIT) and params["train.limit"] == str(TRAIN_LIMIT)
        assert params["optimizer.lr"] == "0.001" and params["device"] == "cpu"
        assert params["replicas"] == "2" and params["kind"] == TINY_MODELS[name]["kind"]
        # the model's colour in the PNGs, by its place in params.yaml
        color = tracking.model_color(list(TINY_MODELS).index(name))
        assert parent.data.tags["mlflow.runColor"] == child.data.tags["mlflow.runColor"] == color
        # the curve (mean and std over replicas per epoch) on the parent: the model's own row
        with open(project.root / "plots/curves" / f"{name}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        for key in CURVE_HEADER[1:]:
            history = mlflow_client.get_metric_history(parent.info.run_id, key)
            assert [m.step for m in history] == [1, 2]
            assert [m.value for m in history] == \
                pytest.approx([float(r[key]) for r in rows], rel=1e-5)
        # and the last row's test MSE and its std as they are in the CSV, one value at step 0:
        # the bar chart that opens the UI's chart view
        for key in ("test_mse", "test_mse_std"):
            (final,) = mlflow_client.get_metric_history(parent.info.run_id, f"final/{key}")
            assert (final.step, final.value) == (0, float(rows[-1][key]))
        (sse,) = mlflow_client.get_metric_history(parent.info.run_id, "final/sse_per_image")
        assert sse.value == pytest.approx(784 * float(rows[-1]["test_mse"]), rel=1e-5)


def test_each_replica_is_a_version_with_an_alias(project, mlflow_client):
    for name in TINY_MODELS:
        for r in range(2):
            version = mlflow_client.get_model_version_by_alias(f"aebench-{name}", f"r{r}")
            # the latest training: here, or the retraining of a test that ran before this one,
            # which wrote the same bytes
            assert version.tags["weights_sha256"] == \
                tracking.sha256_file(project.root / f"data/models/{name}/r{r}.pt")
            assert version.tags["replica"] == str(r)


def test_a_failed_training_moves_no_alias(project_copy, mlflow_client, monkeypatch):
    registered = "aebench-deep3"
    before = mlflow_client.get_registered_model(registered).aliases
    versions = len(mlflow_client.search_model_versions(f"name = '{registered}'"))
    train_replica = training.train_replica

    def second_fails(*args, seed, **kwargs):  # replica 0 trains and is logged, replica 1 fails
        if seed == 1:
            raise training.TrainingError("model deep3-r1: diverged")
        return train_replica(*args, seed=seed, **kwargs)

    monkeypatch.setattr(training, "train_replica", second_fails)  # in this process:
    set_params(project_copy, lambda p: p["train"].update(workers=1))  # no worker processes
    with pytest.raises(training.TrainingError, match="diverged"):
        run_stage("train", key="deep3")
    assert mlflow_client.get_registered_model(registered).aliases == before
    assert len(mlflow_client.search_model_versions(f"name = '{registered}'")) == versions


def test_one_after_another_gives_the_bytes_of_two_workers(project, project_copy):
    shutil.rmtree(project_copy / "data/models/deep3")
    (project_copy / "plots/curves/deep3.csv").unlink()
    set_params(project_copy, lambda p: p["train"].update(workers=1))  # the project used 2
    run_stage("train", key="deep3")  # the arguments of dvc.yaml
    for path in ("data/models/deep3/r0.pt", "data/models/deep3/r1.pt", "plots/curves/deep3.csv"):
        assert (project_copy / path).read_bytes() == (project.root / path).read_bytes(), path


def test_diverging_run_writes_nothing_and_its_run_fails(project, project_copy, mlflow_client):
    # relu code and output, lr 1e6: Adam's first steps move every weight by ~1e6, and epoch 1's
    # mean loss (~1e25) is far past 1000 x the untrained model's (training.EXPLODED). (With
    # code_activation none the loss goes to NaN instead, the other way the stage stops.)
    blowup = {**TINY_MODELS["deep3"], "pixels": "0,1", "code_activation": "relu",
              "output_activation": "relu",
              "optimizer": {"name": "adam", "lr": 1.0e6, "weight_decay": 0.0}}
    # one process: both replicas diverge, and in workers whichever is seen first would fail
    set_params(project_copy, lambda p: (p["models"].update(blowup=blowup),
                                        p["train"].update(workers=1)))
    with pytest.raises(training.TrainingError, match=r"model blowup-r0: .* at epoch 1 .* "
                                                     r"the run diverged"):
        run_stage("train", key="blowup")
    assert not (project_copy / "data/models/blowup").exists()
    assert not (project_copy / "plots/curves/blowup.csv").exists()
    assert sorted(p.name for p in (project_copy / "data/models").iterdir()) == \
        sorted(p.name for p in (project.root / "data/models").iterdir())  # no temporary folder
    experiment = mlflow_client.get_experiment_by_name("aebench").experiment_id
    (parent,) = mlflow_client.search_runs([experiment], "attributes.run_name = 'blowup'")
    (child,) = mlflow_client.search_runs([experiment], "attributes.run_name = 'blowup-r0'")
    assert parent.info.status == child.info.status == "FAILED"


@pytest.fixture
def flaky_kind():
    """test_workers.FlakyConfig registered for one test; the registry restored after."""
    saved = dict(kinds.KINDS)
    kinds.register(FlakyConfig)
    yield
    kinds.KINDS.clear()
    for cls in saved.values():
        kinds.register(cls)


def test_a_failing_worker_fails_its_run_and_kills_the_running_ones(project, project_copy,
                                                                   mlflow_client, flaky_kind):
    # replica 0 trains "forever"; replica 1's worker is SIGKILLed at its first step (as the OOM
    # killer would): r1's run FAILED, r0's KILLED (stopped), the model's FAILED, nothing written
    entry = flaky("sigkill").model_dump()
    set_params(project_copy, lambda p: (p["models"].update(flaky=entry),
                                        p["train"].update(replicas=3)))
    with pytest.raises(workers.ReplicaError, match=r"^model flaky-r1: its worker process "
                                                   r"\(pid \d+\) was killed by SIGKILL") as err:
        run_stage("train", key="flaky")
    assert "\n" not in str(err.value)
    assert not (project_copy / "data/models/flaky").exists()
    assert not (project_copy / "plots/curves/flaky.csv").exists()
    assert sorted(p.name for p in (project_copy / "data/models").iterdir()) == \
        sorted(p.name for p in (project.root / "data/models").iterdir())  # no temporary folder
    experiment = mlflow_client.get_experiment_by_name("aebench").experiment_id
    runs = mlflow_client.search_runs([experiment], "attributes.run_name LIKE 'flaky%'")
    assert {r.info.run_name: r.info.status for r in runs} == \
        {"flaky": "FAILED", "flaky-r0": "KILLED", "flaky-r1": "FAILED"}


def test_ctrl_c_stops_every_worker_and_ends_the_runs_killed(project, project_copy,
                                                            mlflow_client):
    # A real `python -m stages.train`, and SIGINT to its process group as a terminal's Ctrl-C
    set_params(project_copy, lambda p: p["models"]["deep3"].update(epochs=MAX_EPOCHS))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AEBENCH_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *dvc_args("train", "deep3")],
                            cwd=project_copy, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    experiment = mlflow_client.get_experiment_by_name("aebench").experiment_id
    ours = f"tags.process LIKE '%:{proc.pid}'"  # the runs this process opened
    try:
        for _ in range(1200):  # until both workers run and replica 0's run is open
            kids = children(proc.pid)  # the workers: forks, with the stage's command line
            workers_ = list(kids)
            if len(workers_) == 2 and mlflow_client.search_runs(
                    [experiment], f"{ours} AND attributes.run_name = 'deep3-r0'"):
                break
            time.sleep(0.1)
        assert len(workers_) == 2, kids
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted: stages.train (SIGINT)", err
    assert "Traceback" not in err  # the workers ignore Ctrl-C: the parent stops them
    deadline = time.monotonic() + 30
    while any(map(alive, kids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, kids)), {pid: kids[pid] for pid in kids if alive(pid)}
    runs = mlflow_client.search_runs([experiment], ours)
    assert {r.info.run_name: r.info.status for r in runs} == \
        {"deep3": "KILLED", "deep3-r0": "KILLED"}
    assert sorted(p.name for p in (project_copy / "data/models").iterdir()) == \
        sorted(p.name for p in (project.root / "data/models").iterdir())  # no temporary folder


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the processes whose parent is `pid`."""
    kids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                kids[int(stat.parent.name)] = cmd
        except (OSError, ValueError, IndexError):
            pass
    return kids


def test_limit_above_the_rows_is_one_line_naming_train_limit(project_copy):
    set_params(project_copy, lambda p: p["train"].update(limit=61))  # the CSV has 60 rows
    with pytest.raises(ValueError, match=r"train\.limit") as err:
        run_stage("train", key="deep3")
    assert "\n" not in str(err.value) and "61" in str(err.value)


def test_unknown_model_and_bad_params_are_named(project_copy):
    with pytest.raises(ConfigError, match="models.nope: missing"):
        run_stage("train", key="nope")
    set_params(project_copy, lambda p: p["models"]["deep3"]["optimizer"].update(lr=0))
    with pytest.raises(ConfigError, match=r"models.deep3.optimizer.lr: 0 is not allowed"):
        run_stage("train", key="deep3")


def test_unusable_tracking_store_fails_before_training(project_copy, monkeypatch):
    shutil.rmtree(project_copy / "data/models/deep3")
    (project_copy / "plots/curves/deep3.csv").unlink()
    (project_copy / "blocker").write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project_copy / 'blocker/mlflow.db'}")
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking store"):
        run_stage("train", key="deep3")
    assert not (project_copy / "data/models/deep3").exists()
    assert not (project_copy / "plots/curves/deep3.csv").exists()


def test_cli_unwritable_output_fails_before_training(tmp_path, project_copy):
    # The one real `python -m stages.train` of the suite: exit code and stderr are the point.
    # (Running as root, a read-only folder would not stop the write: a path under a regular
    # file cannot be created by anyone.)
    (project_copy / "blocker").write_text("not a folder")
    store = tmp_path / "never" / "mlflow.db"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}
    env.pop("AEBENCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "stages.train", "deep3", "data/csv",
                           "blocker/sub/deep3", "plots/curves/deep3.csv"], cwd=project_copy,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: blocker/sub/deep3: cannot write this output (Not a directory)"), proc.stderr
    assert not store.parent.exists()  # failed before the MLflow store was even opened


def stage_process(root: Path, *argv: str, limit_bytes: int | None = None, uri: str | None = None,
                  before: str = "", **env: str) -> subprocess.Popen:
    """`python -m stages.train ARGV` (dvc.yaml's arguments for deep3 unless given) in `root`,
    as DVC would start it; `limit_bytes` sets a file-size limit (`ulimit -f`) for it, after
    the code in `before` has run (opening the store, say)."""
    argv = argv or ("deep3", "data/csv", "data/models/deep3", "plots/curves/deep3.csv")
    code = (f"import resource, sys\nfrom aebench import cli, tracking\nfrom stages import train\n"
            f"{before}\n")
    if limit_bytes:
        code += f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
    code += f"cli.run(train.main, train.USAGE, train.__doc__, {list(argv)!r})\n"
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **env}
    if uri:
        full_env["MLFLOW_TRACKING_URI"] = uri
    if "AEBENCH_DEBUG" not in env:
        full_env.pop("AEBENCH_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", code], cwd=root, env=full_env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def error_lines(stderr: str) -> list[str]:
    """stderr without the stage's progress: what a user reads when it fails."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("train@", "train deep3"))]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for folder in ("data/models", "plots/curves") for p in (root / folder).rglob("*")
            if p.is_file()}


def test_sigkill_mid_training_leaves_nothing_in_data_models_and_the_next_run_cleans(
        project_copy, capsys):
    before = snapshot(project_copy)
    set_params(project_copy, lambda p: p["models"]["deep3"].update(epochs=100_000))
    trainer = stage_process(project_copy)
    own = project_copy / ".dvc/tmp/aebench" / f"{socket.gethostname()}-{trainer.pid}"
    for _ in range(600):  # until its weights folder is being written: mid-training
        if own.is_dir() and any(p.name.startswith(".deep3.") for p in own.iterdir()):
            break
        time.sleep(0.1)
    trainer.kill()  # SIGKILL: no cleanup, no handler
    trainer.communicate()
    assert any(own.iterdir())  # the half-trained folder is there ...
    assert snapshot(project_copy) == before  # ... not in data/models or plots/curves
    set_params(project_copy, lambda p: p["models"]["deep3"].update(epochs=2))
    run_stage("train", key="deep3")
    assert not own.exists()
    assert f"removed what 1 killed run(s) left: {own}\n" in capsys.readouterr().err
    assert snapshot(project_copy) == before  # the same params: the same bytes


def test_file_size_limit_on_a_checkpoint_names_it_and_keeps_the_last_weights(project,
                                                                             project_copy):
    before = snapshot(project_copy)
    wide = {"encoder": [784, 2048, 3], "decoder": [3, 2048, 784], "epochs": 1}  # r0.pt: 12.9 MB
    set_params(project_copy, lambda p: p["models"]["deep3"].update(wide))
    store = Path(project.tracking_uri.removeprefix("sqlite:///"))
    limit = store.stat().st_size + 4_000_000  # the store may grow; the checkpoint may not
    assert limit < 12_000_000
    trainer = stage_process(project_copy, limit_bytes=limit)
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 1
    assert error_lines(err) == [
        "error: data/models/deep3/r0.pt: cannot write this output (File too large); a file-size "
        "limit (`ulimit -f`) is below its size: raise the limit"]
    assert snapshot(project_copy) == before
    assert list((project_copy / ".dvc/tmp/aebench").iterdir()) == []


@pytest.mark.parametrize("debug", [False, True])
def test_file_size_limit_while_mlflow_writes_names_the_store(project, project_copy, tmp_path,
                                                             debug):
    db = tmp_path / "mlflow.db"
    shutil.copy(project.tracking_uri.removeprefix("sqlite:///"), db)
    uri = f"sqlite:///{db}"
    # the store opened, then a limit far below its size: its next write fails (sqlite: EFBIG)
    trainer = stage_process(project_copy, limit_bytes=64_000, uri=uri,
                            before="tracking.open_store()",
                            **({"AEBENCH_DEBUG": "1"} if debug else {}))
    _, err = trainer.communicate(timeout=300)
    assert trainer.returncode == 1
    line = (f"error: MLflow tracking store {uri}: sqlite: disk I/O error; check the free space "
            f"and the file-size limit (`ulimit -f`) where {db} lies (AEBENCH_DEBUG=1 for the "
            "traceback)")
    if debug:  # MLflow's own report and the chain of exceptions
        assert "Traceback" in err and "SQLAlchemy database error" in err
        assert err.splitlines()[-1] == line
    else:
        assert error_lines(err) == [line]


def test_store_damaged_past_its_header_names_the_store(project, project_copy, tmp_path,
                                                       monkeypatch):
    db = tmp_path / "mlflow.db"
    shutil.copy(project.tracking_uri.removeprefix("sqlite:///"), db)
    with sqlite3.connect(db) as con:
        page = con.execute("select rootpage from sqlite_master where name = 'runs'").fetchone()[0]
        size = con.execute("pragma page_size").fetchone()[0]
    with open(db, "r+b") as f:  # the first page of the runs table, garbage
        f.seek((page - 1) * size)
        f.write(b"\xff" * size)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with pytest.raises(tracking.TrackingError) as err:  # found on open, before any training
        run_stage("train", key="deep3")
    assert str(err.value) == (
        f"MLflow tracking store sqlite:///{db}: damaged (sqlite's quick_check: *** in database "
        f"main *** Page {page}: btreeInitPage() returns error code 11); move {db} aside (the "
        "next run starts a new store) or put back a copy")


def test_a_batch_larger_than_the_training_set_is_warned_once(project_copy, capsys):
    set_params(project_copy, lambda p: p["models"]["deep3"].update(batch_size=64))
    run_stage("train", key="deep3")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [f"warning: params.yaml: models.deep3.batch_size 64 is larger than the "
                        f"{TRAIN_LIMIT} training images (train.limit {TRAIN_LIMIT}): every epoch "
                        f"is one batch of {TRAIN_LIMIT}"]


@pytest.mark.parametrize("section, key, value, message", [
    ("deep3", "epochs", 10**20, "models.deep3.epochs: 100000000000000000000 is not allowed; "
                                "Input should be less than or equal to 100000"),
    ("deep3", "replicas", 1000, "models.deep3.replicas: 1000 is not allowed; Input should be "
                                "less than or equal to 100"),
    ("train", "replicas", 101, "train.replicas: 101 is not allowed; Input should be less than or "
                               "equal to 100"),
    ("train", "seed", 2**64, "train.seed: 18446744073709551616 is not allowed; Input should be "
                             "less than or equal to 4294967295"),
    ("train", "limit", 10**20, "train.limit: 100000000000000000000 is not allowed; Input should "
                               "be less than or equal to 1000000000"),
])
def test_values_that_would_fail_late_fail_before_data_or_runs(project_copy, tmp_path,
                                                               monkeypatch, section, key, value,
                                                               message):
    target = (lambda p: p["train"]) if section == "train" else (lambda p: p["models"][section])
    set_params(project_copy, lambda p: target(p).update({key: value}))
    shutil.rmtree(project_copy / "data/csv")  # nothing may be read ...
    store = tmp_path / "never" / "mlflow.db"  # ... nor any run opened
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    with pytest.raises(ConfigError) as err:
        run_stage("train", key="deep3")
    assert str(err.value) == f"params.yaml: {message}"
    assert not store.parent.exists()


def test_a_model_name_too_long_for_a_file_name_fails_before_any_work(project_copy):
    name = "m" * 245  # a folder fits 255 bytes; its temporary .NAME.XXXXXXXX.tmp would not
    set_params(project_copy, lambda p: p["models"].update({name: p["models"]["deep3"]}))
    with pytest.raises(ConfigError, match=r"^params\.yaml: models: m{20}\.\.\. \(245 "
                                          r"characters\) is too long for a model name; use at "
                                          r"most 100 "):
        run_stage("train", name, "data/csv", f"data/models/{name}", f"plots/curves/{name}.csv")
