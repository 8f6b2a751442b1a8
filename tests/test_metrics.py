"""aebench.metrics against hand-computed values, and the pca stage on small generated data."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from aebench import data, metrics
from aebench.models import build_model

# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_metrics_by_hand():
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    pred = torch.tensor([[0.5, 1.0], [0.0, 0.2]], dtype=torch.float64)
    m = metrics.reconstruction_metrics(pred, target, torch.tensor([3, 7]))
    # squared errors: image 0: 0.25 + 0, image 1: 0 + 0.04; 4 pixels
    assert m["mse"] == pytest.approx(0.29 / 4, rel=1e-12)
    assert m["sse_per_image"] == pytest.approx(784 * 0.29 / 4, rel=1e-12)
    assert m["psnr"] == pytest.approx(10 * math.log10(4 / 0.29), rel=1e-12)
    assert m["mse_per_digit"] == pytest.approx({"3": 0.125, "7": 0.02}, rel=1e-12)
    # bce clamps 1.0 and 0.0 to 1 - 1e-7 and 1e-7
    eps = 1e-7
    expected = -(math.log(0.5) + 2 * math.log(1 - eps) + math.log(0.8)) / 4
    assert m["bce"] == pytest.approx(expected, rel=1e-9)


def test_mse_is_not_clamped_but_bce_is():
    target = torch.tensor([[1.0, 0.0]])
    pred = torch.tensor([[1.1, -0.1]])  # overshoots both ways
    m = metrics.reconstruction_metrics(pred, target, torch.tensor([0]))
    assert m["mse"] == pytest.approx(0.01, rel=1e-6)
    assert m["bce"] == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)  # both clamped to ~exact
    worst = metrics.reconstruction_metrics(torch.tensor([[0.0]]), torch.tensor([[1.0]]),
                                           torch.tensor([0]))
    assert worst["bce"] == pytest.approx(-math.log(1e-7))  # finite, not inf


def test_psnr_and_per_digit_omits_absent_digits():
    assert metrics.psnr(0.01) == pytest.approx(20.0)
    assert metrics.psnr(1.0) == 0.0
    assert metrics.psnr(0.0) == math.inf
    m = metrics.reconstruction_metrics(torch.zeros(3, 4), torch.ones(3, 4) * 0.5,
                                       torch.tensor([1, 1, 9]))
    assert set(m["mse_per_digit"]) == {"1", "9"}


def test_rounded_and_flat_metrics():
    assert metrics.rounded({"a": [1 / 3, 2], "b": math.inf, "c": "cpu"}) == \
        {"a": [0.333333, 2], "b": None, "c": "cpu"}
    flat = metrics.flat_metrics({"mse": 0.5, "mse_per_digit": {"3": 0.1}, "test_loss": 2.0,
                                 "loss": "mse", "psnr": None, "params": 10, "latent_dim": 3,
                                 "train_seconds": 1.0, "device": "cpu"})
    assert flat == {"test_mse": 0.5, "test_mse_digit_3": 0.1, "test_loss": 2.0}


# --------------------------------------------------------------------------- PCA


def structured(n, d=20, rank=5, seed=0):
    """Low-rank signal plus small noise: every direction has some variance, a few a lot."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    w = torch.randn(rank, d, generator=g, dtype=torch.float64)
    return 0.5 + 0.1 * z @ w + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_pca_full_rank_reconstructs_exactly():
    # More images than pixels keeps the covariance full rank: LAPACK's eigh takes seconds on
    # the hundreds of zero eigenvalues of a rank-deficient one.
    x = torch.rand(1000, 784, generator=torch.Generator().manual_seed(0))
    mean, comps = metrics.fit_pca(x, chunk=300)  # chunked accumulation too
    assert comps.shape == (784, 784)
    assert (metrics.pca_reconstruct(x, mean, comps, 784) - x).abs().max() < 1e-10
    assert metrics.mse_by_components(x, mean, comps)[-1] < 1e-10


def test_pca_components_orthonormal_and_sorted():
    train = structured(500)
    mean, comps = metrics.fit_pca(train)
    assert torch.allclose(comps @ comps.T, torch.eye(20, dtype=torch.float64), atol=1e-10)
    variance = ((train - mean) @ comps.T).var(dim=0)
    assert (variance[:-1] >= variance[1:]).all()
    assert torch.allclose(mean, train.mean(0))


def test_pca_mse_strictly_falls_and_curve_matches_reconstruction():
    train, test = structured(500, seed=1), structured(200, seed=2)
    mean, comps = metrics.fit_pca(train)
    curve = metrics.mse_by_components(test, mean, comps)
    assert curve.shape == (21,)
    assert (curve[1:] < curve[:-1]).all()
    assert curve[0] == pytest.approx(float(((test - mean) ** 2).mean()), rel=1e-12)
    for k in (0, 1, 5, 13, 20):
        direct = metrics.mse(metrics.pca_reconstruct(test, mean, comps, k), test)
        assert float(curve[k]) == pytest.approx(direct, rel=1e-9, abs=1e-15)


# --------------------------------------------------------------------------- evaluate_model


