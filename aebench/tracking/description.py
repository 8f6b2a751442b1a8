"""The evaluation run's description, as the MLflow UI shows it on the run's page: first the
verdict (the best model, its test MSE, how many times better than the next), then every model
best first as a Markdown table in units a reader knows (test MSE and SSE/image as mean ± std,
× the best, × PCA at the same latent size), then the figures as images (the `figures` run's
artifacts: the UI renders Markdown images in a description), then the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

from ..constants import N_PIXELS

# The figures in the order a reader wants them: the headline first, then the rest as named.
FIGURE_ORDER = ("test_mse.png", "training_curves.png", "pca_curve.png", "reconstructions.png",
                "latent_space.png", "denoising.png", "encoder_weights.png", "image_7777.png")


def ranking(headline: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The models, best (lowest mean test MSE) first; ties keep params.yaml's order."""
    return sorted(headline, key=lambda name: headline[name]["mse"]["mean"])


def mse_text(stat: Mapping[str, float], n: int = 2, digits: int = 3) -> str:
    """mean ± std, each to `digits` significant digits: 0.000902 ± 0.000185; the mean alone
    for a single replica (n = 1), which has no spread."""
    return f"{stat['mean']:.{digits}g}" + (f" ± {stat['std']:.{digits}g}" if n > 1 else "")


def sse_text(stat: Mapping[str, float], n: int = 2) -> str:
    """SSE/image, mean ± std, two decimals: 0.71 ± 0.14 (the mean alone when n = 1)."""
    return f"{stat['mean']:.2f}" + (f" ± {stat['std']:.2f}" if n > 1 else "")


def _sse(h: Mapping[str, Any]) -> Mapping[str, float]:
    return h.get("sse_per_image") or {k: N_PIXELS * v for k, v in h["mse"].items()}


def times(ratio: float) -> str:
    """A ratio as a reader says it: 4.52×, 34.1×, 0.6×, 1,302×."""
    return f"{ratio:,.0f}×" if ratio >= 1000 else f"{ratio:.3g}×"


def verdict(headline: Mapping[str, Mapping[str, Any]]) -> str:
    """One line: "**Best: conv16**, test MSE 0.000902 ± 0.000185 (SSE/image 0.71 ± 0.14, n = 3),
    4.52× better than the next, over500 (0.00408 ± 7e-05)."; "" without models."""
    order = ranking(headline)
    if not order:
        return ""
    best, h = order[0], headline[order[0]]
    line = (f"**Best: {best}**, test MSE {mse_text(h['mse'], h['n'])} (SSE/image "
            f"{sse_text(_sse(h), h['n'])}, n = {h['n']})")
    if len(order) == 1:
        return line + ", the only model evaluated."
    nxt = headline[order[1]]
    then = f"{order[1]} ({mse_text(nxt['mse'], nxt['n'])})"
    if h["mse"]["mean"] <= 0:
        return line + f"; the next is {then}."
    return line + f", {times(nxt['mse']['mean'] / h['mse']['mean'])} better than the next, {then}."


def pca_ratio(mse: float, pca_k: int, pca_mse: float | None) -> str:
    """The model's MSE as a multiple of PCA's at the same latent size, and what that means."""
    if pca_k >= N_PIXELS:
        return f"n/a: PCA exact (k = {pca_k} ≥ {N_PIXELS})"
    if not pca_mse:
        return "n/a"
    ratio = mse / pca_mse
    return f"{times(ratio)} ({'beats PCA' if ratio < 1 else 'PCA is better'})"


def table(headline: Mapping[str, Mapping[str, Any]],
          details: Mapping[str, Mapping[str, Any]]) -> str:
    """Every model, best first, as a Markdown table."""
    order = ranking(headline)
    if not order:
        return ""
    best = headline[order[0]]["mse"]["mean"]
    rows = ["| # | model | test MSE (mean ± std) | SSE/image | × the best | × PCA, same k "
            "| latent | n |", "|---|---|---|---|---|---|---|---|"]
    for rank, name in enumerate(order, 1):
        h, d = headline[name], details[name]
        mse = h["mse"]["mean"]
        vs_best = "best" if rank == 1 else times(mse / best) if best > 0 else "n/a"
        rows.append(f"| {rank} | {name} | {mse_text(h['mse'], h['n'])} | "
                    f"{sse_text(_sse(h), h['n'])} | "
                    f"{vs_best} | {pca_ratio(mse, d['pca']['k'], d['pca']['mse'])} | "
                    f"{d['latent_dim']} | {h['n']} |")
    return "\n".join(rows)


def figure_url(run_id: str, path: str) -> str:
    """The address of a run's artifact as the MLflow UI's own pages fetch it (relative to the
    UI's root, so it works on any host and port)."""
    return f"get-artifact?path={quote(path, safe='')}&run_uuid={quote(run_id, safe='')}"


def figures(run_id: str, paths: Sequence[str]) -> str:
    """The figures among `paths` (a run's artifacts, figures/NAME.png) as Markdown images, in
    FIGURE_ORDER, then any others by name."""
    rank = {name: i for i, name in enumerate(FIGURE_ORDER)}
    pngs = sorted((p for p in paths if p.endswith(".png")),
                  key=lambda p: (rank.get(p.rsplit("/", 1)[-1], len(rank)), p))
    return "\n\n".join(f"![{p.rsplit('/', 1)[-1]}]({figure_url(run_id, p)})" for p in pngs)


def description(headline: Mapping[str, Mapping[str, Any]],
                details: Mapping[str, Mapping[str, Any]], *, figures_md: str = "",
                report: str = "", report_name: str = "reports/summary.md",
                limit: int = 8000) -> str:
    """The evaluation run's description: verdict, table (no heading between them: the UI
    folds a description after a few lines), figures, then the report where it
    fits within `limit` characters (MLflow's longest tag value); else a line saying where the
    report is."""
    parts = [verdict(headline), table(headline, details),
             "Test MSE on [0,1] pixels of the 10,000 test images, mean ± std over n seeds; "
             "SSE/image = 784 × MSE; × PCA: the model's MSE over PCA's with as many components "
             "as its latent size (below 1: it beats the best linear code). Each model's "
             "numbers are also its child run NAME-eval."]
    if figures_md:
        parts += ["## Figures", figures_md]
    head = "\n\n".join(p for p in parts if p)
    full = f"{head}\n\n## The report ({report_name})\n\n{report}" if report else head
    if len(full) <= limit:
        return full
    short = f"{head}\n\nThe full report: {report_name}, under Artifacts."
    return short if len(short) <= limit else head[:limit]
