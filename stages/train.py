"""Stage train@NAME: train one model of params.yaml and record it in MLflow.

    python -m stages.train NAME CSV_DIR MODEL_DIR CURVE_CSV

Reads params.yaml sections `train` and `models.NAME`. Writes MODEL_DIR/weights.pt (state_dict +
config), MODEL_DIR/run.json (MLflow run id, device, seconds) and CURVE_CSV (one row per epoch).
Nothing is written unless training finishes with finite losses.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from aebench import config, data, models, tracking, training
from aebench.files import write_csv_rows


def log_to_mlflow(name, cfg, train_params, model, history, example):
    """Per-epoch metrics (step = epoch), timing, and the model with a signature and example."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.models import infer_signature

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, rec["epoch"])
               for rec in history.epochs for key, value in rec.items() if key != "epoch"]
    mlflow.MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics)
    mlflow.log_metrics({"train_seconds": history.seconds,
                        "samples_per_second": history.samples_per_second})
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.pytorch.log_model(
        model, name="model", signature=infer_signature(example, output), input_example=example,
        code_paths=[str(Path(models.__file__).parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    name, csv_dir, model_dir, curve_path = argv[0], Path(argv[1]), Path(argv[2]), Path(argv[3])
    params = config.load_params("params.yaml")
    train_params = config.validate_train(params.get("train"))
    all_models = params.get("models") or {}
    if name not in all_models:
        raise config.ConfigError(f"params.yaml: models.{name}: missing; models in params.yaml: "
                                 f"{', '.join(all_models) or 'none'}")
    cfg = config.validate_model(name, all_models[name])

    experiment_id = tracking.open_store()  # fails here, before any training, if unusable
    _, train_x = data.read_mnist_csv(csv_dir / "mnist_train.csv", train_params["limit"] or None)
    _, test_x = data.read_mnist_csv(csv_dir / "mnist_test.csv")
    device = training.pick_device(train_params["device"])
    print(f"train@{name}: {len(train_x)} training images, device {device}, "
          f"path {train_params['path']}", file=sys.stderr)

    torch.manual_seed(train_params["seed"])
    model = models.build_model(cfg)

    import mlflow

    with mlflow.start_run(experiment_id=experiment_id, run_name=name,
                          tags=tracking.run_tags(f"train@{name}")) as run:
        mlflow.log_params({**config.flatten(cfg), **config.flatten(train_params, "train."),
                           "n_train": len(train_x), "device": str(device)})
        history = training.train(model, cfg, torch.from_numpy(train_x), torch.from_numpy(test_x),
                                 device=device, seed=train_params["seed"],
                                 path=train_params["path"], name=name)
        model = model.cpu().eval()
        mlflow.set_tag("train_path", history.path)
        example = models.to_model_scale(torch.from_numpy(test_x[:2]), cfg["pixels"]).numpy()
        log_to_mlflow(name, cfg, train_params, model, history, example)
        run_id, run_experiment = run.info.run_id, run.info.experiment_id

    models.save_checkpoint(model_dir / "weights.pt", model, name, cfg)
    tracking.write_run_info(model_dir, {
        "run_id": run_id, "experiment_id": run_experiment,
        "tracking_uri": mlflow.get_tracking_uri(),
        "device": str(device), "train_path": history.path, "train_seconds": history.seconds,
        "samples_per_second": history.samples_per_second, "epochs": cfg["epochs"],
        "n_train": len(train_x)})
    write_csv_rows(curve_path, history.epochs)
    final = history.final
    print(f"train@{name}: {cfg['epochs']} epochs in {history.seconds:.1f} s on {device}; "
          f"train loss {final['train_loss']:.4f} ({cfg['loss']}, last batch "
          f"{final['train_loss_last_batch']:.4f}), test MSE {final['test_mse']:.5f}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (config.ConfigError, tracking.TrackingError, training.TrainingError, ValueError,
            FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
