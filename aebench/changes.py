"""Which models changed beyond seed noise: one Row per model of either side, with its verdict.

Each changed model's mse (PRIMARY) is tested: paired by seed where both sides have every
replica's value for the same seeds, Welch's t-test on mean ± std otherwise; Holm's step-down
over the models tested at once; a flag where the spread across seeds changed (F test); a test
loss of another kind than mse gets its own test beside it. `aebench compare` and `aebench
review` say it (aebench.compare)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from . import stats
from .revisions import Details, Side

PRIMARY = "mse"


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
    return holm_verdicts(rows, alpha)


def holm_verdicts(rows: list[Row], alpha: float = stats.ALPHA) -> list[Row]:
    """Holm-adjust the tested rows' p-values (and their spreads') over all of `rows`, and give
    each its verdict: better, worse or within noise. The rows, changed in place."""
    tested = [r for r in rows if r.p is not None]
    for r, p, sp in zip(tested, stats.holm([r.p for r in tested]),
                        stats.holm([r.spread_p for r in tested])):
        r.p_adj, r.spread_adj = p, sp
        r.spread = spread_flag(r.a[PRIMARY]["std"], r.b[PRIMARY]["std"], sp, alpha)
        better = r.b[PRIMARY]["mean"] < r.a[PRIMARY]["mean"]
        r.verdict = "within noise" if p >= alpha else ("better" if better else "worse")
    return rows
