"""`aebench compare [A] [B]`: is the change in each model's test MSE larger than seed noise?

`dvc metrics diff` subtracts means. This tests each changed model's mse (the primary metric):
paired by seed where both sides have every replica's value for the same seeds, Welch's t-test
on mean ± std otherwise; Holm's step-down over the models tested at once; and a flag where the
spread across seeds changed. The answer comes first, then one row per changed model.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from . import stats
from .revisions import WORKSPACE, BadInput, Details, Side, load

DASH = "—"
PRIMARY = "mse"
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


@dataclass
class Row:
    model: str
    a: dict | None
    b: dict | None
    verdict: str = "identical"
    test: str | None = None          # "paired" or "Welch" (with why not paired)
    p: float | None = None           # raw p of mse's test
    p_adj: float | None = None       # Holm-adjusted over the models tested
    spread_p: float | None = None
    spread_adj: float | None = None
    loss_test: tuple[str, float] | None = None  # a test loss of its own kind: (test, p)
    spread: str | None = None        # "spread ×k" where the spread across seeds changed


def values(details: Details | None, key: str) -> dict[int, float] | None:
    """seed -> value of `key` (mse, test_loss) over the replicas; None if any lacks it."""
    if details is None:
        return None
    out = {r.seed: getattr(r, key) for r in details.replicas}
    return None if None in out.values() or len(out) != len(details.replicas) else out


def agrees(entry: dict, details: Details) -> bool:
    """The details file's replicas are the ones the metrics entry summarises (n and mean)."""
    mse = [r.mse for r in details.replicas]
    return len(mse) == entry["n"] and math.isclose(sum(mse) / len(mse), entry[PRIMARY]["mean"],
                                                   rel_tol=1e-5, abs_tol=1e-12)


def pairs(a: Side, b: Side, model: str, key: str) -> tuple[list, list] | str:
    """(A's values, B's values) of `key` in seed order, or why they cannot be paired."""
    for side, name in ((a, "A"), (b, "B")):
        details = side.replicas.get(model)
        if details is None:
            return f"no per-seed values in {name}"
        if not agrees(side.models[model], details):
            return f"{name}'s {side.details} disagrees with its metrics"
    va, vb = values(a.replicas[model], key), values(b.replicas[model], key)
    if va is None or vb is None:
        return f"no per-seed {key}"
    if sorted(va) != sorted(vb):
        return "different seeds"
    return [va[s] for s in sorted(va)], [vb[s] for s in sorted(va)]


def spread_flag(sa: float, sb: float, p_adj: float, alpha: float) -> str | None:
    """"spread ×k" when the F test (Holm-adjusted) says the spread changed and by at least
    stats.SPREAD_FACTOR either way."""
    ratio = stats.spread_ratio(sa, sb)
    if p_adj >= alpha or 1 / stats.SPREAD_FACTOR < ratio < stats.SPREAD_FACTOR:
        return None
    return f"spread {sa:.2g} → {sb:.2g}" if sa == 0 else f"spread ×{ratio:.2g}"


def summary(entry: dict, key: str) -> tuple[float, float, int]:
    return entry[key]["mean"], entry[key]["std"], entry["n"]


def run_test(a: Side, b: Side, model: str, key: str, paired: bool = True) -> tuple[str, float]:
    """(how, p) of the test of `key` for a model with n >= 2 on both sides."""
    matched = pairs(a, b, model, key) if paired else "paired tests off"
    if isinstance(matched, tuple):
        return "paired", stats.paired(*matched)
    how = "Welch" if not paired else f"Welch ({matched})"
    return how, stats.welch(summary(a.models[model], key), summary(b.models[model], key))


