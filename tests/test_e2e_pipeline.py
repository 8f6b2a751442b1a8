"""The whole pipeline through DVC, in temporary copies of the repository, on small generated data.

The download stage verifies the real MNIST checksums, which generated files cannot match, so each
copy gets its own IDX files in data/raw, recorded with `dvc commit download`; every later stage
then runs for real: convert, train@<model>, score@<model>, pca, evaluate, figures, report, with
MLflow at its default location (sqlite:///<copy>/mlflow.db). Two models keep it quick: an mlp
with two replicas and a conv model trained on noisy inputs with one. Two copies run side by side
in two folders, and every output must come out byte for byte the same (run ids, times and paths
stay out of them; numbers are rounded to 6 significant digits; training is deterministic on the
CPU).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import write_idx_set

from aebench.smoke import copy_repo

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e
MODELS = {"under30": {"replicas": 2}, "conv16": {"replicas": 1, "input_noise": 0.5}}
OUTPUTS = ("dvc.lock", "data/models", "data/scores", "metrics", "plots/curves",
           "plots/pca_curve.csv", "plots/figures", "plots/test_mse_by_epoch.csv", "reports")


def env(warm: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNIST_MIRROR")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml is this venv's
    env["OMP_NUM_THREADS"] = "1"  # two pipelines side by side on two cores; tiny models
    env["AEBENCH_WARM"] = "1" if warm else "0"  # stages forked from a warm server, or not
    return env


def as_from_a_shell() -> None:
    """In a child before exec: every signal unblocked, SIGHUP, SIGINT and SIGTERM at their
    defaults, as a shell starts a command. Under xdist the worker that runs this file has at
    times had SIGHUP ignored (seen in DVC's /proc status; cause not found), which a process
    keeps across exec, so a warm server started from it ignored SIGTERM and so did its stage,
    and the kill tests saw a training outlive `dvc repro`'s SIGTERM."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True, timeout=900,
                          preexec_fn=as_from_a_shell)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def prepare(dest: Path) -> Path:
    repo = copy_repo(dest)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"]["limit"] = 0
    # One process per training: two workers would start two more interpreters (torch, seconds
    # of imports each) for a second of training. The worker path: test_workers.py, conftest's
    # project (workers 2) and the kill test below (workers 2).
    params["train"]["workers"] = 1
    params["models"] = {name: {**params["models"][name], "epochs": 1, **extra}
                        for name, extra in MODELS.items()}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_idx_set(repo / "data" / "raw", n_train=120, n_test=40, gz=False)
    sh(repo, "dvc", "commit", "-f", "download")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "small params")
    return repo


def files_under(root: Path) -> dict[str, bytes]:
    out = {}
    for rel in OUTPUTS:
        path = root / rel
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            out[str(f.relative_to(root))] = f.read_bytes()
    return out


def side_by_side(*commands: tuple[Path, list[str]], warm=(True, True)) -> list[str]:
    """Run each (folder, command) at once (the machine has two cores), warm or not (as
    `warm` says, in the same order); their outputs."""
    runs = [subprocess.Popen(cmd, cwd=cwd, env=env(on), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, preexec_fn=as_from_a_shell)
            for (cwd, cmd), on in zip(commands, warm, strict=True)]
    outs = [run.communicate(timeout=900)[0] for run in runs]
    for run, out in zip(runs, outs, strict=True):
        assert run.returncode == 0, out
    return outs


@pytest.fixture(scope="module")
def repos(memory_path_factory) -> Iterator[dict]:
    """Two copies with the pipeline run once each, side by side, the first with its stages
    forked from a warm server (aebench.warm), the second each in a process of its own
    (AEBENCH_WARM=0); their outputs are saved; then, again side by side, an experiment with
    one param changed in the first and a plain `dvc repro` (nothing changed) in the second.

    In memory (conftest's memory_path_factory)."""
    a, b = memory_path_factory("a"), memory_path_factory("b")
    try:
        yield run_both(a, b)
    finally:  # the warm servers of both copies, before their folders go
        for repo in (a, b):
            subprocess.run([sys.executable, "-m", "aebench.warm", "--stop"], cwd=repo,
                           env=env(), capture_output=True, timeout=60)


