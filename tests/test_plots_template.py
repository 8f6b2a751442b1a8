"""The plots pages (`make plots`, `dvc plots show` / `diff`): one overlay of every model's curve,
the PCA curve on a log axis, the figures, and a page that needs no network.

One test runs the real `dvc plots show` on a copy of the committed plot files (about 1 s).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dvc_render import VegaRenderer

from aebench.figures import overlay_rows
from aebench.files import read_columns, write_csv_rows

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"
OVERLAY_ID = "test_mse_by_epoch"
OVERLAY_CSV = "plots/test_mse_by_epoch.csv"


def top_level_plots() -> dict[str, dict | None]:
    """dvc.yaml's top-level `plots:` as {plot id: definition or None}."""
    entries = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    return {k: v for e in entries for k, v in ({e: None} if isinstance(e, str) else e).items()}


def inline_scripts(html: str) -> list[str]:
    """Bodies of the <script> elements that have no attributes (the inlined libraries)."""
    return re.findall(r"<script>(.*?)</script>", html, flags=re.S)


def test_top_level_plots_name_every_model_the_pca_curve_and_the_figures():
    plots = top_level_plots()
    # DVC overlays only the files `y:` names: one table that the figures stage writes with every
    # model's curve, so a model added to params.yaml needs no change here.
    assert plots[OVERLAY_ID]["y"] == {OVERLAY_CSV: "test_mse"}
    assert plots[OVERLAY_ID]["x"] == "epoch"
    figures_stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["figures"]
    assert OVERLAY_CSV in figures_stage["cmd"] and any(
        OVERLAY_CSV in (o if isinstance(o, str) else next(iter(o))) for o in figures_stage["outs"])

    pca = next(d for d in plots.values() if d and "plots/pca_curve.csv" in d.get("y", {}))
    assert pca["x"] == {"plots/pca_curve.csv": "components"}
    assert pca["y"] == {"plots/pca_curve.csv": "test_mse"}
    assert "plots/figures" in plots

    for definition in (plots[OVERLAY_ID], pca):
        template = json.loads((ROOT / ".dvc/plots" / f"{definition['template']}.json").read_text())
        assert template["encoding"]["y"]["scale"]["type"] == "log"
        assert "log" in definition["y_label"]


def test_template_inlines_the_vega_versions_dvc_render_loads():
    html = TEMPLATE.read_text(encoding="utf8")
    # dvc-render puts the plots at {plot_divs}; without {scripts} it adds no CDN <script src>.
    assert "{plot_divs}" in html and "{scripts}" not in html
    cdn = re.findall(r"npm/(vega(?:-lite|-embed)?@[\d.]+)", VegaRenderer.SCRIPTS)
    inlined = re.findall(r"<script>/\* (vega(?:-lite|-embed)?@[\d.]+) build/", html)
    rebuild = "rebuild .dvc/plots/offline.html: bash .dvc/plots/build_offline_template.sh"
    assert inlined == cdn, rebuild
    assert all(len(body) > 50_000 for body in inline_scripts(html))


def test_plots_show_writes_an_offline_page_with_one_overlay_of_every_curve(tmp_path):
    # A copy of what the page is built from, in a fresh git repository.
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "plots", tmp_path / "plots")
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)

    # The overlay table as the figures stage writes it, from the committed curves and a new model.
    curves = {p.stem: read_columns(p, ("epoch", "test_mse", "test_mse_std"))
              for p in sorted((ROOT / "plots" / "curves").glob("*.csv"))}
    curves["newmodel"] = next(iter(curves.values()))
    write_csv_rows(tmp_path / OVERLAY_CSV, overlay_rows(curves))

    # No --html-template: the page must come from .dvc/config's plots.html_template.
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out"], cwd=tmp_path,
                   check=True, capture_output=True)
    page = (tmp_path / "out" / "index.html").read_text(encoding="utf8")

    assert not re.findall(r"<script[^>]*\bsrc\s*=", page), "the page loads a script from outside"
    for body in inline_scripts(TEMPLATE.read_text(encoding="utf8")):
        assert body in page

    spec = re.search(r"var spec = (\{.*?\});\s*vegaEmbed\('#" + OVERLAY_ID + "'", page, re.S)
    assert spec, f"no {OVERLAY_ID} plot on the page"
    values = json.loads(spec.group(1))["data"]["values"]
    assert {v["model"] for v in values} == set(curves)
    assert page.count(f"vegaEmbed('#{OVERLAY_ID}'") == 1

    figures = sorted(p.name for p in (ROOT / "plots" / "figures").glob("*.png"))
    assert figures and all(f"plots/figures/{name}" in page for name in figures)
    # dvc-render puts the images after the vega plots, in name order; the page's style puts
    # the headline first, then the overlay: the ids it names are the ones dvc-render wrote
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    orders = dict(re.findall(r"#(\w+) \{\s*order: (-?\d+);", style))
    assert orders == {"plots_figures_test_mse_png": "-2", OVERLAY_ID: "-1"}
    assert all(re.search(rf'id ?= ?"{i}"', page) for i in orders)
    assert re.search(r"body \{\s*display: flex;\s*flex-direction: column;", style)


def test_log_y_template_colours_ticks_and_floor():
    from aebench.charts import PCA_FLOOR

    template = json.loads((ROOT / ".dvc/plots/log_y.json").read_text())
    encoding = template["encoding"]
    # a categorical scheme of 10 colours, in the data's order (params.yaml's): the colours the
    # PNGs give each model (matplotlib's tab10 is d3's category10)
    assert encoding["color"]["scale"] == {"scheme": "category10"}
    assert encoding["color"]["sort"] is None
    assert encoding["color"]["title"] == "model"  # not "curve"
    assert encoding["x"]["axis"] == {"tickMinStep": 1, "format": "d"}  # epochs, components
    # the floor of the PCA PNG, not float noise down to 1e-15
    [floor] = [float(t["filter"].split(">=")[1]) for t in template["transform"] if "filter" in t]
    assert floor == PCA_FLOOR
    # a line per curve and revision (dashed by revision), and a point at each value: a one-epoch
    # run (make smoke) has nothing to draw a line between
    line, point = template["layer"]
    assert line["mark"]["type"] == "line" and line["encoding"]["strokeDash"]["field"] == "rev"
    assert point["mark"]["type"] == "point"


def test_offline_page_scales_wide_figures_to_its_width():
    html = TEMPLATE.read_text(encoding="utf8")
    style = html.split("<style>", 1)[1].split("</style>", 1)[0]
    assert re.search(r'div\[style\*="nowrap"\] img \{\s*max-width: 100%;', style)
    assert "white-space: normal !important;" in style
    script = (ROOT / ".dvc/plots/build_offline_template.sh").read_text()
    assert style in script  # the page is what its build script writes