def cfg(kind="mlp", pixels="0,1", noise=0.0, loss="mse"):
    base = {"kind": kind, "pixels": pixels, "input_noise": noise, "init": "torch",
            "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0}, "loss": loss,
            "batch_size": 8, "epochs": 1, "activation": "relu", "output_activation": "sigmoid"}
    if kind == "mlp":
        return {**base, "encoder": [784, 8], "decoder": [8, 784], "code_activation": "none",
                "dropout": 0.0}
    return {**base, "channels": [1, 2, 2], "kernel": 3, "pool": 2}


class Constant(nn.Module):
    """Outputs `value` everywhere, in the model's own scale."""

    latent_dim = 1

    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x):
        return torch.full_like(x, float(self.value))


class Identity(nn.Module):
    latent_dim = 784

    def forward(self, x):
        return x


def batch(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, n, dtype=np.uint8), rng.integers(0, 256, (n, 784), dtype=np.uint8)


def test_minus_one_one_outputs_are_mapped_not_clamped():
    labels = np.array([0, 1], dtype=np.uint8)
    pixels = np.full((2, 784), 255, dtype=np.uint8)
    m = metrics.evaluate_model(Constant(1.2), cfg(pixels="-1,1"), labels, pixels, 0)
    assert m["mse"] == pytest.approx(0.01, rel=1e-5)  # 1.2 -> 1.1 on [0,1], target 1.0
    assert m["test_loss"] == pytest.approx(0.04, rel=1e-5)  # (1.2 - 1.0)^2 on [-1,1]
    assert m["params"] == 1 and m["latent_dim"] == 1 and m["loss"] == "mse"


def test_test_loss_in_source_scale():
    labels, pixels = batch()
    m = metrics.evaluate_model(Constant(0.5), cfg(loss="half_mse"), labels, pixels, 0)
    assert m["test_loss"] == pytest.approx(0.5 * m["mse"], rel=1e-9)
    m = metrics.evaluate_model(Constant(0.2), cfg(pixels="-1,1"), labels, pixels, 0)
    assert m["test_loss"] == pytest.approx(4 * m["mse"], rel=1e-6)


@pytest.mark.parametrize("kind,noise", [("mlp", 0.0), ("conv", 0.5), ("mlp", 0.3)])
def test_evaluate_model_keys(kind, noise):
    torch.manual_seed(0)
    c = cfg(kind, pixels="-1,1", noise=noise)
    model = build_model(c).eval()
    labels, pixels = batch()
    m = metrics.evaluate_model(model, c, labels, pixels, noise_seed=3)
    keys = {"mse", "sse_per_image", "bce", "psnr", "mse_per_digit", "test_loss", "loss",
            "params", "latent_dim"}
    if noise:
        keys |= {"denoise_mse", "noisy_input_mse"}
    assert set(m) == keys
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert m["latent_dim"] == model.latent_dim
    assert all(math.isfinite(v) for v in metrics.flat_metrics(m).values())
    assert metrics.evaluate_model(model, c, labels, pixels, noise_seed=3) == m  # deterministic


def test_noisy_input_is_the_same_noise_the_model_sees():
    labels, pixels = batch()
    c = cfg(noise=0.5)
    m = metrics.evaluate_model(Identity(), c, labels, pixels, noise_seed=5)
    # an identity model returns its noisy input: denoising it gains nothing
    assert m["denoise_mse"] == m["noisy_input_mse"] > 0.01
    assert m["mse"] == pytest.approx(0, abs=1e-12)  # float32 / 255 vs float64 / 255
    other = metrics.evaluate_model(Identity(), c, labels, pixels, noise_seed=6)
    assert other["noisy_input_mse"] != m["noisy_input_mse"]


# --------------------------------------------------------------------------- pca stage


def test_pca_stage(tmp_path, monkeypatch):
    from stages import pca

    models = {"small": cfg(), "wide": {**cfg(), "encoder": [784, 1000], "decoder": [1000, 784]},
              "conv": cfg("conv")}  # conv latent 2 x 12 x 12 = 288
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"models": models}))
    for split, n in (("train", 1000), ("test", 30)):  # > 784 images: see above
        labels, pixels = batch(n, seed=n)
        data.write_mnist_csv(tmp_path / "csv" / f"mnist_{split}.csv", labels, pixels)
    monkeypatch.chdir(tmp_path)

    assert pca.main(["csv", "metrics/pca.json", "plots/pca_curve.csv"]) == 0
    result = json.loads((tmp_path / "metrics/pca.json").read_text())
    assert list(result) == ["pca8", "pca288", "pca784"]  # by latent size; 1000 capped at 784
    assert [r["latent_dim"] for r in result.values()] == [8, 288, 784]
    assert result["pca784"]["mse"] == 0 and result["pca784"]["psnr"] is None
    assert result["pca8"]["mse"] > result["pca288"]["mse"] > 0
    rows = list(csv.DictReader((tmp_path / "plots/pca_curve.csv").open()))
    assert [int(r["components"]) for r in rows] == list(range(785))
    assert float(rows[8]["test_mse"]) == pytest.approx(result["pca8"]["mse"], rel=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))
