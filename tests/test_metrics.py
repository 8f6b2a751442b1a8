"""aebench.metrics and aebench.pca against hand-computed values, and the pca stage."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from conftest import run_stage
from torch import nn

from aebench import data, files, kinds, metric_files, metrics, pca

# --------------------------------------------------------------------------- reconstruction


def test_reconstruction_metrics_by_hand():
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    pred = torch.tensor([[0.5, 1.0], [0.0, 0.2]], dtype=torch.float64)
    m = metrics.reconstruction_metrics(pred, metrics.TestSet(target, [3, 7]))
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
    m = metrics.reconstruction_metrics(pred, metrics.TestSet(target, [0]))
    assert m["mse"] == pytest.approx(0.01, rel=1e-6)
    assert m["bce"] == pytest.approx(-math.log(1 - 1e-7), rel=1e-6)  # both clamped to ~exact
    worst = metrics.reconstruction_metrics(torch.tensor([[0.0]]),
                                           metrics.TestSet(torch.tensor([[1.0]]), [0]))
    assert worst["bce"] == pytest.approx(-math.log(1e-7))  # finite, not inf


def test_psnr_and_per_digit_omits_absent_digits():
    assert metrics.psnr(0.01) == pytest.approx(20.0)
    assert metrics.psnr(1.0) == 0.0
    assert metrics.psnr(0.0) == math.inf
    m = metrics.reconstruction_metrics(torch.zeros(3, 4),
                                       metrics.TestSet(torch.ones(3, 4) * 0.5, [1, 1, 9]))
    assert set(m["mse_per_digit"]) == {"1", "9"}


def test_rounded_and_flat_metrics():
    assert files.rounded({"a": [1 / 3, 2], "b": math.inf, "c": "cpu"}) == \
        {"a": [0.333333, 2], "b": None, "c": "cpu"}
    flat = metrics.flat({"mse": 0.5, "mse_per_digit": {"3": 0.1}, "test_loss": 2.0,
                         "psnr": math.inf, "denoise_mse": 0.2})
    assert flat == {"test_mse": 0.5, "test_mse_digit_3": 0.1, "test_loss": 2.0,
                    "test_denoise_mse": 0.2}


# --------------------------------------------------------------------------- replica statistics


def test_headline_is_mean_std_and_n_without_test_loss_when_it_is_mse():
    replicas = [{"seed": 0, "mse": 0.1, "sse_per_image": 78.4, "test_loss": 0.4},
                {"seed": 1, "mse": 0.2, "sse_per_image": 156.8, "test_loss": 0.8},
                {"seed": 2, "mse": 0.3, "sse_per_image": 235.2, "test_loss": 1.2}]
    h = metrics.headline(replicas, cfg(pixels="-1,1"))
    assert list(h) == ["mse", "sse_per_image", "test_loss", "n"] and h["n"] == 3
    assert h["mse"] == pytest.approx({"mean": 0.2, "std": 0.1})  # sample std (ddof 1)
    assert h["test_loss"]["mean"] == pytest.approx(0.8)
    assert "test_loss" not in metrics.headline(replicas, cfg(pixels="0,1", loss="mse"))
    assert "test_loss" in metrics.headline(replicas, cfg(pixels="0,1", loss="half_mse"))
    one = metrics.headline(replicas[:1], cfg())
    assert one["n"] == 1 and one["mse"] == {"mean": 0.1, "std": 0.0}  # no NaN for one replica


def test_averaged_over_replicas_per_digit_too():
    replicas = [{"seed": 0, "mse": 0.1, "mse_per_digit": {"3": 0.2, "7": 0.0}},
                {"seed": 1, "mse": 0.3, "mse_per_digit": {"3": 0.4, "7": 0.1}}]
    mean = metrics.averaged(replicas)
    assert set(mean) == {"mse", "mse_per_digit"}  # the seed is no metric
    assert mean["mse"] == pytest.approx(0.2)
    assert mean["mse_per_digit"] == pytest.approx({"3": 0.3, "7": 0.05})


# --------------------------------------------------------------------------- PCA


def structured(n, d=20, rank=5, seed=0):
    """Low-rank signal plus small noise: every direction has some variance, a few a lot."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, rank, generator=g, dtype=torch.float64)
    w = torch.randn(rank, d, generator=g, dtype=torch.float64)
    return 0.5 + 0.1 * z @ w + 0.01 * torch.randn(n, d, generator=g, dtype=torch.float64)


