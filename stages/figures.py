"""Stage figures: the comparison figures of every model in params.yaml.

    python -m stages.figures CSV_DIR MODELS_DIR MODELS_JSON PCA_JSON CURVES_DIR PCA_CURVE OUT_DIR

Reads params.yaml sections `models` and `evaluate` (noise_seed). Loads every model from
MODELS_DIR/<name>/weights.pt, reads the metrics, the training curves and the PCA curve, and
writes every PNG of FIGURES into OUT_DIR (all of them, always: a figure with nothing to show
says why). Then logs each PNG to the MLflow run of every model it shows (artifact path
"figures"); a run missing from this store is a warning, as in `evaluate`.

The digits are fixed so that two commits' figures compare: the first test image of each digit
0..9 and the first 15 test images; the latent-space scatter uses the first 2,000 test images;
the denoising figure draws its noise from evaluate.noise_seed.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from aebench import config, data, figures, models, tracking

FIGURES = {
    "reconstructions.png": "originals, then each model's reconstruction of the same test digits",
    "denoising.png": "noisy input / output / clean rows of each denoising model",
    "training_curves.png": "test MSE per epoch, and training loss in each source's own scale",
    "test_mse.png": "test MSE bars beside PCA at the same latent size and the 2006 reference",
    "pca_curve.png": "PCA test MSE by number of components, each model at its latent size",
    "encoder_weights.png": "first-layer encoder weights of the fully connected models",
    "latent_space.png": "test codes projected to 2-D by PCA, coloured by digit",
    "image_7777.png": "training image 7777 before and after deep3 (seed 000)",
}
TRAIN_IMAGE = 7777          # seed 000's image
TRAIN_IMAGE_MODEL = "deep3"  # seed 000's model
LATENT_N = 2000              # the first 2,000 test images in the latent-space scatter


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` first") from None


def read_columns(path: Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Named numeric columns of a CSV file with a header."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` first") from None
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no rows or no column(s) {', '.join(missing)}")
    return {c: np.array([float(r[c]) for r in rows]) for c in columns}


def loss_label(cfg: dict) -> str:
    scale = "[-1,1]" if cfg["pixels"] == "-1,1" else "[0,1]"
    text = {"mse": f"MSE on {scale}", "half_mse": f"0.5 x MSE on {scale}",
            "bce": "BCE on [0,1]"}[cfg["loss"]]
    return text + (", noisy inputs" if cfg["input_noise"] > 0 else "")


def pca_mse_at(pca: dict, curve: dict[str, np.ndarray], k: int) -> float | None:
    """PCA test mse with k components: pca.json's entry, else the PCA curve's row."""
    for entry in pca.values():
        if isinstance(entry, dict) and entry.get("latent_dim") == k and "mse" in entry:
            return float(entry["mse"])
    hit = np.flatnonzero(curve["components"] == k)
    return float(curve["test_mse"][hit[0]]) if hit.size else None


def load_models(models_dir: Path, models_cfg: dict) -> dict[str, nn.Module]:
    loaded = {}
    for name, cfg in models_cfg.items():
        if not (models_dir / name).is_dir():
            raise FileNotFoundError(f"{models_dir / name}: missing; model {name!r} has not been "
                                    f"trained (run `dvc repro train@{name}`)")
        loaded[name] = models.load_checkpoint(models_dir / name / "weights.pt", name, cfg)
    return loaded


def _unit(model: nn.Module, x: np.ndarray, cfg: dict, **noise) -> np.ndarray:
    return models.reconstruct(model, torch.from_numpy(x), cfg["pixels"], **noise).numpy()


def draw(out_dir: Path, cfgs: dict, nets: dict, metrics: dict, pca: dict, pca_curve: dict,
         curves: dict, test: tuple, train: tuple, seed: int) -> dict[str, list[str]]:
    """Write every figure; return {png name: the models it shows}."""
    test_y, test_x = test
    train_y, train_x = train
    names = list(cfgs)
    shown: dict[str, list[str]] = {}
    idx, groups, captions = figures.figure_digits(test_y)
    x = test_x[idx]
    clean = x / 255.0
    digits = {"groups": groups, "group_captions": captions, "indices": list(idx)}

    rows = [(f"{n}\ntest MSE {metrics[n]['mse']:.5f}", _unit(nets[n], x, cfgs[n])) for n in names]
    figures.reconstructions(clean, rows, out_dir / "reconstructions.png", **digits)
    shown["reconstructions.png"] = names

    noisy_models = [n for n in names if cfgs[n]["input_noise"] > 0]
    blocks = []
    for n in noisy_models:
        p = cfgs[n]["input_noise"]
        noise = {"noise": p, "noise_seed": seed}
        m = metrics[n]
        noisy_mse = f"\ntest MSE {m['noisy_input_mse']:.5f}" if "noisy_input_mse" in m else ""
        out_mse = f"\ntest MSE {m['denoise_mse']:.5f}" if "denoise_mse" in m else ""
        blocks.append({
            "heading": f"{n} (trained with input_noise {p}: each pixel dropped with p = {p}, "
                       f"the kept ones scaled by {1 / (1 - p):g})",
            # the identity "model" returns the noisy input itself, from the same seeded noise
            "noisy": _unit(nn.Identity(), x, cfgs[n], **noise),
            "output": _unit(nets[n], x, cfgs[n], **noise),
            "clean": clean,
            "noisy_label": f"noisy input{noisy_mse}",
            "output_label": f"output{out_mse}",
            "clean_label": "clean target"})
    if blocks:
        figures.denoising(blocks, out_dir / "denoising.png", **digits,
                          title="Denoising: noisy input, output, clean image (test MSE against the "
                                f"clean images, noise seed {seed})")
    else:
        figures.placeholder(out_dir / "denoising.png", "Denoising",
                            "No denoising model (input_noise > 0) in params.yaml models.")
    shown["denoising.png"] = noisy_models

    figures.training_curves(curves, out_dir / "training_curves.png",
                            loss_labels={n: loss_label(cfgs[n]) for n in names})
    shown["training_curves.png"] = names

    results = {}
    for n in names:
        latent = int(metrics[n].get("latent_dim", nets[n].latent_dim))
        k = min(latent, data.N_PIXELS)
        results[n] = {"mse": metrics[n]["mse"], "latent_dim": latent, "pca_k": k,
                      "pca_mse": pca_mse_at(pca, pca_curve, k),
                      "denoise_mse": metrics[n].get("denoise_mse")}
    figures.mse_bars(results, out_dir / "test_mse.png")
    shown["test_mse.png"] = names
    figures.pca_curve(pca_curve["components"], pca_curve["test_mse"],
                      {n: (r["latent_dim"], r["mse"]) for n, r in results.items()},
                      out_dir / "pca_curve.png")
    shown["pca_curve.png"] = names

    mlp = [n for n in names if isinstance(nets[n], models.MLPAutoencoder)]
    if mlp:
        figures.encoder_weights({n: nets[n].encoder[0].weight.detach().numpy() for n in mlp},
                                out_dir / "encoder_weights.png")
    else:
        figures.placeholder(out_dir / "encoder_weights.png", "Encoder weights",
                            "No fully connected (kind: mlp) model in params.yaml models.")
    shown["encoder_weights.png"] = mlp

    n_codes = min(LATENT_N, len(test_x))
    embeddings = {}
    with torch.no_grad():
        for n in names:
            xm = models.to_model_scale(torch.from_numpy(test_x[:n_codes]), cfgs[n]["pixels"])
            xy, explained = figures.pca_2d(nets[n].encode(xm).numpy())
            embeddings[n] = {"xy": xy, "labels": test_y[:n_codes], "explained": explained,
                             "latent_dim": nets[n].latent_dim}
    figures.latent_space(embeddings, out_dir / "latent_space.png",
                         subtitle=f"first {n_codes} test images, each model's codes in eval mode")
    shown["latent_space.png"] = names

    i = min(TRAIN_IMAGE, len(train_x) - 1)
    afters = []
    if TRAIN_IMAGE_MODEL in nets:
        n = TRAIN_IMAGE_MODEL
        afters = [(f"after {n}", _unit(nets[n], train_x[i:i + 1], cfgs[n]))]
        title = f"Training image {i} (digit {train_y[i]}) before and after {n}"
    else:
        title = (f"Training image {i} (digit {train_y[i]})\n{TRAIN_IMAGE_MODEL} is not in "
                 "params.yaml models: nothing to reconstruct")
    if i != TRAIN_IMAGE:
        title += (f"\n(image {TRAIN_IMAGE} not available: the training set has {len(train_x)} "
                  "images; the last one is shown)")
    figures.image_before_after(train_x[i] / 255.0, afters, out_dir / "image_7777.png",
                               title=title)
    shown["image_7777.png"] = [n for n in [TRAIN_IMAGE_MODEL] if n in nets]
    return shown


def log_figures(out_dir: Path, shown: dict[str, list[str]], models_dir: Path) -> None:
    """Each PNG to the run of every model it shows. A run missing from this store (models
    pulled from a DVC remote, a fresh mlflow.db) is a warning: plots/figures is the record."""

    per_model: dict[str, list[Path]] = {}
    for png, names in shown.items():
        for n in names:
            per_model.setdefault(n, []).append(out_dir / png)
    for n, pngs in per_model.items():
        run_id = tracking.read_run_info(models_dir / n)["run_id"]
        tracking.log_to_run(run_id, artifacts=pngs, artifact_path="figures", what=f"{n}: figures")


def main(argv: list[str]) -> int:
    if len(argv) != 7:
        print(__doc__, file=sys.stderr)
        return 2
    csv_dir, models_dir, models_json, pca_json, curves_dir, pca_curve_csv, out_dir = \
        map(Path, argv)
    params = config.load_params("params.yaml")
    cfgs = config.validate_models(params.get("models"))
    seed = config.validate_evaluate(params.get("evaluate"))["noise_seed"]

    nets = load_models(models_dir, cfgs)
    for n in cfgs:
        tracking.read_run_info(models_dir / n)  # a missing run.json fails before any drawing
    metrics = read_json(models_json)
    missing = [n for n in cfgs if n not in metrics]
    if missing:
        raise ValueError(f"{models_json}: no metrics for {', '.join(missing)}; "
                         "rerun `dvc repro evaluate`")
    pca = read_json(pca_json)
    pca_curve = read_columns(pca_curve_csv, ("components", "test_mse"))
    curves = {n: read_columns(curves_dir / f"{n}.csv", ("epoch", "train_loss", "test_mse"))
              for n in cfgs}
    tracking.open_store()  # an unusable store fails here, before the drawing
    test = data.read_mnist_csv(csv_dir / "mnist_test.csv")
    train = data.read_mnist_csv(csv_dir / "mnist_train.csv", limit=TRAIN_IMAGE + 1)

    shown = draw(out_dir, cfgs, nets, metrics, pca, pca_curve, curves, test, train, seed)
    log_figures(out_dir, shown, models_dir)
    for png in FIGURES:
        models_shown = ", ".join(shown[png]) or "no model"
        print(f"figures: {out_dir / png} ({models_shown})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (config.ConfigError, tracking.TrackingError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
