"""The comparison figures: a registry of small functions, one per PNG.

Each takes the loaded `Inputs` and a path, and draws with `aebench.mosaics` (images) or
`aebench.charts` (plots). Images show replica 0 of each model; bars and curves show the mean
over replicas with +- one standard deviation.
The digits are fixed so that two commits' figures compare: the first test image of each digit
0..9 and the first 15 test images; the latent-space scatter uses the first LATENT_N test images;
the denoising figure draws its noise from evaluate.noise_seed. A figure with nothing to show
says why, so the set of files stays the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import charts, drawing, mosaics, parallel
from .constants import N_PIXELS
from .kinds import ModelConfig
from .metrics import mean_std
from .models import reconstruct, to_model_scale

TRAIN_IMAGE = 7777           # seed 000 shows training image 7777 ...
TRAIN_IMAGE_MODEL = "deep3"  # ... before and after its model
LATENT_N = 2000              # test images in the latent-space scatter
# Drawn first: the slowest figure by far (a panel of LATENT_N codes per model, laid out around
# every panel's ticks), so that one core draws it while the others draw the rest. Last, as it
# is in the registry, it began only once the rest were nearly done: ~1 s longer on 2 cores.
FIRST = "latent_space.png"


@dataclass
class Inputs:
    cfgs: dict[str, ModelConfig]
    nets: dict[str, nn.Module]                   # replica 0 of each model
    headline: dict[str, dict]                    # metrics/<model>.json of each model
    details: dict[str, dict]                     # evaluate's details: latent_dim, mean metrics
    pca_curve: dict[str, np.ndarray]             # "components", "test_mse"
    curves: dict[str, dict[str, np.ndarray]]     # per model: "epoch", "test_mse", ... (+ _std)
    test: tuple[np.ndarray, np.ndarray]          # labels, uint8 pixels (N, 784)
    train: tuple[np.ndarray, np.ndarray]         # the first TRAIN_IMAGE + 1 training images
    noise_seed: int


FIGURES: dict[str, Callable[[Inputs, Path], object]] = {}


def figure(name: str):
    def register(fn):
        FIGURES[name] = fn
        return fn
    return register


def _unit(inp: Inputs, name: str, x: np.ndarray, **noise) -> np.ndarray:
    return reconstruct(inp.nets[name], torch.from_numpy(x), inp.cfgs[name].pixels,
                       **noise).numpy()


def _digits(inp: Inputs) -> tuple[np.ndarray, dict]:
    idx, groups, captions = mosaics.figure_digits(inp.test[0])
    return inp.test[1][idx], {"groups": groups, "group_captions": captions,
                              "indices": list(idx)}


@figure("reconstructions.png")
def reconstructions(inp: Inputs, path: Path):
    x, digits = _digits(inp)
    rows = [(f"{n}\ntest MSE {inp.headline[n]['mse']['mean']:.5f}", _unit(inp, n, x))
            for n in inp.cfgs]
    mosaics.reconstructions(x / 255.0, rows, path, **digits)


@figure("denoising.png")
def denoising(inp: Inputs, path: Path):
    noisy = [n for n, c in inp.cfgs.items() if c.input_noise > 0]
    if not noisy:
        return drawing.placeholder(path, "Denoising",
                                   "No model in params.yaml is trained on noisy inputs "
                                   "(input_noise > 0).")
    x, digits = _digits(inp)
    blocks = []
    for n in noisy:
        p, mean = inp.cfgs[n].input_noise, inp.details[n]["mean"]
        noise = {"noise": p, "noise_seed": inp.noise_seed}
        blocks.append({
            "heading": f"{n}: each pixel dropped with p = {p}, the kept ones scaled by "
                       f"{1 / (1 - p):g}",
            # the identity "model" returns the noisy input itself, from the same seeded noise
            "noisy": reconstruct(nn.Identity(), torch.from_numpy(x), inp.cfgs[n].pixels,
                                 **noise).numpy(),
            "output": _unit(inp, n, x, **noise), "clean": x / 255.0,
            "noisy_label": f"noisy input\ntest MSE {mean['noisy_input_mse']:.5f}",
            "output_label": f"output\ntest MSE {mean['denoise_mse']:.5f}",
            "clean_label": "clean target"})
    mosaics.denoising(blocks, path, **digits,
                      title="Denoising: noisy input, output, clean image\n(test MSE against the "
                            f"clean images, noise seed {inp.noise_seed})")


def loss_label(cfg: ModelConfig) -> str:
    scale = "[-1,1]" if cfg.pixels == "-1,1" else "[0,1]"
    text = {"mse": f"MSE on {scale}", "half_mse": f"0.5 x MSE on {scale}",
            "bce": "BCE on [0,1]"}[cfg.loss]
    return text + (", noisy inputs" if cfg.input_noise > 0 else "")


@figure("training_curves.png")
def training_curves(inp: Inputs, path: Path):
    charts.training_curves(inp.curves, path,
                            loss_labels={n: loss_label(c) for n, c in inp.cfgs.items()})


def _bars(inp: Inputs) -> dict[str, dict]:
    out = {}
    for n in inp.cfgs:
        latent, h = inp.details[n]["latent_dim"], inp.headline[n]
        out[n] = {"mse": h["mse"]["mean"], "mse_std": h["mse"]["std"], "latent_dim": latent,
                  "pca_mse": inp.details[n]["pca"]["mse"]}
        replicas = inp.details[n]["replicas"]
        if "denoise_mse" in replicas[0]:
            stat = mean_std([r["denoise_mse"] for r in replicas])
            out[n]["denoise_mse"], out[n]["denoise_mse_std"] = stat["mean"], stat["std"]
    return out


@figure("test_mse.png")
def test_mse(inp: Inputs, path: Path):
    charts.mse_bars(_bars(inp), path)


@figure("pca_curve.png")
def pca_curve(inp: Inputs, path: Path):
    points = {n: (b["latent_dim"], b["mse"]) for n, b in _bars(inp).items()}
    charts.pca_curve(inp.pca_curve["components"], inp.pca_curve["test_mse"], points, path)


def first_layer(model: nn.Module) -> np.ndarray | None:
    """(hidden, 784) weights of a model whose encoder starts with a Linear layer on pixels."""
    layer = next(iter(getattr(model, "encoder", [])), None)
    if isinstance(layer, nn.Linear) and layer.in_features == N_PIXELS:
        return layer.weight.detach().numpy()
    return None


@figure("encoder_weights.png")
def encoder_weights(inp: Inputs, path: Path):
    weights = {n: w for n, net in inp.nets.items() if (w := first_layer(net)) is not None}
    if not weights:
        return drawing.placeholder(path, "Encoder weights",
                                   "No model in params.yaml starts with a fully connected layer.")
    mosaics.encoder_weights(weights, path)


@figure("latent_space.png")
def latent_space(inp: Inputs, path: Path):
    labels, pixels = inp.test
    n_codes = min(LATENT_N, len(pixels))
    embeddings = {}
    with torch.no_grad():
        for n, net in inp.nets.items():
            codes = net.encode(to_model_scale(torch.from_numpy(pixels[:n_codes]),
                                              inp.cfgs[n].pixels))
            xy, explained = charts.pca_2d(codes.numpy())
            embeddings[n] = {"xy": xy, "labels": labels[:n_codes], "explained": explained,
                             "latent_dim": net.latent_dim}
    charts.latent_space(embeddings, path, subtitle=f"first {n_codes} test images, replica 0 "
                                                    "of each model, codes in eval mode")


@figure("image_7777.png")
def image_7777(inp: Inputs, path: Path):
    labels, pixels = inp.train
    i = min(TRAIN_IMAGE, len(pixels) - 1)
    n = TRAIN_IMAGE_MODEL
    if n in inp.nets:
        afters = [(f"after {n}", _unit(inp, n, pixels[i:i + 1]))]
        title = f"Training image {i} (digit {labels[i]}) before and after {n}"
    else:
        afters = []
        title = (f"Training image {i} (digit {labels[i]})\n{n} is not in params.yaml models: "
                 "nothing to reconstruct")
    if i != TRAIN_IMAGE:
        title += (f"\n(image {TRAIN_IMAGE} not available: the training set has {len(pixels)} "
                  "images; the last one is shown)")
    mosaics.image_before_after(pixels[i] / 255.0, afters, path, title=title)


def overlay_rows(curves: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    """Every model's curve in one long table (model, epoch, test_mse, test_mse_std): DVC overlays
    only the files a plot names, and one file names every model, however many there are."""
    return [{"model": name, "epoch": int(epoch), "test_mse": float(mse),
             "test_mse_std": float(std)}
            for name, c in curves.items()
            for epoch, mse, std in zip(c["epoch"], c["test_mse"], c["test_mse_std"],
                                       strict=True)]


def draw_all(inp: Inputs, out_dir: Path, *, workers: int = 1) -> list[Path]:
    """Every registered figure into out_dir, `workers` at a time, each in a process of one
    thread (aebench.parallel: the same bytes as one after another); returns the paths."""
    def draw(name: str) -> None:  # nothing to send back: the PNG is the result
        FIGURES[name](inp, out_dir / name)

    order = sorted(FIGURES, key=lambda name: name != FIRST)  # otherwise the registry's order
    parallel.each(draw, order, workers=workers, start=lambda: torch.set_num_threads(1))
    return [out_dir / name for name in FIGURES]
