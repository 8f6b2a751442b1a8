"""The plots: test-MSE curves, bars beside PCA, the PCA curve, latent codes in 2-D. Plain
numpy arrays and dicts in, a PNG path out; every model in the colour `drawing.model_colors`
gives it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .constants import HINTON_2006, N_PIXELS
from .drawing import model_colors, new_figure, save_png

EXACT_MSE = 1e-8      # below this an MSE is "lossless" (PCA with all 784 components)
PCA_FLOOR = 1e-6      # the PCA curve is drawn down to here (k ~ 640 on MNIST)
# Hinton & Salakhutdinov 2006, the 784-1000-500-250-30 deep autoencoder, on the same [0,1] scale.
REFERENCE = {"label": "Hinton & Salakhutdinov 2006 (deep AE)", "latent_dim": HINTON_2006[1],
             "mse": HINTON_2006[3]}


def pca_2d(codes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Project (N, D) codes onto their first two principal components.

    Returns (xy (N, 2), explained variance ratio (2,)). Up to 64 dimensions an exact SVD; above,
    a randomized subspace iteration from a fixed seed, as sklearn's randomized PCA does
    (deterministic, and many seconds faster than a full SVD of 2,000 x 2,304 conv codes on a
    busy CPU). Each axis's sign is fixed so its largest loading is positive. Codes with fewer
    than two dimensions get a zero second axis."""
    x = np.asarray(codes, dtype=np.float64)
    x = x - x.mean(axis=0)
    n, d = x.shape
    total = float((x ** 2).sum())
    k = min(2, d, n)
    if k == 0 or total == 0:
        return np.zeros((n, 2)), np.zeros(2)
    if d <= 64:
        _, s, vt = np.linalg.svd(x, full_matrices=False)
    else:
        rng = np.random.default_rng(seed)
        q = np.linalg.qr(x @ rng.standard_normal((d, min(k + 10, d))))[0]
        for _ in range(10):
            q = np.linalg.qr(x @ (x.T @ q))[0]
        _, s, vt = np.linalg.svd(q.T @ x, full_matrices=False)
    vt = vt[:k]
    idx = np.abs(vt).argmax(axis=1)
    vt = vt * np.sign(vt[np.arange(k), idx])[:, None]
    xy = np.zeros((n, 2))
    xy[:, :k] = x @ vt.T
    ratio = np.zeros(2)
    ratio[:k] = s[:k] ** 2 / total
    return xy, ratio


def _ref_label(reference: Mapping) -> str:
    return f"{reference['label']}, latent {reference['latent_dim']}: {reference['mse']}"


def training_curves(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, *,
                    loss_labels: Mapping[str, str], reference: Mapping | None = REFERENCE
                    ) -> Path:
    """Left: test MSE on [0,1] pixels per epoch (log y), all models; right: the training loss
    in each source's own scale (epoch mean). `curves[name]` has "epoch", "test_mse",
    "train_loss" (means over replicas) and optionally "test_mse_std", "train_loss_std", drawn
    as a band of +- one standard deviation; `loss_labels[name]` says what that loss is."""
    colors = model_colors(list(curves))
    fig = new_figure(13, 6.2, layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for name, c in curves.items():
        epoch = np.asarray(c["epoch"])
        style = {"color": colors[name], "lw": 1.6, "marker": "o" if len(epoch) <= 30 else None,
                 "ms": 3}
        for ax, key, label in ((ax1, "test_mse", name),
                               (ax2, "train_loss", f"{name}: {loss_labels.get(name, '')}")):
            mean = np.asarray(c[key], dtype=np.float64)
            ax.plot(epoch, mean, label=label, **style)
            if f"{key}_std" in c:
                std = np.asarray(c[f"{key}_std"], dtype=np.float64)
                ax.fill_between(epoch, np.maximum(mean - std, mean * 0.05), mean + std,
                                color=colors[name], alpha=0.2, lw=0)
    if reference:
        ax1.axhline(reference["mse"], color="crimson", ls="--", lw=1.2,
                    label=_ref_label(reference))
    ax1.set_title("Test MSE per epoch (common scale: [0,1] pixels)\nline: mean over replicas, "
                  "band: +- one standard deviation", fontsize=11)
    ax1.set_ylabel("test MSE per pixel (log scale)")
    ax2.set_title("Training loss per epoch (each source's own loss and scale)", fontsize=11)
    ax2.set_ylabel("training loss, epoch mean (log scale)")
    for ax in (ax1, ax2):
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.35)
        ax.grid(True, which="minor", alpha=0.12)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2,
                  frameon=False)
    return save_png(fig, path)


