"""`aebench compare [A] [B]`: is the change in each model's test MSE larger than seed noise?

`dvc metrics diff` subtracts means. This tests each changed model's mse (the primary metric):
paired by seed where both sides have every replica's value for the same seeds, Welch's t-test
on mean ± std otherwise; Holm's step-down over the models tested at once; and a flag where the
spread across seeds changed (the tests: aebench.changes). The answer comes first, then one row
per changed model, then how it was tested.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import stats
from .changes import PRIMARY, Row, compare
from .revisions import WORKSPACE, BadInput, Side, load

DASH = "—"
HELP = f"""\
A and B are any git revision (commit, branch, tag), a DVC experiment's name, or `workspace`.
Each model's test mse is tested for a change larger than seed noise at level α (--alpha,
default {stats.ALPHA}): a paired t-test on the per-seed differences where both sides have the
same seeds, else Welch's t-test on mean ± std; p is Holm-adjusted over the models tested.

verdicts: better / worse (adjusted p < α; lower is better), within noise (not shown to differ;
  not "no change"), one run (n = 1 on a side: no test), identical (every value bit-identical),
  added / removed; "spread ×k" is added when the spread across seeds changed (F test).
exit codes: 0 compared; 1 with --fail-on-worse and a model worse; 2 an error (bad revision,
  missing or corrupt metrics file, a value that is not a finite number, a negative std, an n
  that is not a positive integer): one line naming the revision, file, model and key.
