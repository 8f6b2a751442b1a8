"""The whole pipeline through DVC, in a temporary copy of the repository, on small generated data.

The download stage verifies the real MNIST checksums, which generated files cannot match, so the
test writes its own IDX files into data/raw and records them with `dvc commit download`; every
later stage then runs for real: convert, train@<model> (one epoch each), pca, evaluate, figures,
report, with MLflow at its default location (sqlite:///<copy>/mlflow.db).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_idx_set

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.e2e


def sh(cwd: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MNIST_MIRROR")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # `python` in dvc.yaml is this venv's
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def copy_repo(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    for rel in ("dvc.lock", "metrics", "plots", "reports"):  # start from nothing, not main's run
        path = dest / rel
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    return dest


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = copy_repo(tmp_path_factory.mktemp("repo"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for cfg in params["models"].values():
        cfg["epochs"] = 1
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_idx_set(repo / "data" / "raw", n_train=120, n_test=40, gz=False)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "config", "user.email", "test@example.com")
    sh(repo, "git", "config", "user.name", "test")
    sh(repo, "dvc", "commit", "-f", "download")
    sh(repo, "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-q", "-m", "baseline")
    return repo


def test_every_model_is_trained_evaluated_and_recorded(repo):
    names = list(yaml.safe_load((repo / "params.yaml").read_text())["models"])
    metrics = json.loads((repo / "metrics" / "models.json").read_text())
    assert list(metrics) == names
    for name in names:
        ckpt = torch.load(repo / "data" / "models" / name / "weights.pt", weights_only=True)
        assert ckpt["name"] == name and ckpt["state_dict"]
        curve = (repo / "plots" / "curves" / f"{name}.csv").read_text().splitlines()
        assert curve[0].startswith("epoch,") and len(curve) == 2
        assert 0 < metrics[name]["mse"] < 1
    assert set(json.loads((repo / "metrics" / "pca.json").read_text()))
    pngs = list((repo / "plots" / "figures").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    report = (repo / "reports" / "summary.md").read_text()
    assert all(name in report for name in names)

    db = sqlite3.connect(repo / "mlflow.db")
    runs = dict(db.execute("select name, run_uuid from runs where status = 'FINISHED'"))
    assert set(runs) == set(names)
    for run_id in runs.values():
        keys = {k for (k,) in db.execute("select key from params where run_uuid=?", (run_id,))}
        assert {"optimizer.lr", "batch_size", "train.seed", "device"} <= keys
        steps = db.execute("select step from metrics where run_uuid=? and key='test_mse'",
                           (run_id,)).fetchall()
        assert set(steps) == {(1,)}  # one epoch at step=epoch; evaluate's final value at it too
        evaluated = {k for (k,) in db.execute("select key from latest_metrics where run_uuid=?",
                                              (run_id,))}
        assert "test_sse_per_image" in evaluated
    logged = {n for (n,) in db.execute("select name from logged_models")}
    assert logged == {"model"} and db.execute("select count(*) from logged_models").fetchone()[0] \
        == len(names)


def test_nothing_reruns_when_nothing_changed(repo):
    out = sh(repo, "dvc", "repro")
    assert "Running stage" not in out


def test_one_param_change_retrains_and_rescores_only_that_model(repo):
    out = sh(repo, "dvc", "exp", "run", "-S", "models.under30.epochs=2")
    trained = sorted(line.split("'")[1] for line in out.splitlines()
                     if line.startswith("Running stage 'train@"))
    assert trained == ["train@under30"]
    params = json.loads(sh(repo, "dvc", "params", "diff", "--json"))
    changed = params["params.yaml"]
    assert list(changed) == ["models.under30.epochs"]
    assert (changed["models.under30.epochs"]["old"], changed["models.under30.epochs"]["new"]) \
        == (1, 2)
    diff = json.loads(sh(repo, "dvc", "metrics", "diff", "--json"))["metrics/models.json"]
    changed_models = {key.split(".")[0] for key in diff}
    assert changed_models == {"under30"}