def _log_floor(values: Sequence[float | None]) -> float:
    """A power of ten below the smallest value that is not (near) zero."""
    positive = [v for v in values if v is not None and v > EXACT_MSE]
    return float(10 ** np.floor(np.log10(min(positive) / 2))) if positive else 1e-4


def _mse_text(value: float, std: float | None = None) -> str:
    """An MSE with 3 significant digits (0.000902, 0.0308: the digits that tell the models
    apart), and its std with 1."""
    return f"{value:.3g}" + (f" ± {std:.1g}" if std else "")


def bar_labels(results: Mapping[str, Mapping]) -> dict[str, dict[str, str]]:
    """The models of mse_bars best (lowest test MSE) first, each with the texts beside its bars:
    "mse" (mean ± std, then "best" or how many times the best, and how many times PCA's),
    "denoise" (where the model has one) and "pca" ("exact" where PCA's MSE is ~0)."""
    order = sorted(results, key=lambda n: results[n]["mse"])
    best = results[order[0]]["mse"] if order else 0.0
    labels = {}
    for name in order:
        r = results[name]
        mse, pca = r["mse"], r.get("pca_mse")
        parts = [_mse_text(mse, r.get("mse_std")),
                 ("best" if len(order) > 1 else "") if name == order[0] else
                 f"{mse / best:.3g}× the best" if best > 0 else ""]
        if pca is not None and pca > EXACT_MSE:
            ratio = mse / pca  # 83×, 0.6×, 1,299× (not 1.3e+03×)
            parts.append(f"{ratio:,.0f}× PCA" if ratio >= 100 else f"{ratio:.2g}× PCA")
        text = {"mse": "  ·  ".join(filter(None, parts))}
        if r.get("denoise_mse") is not None:
            text["denoise"] = (f"{_mse_text(r['denoise_mse'], r.get('denoise_mse_std'))}  "
                               "on noisy inputs")
        if pca is not None:
            text["pca"] = ("PCA exact: 0 (k ≥ 784)" if pca <= EXACT_MSE
                           else f"PCA {_mse_text(pca)}")
        labels[name] = text
    return labels


