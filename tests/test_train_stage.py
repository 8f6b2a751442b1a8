"""The train stage: the session's project (conftest) trained deep3 and convnoisy in-process, two
replicas each; these tests read what it wrote, and run the failures on copies of it."""

from __future__ import annotations

import csv
import os
import shutil
import signal
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
from aebench.config import ConfigError

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
    set_params(project_copy, lambda p: p["models"]["deep3"].update(epochs=10**6))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AEBENCH_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "stages.train", *dvc_args("train", "deep3")],
                            cwd=project_copy, env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    experiment = mlflow_client.get_experiment_by_name("aebench").experiment_id
    ours = f"tags.process LIKE '%:{proc.pid}'"  # the runs this process opened
    try:
        for _ in range(1200):  # until both workers run and replica 0's run is open
            kids = children(proc.pid)  # the workers, and multiprocessing's resource tracker
            workers_ = [pid for pid, cmd in kids.items() if "spawn_main" in cmd]
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
    deadline = time.monotonic() + 30  # multiprocessing's tracker ends when the pipe closes
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
