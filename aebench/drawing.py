"""The canvas every figure is drawn on: a figure, its colours, its PNG.

`aebench.figures` decides what each PNG shows; `aebench.mosaics` draws the image figures and
`aebench.charts` the plots, both on this module's canvas.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend switch) at
100 DPI and written atomically (a temporary file, then a rename). The PNG carries no
'Software' text, so the same inputs give the same bytes whatever the matplotlib version, and
`dvc plots diff` shows a figure as changed only when its picture changed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextPath

from .files import atomic_path

DPI = 100


def new_figure(width_in: float, height_in: float, layout: str | None = None) -> Figure:
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


def text_px(text: str, size: float = 10, weight: str = "normal") -> float:
    """Width in screen pixels of the widest line of `text` (DejaVu Sans, as drawn)."""
    prop = FontProperties(size=size, weight=weight)
    widths = [TextPath((0, 0), line, prop=prop).get_extents().width if line.strip() else 0
              for line in text.split("\n")]
    return max(widths, default=0) * DPI / 72


def placeholder(path: str | Path, title: str, message: str) -> Path:
    """A small figure that says why there is nothing to show (keeps the set of files stable)."""
    fig = new_figure(max(6.0, (text_px(message) + 60) / DPI), 1.6)
    fig.text(0.5, 0.68, title, ha="center", va="center", fontsize=12, weight="bold")
    fig.text(0.5, 0.35, message, ha="center", va="center", fontsize=10)
    return save_png(fig, path)
