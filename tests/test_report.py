"""The Markdown summary: every model as mean ± std with n, PCA comparisons, the reference rows,
the noise sentence, denoising, figure links; and the report stage on the session's project."""

from __future__ import annotations

import numpy as np
from conftest import STALE_MODEL, TINY_MODELS, run_stage

from aebench import report, tracking


def model(latent, mse, n=3, std=0.001, pca=None, **extra):
    """(headline entry, details entry) of a model with test mse `mse` +- `std` over n replicas;
    `pca` (k, mse) as evaluate takes it from the PCA curve."""
    k, pca_mse = pca or (min(latent, 784), CURVE["test_mse"][min(latent, 784)])
    mean = {"mse": mse, "sse_per_image": 784 * mse, "bce": 0.1, "psnr": 20.0,
            "mse_per_digit": {"0": mse}, "test_loss": 4 * mse, **extra}
    headline = {"mse": {"mean": mse, "std": std},
                "sse_per_image": {"mean": 784 * mse, "std": 784 * std},
                "test_loss": {"mean": 4 * mse, "std": 4 * std}, "n": n}
    details = {"kind": "mlp", "latent_dim": latent, "params": 1234, "loss": "mse",
               "device": "cuda", "pca": {"k": k, "mse": float(pca_mse)},
               "replicas": [{"seed": s, **mean} for s in range(n)], "mean": mean}
    return headline, details


# The pipeline's PCA curve at k = 30 and 128 (the published PCA rows), made up elsewhere.
CURVE = {"components": np.arange(785.0), "test_mse": np.linspace(0.06, 0.0, 785)}
CURVE["test_mse"][30], CURVE["test_mse"][128] = 0.0176866, 0.00420533
MODELS = {
    "under30": model(30, 0.01),  # beats PCA 30 (0.0177)
    "shallow128": model(128, 0.005),  # loses to PCA 128 (0.0042)
    "conv16": model(2304, 0.003, denoise_mse=0.02, noisy_input_mse=0.2),  # PCA exact at 784
    "odd": model(40, 0.02),
}
HEADLINE = {name: h for name, (h, _) in MODELS.items()}
DETAILS = {name: d for name, (_, d) in MODELS.items()}


def summary(headline=HEADLINE, details=DETAILS, figures=()):
    return report.summary(headline, details, CURVE, list(figures))


def row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_summary_lists_every_model_and_compares_with_pca():
    text = summary()
    for name in MODELS:
        assert row(text, name)
    assert "| 0.01769 (k=30) | 0.57 | yes |" in row(text, "under30")
    assert "| 0.00421 (k=128) | 1.19 | no |" in row(text, "shallow128")
    assert "n/a (PCA exact)" in row(text, "conv16") and "(k=784)" in row(text, "conv16")
    assert "(k=40)" in row(text, "odd")  # the curve has every k: no nearest-size guess
    assert "| 1,234 |" in row(text, "under30")


def test_model_rows_are_mean_plus_minus_std_with_n():
    line = row(summary(), "under30")
    assert "| 0.01000 ± 0.00100 |" in line  # test MSE
    assert "| 7.84 ± 0.78 |" in line  # SSE/image
    assert "| 0.04000 ± 0.00400 (mse) |" in line  # test loss in the source's scale
    assert line.endswith("| 3 | cuda |")  # n, device
    headline = {"under30": {k: v for k, v in HEADLINE["under30"].items() if k != "test_loss"}}
    # no test_loss in the headline (the loss is the common mse): the mse stands in
    assert "| 0.01000 ± 0.00100 (mse) |" in row(summary(headline, DETAILS), "under30")


def test_noise_sentence_follows_the_smallest_n():
    one = {"under30": {**HEADLINE["under30"], "n": 1}, "odd": HEADLINE["odd"]}
    text = summary(one, DETAILS)
    assert "trained once (n = 1)" in text and "set train.replicas to 3 or more" in text
    assert "× the std" not in text
    three = {"under30": {**HEADLINE["under30"], "n": 5}, "odd": HEADLINE["odd"]}  # 5 and 3
    text = summary(three, DETAILS)
    assert "With n = 3 replicas per side" in text
    assert "about 2.3 × the std across replicas" in text  # t(0.975, 4) * sqrt(2/3) = 2.27
    assert "n = 1" not in text


def test_summary_reference_rows_next_to_pipeline_pca():
    text = summary()
    assert "| PCA (fit on the 60k training images) | 30 | 13.87 | 0.01769 | 13.87 | 0.01769 |" \
        in text
    assert "| PCA | 128 | 3.30 | 0.00421 | 3.30 | 0.00421 | shallow128 3.92 |" in text
    assert "| Hinton & Salakhutdinov 2006, deep autoencoder 784-1000-500-250-30 | 30 | 3.00 | " \
        "0.00383 |" in text


def test_denoising_table_only_for_denoising_models():
    text = summary()
    denoise = text.split("## Denoising")[1].split("##")[0]
    assert "| conv16 | 0.20000 | 0.02000 | 0.00300 | 10.00 | yes |" in denoise
    assert "under30" not in denoise and "odd" not in denoise
    clean = [n for n in MODELS if n != "conv16"]
    text = summary({n: HEADLINE[n] for n in clean}, {n: DETAILS[n] for n in clean})
    assert "## Denoising" not in text


def test_figure_links_relative_to_the_report(tmp_path):
    figures = tmp_path / "plots" / "figures"
    assert report.figure_links(figures, tmp_path / "reports/summary.md") == []
    (figures / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png", "notes.txt"):
        (figures / name).write_bytes(b"")
    links = report.figure_links(figures, tmp_path / "reports" / "summary.md")
    assert links == ["../plots/figures/a.png", "../plots/figures/b.png",
                     "../plots/figures/sub/c.png"]
    assert "- [a.png](../plots/figures/a.png)" in summary(figures=links)
    assert summary().rstrip().endswith("## Figures\n\nNone.")


def test_report_stage(project_copy, mlflow_client):
    (project_copy / "plots/figures").mkdir(parents=True)
    (project_copy / "plots/figures/x.png").write_bytes(b"")
    run_stage("report")  # the arguments of dvc.yaml
    text = (project_copy / "reports/summary.md").read_text()
    assert "- [x.png](../plots/figures/x.png)" in text
    for name in TINY_MODELS:
        assert row(text, name).endswith("| 2 | cpu |")  # n = train.replicas, device
    assert f"| {STALE_MODEL} |" not in text  # a folder in data/models is not a model
    assert "With n = 2 replicas per side" in text and "about 4.3 ×" in text
    assert "## Denoising" in text and "| convnoisy |" in text.split("## Denoising")[1]
    assert "| deep3 |" not in text.split("## Denoising")[1]
    assert sorted(p.name for p in (project_copy / "reports").iterdir()) == \
        ["details.json", "summary.md"]  # no temporary file left
    # attached to the evaluation run that wrote the details it read, as its description too
    experiment = mlflow_client.get_experiment_by_name("aebench").experiment_id
    sha = tracking.sha256_file(project_copy / "reports/details.json")
    (evaluation, *_) = mlflow_client.search_runs(
        [experiment], f"tags.details_sha256 = '{sha}'", order_by=["attributes.start_time DESC"])
    assert [a.path for a in mlflow_client.list_artifacts(evaluation.info.run_id, "reports")] == \
        ["reports/details.json", "reports/summary.md"]
    assert evaluation.data.tags["mlflow.note.content"].endswith(text)