def rescales_mse(entry: dict, details: Details | None) -> bool:
    """Is the test loss only mse times a constant (mse on [-1,1] pixels, half mse)? The ratio
    test_loss / mse is then the same for every replica (or for the mean and the std)."""
    if "test_loss" not in entry:
        return True
    tl, mse = entry["test_loss"], entry[PRIMARY]
    if details and all(r.test_loss is not None and r.mse > 0 for r in details.replicas):
        ratios = [r.test_loss / r.mse for r in details.replicas]
    else:
        ratios = [tl["mean"] / mse["mean"]] + ([tl["std"] / mse["std"]] if mse["std"] else [])
    return max(ratios) <= min(ratios) * (1 + 1e-4) and min(ratios) > 0


def identical(a: Side, b: Side, model: str) -> bool:
    """Every value of the metrics entry and of every replica equal on both sides (pca_mse only
    where both have it: the layout before metrics/<model>.json kept PCA apart)."""
    ea, eb = a.models[model], b.models[model]
    if "pca_mse" not in ea or "pca_mse" not in eb:
        ea, eb = ({k: v for k, v in e.items() if k != "pca_mse"} for e in (ea, eb))
    ra, rb = a.replicas.get(model), b.replicas.get(model)
    return ea == eb and (ra is None or rb is None or ra == rb)


def compare(a: Side, b: Side, alpha: float = stats.ALPHA, paired: bool = True) -> list[Row]:
    """One row per model on either side (A's order, then B's new ones), with its verdict."""
    rows = []
    for model in list(a.models) + [m for m in b.models if m not in a.models]:
        ea, eb = a.models.get(model), b.models.get(model)
        row = Row(model, ea, eb)
        rows.append(row)
        if ea is None or eb is None:
            row.verdict = "added" if ea is None else "removed"
        elif identical(a, b, model):
            row.verdict = "identical"
        elif min(ea["n"], eb["n"]) < 2:
            row.verdict = "one run"
        else:
            row.test, row.p = run_test(a, b, model, PRIMARY, paired)
            row.spread_p = stats.spread(summary(ea, PRIMARY), summary(eb, PRIMARY))
            if "test_loss" in ea and "test_loss" in eb and not (
                    rescales_mse(ea, a.replicas.get(model))
                    and rescales_mse(eb, b.replicas.get(model))):
                row.loss_test = run_test(a, b, model, "test_loss", paired)
    tested = [r for r in rows if r.p is not None]
    for r, p, sp in zip(tested, stats.holm([r.p for r in tested]),
                        stats.holm([r.spread_p for r in tested])):
        r.p_adj, r.spread_adj = p, sp
        r.spread = spread_flag(r.a[PRIMARY]["std"], r.b[PRIMARY]["std"], sp, alpha)
        better = r.b[PRIMARY]["mean"] < r.a[PRIMARY]["mean"]
        r.verdict = "within noise" if p >= alpha else ("better" if better else "worse")
    return rows


# --------------------------------------------------------------------------- rendering


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


def footer(rows: list[Row], a: Side, b: Side, alpha: float) -> list[str]:
    tested = sum(r.p is not None for r in rows)
    pca = [r.model for r in rows if r.a and r.b and r.a.get("pca_mse") != r.b.get("pca_mse")]
    lines = [
        "- mse (test MSE on [0,1] pixels) is the one metric tested: SSE/image is 784 × mse, and "
        "a test loss that only rescales mse (mse on [-1,1] pixels, half mse) would repeat its "
        "test; a test loss of another kind (bce) gets its own p beside it, outside the verdict.",
        "- Test: the paired t-test on the per-seed differences where both sides have the same "
        f"seeds (from {b.details or a.details or 'the details file'}), else Welch's t-test on "
        f"mean ± std (n). p is Holm-adjusted over the {tested} model{'s' * (tested != 1)} "
        f"tested, so the chance of any false better/worse among them is at most α = {alpha}.",
        "- Spread: a two-sided F test of the variance ratio, Holm-adjusted over the same "
        f"models; flagged where it says so and the std changed ×{stats.SPREAD_FACTOR:g} or more.",
        f"- {noise_note(rows, alpha)}"]
    if pca:
        lines.append(f"- PCA's mse at the latent size changed for {', '.join(pca)} "
                     "(deterministic: see `dvc metrics diff`).")
    return lines


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