def test_pca_full_rank_reconstructs_exactly():
    # 20 pixels, not 784: one eigendecomposition of 784 x 784 (in test_pca_stage) is enough
    # for the suite, and it can take seconds on a busy CPU.
    x = structured(1000, seed=3)
    mean, comps = pca.fit_pca(x, chunk=300)  # chunked accumulation too
    assert comps.shape == (20, 20)
    whole_mean, whole_comps = pca.fit_pca(x, chunk=1000)
    assert torch.allclose(mean, whole_mean, atol=1e-14)
    assert torch.allclose(comps, whole_comps, atol=1e-8)  # signs fixed: the same, not flipped
    assert (pca.pca_reconstruct(x, mean, comps, 20) - x).abs().max() < 1e-10
    assert pca.mse_by_components(x, mean, comps)[-1] < 1e-10


def test_pca_components_orthonormal_and_sorted():
    train = structured(500)
    mean, comps = pca.fit_pca(train)
    assert torch.allclose(comps @ comps.T, torch.eye(20, dtype=torch.float64), atol=1e-10)
    variance = ((train - mean) @ comps.T).var(dim=0)
    assert (variance[:-1] >= variance[1:]).all()
    assert torch.allclose(mean, train.mean(0))


def test_pca_mse_strictly_falls_and_curve_matches_reconstruction():
    train, test = structured(500, seed=1), structured(200, seed=2)
    mean, comps = pca.fit_pca(train)
    curve = pca.mse_by_components(test, mean, comps)
    assert curve.shape == (21,)
    assert (curve[1:] < curve[:-1]).all()
    assert curve[0] == pytest.approx(float(((test - mean) ** 2).mean()), rel=1e-12)
    for k in (0, 1, 5, 13, 20):
        direct = metrics.mse(pca.pca_reconstruct(test, mean, comps, k), test)
        assert float(curve[k]) == pytest.approx(direct, rel=1e-9, abs=1e-15)


CURVE = {"components": np.arange(785.0), "test_mse": np.linspace(0.06, 0.0, 785)}


def test_pca_at_caps_the_latent_size_at_784():
    assert pca.pca_at(CURVE, 8) == {"k": 8, "mse": pytest.approx(CURVE["test_mse"][8])}
    assert pca.pca_at(CURVE, 1152) == {"k": 784, "mse": 0.0}
    with pytest.raises(ValueError, match="no row for 30 components"):
        pca.pca_at({"components": np.arange(10.0), "test_mse": np.zeros(10)}, 30)


def test_metrics_file_adds_pca_mse_below_784_only():
    # at 784 and above PCA is exact (mse 0): nothing for a reviewer to diff
    head = {"mse": {"mean": 0.01, "std": 0.001}, "n": 3}
    assert metric_files.entry(head, pca.pca_at(CURVE, 8)) == \
        {**head, "pca_mse": pytest.approx(CURVE["test_mse"][8])}
    assert metric_files.entry(head, pca.pca_at(CURVE, 1000)) == head


# --------------------------------------------------------------------------- evaluate_model


def cfg(kind="mlp", pixels="0,1", noise=0.0, loss="mse"):
    base = {"kind": kind, "pixels": pixels, "input_noise": noise, "init": "torch",
            "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0}, "loss": loss,
            "batch_size": 8, "epochs": 1, "activation": "relu", "output_activation": "sigmoid"}
    if kind == "mlp":
        base |= {"encoder": [784, 8], "decoder": [8, 784], "code_activation": "none",
                 "dropout": 0.0}
    else:
        base |= {"channels": [1, 2, 2], "kernel": 3, "pool": 2}
    return kinds.validate_model("m", base)


class Constant(nn.Module):
    """Outputs `value` everywhere, in the model's own scale."""

    latent_dim = 1

    def __init__(self, value):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))

    def forward(self, x):
        return torch.full_like(x, float(self.value))


def as_test_set(labels, pixels):
    return metrics.TestSet.of_images(pixels, labels)


def batch(n=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 10, n, dtype=np.uint8), rng.integers(0, 256, (n, 784), dtype=np.uint8)


def test_minus_one_one_outputs_are_mapped_not_clamped():
    labels = np.array([0, 1], dtype=np.uint8)
    pixels = np.full((2, 784), 255, dtype=np.uint8)
    m = metrics.evaluate_model(Constant(1.2), cfg(pixels="-1,1"), as_test_set(labels, pixels), 0)
    assert m["mse"] == pytest.approx(0.01, rel=1e-5)  # 1.2 -> 1.1 on [0,1], target 1.0
    assert m["test_loss"] == pytest.approx(0.04, rel=1e-5)  # (1.2 - 1.0)^2 on [-1,1]