def run_both(a: Path, b: Path) -> dict:
    a, b = prepare(a), prepare(b)
    side_by_side((a, ["dvc", "repro"]), (b, ["dvc", "repro"]), warm=(True, False))
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-q", "-m", "baseline")
    outputs = (files_under(a), files_under(b))
    aliases = registry_aliases(a)
    exp, rerun = side_by_side((a, ["dvc", "exp", "run", "-S", "models.under30.epochs=2"]),
                              (b, ["dvc", "repro"]))
    return {"a": a, "b": b, "outputs": outputs, "exp": exp, "rerun": rerun,
            "aliases_before_exp": aliases}


def registry_aliases(repo: Path) -> dict:
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as db:
        return {(name, alias): version for name, alias, version in db.execute(
            "select name, alias, version from registered_model_aliases")}


def test_every_model_is_trained_evaluated_and_recorded(repos):
    repo = repos["b"]  # as the first run left it
    headline = {p.stem: json.loads(p.read_text()) for p in (repo / "metrics").iterdir()}
    assert sorted(headline) == sorted(MODELS)
    assert headline["under30"]["n"] == 2 and headline["conv16"]["n"] == 1
    assert set(headline["under30"]) == {"mse", "sse_per_image", "test_loss", "n", "pca_mse"}
    assert all(0 < m["mse"]["mean"] < 1 for m in headline.values())
    assert headline["conv16"]["mse"]["std"] == 0
    assert sorted(p.name for p in (repo / "data" / "models" / "under30").iterdir()) \
        == ["r0.pt", "r1.pt"]
    curve = (repo / "plots" / "curves" / "under30.csv").read_text().splitlines()
    assert curve[0] == "epoch,test_mse,test_mse_std,train_loss,train_loss_std" and len(curve) == 2
    assert "pca_mse" not in headline["conv16"]  # a code of 2304: PCA is exact
    details = json.loads((repo / "reports" / "details.json").read_text())
    assert "denoise_mse" in details["conv16"]["mean"] and len(details["under30"]["replicas"]) == 2
    pngs = list((repo / "plots" / "figures").glob("*.png"))
    assert len(pngs) == 8 and all(p.stat().st_size > 1000 for p in pngs)
    report = (repo / "reports" / "summary.md").read_text()
    assert all(name in report for name in MODELS) and "## Denoising" in report

    db = sqlite3.connect(repo / "mlflow.db")
    runs = {name: status for name, status in db.execute("select name, status from runs")}
    assert {"under30", "under30-r0", "under30-r1", "conv16", "conv16-r0", "evaluate",
            "under30-r0-eval", "figures"} <= set(runs)
    assert set(runs.values()) == {"FINISHED"}
    logged = sorted(n for (n,) in db.execute("select name from logged_models"))
    assert logged == ["conv16-r0", "under30-r0", "under30-r1"]
    train_keys = {k for (k,) in db.execute(
        "select m.key from metrics m join runs r on m.run_uuid = r.run_uuid "
        "where r.name = 'under30-r0'")}
    assert "test_mse" in train_keys and not any(k.startswith("test_sse") for k in train_keys)
    # registered: one version per replica, @r{i} from train, @best from evaluate
    aliases = {(name, alias): version for name, alias, version in db.execute(
        "select name, alias, version from registered_model_aliases")}
    assert set(aliases) == {("aebench-under30", "r0"), ("aebench-under30", "r1"),
                            ("aebench-under30", "best"), ("aebench-conv16", "r0"),
                            ("aebench-conv16", "best")}
    best = min((r["mse"], i) for i, r in enumerate(details["under30"]["replicas"]))[1]
    assert aliases[("aebench-under30", "best")] == aliases[("aebench-under30", f"r{best}")]
    # the evaluate run holds the headline (a child per model) and, from the report stage, the
    # report; each training run the final test MSE, the curve's last row
    def latest(run):
        return dict(db.execute("select m.key, m.value from latest_metrics m join runs r on "
                               "m.run_uuid = r.run_uuid where r.name = ?", (run,)))

    assert latest("under30-eval")["test_mse"] == \
        pytest.approx(headline["under30"]["mse"]["mean"], rel=1e-5)
    last = dict(zip(curve[0].split(","), map(float, curve[-1].split(",")), strict=True))
    assert latest("under30")["final/test_mse"] == last["test_mse"]
    assert latest("under30")["final/test_mse_std"] == last["test_mse_std"]
    (note,) = db.execute("select t.value from tags t join runs r on t.run_uuid = r.run_uuid "
                         "where r.name = 'evaluate' and t.key = 'mlflow.note.content'").fetchone()
    assert note.endswith(report)
    assert (repo / ".mlflow-last-store").read_text() == f"sqlite:///{repo}/mlflow.db\n"