def mse_bars(results: Mapping[str, Mapping], path: str | Path, *,
             reference: Mapping | None = REFERENCE) -> Path:
    """Horizontal bars (log x), one group per model, best (lowest test MSE) at the top: test
    MSE, the MSE on noisy inputs (denoising models), and PCA at the model's latent size (capped
    at 784), each with its value beside it (bar_labels). `results[name]` has "mse",
    "latent_dim", "pca_mse" (None if unknown) and optionally "denoise_mse", and "mse_std" /
    "denoise_mse_std" drawn as error bars (+- one standard deviation over replicas). A PCA MSE
    of ~0 (784 components reconstruct exactly) has no bar, only the words "PCA exact"."""
    colors = model_colors(list(results))  # by params.yaml's order, as in every figure
    labels = bar_labels(results)
    names = list(labels)
    values = [v for r in results.values() for v in (r["mse"], r.get("pca_mse"),
                                                    r.get("denoise_mse"))]
    floor = _log_floor(values + ([reference["mse"]] if reference else []))
    fig = new_figure(12.0, 1.5 + 0.85 * max(len(names), 2), layout="constrained")
    ax = fig.subplots()
    height = 0.26

    def bar(y, value, std, text, **kw):
        if value <= EXACT_MSE:  # exact: no bar to draw, the words at the axis
            ax.text(floor * 1.15, y, text, ha="left", va="center", fontsize=8, color="0.3")
            return
        ax.barh(y, value - floor, left=floor, height=height, **kw)
        if std:  # +- one standard deviation over replicas
            ax.errorbar(value, y, xerr=[[min(std, value - floor)], [std]], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
        ax.text((value + (std or 0)) * 1.12, y, text, ha="left", va="center", fontsize=8)

    for i, name in enumerate(names):
        r, text = results[name], labels[name]
        rows = [(r["mse"], r.get("mse_std"), text["mse"],
                 {"color": colors[name], "edgecolor": "black", "lw": 0.6})]
        if "denoise" in text:
            rows.append((r["denoise_mse"], r.get("denoise_mse_std"), text["denoise"],
                         {"color": colors[name], "edgecolor": "black", "lw": 0.6,
                          "hatch": "xxx", "alpha": 0.55}))
        if "pca" in text:
            rows.append((r["pca_mse"], None, text["pca"],
                         {"color": "0.85", "edgecolor": "0.35", "lw": 0.6, "hatch": "//"}))
        for j, (value, std, label, style) in enumerate(rows):
            bar(i + (j - (len(rows) - 1) / 2) * height, value, std, label, **style)
    handles = [Patch(facecolor="0.45", edgecolor="black", label="autoencoder: test MSE"),
               Patch(facecolor="0.85", edgecolor="0.35", hatch="//",
                     label="PCA, as many components as the latent size (max 784)")]
    if any(r.get("denoise_mse") is not None for r in results.values()):
        handles.insert(1, Patch(facecolor="0.45", edgecolor="black", alpha=0.55, hatch="xxx",
                                label="denoising model: MSE on noisy test inputs vs clean ones"))
    if reference:
        ax.axvline(reference["mse"], color="crimson", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="crimson", ls="--", label=_ref_label(reference)))
    ax.set_xscale("log")
    tops = [r["mse"] + (r.get("mse_std") or 0) for r in results.values()]
    ax.set_xlim(floor, max([v for v in values if v is not None] + tops) * 60)  # to measure
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([f"{n}\nlatent {results[n]['latent_dim']}" for n in names], fontsize=9)
    pad = max(0.0, (3 - len(names)) / 2)  # one or two groups: thinner rows, centred
    ax.set_ylim(len(names) - 0.5 + pad, -0.5 - pad)  # the best at the top
    ax.set_xlabel("MSE per pixel on [0,1] (log scale); mean ± std over replicas")
    ax.set_title("Test MSE of each model, best first, beside PCA with the same number of "
                 "components", fontsize=12, weight="bold")
    ax.grid(True, axis="x", which="major", alpha=0.35)
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    _fit_texts(fig, ax, floor)
    return save_png(fig, path)


def _fit_texts(fig, ax, floor: float, margin: float = 0.03) -> None:
    """End the log x axis where its rightmost text ends (each bar's label is right of it), so
    that no empty decade takes the bars' room: a text at x whose width is a share s of the
    axes needs log10(x / floor) / (1 - s) decades."""
    fig.draw_without_rendering()  # lays the figure out: the axes' and the texts' widths in pixels
    width = ax.get_window_extent().width
    need = [np.log10(t.get_position()[0] / floor) / (1 - t.get_window_extent().width / width
                                                      - margin) for t in ax.texts]
    ax.set_xlim(floor, floor * 10 ** max(need))


