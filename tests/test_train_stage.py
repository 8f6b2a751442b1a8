"""stages/train.py in-process, on the small CSVs of conftest, with MLflow in a temporary store."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from aebench import tracking
from aebench.config import ConfigError
from stages import train as train_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path, mnist_csv, monkeypatch):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for cfg in params["models"].values():
        cfg["epochs"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(mnist_csv, tmp_path / "data" / "csv")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def run_stage(name):
    return train_stage.main([name, "data/csv", f"data/models/{name}", f"plots/curves/{name}.csv"])


def test_writes_weights_run_info_and_curve(workdir):
    assert run_stage("sigmoid100") == 0
    ckpt = torch.load("data/models/sigmoid100/weights.pt", weights_only=True)
    assert ckpt["config"]["loss"] == "half_mse"
    info = json.loads(Path("data/models/sigmoid100/run.json").read_text())
    assert info["device"] == "cpu" and info["train_seconds"] > 0 and info["n_train"] == 30
    rows = Path("plots/curves/sigmoid100.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,train_loss_last_batch,test_mse" and len(rows) == 3

    import mlflow

    run = mlflow.get_run(info["run_id"])
    assert run.info.run_name == "sigmoid100" and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["device"] == "cpu"
    assert run.data.tags["dvc_stage"] == "train@sigmoid100"
    experiment = mlflow.get_experiment(run.info.experiment_id)
    assert experiment.name == "aebench"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    history = mlflow.MlflowClient().get_metric_history(info["run_id"], "test_mse")
    assert [m.step for m in history] == [1, 2]


def test_same_seed_same_weights(workdir):
    run_stage("under30")
    first = torch.load("data/models/under30/weights.pt", weights_only=True)["state_dict"]
    shutil.rmtree("data/models/under30")
    run_stage("under30")
    second = torch.load("data/models/under30/weights.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_limit_trains_on_the_first_images(workdir):
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["train"]["limit"] = 10
    Path("params.yaml").write_text(yaml.safe_dump(params))
    run_stage("under30")
    assert json.loads(Path("data/models/under30/run.json").read_text())["n_train"] == 10


def test_unusable_tracking_store_fails_before_training(workdir, monkeypatch):
    Path("blocker").write_text("a file where the store's folder should be")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'blocker' / 'mlflow.db'}")
    with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking store"):
        run_stage("under30")
    assert not Path("data/models").exists() and not Path("plots").exists()


def test_nan_loss_writes_no_weights(workdir, monkeypatch):
    real_build = train_stage.models.build_model

    def poisoned(cfg):
        model = real_build(cfg)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(train_stage.models, "build_model", poisoned)
    with pytest.raises(train_stage.training.TrainingError, match="under30.*epoch 1"):
        run_stage("under30")
    assert not Path("data/models/under30").exists()
    assert not Path("plots/curves/under30.csv").exists()


def test_unknown_model_and_bad_params_are_named(workdir):
    with pytest.raises(ConfigError, match="models.nope: missing"):
        run_stage("nope")
    params = yaml.safe_load(Path("params.yaml").read_text())
    bad = copy.deepcopy(params)
    bad["models"]["under30"]["optimizer"]["lr"] = 0
    Path("params.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match=r"models.under30.optimizer.lr: 0 is not allowed"):
        run_stage("under30")


def test_runs_from_a_dvc_temp_copy_land_in_the_working_copy(monkeypatch):
    root = Path("/home/u/project")
    assert tracking.working_copy_root(root / ".dvc/tmp/exps/tmpab12/") == root
    assert tracking.working_copy_root(root) == root
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(root / ".dvc/tmp/exps/tmpab12") == \
        "sqlite:////home/u/project/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(root) == "http://127.0.0.1:5000"
