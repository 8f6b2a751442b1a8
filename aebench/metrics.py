"""Metrics on one common scale, the optimal linear (PCA) baseline, and replica statistics.

Every reconstruction metric compares outputs mapped to [0,1] pixels (not clamped, so a model
that overshoots pays for it) with the test images / 255. Sums run in float64, so the digits
the metrics files keep (6 significant) do not depend on float32 summation order.
"""

from __future__ import annotations

import inspect
import math
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from .constants import N_PIXELS
from .kinds import ModelConfig
from .losses import BCE_EPS, source_loss
from .models import from_unit_scale, reconstruct

DIGITS = range(10)
# What a reviewer diffs, per model: mean and std over replicas (lower is better for each).
HEADLINE = ("mse", "sse_per_image", "test_loss")


def as_tensor(a) -> torch.Tensor:
    """A tensor of `a`; numpy arrays are copied, because read_mnist_csv's are read-only and
    torch warns about (and must not write to) those."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels with peak 1.0 (inf for a perfect copy)."""
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def mse(pred01: torch.Tensor, target01: torch.Tensor) -> float:
    return float(((pred01.double() - target01.double()) ** 2).mean())


class TestSet:
    """Test images as every replica's metrics use them, converted once per evaluation instead
    of once per replica (each conversion is a pass over 7.8 million float64 pixels): `images`
    (uint8, (N, 784); TestSet.of_images only), `labels`, `unit` (the [0,1] targets, float64)
    and, made on first use, `complement` (1 - unit, for bce) and `scaled(pixels)` (the targets
    on a model's own scale, for test_loss)."""

    def __init__(self, unit, labels, *, images=None):
        self.unit = as_tensor(unit).double()
        self.labels = as_tensor(labels)
        self.images = None if images is None else as_tensor(images)
        self._scaled: dict[str, torch.Tensor] = {}

    @classmethod
    def of_images(cls, images, labels) -> TestSet:
        images = as_tensor(images)
        return cls(images.double() / 255, labels, images=images)

    @cached_property
    def complement(self) -> torch.Tensor:
        return 1 - self.unit

    def scaled(self, pixels: str) -> torch.Tensor:
        if pixels not in self._scaled:
            self._scaled[pixels] = from_unit_scale(self.unit, pixels)
        return self._scaled[pixels]


def reconstruction_metrics(pred01: torch.Tensor, test: TestSet) -> dict[str, Any]:
    """mse, sse_per_image, bce, psnr and mse_per_digit of (N, 784) predictions on [0,1] pixels
    against test.unit.

    mse is per pixel with the prediction NOT clamped. bce alone clamps the prediction to
    [1e-7, 1 - 1e-7], because log(0) is -inf and outputs of linear or tanh models leave [0,1].
    psnr comes from the dataset mse (not a mean of per-image psnr). mse_per_digit has a key
    "0".."9" for each digit present in test.labels.

    Each float64 pass writes into a tensor this function made (the in-place `_` operations):
    the same operations in the same order as the plain expressions in the comments, so the same
    bits, with three new 63 MB tensors per replica instead of ten."""
    pred = pred01.double()
    target = test.unit
    se_per_image = torch.sub(pred, target).square_().sum(dim=1)  # ((pred - target) ** 2).sum(1)
    n_pixels = pred.shape[1]
    mse_all = float(se_per_image.sum()) / pred.numel()
    # -(target * log(p) + (1 - target) * log(1 - p)).mean(), p = pred clamped
    p = pred.clamp(BCE_EPS, 1 - BCE_EPS)
    log_q = torch.rsub(p, 1).log_().mul_(test.complement)
    bce = -float(p.log_().mul_(target).add_(log_q).mean())
    per_digit = {}
    for d in DIGITS:
        mask = test.labels == d
        if mask.any():
            per_digit[str(d)] = float(se_per_image[mask].mean()) / n_pixels
    return {
        "mse": mse_all,
        "sse_per_image": N_PIXELS * mse_all,
        "bce": bce,
        "psnr": psnr(mse_all),
        "mse_per_digit": per_digit,
    }