"""


# The answer first, then one row per changed model, then how it was tested.


def _stat(entry: dict | None, key: str = PRIMARY, n: bool = True) -> str:
    if entry is None or key not in entry:
        return DASH
    s = entry[key]
    return f"{s['mean']:.4g} ± {s['std']:.2g}" + (f" ({entry['n']})" if n else "")


def _pct(a: dict, b: dict, key: str = PRIMARY) -> str:
    ma, mb = a[key]["mean"], b[key]["mean"]
    return f"{(mb - ma) / ma:+.1%}" if ma else f"{mb - ma:+.3g}"


def _p(p: float | None) -> str:
    return DASH if p is None else f"{p:.2g}"


def _verdict(r: Row) -> str:
    return r.verdict + (f"; {r.spread}" if r.spread else "")


def _loss_cell(r: Row) -> str:
    if r.a is None or r.b is None or "test_loss" not in r.a or "test_loss" not in r.b:
        return DASH if r.a is None or r.b is None else "= mse"
    ma, mb = r.a["test_loss"]["mean"], r.b["test_loss"]["mean"]
    cell = f"{ma:.4g} → {mb:.4g} ({_pct(r.a, r.b, 'test_loss')})"
    return cell + (f"; {r.loss_test[0]} p {_p(r.loss_test[1])}" if r.loss_test else "")


def headline_lines(rows: list[Row]) -> list[str]:
    """What changed, first: one line per model that is not bit-identical, then the rest."""
    lines = []
    for r in rows:
        if r.verdict == "identical":
            continue
        if r.verdict in ("added", "removed"):
            lines.append(f"- **{r.model}**: {r.verdict} (mse {_stat(r.a or r.b)})")
            continue
        how = f"{r.test.split(' ')[0]} t-test, p = {_p(r.p_adj)} after Holm" if r.test \
            else "n = 1 on a side: no test"
        spread = f"; {r.spread}" if r.spread else ""
        lines.append(f"- **{r.model}**: {r.verdict}, {_pct(r.a, r.b)} mse ({how}){spread}")
    same = [r.model for r in rows if r.verdict == "identical"]
    if same:
        lines.append(f"- {len(same)} model{'s' * (len(same) != 1)} bit-identical: "
                     + ", ".join(same))
    return lines


def table(rows: list[Row], show_all: bool) -> list[str]:
    lines = ["| model | mse A | mse B | change | SSE/image A → B | test loss A → B | test | "
             "p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    same = [r.model for r in rows if r.verdict == "identical"]
    for r in rows:
        if r.verdict == "identical" and not show_all:
            continue
        change = _pct(r.a, r.b) if r.a and r.b else DASH
        sse = f"{_stat(r.a, 'sse_per_image', False)} → {_stat(r.b, 'sse_per_image', False)}"
        lines.append(f"| {r.model} | {_stat(r.a)} | {_stat(r.b)} | {change} | {sse} | "
                     f"{_loss_cell(r)} | {r.test or DASH} | {_p(r.p_adj)} | {_verdict(r)} |")
    if same and not show_all:
        lines.append(f"| {', '.join(same)} | | | +0% | | | | | identical |")
    return lines


def noise_note(rows: list[Row], alpha: float) -> str:
    n = min((min(r.a["n"], r.b["n"]) for r in rows if r.a and r.b), default=1)
    if n < 2:
        return "With one run on a side nothing can be told from noise: train more seeds."
    return (f"With n = {n} seeds, Welch's test needs a change of about "
            f"{stats.detectable(n, alpha):.1f} × the std across seeds; the paired test needs "
            "less when the seeds' results move together. 'within noise' means not shown, not "
            "no change.")


def pca_note(rows: list[Row]) -> str | None:
    """Where PCA's mse at a model's latent size differs between A and B: added (a revision
    from before pca_mse), removed or changed."""
    how = {}
    for r in rows:
        if r.a and r.b and r.a.get("pca_mse") != r.b.get("pca_mse"):
            word = "added" if "pca_mse" not in r.a else "removed" if "pca_mse" not in r.b \
                else "changed"
            how.setdefault(word, []).append(r.model)
    if not how:
        return None
    return "- PCA's mse at the latent size " + "; ".join(
        f"{word} for {', '.join(models)}" for word, models in how.items()) + \
        " (deterministic, not tested: see `dvc metrics diff`)."


def footer(rows: list[Row], a: Side, b: Side, alpha: float) -> list[str]:
    tested = sum(r.p is not None for r in rows)
    lines = [
        "- mse (test MSE on [0,1] pixels) is the one metric tested: SSE/image is 784 × mse, and "
        "a test loss that only rescales mse (mse on [-1,1] pixels, half mse) would repeat its "
        "test; a test loss of another kind (bce) gets its own p beside it, outside the verdict."]
    if tested:
        lines += [
            "- Test: the paired t-test on the per-seed differences where both sides have the "
            f"same seeds (from {b.details or a.details or 'the details file'}), else Welch's "
            f"t-test on mean ± std (n). p is Holm-adjusted over the {tested} "
            f"model{'s' * (tested != 1)} tested, so the chance of any false better/worse among "
            f"them is at most α = {alpha}.",
            "- Spread: a two-sided F test of the variance ratio, Holm-adjusted over the same "
            f"models; flagged where it says so and the std changed ×{stats.SPREAD_FACTOR:g} or "
            "more.",
            f"- {noise_note(rows, alpha)}"]
    elif all(r.verdict == "identical" for r in rows):
        lines.append("- No test: every model's numbers are bit-identical on both sides.")
    else:  # what changed was added, removed, or has one run on a side
        lines.append("- No test: no changed model has more than one run on each side.")
        if any(r.verdict == "one run" for r in rows):
            lines.append(f"- {noise_note(rows, alpha)}")
    note = pca_note(rows)
    return lines + ([note] if note else [])


def render(rows: list[Row], a: Side, b: Side, alpha: float = stats.ALPHA,
           show_all: bool = False) -> str:
    lines = [f"**A** = {a.label} → **B** = {b.label}", "", *headline_lines(rows), "",
             *table(rows, show_all), "", *footer(rows, a, b, alpha)]
    return "\n".join(lines) + "\n"


def alpha_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: α must be a number in (0, 1)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aebench compare", description=__doc__.splitlines()[0],
                                epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", nargs="?", default="HEAD", help="revision A (default: HEAD)")
    p.add_argument("b", nargs="?", default=WORKSPACE, help="revision B (default: workspace)")
    p.add_argument("--alpha", type=alpha_arg, default=stats.ALPHA,
                   help=f"significance level in (0, 1) (default {stats.ALPHA})")
    p.add_argument("--all", action="store_true", help="a row for every model, identical too")
    p.add_argument("--output", type=Path, help="also write the Markdown to this file")
    p.add_argument("--fail-on-worse", action="store_true", help="exit 1 if a model is worse")
    p.add_argument("--repo", help="the DVC repository (default: found from here)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    typed = args.a
    try:
        a = load(args.a, args.repo)
        typed = args.b
        b = load(args.b, args.repo)
    except BadInput as e:
        print(f"aebench compare: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DVC's own errors: a bad revision, not a DVC repository
        print(f"aebench compare: {typed}: {e}", file=sys.stderr)
        return 2
    rows = compare(a, b, args.alpha)
    text = render(rows, a, b, args.alpha, args.all)
    print(text, end="")
    try:
        if args.output:
            args.output.write_text(text)
    except OSError as e:
        print(f"aebench compare: --output {args.output}: {e.strerror}", file=sys.stderr)
        return 2
    return 1 if args.fail_on_worse and any(r.verdict == "worse" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
