"""Drawing the comparison figures: plain numpy arrays and dicts in, a PNG path out.

`aebench.figures` decides what each PNG shows; this module only draws.

Images are (N, 784) arrays of pixels on [0,1] (outputs are clipped to [0,1] for display only).
Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) at
100 DPI and written atomically (a temporary file, then a rename). The PNG carries no
'Software' text, so the same inputs give the same bytes whatever the matplotlib version, and
`dvc plots diff` shows a figure as changed only when its picture changed.

Which test digits are shown is fixed (`figure_digits`): the first test image of each digit 0..9,
then the first 15 test images (the ones seed 004 means to show as a 3 x 5 grid; its display()
indexes data[i * m + j] with m = 3 rows, so it repeats some), so two commits' figures show the
same digits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.textpath import TextPath
from matplotlib.ticker import MaxNLocator

from .constants import HINTON_2006, N_PIXELS, SIDE
from .files import atomic_path

DPI = 100
N_FIRST = 15          # the first 15 test images, as seed 004 shows them
EXACT_MSE = 1e-8      # below this an MSE is "lossless" (PCA with all 784 components)
PCA_FLOOR = 1e-6      # the PCA curve is drawn down to here (k ~ 640 on MNIST)
# Hinton & Salakhutdinov 2006, the 784-1000-500-250-30 deep autoencoder, on the same [0,1] scale.
REFERENCE = {"label": "Hinton & Salakhutdinov 2006 (deep AE)", "latent_dim": HINTON_2006[1],
             "mse": HINTON_2006[3]}

_GAP = 2              # pixels between tiles (at image scale)
_GROUP_GAP = 14       # pixels between groups of tiles


# --------------------------------------------------------------------------- data helpers


def figure_digits(labels: np.ndarray,
                  n_first: int = N_FIRST) -> tuple[np.ndarray, list[int], list[str]]:
    """The test-set indices the digit figures show: the first test image of each digit 0..9
    (a digit absent from `labels` is left out), then the first `n_first` test images.

    Returns (indices, group sizes, group captions)."""
    labels = np.asarray(labels)
    by_digit = [int(np.flatnonzero(labels == d)[0]) for d in range(10) if (labels == d).any()]
    first = list(range(min(n_first, len(labels))))
    digits = "".join(str(int(labels[i])) for i in by_digit)
    return (np.array(by_digit + first, dtype=np.int64), [len(by_digit), len(first)],
            [f"first test image of each digit {_digit_list(digits)}", f"first {len(first)} "
             "test images"])


def _digit_list(digits: str) -> str:
    return "0-9" if digits == "0123456789" else ", ".join(digits) or "(none)"


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


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(width_in: float, height_in: float, layout: str | None = None) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` atomically, without a timestamp or version in the PNG."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def model_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One colour per model, by its position in params.yaml, the same in every figure."""
    cmap = colormaps["tab10"] if len(names) <= 10 else colormaps["tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _text_px(text: str, size: float = 10, weight: str = "normal") -> float:
    """Width in screen pixels of the widest line of `text` (DejaVu Sans, as drawn)."""
    prop = FontProperties(size=size, weight=weight)
    widths = [TextPath((0, 0), line, prop=prop).get_extents().width if line.strip() else 0
              for line in text.split("\n")]
    return max(widths, default=0) * DPI / 72


def _tiles(images: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(images, dtype=np.float64).reshape(-1, SIDE, SIDE), 0, 1)


def _mosaic_row(images: np.ndarray, groups: Sequence[int]) -> tuple[np.ndarray, list[float]]:
    """(K, 784) images side by side, groups apart; gaps are NaN. Returns (array, tile centres)."""
    tiles = _tiles(images)
    parts, centres, x = [], [], 0
    start = 0
    for g, size in enumerate(groups):
        if g:
            parts.append(np.full((SIDE, _GROUP_GAP), np.nan))
            x += _GROUP_GAP
        for i in range(size):
            if i:
                parts.append(np.full((SIDE, _GAP), np.nan))
                x += _GAP
            parts.append(tiles[start + i])
            centres.append(x + SIDE / 2)
            x += SIDE
        start += size
    return np.hstack(parts) if parts else np.full((SIDE, SIDE), np.nan), centres


def _mosaic_grid(tiles: np.ndarray, ncols: int, gap: int = _GAP) -> np.ndarray:
    """(K, 28, 28) tiles in a grid of `ncols` columns; gaps and empty cells are NaN."""
    k = len(tiles)
    nrows = max(1, -(-k // ncols))
    out = np.full((nrows * SIDE + (nrows - 1) * gap, ncols * SIDE + (ncols - 1) * gap), np.nan)
    for i, tile in enumerate(tiles):
        y, x = (d * (SIDE + gap) for d in divmod(i, ncols))
        out[y:y + SIDE, x:x + SIDE] = tile
    return out


def _gray():
    return colormaps["gray"].with_extremes(bad="white")


Row = tuple[str, np.ndarray] | str | None


def _tile_rows(rows: Sequence[Row], path, *, title: str,
               header: Sequence[tuple[str, float, float]] = (),
               col_labels: Sequence[tuple[str, float]] = (), scale: int = 2) -> Path:
    """Rows of image mosaics, `scale` screen pixels per image pixel (crisp, no resampling
    blur), each labelled on the left; the label column is as wide as the widest label.

    `rows`: (label, mosaic), a str (a bold heading over the images) or None (a blank spacer);
    `header`: (caption, x0, x1) spans in mosaic pixels drawn above the first image row;
    `col_labels`: (text, x) small captions above the first image row."""
    images = [r for r in rows if isinstance(r, tuple)]
    width = max(m.shape[1] for _, m in images)
    label_px = max(90, int(max(_text_px(label) for label, _ in images)) + 24)
    row_px, gap_px, spacer_px, heading_px = SIDE * scale, 6, 14, 24
    title_px = 22 + 17 * title.count("\n")
    top_px = 12 + title_px + (22 if header else 0) + (16 if col_labels else 0)
    heights = [spacer_px if r is None else heading_px if isinstance(r, str) else row_px + gap_px
               for r in rows]
    fig_w = max(label_px + width * scale + 20, int(_text_px(title, 12, "bold")) + 40)
    fig_h = top_px + sum(heights) + 8
    fig = _new_figure(fig_w / DPI, fig_h / DPI)
    fig.text(0.5, 1 - 10 / fig_h, title, ha="center", va="top", fontsize=12, weight="bold")
    y = fig_h - top_px
    # Group captions and column labels sit above the first row, in figure pixels.
    caption_y = (y + (18 if col_labels else 4)) / fig_h
    for caption, x0, x1 in header:
        fig.text((label_px + (x0 + x1) / 2 * scale) / fig_w, caption_y, caption, ha="center",
                 va="bottom", fontsize=10)
    for text, x in col_labels:
        fig.text((label_px + x * scale) / fig_w, (y + 3) / fig_h, text, ha="center",
                 va="bottom", fontsize=7, color="0.35")
    cmap = _gray()
    for row, h in zip(rows, heights, strict=True):
        y -= h
        if row is None:
            continue
        if isinstance(row, str):
            fig.text(label_px / fig_w, (y + 5) / fig_h, row, ha="left", va="bottom",
                     fontsize=10, weight="bold")
            continue
        label, mosaic = row
        ax = fig.add_axes([label_px / fig_w, (y + gap_px / 2) / fig_h,
                           mosaic.shape[1] * scale / fig_w, row_px / fig_h])
        ax.imshow(mosaic, cmap=cmap, vmin=0, vmax=1, interpolation="nearest", aspect="auto",
                  extent=(0, mosaic.shape[1], SIDE, 0))
        ax.set_xlim(0, mosaic.shape[1])
        ax.set_axis_off()
        fig.text((label_px - 12) / fig_w, (y + gap_px / 2 + row_px / 2) / fig_h, label,
                 ha="right", va="center", fontsize=10)
    return save_png(fig, path)


def placeholder(path: str | Path, title: str, message: str) -> Path:
    """A small figure that says why there is nothing to show (keeps the set of files stable)."""
    fig = _new_figure(max(6.0, (_text_px(message) + 60) / DPI), 1.6)
    fig.text(0.5, 0.68, title, ha="center", va="center", fontsize=12, weight="bold")
    fig.text(0.5, 0.35, message, ha="center", va="center", fontsize=10)
    return save_png(fig, path)


# --------------------------------------------------------------------------- the figures


def _digit_header(centres, groups, group_captions, indices):
    """Captions centred over each non-empty group of columns, and each column's test index."""
    header, start = [], 0
    for size, caption in zip(groups, group_captions, strict=False):
        if size:
            x0, x1 = centres[start] - SIDE / 2, centres[start + size - 1] + SIDE / 2
            header.append((caption, x0, x1))
        start += size
    col_labels = [(f"#{i}", x) for i, x in zip(indices, centres, strict=False)]
    return {"header": header, "col_labels": col_labels}


def reconstructions(originals: np.ndarray, rows: Sequence[tuple[str, np.ndarray]],
                    path: str | Path, *, groups: Sequence[int], group_captions: Sequence[str],
                    indices: Sequence[int] = (), title: str | None = None) -> Path:
    """Originals in the first row, then one row of reconstructions per (label, images).

    `groups`: sizes of the column groups (e.g. [10, 15]), `group_captions` their captions,
    `indices` the test index of each column (printed small above it)."""
    orig, centres = _mosaic_row(originals, groups)
    data: list[Row] = [("original", orig)]
    data += [(label, _mosaic_row(imgs, groups)[0]) for label, imgs in rows]
    return _tile_rows(data, path, **_digit_header(centres, groups, group_captions, indices),
                      title=title or "Test digits and their reconstructions (outputs clipped to "
                                     "[0,1] for display)")


def denoising(blocks: Sequence[Mapping], path: str | Path, *, groups: Sequence[int],
              group_captions: Sequence[str], indices: Sequence[int] = (),
              title: str | None = None) -> Path:
    """Per model a heading and three rows: noisy input, output, clean target (seed 002).

    Each block: {"heading", "noisy", "output", "clean"} with (K, 784) images on [0,1] (a "-1,1"
    model's noisy input mapped by (x + 1) / 2), and optional row labels "noisy_label",
    "output_label", "clean_label"."""
    rows: list[Row] = []
    centres: list[float] = []
    for i, b in enumerate(blocks):
        if i:
            rows.append(None)
        noisy, centres = _mosaic_row(b["noisy"], groups)
        rows += [b["heading"],
                 (b.get("noisy_label", "noisy input"), noisy),
                 (b.get("output_label", "output"), _mosaic_row(b["output"], groups)[0]),
                 (b.get("clean_label", "clean"), _mosaic_row(b["clean"], groups)[0])]
    return _tile_rows(rows, path, **_digit_header(centres, groups, group_captions, indices),
                      title=title or "Denoising: noisy input, output, clean image")


def image_before_after(original: np.ndarray, afters: Sequence[tuple[str, np.ndarray]],
                       path: str | Path, *, title: str) -> Path:
    """One image before (left) and after each model (right), large, as seed 000 shows it."""
    panels = [("before", original)] + list(afters)
    n = len(panels)
    width = max(0.4 + 2.6 * n, (_text_px(title, 11, "bold") + 40) / DPI)
    title_in = 0.25 + 0.2 * (title.count("\n") + 1)
    height = title_in + 2.3 + 0.45
    fig = _new_figure(width, height)
    fig.text(0.5, 1 - 0.12 / height, title, ha="center", va="top", fontsize=11, weight="bold")
    left = (width - 2.6 * n) / 2
    for i, (label, img) in enumerate(panels):
        ax = fig.add_axes([(left + 2.6 * i + 0.15) / width, 0.1 / height, 2.3 / width,
                           2.3 / height])
        ax.imshow(_tiles(img)[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=10)
    return save_png(fig, path)


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
    fig = _new_figure(13, 6.2, layout="constrained")
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


def mse_bars(results: Mapping[str, Mapping], path: str | Path, *,
                  reference: Mapping | None = REFERENCE) -> Path:
    """Grouped bars (log y), one group per model: test MSE, the MSE on noisy inputs (denoising
    models), and PCA at the model's latent size (capped at 784). `results[name]` has "mse",
    "latent_dim", "pca_mse" (None if unknown) and optionally "denoise_mse", and "mse_std" /
    "denoise_mse_std" drawn as error bars (+- one standard deviation over replicas). A PCA MSE
    of ~0 (784 components reconstruct exactly) is drawn as a stub marked "0 (exact)"."""
    names = list(results)
    colors = model_colors(names)
    values = [v for r in results.values() for v in (r["mse"], r.get("pca_mse"),
                                                    r.get("denoise_mse"))]
    floor = _log_floor(values + ([reference["mse"]] if reference else []))
    fig = _new_figure(max(8.0, 1.3 * len(names) + 2.5), 6.0, layout="constrained")
    ax = fig.subplots()
    width = 0.27

    def bar(x, value, std=None, **kw):
        if value is None:
            return
        lossless = value <= EXACT_MSE
        height = floor * 1.5 if lossless else value
        ax.bar(x, height - floor, bottom=floor, width=width, **kw)
        text = "0 (exact)" if lossless else f"{value:.2g}" if value < 1e-3 else f"{value:.4f}"
        top = height
        if std:  # +- one standard deviation over replicas
            ax.errorbar(x, value, yerr=[[min(std, value - floor)], [std]], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
            text += f" ± {std:.1g}"
            top = value + std
        ax.text(x, top * 1.1, text, ha="center", va="bottom", fontsize=7, rotation=90)

    for i, name in enumerate(names):
        r = results[name]
        noisy = r.get("denoise_mse")
        offsets = (-width, 0, width) if noisy is not None else (-width / 2, None, width / 2)
        bar(i + offsets[0], r["mse"], r.get("mse_std"), color=colors[name], edgecolor="black",
            lw=0.6)
        if noisy is not None:
            bar(i + offsets[1], noisy, r.get("denoise_mse_std"), color=colors[name],
                edgecolor="black", lw=0.6, hatch="xxx", alpha=0.55)
        bar(i + offsets[2], r.get("pca_mse"), color="0.85", edgecolor="0.35", lw=0.6, hatch="//")
    handles = [Patch(facecolor="0.45", edgecolor="black", label="autoencoder: test MSE"),
               Patch(facecolor="0.85", edgecolor="0.35", hatch="//",
                     label="PCA, as many components as the latent size (max 784)")]
    if any(r.get("denoise_mse") is not None for r in results.values()):
        handles.insert(1, Patch(facecolor="0.45", edgecolor="black", alpha=0.55, hatch="xxx",
                                label="denoising model: MSE on noisy test inputs vs clean ones"))
    if reference:
        ax.axhline(reference["mse"], color="crimson", ls="--", lw=1.2)
        handles.append(Line2D([], [], color="crimson", ls="--", label=_ref_label(reference)))
    ax.set_yscale("log")
    # Room above the tallest bar (and its error bar) for its rotated label: ~1.5 decades.
    tops = [r["mse"] + (r.get("mse_std") or 0) for r in results.values()]
    ax.set_ylim(floor, max([v for v in values if v is not None] + tops) * 40)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"{n}\nlatent {results[n]['latent_dim']}" for n in names], fontsize=9)
    pad = max(0.0, (3 - len(names)) / 2)  # one or two groups: narrower bars, centred
    ax.set_xlim(-0.6 - pad, len(names) - 0.4 + pad)
    ax.set_ylabel("MSE per pixel on [0,1] (log scale)")
    ax.set_title("Test MSE of each model beside PCA with the same number of components",
                 fontsize=12, weight="bold")
    ax.grid(True, axis="y", which="major", alpha=0.35)
    fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=2, frameon=False)
    return save_png(fig, path)


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
    fig = _new_figure(11, 6.0, layout="constrained")
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


def encoder_weights(weights: Mapping[str, np.ndarray], path: str | Path, *,
                    n_units: int = 16) -> Path:
    """First-layer encoder weights as 28 x 28 tiles (seed 002): the first `n_units` hidden units
    of each model, 4 per row, one block per model. `weights[name]` is (hidden, 784). Each tile is
    scaled to its own largest |weight|: red positive, blue negative, white zero."""
    names = list(weights)
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig = _new_figure(3.1 * ncols + 1.2, 3.2 * nrows + 0.8, layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    # 15 colour levels: the eye sees little difference, the PNG is a third smaller
    cmap = colormaps["RdBu_r"].resampled(15).with_extremes(bad="white")
    image = None
    for ax, name in zip(axes, names, strict=False):
        w = np.asarray(weights[name], dtype=np.float64)[:n_units]
        scale = np.abs(w).max(axis=1, keepdims=True)
        tiles = (w / np.where(scale > 0, scale, 1)).reshape(-1, SIDE, SIDE)
        image = ax.imshow(_mosaic_grid(tiles, 4), cmap=cmap, vmin=-1, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"{name}: units 0-{len(tiles) - 1} of {len(weights[name])}", fontsize=10)
    for ax in axes[:len(names)]:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(names):]:
        ax.set_axis_off()
    fig.get_layout_engine().set(w_pad=0.1, h_pad=0.1, wspace=0.06)
    fig.suptitle("First-layer encoder weights, one 28 x 28 tile per hidden unit",
                 fontsize=12, weight="bold")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes), shrink=0.8, aspect=30, pad=0.02)
        bar.set_label("weight / largest |weight| of its unit", fontsize=9)
    return save_png(fig, path)


def latent_space(embeddings: Mapping[str, Mapping], path: str | Path, *,
                 subtitle: str = "") -> Path:
    """One scatter per model of its test codes in 2-D, coloured by digit.

    `embeddings[name]`: {"xy": (N, 2), "labels": (N,), "explained": (2,) variance ratios,
    "latent_dim": int}."""
    names = list(embeddings)
    ncols = min(4, len(names))
    nrows = -(-len(names) // ncols)
    fig = _new_figure(max(3.7 * ncols, 8.5), 3.5 * nrows + 1.2, layout="constrained")
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
