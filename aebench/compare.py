"""`aebench compare [A] [B]`: a noise-aware diff of the headline metrics of two revisions.

`dvc metrics diff` subtracts means; this asks whether the change is larger than the spread across
seeds. Each model entry of the metrics files holds, per metric, the mean and std over n seeds, so
Welch's t-test runs from those summary statistics. A defaults to HEAD, B to the workspace.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ALPHA = 0.05
METRICS = ("mse", "sse_per_image", "test_loss")  # lower is better for each
WORKSPACE = "workspace"
DASH = "—"


def load(rev: str | None, repo: str | None = None) -> dict[str, dict]:
    """{metrics file: its entries} for every metrics file that dvc.yaml names, at `rev` (None: the
    workspace). Raises DVC's errors (not a DVC repository, bad revision) and ValueError."""
    from dvc.repo import Repo  # imported here: it takes a second, and --help should not

    # Repo.find_root fails with a clear "not inside of a DVC repository"; dvc.api.metrics_show
    # would instead try to clone the path ("SCM error"). And DVC always reads the workspace
    # too: dvc.api.metrics_show(rev=...) fails on a broken workspace file even when both sides
    # are commits, so ask for errors per file ("return") and keep this revision's result only.
    with Repo(Repo.find_root(repo)) as dvc_repo:
        shown = dvc_repo.metrics.show(revs=[rev] if rev else None, on_error="return",
                                      hide_workspace=False)
    result = next((v for k, v in shown.items() if k != "workspace"), {"data": {}})
    if "error" in result:
        raise result["error"]
    for path, file in result["data"].items():
        if "error" in file:
            err = file["error"]
            why = "no such file" if isinstance(err, FileNotFoundError) else err.__cause__ or err
            raise ValueError(f"{path}: {why}")
    return {path: file["data"] for path, file in result["data"].items()}


def split(files: dict[str, dict]) -> tuple[dict, dict]:
    """(models, baselines) of all files: model entries carry n (seeds); deterministic ones (PCA)
    do not."""
    entries = {k: v for data in files.values() for k, v in data.items() if isinstance(v, dict)}
    models = {k: v for k, v in entries.items() if "n" in v}
    return models, {k: v for k, v in entries.items() if "n" not in v}


def summary(entry: dict, model: str, metric: str) -> tuple[float, float, int] | None:
    """(mean, std, n) of one metric; test_loss is left out of the file when it equals mse."""
    value = entry.get(metric) or (entry.get("mse") if metric == "test_loss" else None)
    try:
        return None if value is None else (value["mean"], value["std"], entry["n"])
    except (KeyError, TypeError):
        raise ValueError(f"{model}.{metric}: expected {{mean, std}} and n, got {value!r}") from None


def verdict(a: tuple, b: tuple, alpha: float = ALPHA) -> tuple[float | None, str]:
    """(p-value, word) for a change from A to B, each (mean, std, n). Zero std on both sides
    means the seeds agree exactly (a deterministic run), so any change in the mean is real."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if na < 2 or nb < 2:
        return None, "one run"
    if sa == 0 and sb == 0:
        p = 1.0 if ma == mb else 0.0
    else:
        from scipy import stats  # here: importing it takes about a second

        p = float(stats.ttest_ind_from_stats(ma, sa, na, mb, sb, nb, equal_var=False).pvalue)
    if p >= alpha:
        return p, "within noise"
    return p, "better" if mb < ma else "worse"


def compare(a: dict, b: dict, alpha: float = ALPHA) -> list[dict]:
    """One row per model and headline metric present on either side, models in A's order."""
    rows = []
    for model in list(a) + [m for m in b if m not in a]:
        for metric in METRICS:
            if metric == "test_loss" and not any("test_loss" in s.get(model, {}) for s in (a, b)):
                continue  # equals mse on both sides: the mse row says it all
            sa = summary(a[model], model, metric) if model in a else None
            sb = summary(b[model], model, metric) if model in b else None
            if sa is None and sb is None:
                continue
            p, word = verdict(sa, sb, alpha) if sa and sb else (None, "removed" if sa else "added")
            rows.append(dict(model=model, metric=metric, a=sa, b=sb, p=p, verdict=word))
    return rows


