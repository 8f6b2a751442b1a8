"""Metrics on one common scale, and the optimal linear (PCA) baseline.

Every reconstruction metric compares outputs mapped to [0,1] pixels (not clamped, so a model
that overshoots pays for it) with the test images / 255. Sums run in float64, so the digits
the metrics files keep (6 significant) do not depend on float32 summation order.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .models import reconstruct

N_PIXELS = 784
DIGITS = range(10)
MODEL_FACTS = ("params", "latent_dim", "train_seconds", "samples_per_second", "device")
BCE_EPS = 1e-7  # Keras's clip (seed 003); the same clip for every model keeps bce comparable


def source_loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss as each source computed it, on the model's own pixel scale (batch mean)."""
    if loss == "mse":
        return F.mse_loss(output, target)
    if loss == "half_mse":  # seed 004: 0.5 * MSE
        return 0.5 * F.mse_loss(output, target)
    if loss == "bce":
        # Keras clips probabilities to [1e-7, 1 - 1e-7] before the log (seed 003).
        return F.binary_cross_entropy(output.clamp(BCE_EPS, 1 - BCE_EPS), target)
    raise ValueError(f"unknown loss {loss!r}")


def as_tensor(a) -> torch.Tensor:
    """A tensor of `a`; numpy arrays are copied, because read_mnist_csv's are read-only and
    torch warns about (and must not write to) those."""
    return a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB for pixels with peak 1.0 (inf for a perfect copy)."""
    return 10 * math.log10(1 / mse) if mse > 0 else math.inf


def mse(pred01: torch.Tensor, target01: torch.Tensor) -> float:
    return float(((pred01.double() - target01.double()) ** 2).mean())


def reconstruction_metrics(pred01: torch.Tensor, target01: torch.Tensor,
                           labels: torch.Tensor) -> dict[str, Any]:
    """mse, sse_per_image, bce, psnr and mse_per_digit of (N, 784) predictions on [0,1] pixels.

    mse is per pixel with the prediction NOT clamped. bce alone clamps the prediction to
    [1e-7, 1 - 1e-7], because log(0) is -inf and outputs of linear or tanh models leave [0,1].
    psnr comes from the dataset mse (not a mean of per-image psnr). mse_per_digit has a key
    "0".."9" for each digit present in `labels`."""
    pred = pred01.double()
    target = target01.double()
    labels = as_tensor(labels)
    se_per_image = ((pred - target) ** 2).sum(dim=1)
    n_pixels = pred.shape[1]
    mse_all = float(se_per_image.sum()) / pred.numel()
    p = pred.clamp(BCE_EPS, 1 - BCE_EPS)
    bce = float(-(target * p.log() + (1 - target) * (1 - p).log()).mean())
    per_digit = {}
    for d in DIGITS:
        mask = labels == d
        if mask.any():
            per_digit[str(d)] = float(se_per_image[mask].mean()) / n_pixels
    return {
        "mse": mse_all,
        "sse_per_image": N_PIXELS * mse_all,
        "bce": bce,
        "psnr": psnr(mse_all),
        "mse_per_digit": per_digit,
    }


# PCA: the best any linear encoder/decoder pair of k dimensions can do (in mse), the bar an
# autoencoder with a k-dimensional code has to clear.
def fit_pca(train01: torch.Tensor, chunk: int = 10_000) -> tuple[torch.Tensor, torch.Tensor]:
    """mean (D,) and components (D, D): rows are the covariance's eigenvectors, by decreasing
    variance. float64 throughout; the covariance is accumulated in chunks so the 60,000 x 784
    training set is never held centred in float64 twice."""
    n, d = train01.shape
    mean = torch.zeros(d, dtype=torch.float64)
    for part in train01.split(chunk):
        mean += part.double().sum(dim=0)
    mean /= n
    cov = torch.zeros(d, d, dtype=torch.float64)
    for part in train01.split(chunk):
        xc = part.double() - mean
        cov += xc.T @ xc
    cov /= max(n - 1, 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues, orthonormal columns
    components = vectors.flip(1).T.contiguous()
    # An eigenvector's sign is arbitrary; fix it (largest entry positive) so plotted
    # components do not flip between platforms.
    idx = components.abs().argmax(dim=1, keepdim=True)
    components *= components.gather(1, idx).sign()
    return mean, components


def pca_reconstruct(x01: torch.Tensor, mean: torch.Tensor, components: torch.Tensor,
                    k: int) -> torch.Tensor:
    """Project onto the first k components and back (float64)."""
    basis = components[:k]
    return mean + ((x01.double() - mean) @ basis.T) @ basis


def mse_by_components(test01: torch.Tensor, mean: torch.Tensor,
                      components: torch.Tensor) -> torch.Tensor:
    """Test mse of pca_reconstruct for k = 0 .. n_components, in one pass.

    With orthonormal components the residual after k of them is the total squared norm of the
    centred data minus the squared projections on the first k, a cumulative sum."""
    xc = test01.double() - mean
    total = (xc**2).sum()
    captured = ((xc @ components.T) ** 2).sum(dim=0).cumsum(0)
    residual = torch.cat([total.reshape(1), total - captured])
    return residual.clamp_min(0) / xc.numel()  # clamp: rounding can dip below 0 at full rank


# Evaluating one trained model.
def _from_unit(y01: torch.Tensor, pixels: str) -> torch.Tensor:
    """The inverse of models.to_unit_scale: [0,1] pixels back to the model's own scale."""
    return y01 * 2 - 1 if pixels == "-1,1" else y01