def test_two_folders_warm_and_cold_give_the_same_bytes(repos):
    a, b = repos["outputs"]  # a's stages forked from a warm server, b's each its own process
    # dvc.lock, 3 weights, 2 scores, 2+2+1 csv/json, 8 PNG, 2 reports
    assert len(a) >= 21 and sorted(a) == sorted(b)
    different = [name for name in a if a[name] != b[name]]
    assert different == []


def test_nothing_reruns_when_nothing_changed(repos):
    assert "Running stage" not in repos["rerun"]


def test_one_param_change_retrains_and_rescores_only_that_model(repos):
    repo, out = repos["a"], repos["exp"]
    ran = sorted(line.split("'")[1] for line in out.splitlines()
                 if line.startswith("Running stage"))
    assert ran == ["evaluate", "figures", "report", "score@under30", "train@under30"]
    params = json.loads(sh(repo, "dvc", "params", "diff", "--json"))["params.yaml"]
    assert list(params) == ["models.under30.epochs"]
    assert (params["models.under30.epochs"]["old"], params["models.under30.epochs"]["new"]) \
        == (1, 2)
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json"))
    assert list(diff) == ["metrics/under30.json"]  # one file per model: only under30's changed
    assert set(diff["metrics/under30.json"]) >= {"mse.mean", "mse.std"}


def test_the_experiment_registers_its_models_and_moves_no_alias(repos):
    # `dvc exp run` sets DVC_EXP_NAME in its stage commands: the retrained under30's versions
    # are registered, tagged with the experiment; @r0, @r1 and @best stay on the committed run's
    repo = repos["a"]
    assert registry_aliases(repo) == repos["aliases_before_exp"]
    with contextlib.closing(sqlite3.connect(repo / "mlflow.db")) as db:
        tagged = dict(db.execute("select version, value from model_version_tags where name = "
                                 "'aebench-under30' and key = 'dvc_exp_name'"))
    assert sorted(tagged) == [3, 4] and len(set(tagged.values())) == 1  # its 2 replicas
    assert not set(tagged) & set(repos["aliases_before_exp"].values())


def test_compare_pairs_the_experiment_by_seed(repos):
    out = sh(repos["a"], sys.executable, "-m", "aebench", "compare")  # HEAD vs the experiment
    lines = out.splitlines()
    assert lines[0].startswith("**A** = ") and lines[0].endswith(" (HEAD) → **B** = workspace")
    assert lines[2].startswith("- **under30**: ") and lines[3] == "- 1 model bit-identical: conv16"
    under30 = next(line for line in lines if line.startswith("| under30 |"))
    assert "| paired |" in under30  # two replicas, seeds 0 and 1, on both sides


