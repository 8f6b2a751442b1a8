"""Stage evaluate: every model of params.yaml on the 10,000 test images, on one common scale.

    python -m stages.evaluate CSV_DIR MODELS_DIR METRICS_JSON

Reads params.yaml sections `models` and `evaluate` (noise_seed). Loads MODELS_DIR/<name>/
weights.pt and run.json for every model, writes METRICS_JSON ({name: metrics}, in params order)
and adds the test metrics to the MLflow run that trained each model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from aebench import config, data, files, metrics, models, tracking


def load_trained(models_dir: Path, models_cfg: dict) -> dict:
    """{name: (model, run_info)} for every model, all checked before any evaluation starts."""
    loaded = {}
    for name, cfg in models_cfg.items():
        model_dir = models_dir / name
        if not model_dir.is_dir():
            raise FileNotFoundError(f"{model_dir}: missing; model {name!r} has not been trained "
                                    f"(run `dvc repro train@{name}`)")
        model = models.load_checkpoint(model_dir / "weights.pt", name, expected_cfg=cfg)
        loaded[name] = model, tracking.read_run_info(model_dir)
    return loaded


def log_test_metrics(results: dict, loaded: dict, models_cfg: dict) -> None:
    """Add each model's test metrics to its training run, at the last epoch's step: `test_mse`
    then ends the per-epoch curve that training logged."""
    for name, result in results.items():
        extra = {"n_params": result["params"], "latent_dim": result["latent_dim"]}
        tracking.log_to_run(loaded[name][1]["run_id"], step=models_cfg[name]["epochs"],
                            metrics={**metrics.flat_metrics(result), **extra},
                            what=f"{name}: test metrics")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    csv_dir, models_dir, out_path = Path(argv[0]), Path(argv[1]), Path(argv[2])
    params = config.load_params("params.yaml")
    models_cfg = config.validate_models(params.get("models"))
    seed = config.validate_evaluate(params.get("evaluate"))["noise_seed"]

    loaded = load_trained(models_dir, models_cfg)
    tracking.open_store()  # an unusable store fails here, before the evaluation
    labels, pixels = data.read_mnist_csv(csv_dir / "mnist_test.csv")
    results = {}
    for name, (model, info) in loaded.items():
        result = metrics.evaluate_model(model, models_cfg[name], labels, pixels, seed)
        result.update({k: info.get(k) for k in ("train_seconds", "samples_per_second", "device")})
        results[name] = result
        print(f"evaluate: {name}: mse {result['mse']:.5f}, sse/image "
              f"{result['sse_per_image']:.2f}", file=sys.stderr)
    files.write_json(out_path, metrics.rounded(results))
    log_test_metrics(results, loaded, models_cfg)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (config.ConfigError, tracking.TrackingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
