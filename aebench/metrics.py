"""Metrics on one common scale, and the optimal linear (PCA) baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def source_loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The loss as each source computed it, on the model's own pixel scale (batch mean)."""
    if loss == "mse":
        return F.mse_loss(output, target)
    if loss == "half_mse":  # seed 004: 0.5 * MSE
        return 0.5 * F.mse_loss(output, target)
    if loss == "bce":
        # Keras clips probabilities to [1e-7, 1 - 1e-7] before the log (seed 003).
        return F.binary_cross_entropy(output.clamp(1e-7, 1 - 1e-7), target)
    raise ValueError(f"unknown loss {loss!r}")
