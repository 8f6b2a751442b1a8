"""The figures: the stage on the session's project (conftest: a trained mlp named deep3 and a
denoising conv, two replicas each, evaluated), run in-process on a copy; every PNG written,
valid, without volatile metadata, the same bytes twice, logged to MLflow; the figure functions
on a single replica and on models that leave a figure with nothing to show."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, STALE_MODEL, dvc_args, run_stage
from PIL import Image

from aebench import (
    charts,
    config,
    constants,
    data,
    figures,
    files,
    kinds,
    metric_files,
    models,
    mosaics,
)

EVERY_PNG = set(figures.FIGURES)
VOLATILE = ("Software", "Creation Time", "date:create", "date:modify", "Date")


@pytest.fixture(scope="module")
def root(project, tmp_path_factory) -> Path:
    """A copy of the project with plots/figures drawn by the stage (the arguments of dvc.yaml).
    The stale model's files are garbage there: the stage must not read them."""
    root = project.copy(tmp_path_factory.mktemp("figures") / "project")
    (root / "data/models" / STALE_MODEL / "r0.pt").write_bytes(b"garbage")
    (root / "plots/curves" / f"{STALE_MODEL}.csv").write_text("garbage\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
        mp.chdir(root)
        run_stage("figures")
    return root


@pytest.fixture
def in_root(root, project, monkeypatch) -> Path:
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
    return root


def chunks(blob: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file."""
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos:pos + 4])
        out.append((blob[pos + 4:pos + 8], blob[pos + 8:pos + 8 + length]))
        pos += 12 + length
    return out


def check_png(path: Path) -> None:
    blob = path.read_bytes()
    assert 0 < len(blob) < 300_000, path.name
    kinds_of = [kind for kind, _ in chunks(blob)]
    assert b"tIME" not in kinds_of, path.name
    for kind, body in chunks(blob):
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            assert body.split(b"\0")[0].decode() not in VOLATILE, (path.name, body[:40])
    with Image.open(io.BytesIO(blob)) as img:
        img.verify()
    with Image.open(io.BytesIO(blob)) as img:
        assert img.format == "PNG"
        w, h = img.size
        assert 200 <= w <= 2500 and 100 <= h <= 2500, (path.name, img.size)
        assert len(np.unique(np.asarray(img.convert("L")))) > 2, f"{path.name} is blank"


OUT_DIR, OVERLAY = 6, 7  # positions of the figures folder and the overlay table in the args


def test_every_png_is_written_and_valid(root):
    out = root / dvc_args("figures")[OUT_DIR]
    assert {p.name for p in out.iterdir()} == EVERY_PNG  # no temporary files left
    for name in EVERY_PNG:
        check_png(out / name)


def test_overlay_table_has_every_model_and_epoch(root):
    rows = (root / dvc_args("figures")[OVERLAY]).read_text().splitlines()
    assert rows[0] == "model,epoch,test_mse,test_mse_std"
    assert sorted({r.split(",")[0] for r in rows[1:]}) == ["convnoisy", "deep3"]
    assert len(rows) == 1 + 2 * 2  # two models, two epochs each


def test_figures_are_deterministic(in_root):
    args = dvc_args("figures")
    args[OUT_DIR], args[OVERLAY] = "plots/again", "plots/again.csv"
    run_stage("figures", *args)
    for name in EVERY_PNG:
        assert (in_root / dvc_args("figures")[OUT_DIR] / name).read_bytes() == \
            (in_root / "plots/again" / name).read_bytes(), name


def test_figures_go_to_an_evaluation_run(root, mlflow_client):
    client = mlflow_client
    experiment = client.get_experiment_by_name("aebench").experiment_id
    runs = client.search_runs([experiment], "attributes.run_name = 'figures'")
    assert runs and all(run.info.status == "FINISHED" for run in runs)
    logged = client.list_artifacts(runs[-1].info.run_id, "figures")  # the oldest: the fixture's
    assert {Path(a.path).name for a in logged} == EVERY_PNG


def test_missing_metrics_fail_naming_the_model(in_root, tmp_path):
    args = dvc_args("figures")
    partial = tmp_path / "metrics"  # deep3's file only
    partial.mkdir()
    (partial / "deep3.json").write_bytes((in_root / args[2] / "deep3.json").read_bytes())
    args[2], args[OUT_DIR] = str(partial), str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"metrics/convnoisy.json: missing; run `dvc "
                                                r"repro`"):
        run_stage("figures", *args)
    assert not (tmp_path / "out").exists()


def test_interrupted_figures_change_no_output(root, project, tmp_path):
    # Ctrl-C while the PNGs are drawn (side by side, in workers), after denoising.png is done
    # (it would change: another noise seed): no PNG and no table may be replaced.
    copy = Path(shutil.copytree(root, tmp_path / "project"))
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["evaluate"]["noise_seed"] += 1
    (copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    outputs = [copy / dvc_args("figures")[OVERLAY],
               *sorted((copy / dvc_args("figures")[OUT_DIR]).iterdir())]
    def state(path: Path) -> tuple[int, str]:  # a replaced file is a new inode
        return path.stat().st_ino, hashlib.sha256(path.read_bytes()).hexdigest()

    before = {p.name: state(p) for p in outputs}
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": project.tracking_uri}
    stage = subprocess.Popen([sys.executable, "-m", "stages.figures", *dvc_args("figures")],
                             cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_DFL))
    temps = copy / ".dvc/tmp/aebench"
    own = temps / f"{socket.gethostname()}-{stage.pid}"  # the new folder is in it
    for _ in range(1200):
        if list(own.glob(".figures.*.tmp/denoising.png")):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"figures never wrote denoising.png: {stage.communicate()}")
    stage.send_signal(signal.SIGINT)
    _, err = stage.communicate(timeout=120)
    assert (stage.returncode, err.splitlines()[-1]) == (130, "interrupted: stages.figures "
                                                             "(SIGINT)")
    assert {p.name: state(p) for p in outputs} == before
    assert not list(temps.iterdir())  # its and its workers' temporaries went with them


# --------------------------------------------------------------------------- figure functions


@pytest.fixture(scope="module")
def inputs(project) -> figures.Inputs:
    """What the stage loads, read the same way (replica 0 of each model)."""
    root = project.root
    cfgs = kinds.read_models(config.load_params(root / "params.yaml"))
    csv = root / "data/csv"
    return figures.Inputs(
        cfgs=cfgs,
        nets={n: models.load_replicas(root / "data/models", n, c, 1)[0][0]
              for n, c in cfgs.items()},
        headline=metric_files.read(root / "metrics", cfgs),
        details=files.read_json(root / "reports/details.json"),
        pca_curve=files.read_columns(root / "plots/pca_curve.csv", ("components", "test_mse")),
        curves={n: files.read_columns(root / f"plots/curves/{n}.csv", ("epoch",)) for n in cfgs},
        test=data.read_mnist_csv(csv / constants.CSV_NAMES["test"]),
        train=data.read_mnist_csv(csv / constants.CSV_NAMES["train"]),
        noise_seed=1234)


def only(inp: figures.Inputs, names: list[str]) -> figures.Inputs:
    pick = lambda d: {n: d[n] for n in names}  # noqa: E731
    return dataclasses.replace(inp, cfgs=pick(inp.cfgs), nets=pick(inp.nets),
                               headline=pick(inp.headline), details=pick(inp.details),
                               curves=pick(inp.curves))


def test_figures_drawn_side_by_side_are_the_bytes_drawn_one_after_another(inputs, tmp_path):
    paths = {w: figures.draw_all(inputs, tmp_path / str(w), workers=w) for w in (1, 3)}
    assert [p.name for p in paths[3]] == list(figures.FIGURES)
    for one, side in zip(paths[1], paths[3], strict=True):
        assert one.read_bytes() == side.read_bytes(), one.name


def test_error_bars_and_bands_with_a_single_replica(inputs, tmp_path):
    one = dataclasses.replace(
        inputs,
        headline={n: {**h, "n": 1, "mse": {**h["mse"], "std": 0.0}}
                  for n, h in inputs.headline.items()},
        details={n: {**d, "replicas": d["replicas"][:1]} for n, d in inputs.details.items()},
        curves={n: {**c, "test_mse_std": np.zeros_like(c["test_mse"]),
                    "train_loss_std": np.zeros_like(c["train_loss"])}
                for n, c in inputs.curves.items()})
    for name in ("test_mse.png", "training_curves.png"):  # error bars; bands
        figures.FIGURES[name](one, tmp_path / name)
        check_png(tmp_path / name)


def test_the_bars_are_best_first_with_values_a_reader_can_tell_apart():
    results = {"deep3": {"mse": 0.030763, "mse_std": 0.000279, "latent_dim": 3,
                         "pca_mse": 0.051609},
               "over500": {"mse": 0.004081, "mse_std": 7e-05, "latent_dim": 500,
                           "pca_mse": 4.94e-05, "denoise_mse": 0.00997},
               "conv16": {"mse": 0.000902, "mse_std": 0.000185, "latent_dim": 2304,
                          "pca_mse": 1e-12}}
    labels = charts.bar_labels(results)
    assert list(labels) == ["conv16", "over500", "deep3"]  # best first
    assert labels["conv16"] == {"mse": "0.000902 ± 0.0002  ·  best",
                                "pca": "PCA exact: 0 (k ≥ 784)"}  # no sliver at 1e-5
    assert labels["over500"]["mse"] == "0.00408 ± 7e-05  ·  4.52× the best  ·  83× PCA"
    assert labels["over500"]["denoise"] == "0.00997  on noisy inputs"
    assert labels["deep3"] == {"mse": "0.0308 ± 0.0003  ·  34.1× the best  ·  0.6× PCA",
                               "pca": "PCA 0.0516"}
    assert charts.bar_labels({"deep3": results["deep3"]})["deep3"]["mse"] == \
        "0.0308 ± 0.0003  ·  0.6× PCA"
    far = {"over500": {**results["over500"], "mse": 0.0642, "mse_std": 0.0}}
    assert charts.bar_labels(far)["over500"]["mse"] == "0.0642  ·  1,300× PCA"


def test_a_figure_with_nothing_to_show_says_so(inputs, tmp_path):
    # No model trained on noisy inputs; no mlp (no pixel weights to show) and no deep3.
    clean, conv = only(inputs, ["deep3"]), only(inputs, ["convnoisy"])
    for inp, name in ((clean, "denoising.png"), (conv, "encoder_weights.png"),
                      (conv, "image_7777.png")):
        figures.FIGURES[name](inp, tmp_path / name)
        check_png(tmp_path / name)
    full = tmp_path / "full"
    figures.FIGURES["denoising.png"](inputs, full)
    assert full.read_bytes() != (tmp_path / "denoising.png").read_bytes()


def test_shown_noisy_input_is_the_one_the_model_denoised(inputs):
    cfg, model = inputs.cfgs["convnoisy"], inputs.nets["convnoisy"]
    x = torch.from_numpy(inputs.test[1][:12])
    noise = {"noise": cfg.input_noise, "noise_seed": inputs.noise_seed}
    noisy01 = models.reconstruct(torch.nn.Identity(), x, cfg.pixels, **noise)
    out01 = models.reconstruct(model, x, cfg.pixels, **noise)
    with torch.no_grad():  # the model on exactly the noisy image the figure shows ([0,1] model)
        direct = model(noisy01.float())
    torch.testing.assert_close(out01, direct, atol=1e-5, rtol=0)
    kept = noisy01 != 0
    assert 0.3 < (~kept).float().mean() < 0.7  # p = 0.5 of the pixels dropped
    torch.testing.assert_close(noisy01[kept], (x.float() / 255 * 2)[kept])  # the rest x 2


# --------------------------------------------------------------------------- drawing helpers


def test_figure_digits_first_of_each_digit_then_first_15():
    labels = np.array([3, 1, 3, 0, 2, 9, 5, 4, 6, 7, 8, 1, 2, 0, 5, 6, 7])
    idx, groups, captions = mosaics.figure_digits(labels)
    assert list(idx[:10]) == [3, 1, 4, 0, 7, 6, 8, 9, 10, 5]
    assert list(idx[10:]) == list(range(15)) and groups == [10, 15]
    assert "each digit 0-9" in captions[0] and "first 15" in captions[1]
    idx, groups, _ = mosaics.figure_digits(np.array([1, 1, 4]))
    assert list(idx) == [0, 2, 0, 1, 2] and groups == [2, 3]


@pytest.mark.parametrize("dims", [1, 3, 30, 100])  # exact SVD up to 64, randomized above
def test_pca_2d_matches_svd_and_is_deterministic(dims):
    rng = np.random.default_rng(dims)
    codes = rng.standard_normal((300, dims)) * np.geomspace(3, 0.01, dims)
    xy, ratio = charts.pca_2d(codes)
    xy2, ratio2 = charts.pca_2d(codes.copy())
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
