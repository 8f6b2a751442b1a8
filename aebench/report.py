"""The Markdown summary a reviewer pastes into a pull request.

Plain functions of evaluate's outputs (the headline metrics, the details of every replica), the
PCA curve and the figures folder; no torch, so the report stage starts in a blink.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .constants import N_PIXELS, REFERENCES
from .stats import ALPHA, detectable

DASH = "—"


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


def _pm(stat: dict | None, decimals: int = 5) -> str:
    """mean ± std of a headline entry, both to the same decimals (scientific below 1e-3)."""
    if stat is None:
        return DASH
    mean, std = stat["mean"], stat["std"]
    fmt = f".{decimals}f" if abs(mean) >= 1e-3 or decimals < 5 else ".2e"
    return f"{mean:{fmt}} ± {std:{fmt}}"


def _pca_columns(mse: float, pca_entry: dict) -> list[str]:
    """PCA MSE (k), model / PCA, beats PCA."""
    k, pca = pca_entry["k"], pca_entry["mse"]
    cell = f"{_mse(pca)} (k={k})"
    if k >= N_PIXELS:  # full rank: PCA is exact, no linear bar to compare
        return [cell, DASH, "n/a (PCA exact)"]
    return [cell, f"{mse / pca:.2f}", "yes" if mse < pca else "no"]


def model_rows(headline: dict, details: dict) -> list[list[str]]:
    rows = []
    for name, h in headline.items():
        d = details[name]
        loss = _pm(h.get("test_loss") or h["mse"])
        rows.append([
            name, str(d["latent_dim"]), f"{d['params']:,}", _pm(h["mse"]),
            _pm(h["sse_per_image"], 2),
            _num(d["mean"].get("psnr"), ".2f"), _num(d["mean"].get("bce"), ".4f"),
            f"{loss} ({d['loss']})", *_pca_columns(h["mse"]["mean"], d["pca"]),
            str(h["n"]), d.get("device") or DASH,
        ])
    return rows


def reference_rows(details: dict, curve: dict) -> list[list[str]]:
    rows = []
    for ref, latent, sse, mse in REFERENCES:
        own = (latent, float(curve["test_mse"][latent])) if latent < len(curve["test_mse"]) \
            else None
        same = [f"{n} {d['mean']['sse_per_image']:.2f}" for n, d in details.items()
                if d["latent_dim"] == latent]
        rows.append([ref, str(latent), f"{sse:.2f}", f"{mse:.5f}",
                     DASH if own is None else f"{own[1] * N_PIXELS:.2f}",
                     DASH if own is None else _mse(own[1]), ", ".join(same) or DASH])
    return rows


def denoise_rows(details: dict) -> list[list[str]]:
    rows = []
    for name, d in details.items():
        m = d["mean"]
        if "denoise_mse" not in m:
            continue
        noisy, denoised = m["noisy_input_mse"], m["denoise_mse"]
        rows.append([name, _mse(noisy), _mse(denoised), _mse(m["mse"]),
                     f"{noisy / denoised:.2f}" if denoised else DASH,
                     "yes" if denoised < noisy else "no"])
    return rows


def noise_sentence(headline: dict) -> str:
    n = min((h["n"] for h in headline.values()), default=1)
    if n < 2:
        return ("Each model was trained once (n = 1): nothing here tells a real difference "
                "between two commits from seed noise; set train.replicas to 3 or more.")
    return (f"With n = {n} replicas per side, a difference between two commits is real "
            f"(Welch's t-test, p < {ALPHA}) only when it exceeds about "
            f"{detectable(n):.1f} × the std across replicas. Where both commits trained the same "
            "seeds, `aebench compare` pairs replica i with replica i, which tells much smaller "
            "changes from noise.")


def figure_links(figures_dir: str | Path, report_path: str | Path) -> list[str]:
    """Every PNG under figures_dir, as a path relative to the report's folder, sorted."""
    figures_dir = Path(figures_dir)
    if not figures_dir.is_dir():
        return []
    start = Path(report_path).parent
    return [Path(os.path.relpath(p, start)).as_posix() for p in sorted(figures_dir.rglob("*.png"))]


def summary(headline: dict, details: dict, curve: dict, figures: list[str]) -> str:
    """The report's Markdown: models vs PCA, the published reference points, denoising, figures."""
    lines = [
        "# aebench: autoencoders on MNIST",
        "",
        "Every model on the 10,000 MNIST test images, as mean ± standard deviation over its n "
        "replicas (seeds). All metrics on [0,1] pixels (outputs of [-1,1] models mapped by "
        "(y+1)/2, not clamped); SSE/image = 784 x MSE; PSNR (of the mean MSE) with peak 1.0; "
        "BCE with outputs clamped to [1e-7, 1-1e-7]. The test loss is in each model's own "
        "training scale and loss. PCA (fit on the 60,000 training images) is the best a linear "
        "code of the same size can do: a model that does not beat it has learned nothing a "
        "linear map could not. A code of 784 or more gets full-rank PCA, which is exact.",
        "",
        noise_sentence(headline),
        "",
        "## Models",
        "",
    ]
    header = ["model", "latent", "params", "test MSE", "SSE/image", "PSNR dB", "BCE",
              "test loss (source scale)", "PCA MSE (k)", "model / PCA", "beats PCA", "n",
              "device"]
    lines += _table(header, model_rows(headline, details)) if headline \
        else ["No models evaluated."]
    lines += ["", "## Reference points", "",
              "Published numbers next to this pipeline's own PCA at the same latent size, and "
              "this pipeline's models with that latent size (mean SSE/image).", ""]
    lines += _table(["reference", "latent", "SSE/image", "MSE", "pipeline PCA SSE/image",
                     "pipeline PCA MSE", "pipeline models"], reference_rows(details, curve))
    denoise = denoise_rows(details)
    if denoise:
        lines += ["", "## Denoising", "",
                  "Models trained on masked inputs, on the test images masked with a fixed "
                  "noise seed, against the clean images (means over replicas). The noisy input "
                  "itself is the bar a denoiser must clear.", ""]
        lines += _table(["model", "noisy input MSE", "denoised MSE", "clean-input MSE",
                         "noisy / denoised", "clears the bar"], denoise)
    lines += ["", "## Figures", ""]
    lines += [f"- [{Path(f).name}]({f})" for f in figures] if figures else ["None."]
    return "\n".join(lines) + "\n"
