"""The Markdown summary: every model, the reference rows, PCA comparisons, figure links."""

from __future__ import annotations

import json

from aebench import report
from stages import report as report_stage


def model(latent, mse, **extra):
    return {"mse": mse, "sse_per_image": 784 * mse, "bce": 0.1, "psnr": 20.0,
            "mse_per_digit": {"0": mse}, "test_loss": 4 * mse, "loss": "mse", "params": 1234,
            "latent_dim": latent, "train_seconds": 61.0, "samples_per_second": 1e4,
            "device": "cuda", **extra}


MODELS = {
    "under30": model(30, 0.01),  # beats PCA 30 (0.0177)
    "shallow128": model(128, 0.005),  # loses to PCA 128 (0.0042)
    "conv16": model(2304, 0.003, denoise_mse=0.02, noisy_input_mse=0.2),
    "odd": model(40, 0.02),  # no PCA at 40: nearest is 30
}
PCA = {f"pca{k}": {"mse": mse, "sse_per_image": 784 * mse, "latent_dim": k}
       for k, mse in ((30, 0.0176866), (128, 0.00420533), (784, 0.0))}


def row(text, name):
    return next(line for line in text.splitlines() if line.startswith(f"| {name} |"))


def test_summary_lists_every_model_and_compares_with_pca():
    text = report.summary(MODELS, PCA, [])
    for name in MODELS:
        assert row(text, name)
    assert "| 0.01769 (k=30) | 0.57 | yes |" in row(text, "under30")
    assert "| 0.00421 (k=128) | 1.19 | no |" in row(text, "shallow128")
    assert "n/a (PCA exact)" in row(text, "conv16") and "(k=784)" in row(text, "conv16")
    assert "(k=30)" in row(text, "odd")
    assert "| 1,234 |" in row(text, "under30") and "0.04 (mse)" in row(text, "under30")


def test_summary_reference_rows_next_to_pipeline_pca():
    text = report.summary(MODELS, PCA, [])
    assert "| PCA (fit on the 60k training images) | 30 | 13.87 | 0.01769 | 13.87 | 0.01769 |" \
        in text
    assert "| PCA | 128 | 3.30 | 0.00421 | 3.30 | 0.00421 | shallow128 3.92 |" in text
    assert "| Hinton & Salakhutdinov 2006, deep autoencoder 784-1000-500-250-30 | 30 | 3.00 | " \
        "0.00383 |" in text


def test_denoising_table_only_for_denoising_models():
    text = report.summary(MODELS, PCA, [])
    denoise = text.split("## Denoising")[1].split("##")[0]
    assert "| conv16 | 0.20000 | 0.02000 | 0.00300 | 10.00 | yes |" in denoise
    assert "under30" not in denoise
    no_noise = {k: v for k, v in MODELS.items() if k != "conv16"}
    assert "## Denoising" not in report.summary(no_noise, PCA, [])


def test_figure_links_relative_to_the_report(tmp_path):
    figures = tmp_path / "plots" / "figures"
    assert report.figure_links(figures, tmp_path / "reports/summary.md") == []
    (figures / "sub").mkdir(parents=True)
    for name in ("b.png", "a.png", "sub/c.png", "notes.txt"):
        (figures / name).write_bytes(b"")
    links = report.figure_links(figures, tmp_path / "reports" / "summary.md")
    assert links == ["../plots/figures/a.png", "../plots/figures/b.png",
                     "../plots/figures/sub/c.png"]
    text = report.summary(MODELS, PCA, links)
    assert "- [a.png](../plots/figures/a.png)" in text
    assert report.summary(MODELS, PCA, []).rstrip().endswith("## Figures\n\nNone.")


def test_report_stage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/models.json").write_text(json.dumps(MODELS))
    (tmp_path / "metrics/pca.json").write_text(json.dumps(PCA))
    (tmp_path / "plots/figures").mkdir(parents=True)
    (tmp_path / "plots/figures/x.png").write_bytes(b"")
    args = ["metrics/models.json", "metrics/pca.json", "plots/figures", "reports/summary.md"]
    assert report_stage.main(args) == 0
    text = (tmp_path / "reports/summary.md").read_text()
    assert "(../plots/figures/x.png)" in text and "| under30 |" in text
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["summary.md"]  # no temp left