def evaluate_model(model: nn.Module, cfg: dict, test_labels, test_pixels,
                   noise_seed: int) -> dict[str, Any]:
    """All test metrics of one model: reconstruction_metrics of its [0,1] outputs, `test_loss`
    in its own training scale (`loss` names it), `denoise_mse` / `noisy_input_mse` for a model
    trained on noisy inputs (cfg["input_noise"] > 0), `params` and `latent_dim`."""
    pixels = cfg["pixels"]
    x = as_tensor(test_pixels)
    clean01 = x.double() / 255
    pred01 = reconstruct(model, x, pixels).double()
    out = reconstruction_metrics(pred01, clean01, test_labels)
    # The model-scale output is recovered from the [0,1] one in float64 (exact up to the float32
    # rounding of (y + 1) / 2), so one forward pass serves both scales.
    out["test_loss"] = float(source_loss(_from_unit(pred01, pixels), _from_unit(clean01, pixels),
                                         cfg["loss"]))
    out["loss"] = cfg["loss"]
    p = cfg["input_noise"]
    if p > 0:
        denoised01 = reconstruct(model, x, pixels, noise=p, noise_seed=noise_seed)
        # The identity "model" returns the noisy input itself, drawn from the same seeded noise
        # as the denoised outputs: the mse a do-nothing denoiser would score.
        noisy01 = reconstruct(nn.Identity(), x, pixels, noise=p, noise_seed=noise_seed)
        out["denoise_mse"] = mse(denoised01, clean01)
        out["noisy_input_mse"] = mse(noisy01, clean01)
    out["params"] = sum(t.numel() for t in model.parameters())
    out["latent_dim"] = int(model.latent_dim)
    return out


def flat_metrics(metrics: dict[str, Any], prefix: str = "test_") -> dict[str, float]:
    """The test metrics of `metrics` flattened for MLflow: mse -> test_mse, test_loss stays,
    mse_per_digit["3"] -> test_mse_digit_3. Facts about the model rather than its test
    results (params, latent_dim, training time, device) and strings are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "mse_per_digit":
            out.update({f"{prefix}mse_digit_{d}": float(v) for d, v in value.items()})
        elif (key not in MODEL_FACTS and isinstance(value, (int, float))
              and not isinstance(value, bool) and math.isfinite(value)):
            out[key if key.startswith(prefix) else f"{prefix}{key}"] = float(value)
    return out


# Metrics files: diffable and deterministic.
def rounded(obj: Any, digits: int = 6) -> Any:
    """Floats to `digits` significant digits, recursively, so `dvc metrics diff` and git diffs
    show changes rather than float noise. inf / nan become None (null): JSON has no such
    numbers."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj

