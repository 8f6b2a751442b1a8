"""The figures stage on tiny models: every PNG written, valid, deterministic, logged to MLflow.

The project is built once per module in a temporary folder: three tiny untrained models (an mlp
named deep3, a denoising conv, a denoising mlp) plus a clean conv kept out of params.yaml,
their checkpoints and real MLflow runs in a temporary sqlite store, 40 training and 30 test
images, and fake metrics, curves and PCA files in the layout the other stages write.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from aebench import figures, models, tracking
from stages import figures as stage

N_TRAIN, N_TEST = 40, 30

_COMMON = {"init": "torch", "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
           "loss": "mse", "batch_size": 8, "epochs": 2}
CONFIGS = {
    "deep3": {"kind": "mlp", "encoder": [784, 16, 3], "decoder": [3, 16, 784],
              "activation": "relu", "code_activation": "none", "output_activation": "tanh",
              "dropout": 0.0, "pixels": "-1,1", "input_noise": 0.0, **_COMMON},
    "convnoisy": {"kind": "conv", "channels": [1, 2, 4], "kernel": 3, "pool": 2,
                  "activation": "relu", "output_activation": "tanh", "pixels": "-1,1",
                  "input_noise": 0.5, **_COMMON},
    "mlpnoisy": {"kind": "mlp", "encoder": [784, 20], "decoder": [20, 784],
                 "activation": "tanh", "code_activation": "tanh", "output_activation": "sigmoid",
                 "dropout": 0.0, "pixels": "0,1", "input_noise": 0.3, **_COMMON,
                 "loss": "bce"},
    "convclean": {"kind": "conv", "channels": [1, 2, 4], "kernel": 3, "pool": 2,
                  "activation": "relu", "output_activation": "sigmoid", "pixels": "0,1",
                  "input_noise": 0.0, **_COMMON, "loss": "half_mse"},
}
IN_PARAMS = ["deep3", "convnoisy", "mlpnoisy"]
EVERY_PNG = set(stage.FIGURES)


def write_csv(path: Path, labels: np.ndarray, pixels: np.ndarray) -> None:
    header = ["label"] + [f"{r}x{c}" for r in range(1, 29) for c in range(1, 29)]
    rows = np.column_stack([labels, pixels]).astype(int)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows.tolist())


def fake_digits(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels cycling 0..9 (so every digit is there) and blobby images, not pure noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 28, 28))
    for i, d in enumerate(labels):
        cy, cx = 8 + d + rng.integers(-2, 3), 8 + (d * 7) % 12 + rng.integers(-2, 3)
        images[i] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0)
    return labels, (images * 255).astype(np.uint8).reshape(n, 784)


def write_params(folder: Path, names: list[str]) -> None:
    params = {"evaluate": {"noise_seed": 1234}, "models": {n: CONFIGS[n] for n in names}}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("figproject")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp.chdir(root)
        csv_dir = root / "data" / "csv"
        csv_dir.mkdir(parents=True)
        write_csv(csv_dir / "mnist_train.csv", *fake_digits(N_TRAIN, 0))
        write_csv(csv_dir / "mnist_test.csv", *fake_digits(N_TEST, 1))

        import mlflow

        experiment = tracking.open_store()
        client = mlflow.MlflowClient()
        metrics, pca, runs = {}, {}, {}
        curves = root / "plots" / "curves"
        curves.mkdir(parents=True)
        for i, (name, cfg) in enumerate(CONFIGS.items()):
            torch.manual_seed(i)
            model = models.build_model(cfg)
            models.save_checkpoint(root / "data/models" / name / "weights.pt", model, name, cfg)
            run_id = client.create_run(experiment, run_name=name).info.run_id
            runs[name] = run_id
            tracking.write_run_info(root / "data/models" / name, {"run_id": run_id})
            k = min(model.latent_dim, 784)
            metrics[name] = {"mse": 0.05 / (i + 1), "sse_per_image": 784 * 0.05 / (i + 1),
                             "psnr": 20.0, "latent_dim": model.latent_dim}
            if cfg["input_noise"] > 0:
                metrics[name].update({"denoise_mse": 0.06 / (i + 1), "noisy_input_mse": 0.2})
            pca[f"pca{k}"] = {"mse": 0.0 if k == 784 else 0.06 / (1 + k), "latent_dim": k}
            with open(curves / f"{name}.csv", "w") as f:
                f.write("epoch,train_loss,train_loss_last_batch,test_mse\n")
                for e in range(1, cfg["epochs"] + 1):
                    f.write(f"{e},{0.3 / e},{0.31 / e},{0.06 / e / (i + 1)}\n")
        (root / "metrics").mkdir()
        (root / "metrics/models.json").write_text(json.dumps(metrics))
        (root / "metrics/pca.json").write_text(json.dumps(dict(sorted(pca.items()))))
        with open(root / "plots/pca_curve.csv", "w") as f:
            f.write("components,test_mse\n")
            for k in range(785):
                f.write(f"{k},{0.0 if k == 784 else 0.06 * (1 - k / 784) ** 3}\n")
        write_params(root, IN_PARAMS)
        yield {"root": root, "runs": runs, "client": client}


def args(root: Path, out: str = "plots/figures") -> list[str]:
    return [str(root / p) for p in ("data/csv", "data/models", "metrics/models.json",
                                    "metrics/pca.json", "plots/curves", "plots/pca_curve.csv",
                                    out)]


@pytest.fixture(scope="module")
def figures_dir(project):
    assert stage.main(args(project["root"])) == 0
    return project["root"] / "plots/figures"


def test_every_png_is_written_and_valid(figures_dir):
    assert {p.name for p in figures_dir.iterdir()} == EVERY_PNG  # no temporary files left
    for name in EVERY_PNG:
        blob = (figures_dir / name).read_bytes()
        assert 0 < len(blob) < 300_000, name
        with Image.open(io.BytesIO(blob)) as img:
            img.verify()
        with Image.open(io.BytesIO(blob)) as img:
            assert img.format == "PNG"
            w, h = img.size
            assert 200 <= w <= 2500 and 100 <= h <= 2500, (name, img.size)
            assert "Software" not in img.info, name  # no matplotlib version in the file
            assert len(np.unique(np.asarray(img.convert("L")))) > 2, f"{name} is blank"


def test_figures_are_deterministic(project, figures_dir):
    assert stage.main(args(project["root"], "plots/again")) == 0
    again = project["root"] / "plots/again"
    for name in EVERY_PNG:
        assert (figures_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_each_model_run_gets_the_figures_that_show_it(project, figures_dir):
    expected = {
        "deep3": EVERY_PNG - {"denoising.png"},
        "convnoisy": EVERY_PNG - {"encoder_weights.png", "image_7777.png"},
        "mlpnoisy": EVERY_PNG - {"image_7777.png"},
    }
    for name, pngs in expected.items():
        logged = project["client"].list_artifacts(project["runs"][name], "figures")
        assert {Path(a.path).name for a in logged} == pngs, name
    assert project["client"].list_artifacts(project["runs"]["convclean"]) == []


def test_models_missing_from_a_category_still_give_every_file(project, tmp_path, monkeypatch):
    # One conv model, no input noise: no denoising model, no mlp, no deep3.
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, ["convclean"])
    assert stage.main(args(project["root"], str(tmp_path / "out"))) == 0
    assert {p.name for p in (tmp_path / "out").iterdir()} == EVERY_PNG
    for name in EVERY_PNG:
        with Image.open(tmp_path / "out" / name) as img:
            img.verify()
    logged = project["client"].list_artifacts(project["runs"]["convclean"], "figures")
    assert {Path(a.path).name for a in logged} == EVERY_PNG - {
        "denoising.png", "encoder_weights.png", "image_7777.png"}


def test_missing_metrics_fail_naming_the_model(project, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, ["deep3"])
    metrics = project["root"] / "metrics/models.json"
    partial = tmp_path / "models.json"
    partial.write_text(json.dumps({"other": json.loads(metrics.read_text())["deep3"]}))
    argv = args(project["root"], str(tmp_path / "out"))
    argv[2] = str(partial)
    with pytest.raises(ValueError, match="no metrics for deep3"):
        stage.main(argv)
    assert not (tmp_path / "out").exists()


def test_a_run_missing_from_the_store_is_a_warning(project, tmp_path, capsys):
    (tmp_path / "ghost").mkdir()
    tracking.write_run_info(tmp_path / "ghost", {"run_id": "0" * 32})
    png = figures.placeholder(tmp_path / "x.png", "title", "message")
    stage.log_figures(tmp_path, {png.name: ["ghost"]}, tmp_path)
    assert "warning: ghost: figures not logged" in capsys.readouterr().err


def test_shown_noisy_input_is_the_one_the_model_denoised():
    torch.manual_seed(0)
    cfg = CONFIGS["convnoisy"]
    model = models.build_model(cfg).eval()
    x = fake_digits(12, 3)[1]
    noise = {"noise": cfg["input_noise"], "noise_seed": 1234}
    noisy01 = stage._unit(torch.nn.Identity(), x, cfg, **noise)
    out01 = stage._unit(model, x, cfg, **noise)
    with torch.no_grad():
        direct = models.to_unit_scale(model(torch.from_numpy(noisy01 * 2 - 1).float()), "-1,1")
    np.testing.assert_allclose(out01, direct.numpy(), atol=1e-5)
    assert (noisy01 == 0.5).mean() > 0.3  # masked pixels: zero on [-1,1] pixels, grey on [0,1]


def test_figure_digits_first_of_each_digit_then_first_15():
    labels = np.array([3, 1, 3, 0, 2, 9, 5, 4, 6, 7, 8, 1, 2, 0, 5, 6, 7])
    idx, groups, captions = figures.figure_digits(labels)
    assert list(idx[:10]) == [3, 1, 4, 0, 7, 6, 8, 9, 10, 5]
    assert list(idx[10:]) == list(range(15)) and groups == [10, 15]
    assert "each digit 0-9" in captions[0] and "first 15" in captions[1]
    idx, groups, _ = figures.figure_digits(np.array([1, 1, 4]))
    assert list(idx) == [0, 2, 0, 1, 2] and groups == [2, 3]


@pytest.mark.parametrize("dims", [1, 3, 30, 200])
def test_pca_2d_matches_svd_and_is_deterministic(dims):
    rng = np.random.default_rng(dims)
    codes = rng.standard_normal((300, dims)) * np.geomspace(3, 0.01, dims)
    xy, ratio = figures.pca_2d(codes)
    xy2, ratio2 = figures.pca_2d(codes.copy())
    assert xy.shape == (300, 2) and np.array_equal(xy, xy2) and np.array_equal(ratio, ratio2)
    centred = codes - codes.mean(axis=0)
    s = np.linalg.svd(centred, compute_uv=False)
    k = min(2, dims)
    np.testing.assert_allclose(ratio[:k], s[:k] ** 2 / (s ** 2).sum(), rtol=1e-4)
    vt = np.linalg.svd(centred, full_matrices=False)[2][:k]
    # the same axes up to sign: |cosine| of each projection with the exact one is 1
    exact = centred @ vt.T
    cos = np.abs((xy[:, :k] * exact).sum(0)) / np.linalg.norm(xy[:, :k], axis=0) / \
        np.linalg.norm(exact, axis=0)
    np.testing.assert_allclose(cos, 1, atol=1e-4)
    if dims == 1:
        assert np.all(xy[:, 1] == 0)