def pca_curve(components: np.ndarray, mse: np.ndarray, points: Mapping[str, tuple[int, float]],
              path: str | Path, *, reference: Mapping | None = REFERENCE) -> Path:
    """PCA test MSE against the number of components (log-log), each model a point at its
    latent size, and the reference. `points[name]` = (latent_dim, test mse). The curve is drawn
    down to PCA_FLOOR: past it only pixels that (almost) never vary are left, and the residual
    is float rounding; the y axis shows every value drawn."""
    names = list(points)
    colors = model_colors(names)
    k = np.asarray(components, dtype=np.float64)
    m = np.asarray(mse, dtype=np.float64)
    shown = [v for _, v in points.values()] + ([reference["mse"]] if reference else [])
    keep = (k >= 1) & (m >= PCA_FLOOR)
    floor = _log_floor(shown + list(m[keep]))
    fig = new_figure(11, 6.0, layout="constrained")
    ax = fig.subplots()
    last = int(k[keep].max()) if keep.any() else 0
    ax.plot(k[keep], m[keep], color="0.25", lw=1.8,
            label=f"PCA (fit on the training set), k = 1..{last}; beyond, MSE < {PCA_FLOOR:g}")
    k_max = float(k.max()) if k.size else float(N_PIXELS)
    ax.axvline(k_max, color="0.5", ls=":", lw=1)
    ax.text(k_max * 1.06, floor * 1.3, f"{int(k_max)} components: PCA is exact", ha="left",
            va="bottom", fontsize=8, color="0.35", rotation=90)
    markers = "osD^vPXh<>p"
    for i, name in enumerate(names):
        latent, value = points[name]
        ax.plot([latent], [value], marker=markers[i % len(markers)], ms=9, ls="none",
                color=colors[name], markeredgecolor="black",
                label=f"{name} (latent {latent}): {value:.4f}")
    if reference:
        ax.plot([reference["latent_dim"]], [reference["mse"]], marker="*", ms=15, ls="none",
                color="crimson", markeredgecolor="black", label=_ref_label(reference))
    latents = [p[0] for p in points.values()] + [k_max]
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(0.8, max(latents) * 1.6)
    ax.set_ylim(floor, max(list(m[keep]) + shown) * 1.6)
    ax.set_xlabel("number of components / latent size (log scale)")
    ax.set_ylabel("test MSE per pixel on [0,1] (log scale)")
    fig.suptitle("PCA reconstruction error by number of components; each model at its latent "
                 "size", fontsize=12, weight="bold")
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0), frameon=False)
    return save_png(fig, path)


def latent_space(embeddings: Mapping[str, Mapping], path: str | Path, *,
                 subtitle: str = "") -> Path:
    """One scatter per model of its test codes in 2-D, coloured by digit.

    `embeddings[name]`: {"xy": (N, 2), "labels": (N,), "explained": (2,) variance ratios,
    "latent_dim": int}."""
    names = list(embeddings)
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig = new_figure(max(3.7 * ncols, 8.5), 3.5 * nrows + 1.2, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cmap = colormaps["tab10"]
    for ax, name in zip(axes, names, strict=False):
        e = embeddings[name]
        xy, labels = np.asarray(e["xy"]), np.asarray(e["labels"]).astype(int)
        # not antialiased: 7 x 2,000 blended dots make a PNG of half a megabyte
        ax.scatter(xy[:, 0], xy[:, 1], c=cmap(labels % 10), s=5, linewidths=0, antialiased=False)
        ex = np.asarray(e["explained"]) * 100
        ax.set_title(f"{name} (latent {e['latent_dim']})", fontsize=10)
        ax.set_xlabel(f"PC 1 ({ex[0]:.0f}% of variance)", fontsize=8)
        ax.set_ylabel(f"PC 2 ({ex[1]:.0f}%)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(names):]:
        ax.set_axis_off()
    handles = [Line2D([], [], marker="o", ls="none", color=cmap(d), label=str(d))
               for d in range(10)]
    fig.legend(handles=handles, title="digit", loc="outside lower center", ncol=10, fontsize=9,
               title_fontsize=9, frameon=False)
    fig.suptitle("Test codes projected onto their first two principal components"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=12, weight="bold")
    return save_png(fig, path)