def processes_in(repo: Path) -> dict[int, str]:
    """{pid: command line} of every process working in `repo`: dvc, the stage's command, the
    stage (forked from a warm server, it has the server's command line) and its workers."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cwd").resolve() == repo.resolve():
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ")\
                    .decode()
        except OSError:  # gone meanwhile, or not ours to see
            pass
    return found


def test_killing_dvc_repro_stops_the_trainer_and_changes_no_committed_file(repos):
    repo = repos["b"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["under30"]["epochs"] = 500  # long enough to be killed mid-training
    params["train"]["workers"] = 2  # its two replicas in two workers, whatever the cores
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "results and a long under30")
    db = sqlite3.connect(repo / "mlflow.db")
    before = db.execute("select count(*) from runs").fetchone()[0]
    weights = files_under(repo)
    sh(repo, "python", "-m", "aebench.warm", "--start")  # the stage runs in the server's fork
    dvc = subprocess.Popen(["dvc", "repro", "train@under30"], cwd=repo, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           preexec_fn=as_from_a_shell)
    wait_for_training(db)
    assert any("aebench.warm --serve" in cmd for cmd in processes_in(repo).values())
    for _ in range(600):  # and both workers have started (their imports take seconds)
        if len(workers_in(repo)) == 2:
            break
        time.sleep(0.1)
    assert len(workers_in(repo)) == 2, processes_in(repo)
    dvc.terminate()  # SIGTERM to dvc alone: DVC does not forward it to the stage
    dvc.wait(timeout=30)
    # the trainer notices its parent is gone and stops within seconds, its workers with it
    assert gone(repo), processes_in(repo)
    assert sh(repo, "git", "status", "--porcelain") == ""  # no committed file changed or lost
    new = dict(db.execute("select name, status from runs order by start_time")
               .fetchall()[before:])
    assert new == {"under30": "KILLED", "under30-r0": "KILLED"}
    assert files_under(repo) == weights  # data/models is persist: DVC did not delete it first
    assert no_temporaries(repo)


def workers_in(repo: Path) -> list[int]:
    """Pids of the worker processes training in `repo`: forks of the stage (its command line)
    with no children of their own. The stage, a fork of the warm server, has the server's
    command line too, but once its workers run it has children."""
    procs = processes_in(repo)
    parent = {}
    for pid in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            parent[pid] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return [pid for pid, ppid in parent.items()
            if procs.get(ppid) == procs[pid] and pid not in parent.values()]


def gone(repo: Path) -> bool:
    """Whether every process working in `repo` has ended, within 30 s."""
    for _ in range(300):
        if not processes_in(repo):
            return True
        time.sleep(0.1)
    return False


def wait_for_training(db: sqlite3.Connection) -> None:
    """Until replica 0's MLflow run of under30 is RUNNING: the trainer is training."""
    for _ in range(600):
        if db.execute("select count(*) from runs where name = 'under30-r0' and status = "
                      "'RUNNING'").fetchone()[0]:
            return
        time.sleep(0.1)
    raise AssertionError("under30 never started training")


def no_temporaries(repo: Path) -> bool:
    """Nothing a run left in .dvc/tmp/aebench, nor in a folder a stage depends on."""
    temp = repo / ".dvc/tmp/aebench"
    return (not temp.exists() or not any(temp.iterdir())) and \
        sorted(p.name for p in (repo / "data/models").iterdir()) == sorted(MODELS)


def status_of(repo: Path, stage: str) -> list:
    return json.loads(sh(repo, "dvc", "status", "--json", stage).strip() or "{}").get(stage, [])


def test_an_interrupted_or_failed_retrain_keeps_the_last_weights(repos):
    repo = repos["b"]  # under30 at 500 epochs: its trainer runs long enough to be interrupted
    weights = files_under(repo)
    db = sqlite3.connect(repo / "mlflow.db")
    sh(repo, "python", "-m", "aebench.warm", "--start")  # the stage runs in the server's fork
    # Ctrl-C in the terminal: SIGINT to DVC and the stage's command, their process group
    dvc = subprocess.Popen(["dvc", "repro", "train@under30"], cwd=repo, env=env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True, preexec_fn=as_from_a_shell)
    wait_for_training(db)
    assert any("aebench.warm --serve" in cmd for cmd in processes_in(repo).values())
    os.killpg(dvc.pid, signal.SIGINT)
    assert dvc.wait(timeout=60) != 0
    assert gone(repo), processes_in(repo)  # the stage's workers too
    assert files_under(repo) == weights and no_temporaries(repo)
    # a retrain that diverges (relu outputs, lr 1e6: the loss explodes at epoch 2)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["models"]["under30"].update(
        epochs=3, pixels="0,1", activation="relu", code_activation="relu",
        output_activation="relu", optimizer={"name": "adam", "lr": 1.0e6, "weight_decay": 0.0})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    failed = subprocess.run(["dvc", "repro", "train@under30"], cwd=repo, env=env(),
                            capture_output=True, text=True, timeout=600,
                            preexec_fn=as_from_a_shell)
    assert failed.returncode != 0 and "the run diverged" in failed.stderr + failed.stdout
    assert files_under(repo) == weights and no_temporaries(repo)
    # DVC sees new params, and the weights it recorded still in place (not "deleted")
    assert [next(iter(change)) for change in status_of(repo, "train@under30")] == \
        ["changed deps"]
