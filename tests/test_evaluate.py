"""The evaluate stage, in-process in a temporary folder, on tiny random models and data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from aebench import data, models, tracking
from stages import evaluate

REPO = Path(__file__).resolve().parents[1]
ARGS = ["csv", "data/models", "metrics/models.json"]


def cfg(kind="mlp", noise=0.0):
    base = {"kind": kind, "pixels": "-1,1", "input_noise": noise, "init": "torch",
            "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0}, "loss": "mse",
            "batch_size": 8, "epochs": 1, "activation": "relu", "output_activation": "tanh"}
    if kind == "mlp":
        return {**base, "encoder": [784, 8], "decoder": [8, 784], "code_activation": "none",
                "dropout": 0.0}
    return {**base, "channels": [1, 2, 2], "kernel": 3, "pool": 2}


MODELS = {"small": cfg(), "noisy": cfg("conv", noise=0.5)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store with a run per model (creating a sqlite store takes seconds)."""
    import mlflow

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        experiment = tracking.open_store()
        run_ids = {}
        for name in MODELS:
            with mlflow.start_run(experiment_id=experiment, run_name=name) as run:
                run_ids[name] = run.info.run_id
    return uri, run_ids


@pytest.fixture
def workdir(tmp_path, monkeypatch, store):
    """params.yaml, csv/mnist_test.csv and data/models/<name>/{weights.pt,run.json}; cwd there."""
    uri, run_ids = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"evaluate": {"noise_seed": 7}, "models": MODELS}, sort_keys=False))
    rng = np.random.default_rng(0)
    data.write_mnist_csv(tmp_path / "csv" / "mnist_test.csv",
                         rng.integers(0, 10, 30, dtype=np.uint8),
                         rng.integers(0, 256, (30, 784), dtype=np.uint8))
    for name, c in MODELS.items():
        torch.manual_seed(0)
        model_dir = tmp_path / "data" / "models" / name
        models.save_checkpoint(model_dir / "weights.pt", models.build_model(c), name, c)
        tracking.write_run_info(model_dir, {"run_id": run_ids[name], "device": "cpu",
                                            "train_seconds": 12.5, "samples_per_second": 4800.0})
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_evaluate_writes_metrics_and_logs_to_mlflow(workdir, store):
    import mlflow

    assert evaluate.main(ARGS) == 0
    out = workdir / "metrics" / "models.json"
    result = json.loads(out.read_text())
    assert list(result) == ["small", "noisy"]  # params order
    assert "denoise_mse" not in result["small"]
    assert {"denoise_mse", "noisy_input_mse"} <= set(result["noisy"])
    assert result["noisy"]["latent_dim"] == 2 * 12 * 12
    assert result["small"]["train_seconds"] == 12.5 and result["small"]["device"] == "cpu"
    assert result["small"]["test_loss"] == pytest.approx(4 * result["small"]["mse"], rel=1e-5)
    first = out.read_bytes()
    assert evaluate.main(ARGS) == 0
    assert out.read_bytes() == first  # same weights, byte-identical file

    run = mlflow.MlflowClient().get_run(store[1]["noisy"])
    logged = run.data.metrics
    assert logged["test_mse"] == pytest.approx(result["noisy"]["mse"], rel=1e-5)
    assert {"test_mse_digit_3", "test_denoise_mse", "test_loss", "n_params"} <= set(logged)


def test_missing_model_names_the_model(workdir):
    (workdir / "data/models/noisy/weights.pt").unlink()
    (workdir / "data/models/noisy/run.json").unlink()
    (workdir / "data/models/noisy").rmdir()
    with pytest.raises(FileNotFoundError, match="model 'noisy'"):
        evaluate.main(ARGS)


def test_missing_weights_file_names_the_model(workdir):
    (workdir / "data/models/small/weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="model 'small'"):
        evaluate.main(ARGS)


def test_garbage_weights_name_the_file(workdir):
    (workdir / "data/models/small/weights.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="data/models/small/weights.pt"):
        evaluate.main(ARGS)


def test_checkpoint_of_other_config_names_the_file(workdir):
    other = {**MODELS["small"], "encoder": [784, 4], "decoder": [4, 784]}
    models.save_checkpoint(workdir / "data/models/small/weights.pt",
                           models.build_model(other), "small", other)
    with pytest.raises(ValueError, match=r"data/models/small/weights.pt.*decoder, encoder"):
        evaluate.main(ARGS)


def test_run_missing_from_store_is_a_warning(workdir, capsys):
    tracking.write_run_info(workdir / "data/models/small", {"run_id": "0" * 32, "device": "cpu"})
    assert evaluate.main(ARGS) == 0
    assert "warning: small: test metrics not logged" in capsys.readouterr().err
    result = json.loads((workdir / "metrics/models.json").read_text())
    assert result["small"]["train_seconds"] is None


def test_cli_error_is_one_line_and_exit_1(workdir):
    (workdir / "data/models/small/weights.pt").write_bytes(b"garbage")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", *ARGS], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: data/models/small/weights.pt: not a valid")
    assert "Traceback" not in proc.stderr
