"""The image figures: test digits, their reconstructions and denoising, one image before and
after, first-layer weights as tiles. Plain numpy arrays in, a PNG path out.

Images are (N, 784) arrays of pixels on [0,1] (outputs are clipped to [0,1] for display only).
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

from .constants import SIDE
from .drawing import DPI, new_figure, save_png, text_px

N_FIRST = 15          # the first 15 test images, as seed 004 shows them
_GAP = 2              # pixels between tiles (at image scale)
_GROUP_GAP = 14       # pixels between groups of tiles


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
    label_px = max(90, int(max(text_px(label) for label, _ in images)) + 24)
    row_px, gap_px, spacer_px, heading_px = SIDE * scale, 6, 14, 24
    title_px = 22 + 17 * title.count("\n")
    top_px = 12 + title_px + (22 if header else 0) + (16 if col_labels else 0)
    heights = [spacer_px if r is None else heading_px if isinstance(r, str) else row_px + gap_px
               for r in rows]
    fig_w = max(label_px + width * scale + 20, int(text_px(title, 12, "bold")) + 40)
    fig_h = top_px + sum(heights) + 8
    fig = new_figure(fig_w / DPI, fig_h / DPI)
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
    width = max(0.4 + 2.6 * n, (text_px(title, 11, "bold") + 40) / DPI)
    title_in = 0.25 + 0.2 * (title.count("\n") + 1)
    height = title_in + 2.3 + 0.45
    fig = new_figure(width, height)
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


def encoder_weights(weights: Mapping[str, np.ndarray], path: str | Path, *,
                    n_units: int = 16) -> Path:
    """First-layer encoder weights as 28 x 28 tiles (seed 002): the first `n_units` hidden units
    of each model, 4 per row, one block per model. `weights[name]` is (hidden, 784). Each tile is
    scaled to its own largest |weight|: red positive, blue negative, white zero."""
    names = list(weights)
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig = new_figure(3.1 * ncols + 1.2, 3.2 * nrows + 0.8, layout="constrained")
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
