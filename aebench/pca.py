"""PCA: the best any linear encoder/decoder pair of k dimensions can do (in mse), the bar an
autoencoder with a k-dimensional code has to clear. One eigendecomposition gives the test
error for every k at once, so the pca stage serves any latent size a model names.
"""

from __future__ import annotations

import numpy as np
import torch

from .constants import N_PIXELS


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


def pca_at(curve: dict[str, np.ndarray], latent: int) -> dict[str, float]:
    """k = min(latent, 784) and PCA's test mse with k components, from the PCA curve (whose
    rows are k = 0..784)."""
    k = min(int(latent), N_PIXELS)
    hit = np.flatnonzero(np.asarray(curve["components"]) == k)
    if not hit.size:
        raise ValueError(f"the PCA curve has no row for {k} components")
    return {"k": k, "mse": float(curve["test_mse"][hit[0]])}

