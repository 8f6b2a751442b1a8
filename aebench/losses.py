"""Each source's loss, on the model's own pixel scale (a batch mean).

Training minimises it; evaluation reports it on the test set, so each result can be held next to
the number its source printed. A kind that trains on more than this (a VAE's KL term, say)
overrides `ModelConfig.training_loss` in its own file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BCE_EPS = 1e-7  # Keras's clip (seed 003); the same clip for every model keeps bce comparable


def source_loss(output: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return F.mse_loss(output, target)
    if loss == "half_mse":  # seed 004: 0.5 * MSE
        return 0.5 * F.mse_loss(output, target)
    if loss == "bce":
        # Keras clips probabilities to [1e-7, 1 - 1e-7] before the log (seed 003).
        return F.binary_cross_entropy(output.clamp(BCE_EPS, 1 - BCE_EPS), target)
    raise ValueError(f"unknown loss {loss!r}")
