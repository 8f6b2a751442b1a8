"""The Markdown summary a reviewer pastes into a pull request.

Plain functions of the two metrics files (evaluate's models.json, pca's pca.json) and the
figures folder; no torch, so the report stage starts in a blink.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

N_PIXELS = 784

# design.md, "Reference points": (reference, latent, sse_per_image, mse) on the MNIST test set.
REFERENCES = (
    ("PCA (fit on the 60k training images)", 30, 13.87, 0.01769),
    ("PCA", 128, 3.30, 0.00421),
    ("Hinton & Salakhutdinov 2006, deep autoencoder 784-1000-500-250-30", 30, 3.00, 0.00383),
)
DASH = "—"


def pca_at(pca: dict[str, dict], latent: int) -> dict | None:
    """The PCA entry for a model of this latent size: k = min(latent, 784), or the nearest k
    present (ties to the smaller, the stricter bar)."""
    if not pca:
        return None
    k = min(latent, N_PIXELS)
    return min(pca.values(), key=lambda e: (abs(e["latent_dim"] - k), e["latent_dim"]))


def _num(value: Any, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def _mse(value: float | None) -> str:
    """5 decimals like design.md's table; small values (PCA near full rank) keep their digits."""
    if value is None:
        return DASH
    return f"{value:.5f}" if value >= 1e-3 or value == 0 else f"{value:.2e}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _pca_columns(model: dict, pca: dict) -> list[str]:
    """PCA MSE (k), model / PCA, beats PCA."""
    entry = pca_at(pca, model["latent_dim"])
    if entry is None:
        return [DASH, DASH, DASH]
    cell = f"{_mse(entry['mse'])} (k={entry['latent_dim']})"
    if entry["latent_dim"] >= N_PIXELS:  # full rank: PCA is exact, no linear bar to compare
        return [cell, DASH, "n/a (PCA exact)"]
    ratio = model["mse"] / entry["mse"]
    return [cell, f"{ratio:.2f}", "yes" if ratio < 1 else "no"]


def model_rows(models: dict[str, dict], pca: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, m in models.items():
        loss = _num(m.get("test_loss"), ".4g")
        if "loss" in m:
            loss += f" ({m['loss']})"
        rows.append([
            name, str(m["latent_dim"]), f"{m['params']:,}", _mse(m["mse"]),
            f"{m['sse_per_image']:.2f}", _num(m.get("psnr"), ".2f"), _num(m.get("bce"), ".4f"),
            loss, *_pca_columns(m, pca), _num(m.get("train_seconds"), ".1f"),
            m.get("device") or DASH,
        ])
    return rows


def reference_rows(models: dict[str, dict], pca: dict[str, dict]) -> list[list[str]]:
    rows = []
    for ref, latent, sse, mse in REFERENCES:
        own = next((e for e in pca.values() if e["latent_dim"] == latent), None)
        same = [f"{n} {m['sse_per_image']:.2f}" for n, m in models.items()
                if m["latent_dim"] == latent]
        rows.append([ref, str(latent), f"{sse:.2f}", f"{mse:.5f}",
                     DASH if own is None else f"{own['sse_per_image']:.2f}",
                     DASH if own is None else _mse(own["mse"]),
                     ", ".join(same) or DASH])
    return rows


def denoise_rows(models: dict[str, dict]) -> list[list[str]]:
    rows = []
    for name, m in models.items():
        if "denoise_mse" not in m:
            continue
        noisy, denoised = m["noisy_input_mse"], m["denoise_mse"]
        rows.append([name, _mse(noisy), _mse(denoised), _mse(m["mse"]),
                     f"{noisy / denoised:.2f}" if denoised else DASH,
                     "yes" if denoised < noisy else "no"])
    return rows


def figure_links(figures_dir: str | Path, report_path: str | Path) -> list[str]:
    """Every PNG under figures_dir, as a path relative to the report's folder, sorted."""
    figures_dir = Path(figures_dir)
    if not figures_dir.is_dir():
        return []
    start = Path(report_path).parent
    return [Path(os.path.relpath(p, start)).as_posix() for p in sorted(figures_dir.rglob("*.png"))]


def summary(models: dict[str, dict], pca: dict[str, dict], figures: list[str]) -> str:
    """The report's Markdown: models vs PCA, the published reference points, denoising, figures."""
    lines = [
        "# aebench: autoencoders on MNIST",
        "",
        "Every model on the 10,000 MNIST test images. All metrics on [0,1] pixels (outputs of "
        "[-1,1] models mapped by (y+1)/2, not clamped); SSE/image = 784 x MSE; PSNR with peak "
        "1.0; BCE with outputs clamped to [1e-7, 1-1e-7]. The test loss is in each model's own "
        "training scale and loss. PCA (fit on the 60,000 training images) is the best a linear "
        "code of the same size can do: a model that does not beat it has learned nothing a "
        "linear map could not. A code of 784 or more gets full-rank PCA, which is exact.",
        "",
        "## Models",
        "",
    ]
    header = ["model", "latent", "params", "test MSE", "SSE/image", "PSNR dB", "BCE",
              "test loss (source scale)", "PCA MSE (k)", "model / PCA", "beats PCA",
              "train s", "device"]
    lines += _table(header, model_rows(models, pca)) if models else ["No models evaluated."]
    lines += ["", "## Reference points", "",
              "Published numbers (design.md) next to this pipeline's own PCA at the same latent "
              "size, and this pipeline's models with that latent size (SSE/image).", ""]
    lines += _table(["reference", "latent", "SSE/image", "MSE", "pipeline PCA SSE/image",
                     "pipeline PCA MSE", "pipeline models"], reference_rows(models, pca))
    denoise = denoise_rows(models)
    if denoise:
        lines += ["", "## Denoising", "",
                  "Models trained on masked inputs, on the test images masked with a fixed "
                  "noise seed, against the clean images. The noisy input itself is the bar a "
                  "denoiser must clear.", ""]
        lines += _table(["model", "noisy input MSE", "denoised MSE", "clean-input MSE",
                         "noisy / denoised", "clears the bar"], denoise)
    lines += ["", "## Figures", ""]
    lines += [f"- [{Path(f).name}]({f})" for f in figures] if figures else ["None."]
    return "\n".join(lines) + "\n"