# Rows per forward pass in evaluation: as many as keep one chunk's widest activation within
# CHUNK_BYTES, at most MAX_ROWS (reconstruct's own default, read from it). Only the speed
# depends on it for a conv model: conv16's 16 x 24 x 24 maps fill 74 MB at 2,000 rows, and its
# pass over the test set took 1.5 s there against 0.8 s at 400-625 rows (2-core EPYC, 32 MB
# L3), the same bits at every size tried. Not so for a linear layer (its matrix product's
# blocking follows the rows): every MLP here stays at MAX_ROWS, so its outputs are the bits
# they always were.
CHUNK_BYTES = 16 * 2**20
MAX_ROWS = inspect.signature(reconstruct).parameters["batch_size"].default


def chunk_rows(model: nn.Module, pixels: str) -> int:
    """Rows per forward pass of `model` in evaluation (CHUNK_BYTES), from one row's activations."""
    widest = 0

    def note(_module, _inputs, output):
        nonlocal widest
        if isinstance(output, torch.Tensor):
            widest = max(widest, output.numel() * output.element_size())

    hooks = [m.register_forward_hook(note) for m in model.modules()]
    try:
        reconstruct(model, torch.zeros(1, N_PIXELS, dtype=torch.uint8), pixels)
    finally:
        for hook in hooks:
            hook.remove()
    return max(1, min(MAX_ROWS, CHUNK_BYTES // max(widest, 1)))


# Evaluating one trained model.
def evaluate_model(model: nn.Module, cfg: ModelConfig, test: TestSet,
                   noise_seed: int) -> dict[str, Any]:
    """All test metrics of one replica on `test` (TestSet.of_images): reconstruction_metrics of
    its [0,1] outputs, `test_loss` in its own training scale, and `denoise_mse` /
    `noisy_input_mse` for a model trained on noisy inputs (cfg.input_noise > 0)."""
    x = test.images
    clean01 = test.unit
    rows = chunk_rows(model, cfg.pixels)
    pred01 = reconstruct(model, x, cfg.pixels, batch_size=rows).double()
    out = reconstruction_metrics(pred01, test)
    # The model-scale output is recovered from the [0,1] one in float64 (exact up to the float32
    # rounding of (y + 1) / 2), so one forward pass serves both scales.
    out["test_loss"] = float(source_loss(from_unit_scale(pred01, cfg.pixels),
                                         test.scaled(cfg.pixels), cfg.loss))
    p = cfg.input_noise
    if p > 0:
        denoised01 = reconstruct(model, x, cfg.pixels, noise=p, noise_seed=noise_seed,
                                 batch_size=rows)
        # The identity "model" returns the noisy input itself, drawn from the same seeded noise
        # as the denoised outputs: the mse a do-nothing denoiser would score.
        noisy01 = reconstruct(nn.Identity(), x, cfg.pixels, noise=p, noise_seed=noise_seed)
        out["denoise_mse"] = mse(denoised01, clean01)
        out["noisy_input_mse"] = mse(noisy01, clean01)
    return out


def loss_is_mse(cfg: ModelConfig) -> bool:
    """The source's loss is the common metric itself (MSE on [0,1] pixels): no extra column."""
    return cfg.loss == "mse" and cfg.pixels == "0,1"


def mean_std(values) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0}


def headline(replicas: list[dict[str, Any]], cfg: ModelConfig) -> dict[str, Any]:
    """The numbers a reviewer diffs for one model: mean and std over its replicas of each
    HEADLINE metric (test_loss left out where it equals mse), and n."""
    keys = [k for k in HEADLINE if not (k == "test_loss" and loss_is_mse(cfg))]
    return {**{k: mean_std([r[k] for r in replicas]) for k in keys}, "n": len(replicas)}


def averaged(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Every metric of the replicas averaged (per digit too), for the report and figures."""
    out: dict[str, Any] = {}
    for key, value in replicas[0].items():
        if key == "seed":
            continue
        if isinstance(value, dict):
            out[key] = {d: float(np.mean([r[key][d] for r in replicas])) for d in value}
        else:
            out[key] = float(np.mean([r[key] for r in replicas]))
    return out


def flat(result: dict[str, Any]) -> dict[str, float]:
    """One replica's metrics as MLflow metric names: mse -> test_mse, mse_per_digit["3"] ->
    test_mse_digit_3 (test_loss keeps its name). Infinite values (a perfect psnr) left out."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out.update({f"test_{key.removesuffix('_per_digit')}_digit_{d}": float(v)
                        for d, v in value.items()})
        elif math.isfinite(value):
            out[key if key.startswith("test_") else f"test_{key}"] = float(value)
    return out