def _cell(s: tuple | None) -> str:
    return DASH if s is None else f"{s[0]:.4g} ± {s[1]:.2g} ({s[2]})"


def _change(a: tuple | None, b: tuple | None) -> str:
    if a is None or b is None:
        return DASH
    pct = f" ({(b[0] - a[0]) / a[0]:+.1%})" if a[0] else ""
    return f"{b[0] - a[0]:+.3g}{pct}"


def detectable(n: int, alpha: float = ALPHA) -> float:
    """The smallest change, in stds across seeds, that Welch's test calls real at `alpha` when
    both sides have n seeds and the same std: t = d / (std * sqrt(2/n)), 2n - 2 dof."""
    # Student's t quantile, as scipy.stats.t.ppf computes it, without importing scipy.stats
    # (about a second; the report stage needs only this number).
    from scipy.special import stdtrit

    return float(stdtrit(2 * n - 2, 1 - alpha / 2) * math.sqrt(2 / n))


def noise_note(rows: list[dict], alpha: float) -> str:
    """The honest sentence: how large a change the smallest n can tell from noise."""
    n = min((min(r["a"][2], r["b"][2]) for r in rows if r["p"] is not None), default=1)
    if n < 2:
        return "With one run on a side nothing can be told from noise: train more seeds."
    d = detectable(n, alpha)
    return (f"A verdict is only as good as n: with n = {n} seeds a change must exceed about "
            f"{d:.1f} × the std across seeds to be called better or worse at α = {alpha}; "
            "'within noise' means not shown, not no change.")


def render(rows: list[dict], base_a: dict, base_b: dict, label_a: str, label_b: str,
           alpha: float = ALPHA) -> str:
    """The Markdown table, the noise sentence and a footer on the deterministic baselines."""
    lines = [f"| model | metric | A: {label_a} | B: {label_b} | change | p | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = DASH if r["p"] is None else f"{r['p']:.3g}"
        lines.append(f"| {r['model']} | {r['metric']} | {_cell(r['a'])} | {_cell(r['b'])} | "
                     f"{_change(r['a'], r['b'])} | {p} | {r['verdict']} |")
    changed = sorted(k for k in base_a.keys() | base_b.keys() if base_a.get(k) != base_b.get(k))
    footer = ("PCA baselines (deterministic, no seeds) are left out of the table: "
              + (f"changed: {', '.join(changed)} (see `dvc metrics diff`)." if changed
                 else "unchanged."))
    return "\n".join(lines + ["", f"Welch's t-test on mean ± std (n seeds), α = {alpha}. "
                              + noise_note(rows, alpha), "", footer, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aebench compare", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["compare"], help=argparse.SUPPRESS)
    parser.add_argument("a", nargs="?", default="HEAD", help="revision A (default: HEAD)")
    parser.add_argument("b", nargs="?", default=WORKSPACE, help="revision B (default: workspace)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level")
    parser.add_argument("--output", type=Path, help="also write the Markdown to this file")
    parser.add_argument("--fail-on-worse", action="store_true", help="exit 1 if a row is worse")
    parser.add_argument("--repo", help="the DVC repository (default: found from here)")
    args = parser.parse_args(argv)
    sides, rev = [], args.a
    try:
        for rev in (args.a, args.b):
            models, baselines = split(load(None if rev == WORKSPACE else rev, args.repo))
            if not models:
                raise ValueError("no model entries (with n) in the metrics files of dvc.yaml")
            sides.append((models, baselines))
        rev = f"{args.a} vs {args.b}"
        (models_a, base_a), (models_b, base_b) = sides
        rows = compare(models_a, models_b, args.alpha)
    except Exception as e:  # DVC's errors (bad revision, corrupt file) and malformed entries
        print(f"aebench compare: {rev}: {e}", file=sys.stderr)
        return 2
    text = render(rows, base_a, base_b, args.a, args.b, args.alpha)
    print(text, end="")
    try:
        if args.output:
            args.output.write_text(text)
    except OSError as e:
        print(f"aebench compare: --output {args.output}: {e.strerror}", file=sys.stderr)
        return 2
    return 1 if args.fail_on_worse and any(r["verdict"] == "worse" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