def test_test_loss_in_source_scale():
    labels, pixels = batch()
    m = metrics.evaluate_model(Constant(0.5), cfg(loss="half_mse"), as_test_set(labels, pixels), 0)
    assert m["test_loss"] == pytest.approx(0.5 * m["mse"], rel=1e-9)
    m = metrics.evaluate_model(Constant(0.2), cfg(pixels="-1,1"), as_test_set(labels, pixels), 0)
    assert m["test_loss"] == pytest.approx(4 * m["mse"], rel=1e-6)


@pytest.mark.parametrize("kind,noise", [("mlp", 0.0), ("conv", 0.5), ("mlp", 0.3)])
def test_evaluate_model_keys(kind, noise):
    torch.manual_seed(0)
    c = cfg(kind, pixels="-1,1", noise=noise)
    model = c.make().eval()
    labels, pixels = batch()
    test = as_test_set(labels, pixels)
    m = metrics.evaluate_model(model, c, test, noise_seed=3)
    keys = {"mse", "sse_per_image", "bce", "psnr", "mse_per_digit", "test_loss"}
    if noise:
        keys |= {"denoise_mse", "noisy_input_mse"}
    assert set(m) == keys
    assert set(m["mse_per_digit"]) == {str(d) for d in np.unique(labels)}
    assert all(math.isfinite(v) for v in metrics.flat(m).values())
    assert metrics.evaluate_model(model, c, test, noise_seed=3) == m  # deterministic


def test_noisy_input_is_the_same_noise_the_model_sees():
    labels, pixels = batch()
    c = cfg(noise=0.5)
    m = metrics.evaluate_model(nn.Identity(), c, as_test_set(labels, pixels), noise_seed=5)
    # an identity model returns its noisy input: denoising it gains nothing
    assert m["denoise_mse"] == m["noisy_input_mse"] > 0.01
    assert m["mse"] == pytest.approx(0, abs=1e-12)  # float32 / 255 vs float64 / 255
    other = metrics.evaluate_model(nn.Identity(), c, as_test_set(labels, pixels), noise_seed=6)
    assert other["noisy_input_mse"] != m["noisy_input_mse"]


def test_chunk_rows_keeps_the_widest_activation_within_budget():
    assert metrics.chunk_rows(cfg("mlp").make(), "0,1") == metrics.MAX_ROWS  # 784 floats a row
    conv = kinds.validate_model("c", {**cfg("conv").model_dump(), "channels": [1, 4, 16]}).make()
    widest = 16 * 24 * 24 * 4  # bytes of one row's feature maps after the second convolution
    assert metrics.chunk_rows(conv, "-1,1") == metrics.CHUNK_BYTES // widest < metrics.MAX_ROWS


# --------------------------------------------------------------------------- pca stage


@pytest.fixture
def one_torch_thread():
    """On a busy machine torch's threads wait on each other: one eigendecomposition of
    784 x 784 took 0.1 s with one thread and 0.15 to 10 s with two (2 cores, load 5)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_pca_stage(tmp_path, one_torch_thread):
    for split, n in (("train", 1000), ("test", 30)):  # > 784 training images: full rank
        labels, pixels = batch(n, seed=n)
        data.write_mnist_csv(tmp_path / "csv" / f"mnist_{split}.csv", labels, pixels)
    curve_csv = tmp_path / "plots" / "pca_curve.csv"
    run_stage("pca", tmp_path / "csv", curve_csv)  # reads no params: any cwd will do
    rows = list(csv.DictReader(curve_csv.open()))
    assert list(rows[0]) == ["components", "test_mse"]
    assert [int(r["components"]) for r in rows] == list(range(785))
    mse = np.array([float(r["test_mse"]) for r in rows])
    assert (np.diff(mse) <= 0).all() and mse[-1] < 1e-9 < mse[8]
    # k = 0 keeps only the training mean (6 significant digits in the file)
    train_mean = batch(1000, seed=1000)[1].mean(axis=0) / 255
    assert mse[0] == pytest.approx(((batch(30, seed=30)[1] / 255 - train_mean) ** 2).mean(),
                                   rel=1e-5)
    assert not list(tmp_path.rglob("*.tmp"))
