"""The tests behind `aebench compare`: is a change between two revisions larger than seed noise?

Replica i of a model is trained from seed train.seed + i on both sides, so where both sides
have per-seed values for the same seeds the differences are paired (same initial weights, same
shuffles) and `paired` tests them; otherwise `welch` tests the summary statistics. `spread`
asks whether the spread across seeds changed (two-sided F test of the variance ratio), and
`holm` controls the family-wise error over the models compared at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALPHA = 0.05
SPREAD_FACTOR = 2.0  # a spread flag also needs the std to change by at least this factor


def paired(a: Sequence[float], b: Sequence[float]) -> float:
    """p of the paired t-test on b - a (the same seeds, in the same order, n >= 2). Differences
    that are all equal (no spread) are exact: p is 1 when they are 0, else 0."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    if np.all(d == d[0]):
        return 1.0 if d[0] == 0 else 0.0
    from scipy import stats  # here, not at the top: importing it takes about a second

    return float(stats.ttest_rel(b, a).pvalue)


def welch(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """p of Welch's t-test from (mean, std, n) of each side (n >= 2). Zero std on both sides
    means the seeds agree exactly, so any change in the mean is real (p 0)."""
    (ma, sa, na), (mb, sb, nb) = a, b
    if sa == 0 and sb == 0:
        return 1.0 if ma == mb else 0.0
    from scipy import stats

    return float(stats.ttest_ind_from_stats(ma, sa, na, mb, sb, nb, equal_var=False).pvalue)


def spread(a: tuple[float, float, int], b: tuple[float, float, int]) -> float:
    """Two-sided p of the F test that the spread across seeds is the same on both sides, from
    (mean, std, n) of each (n >= 2). One side with zero spread and the other not: p 0."""
    (_, sa, na), (_, sb, nb) = a, b
    if sa == 0 or sb == 0:
        return 1.0 if sa == sb else 0.0
    from scipy import stats

    f = stats.f(nb - 1, na - 1)
    ratio = sb**2 / sa**2
    return float(min(1.0, 2 * min(f.cdf(ratio), f.sf(ratio))))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values: reject hypothesis i at level alpha when its adjusted
    p < alpha; the chance of any false rejection in the family stays <= alpha."""
    m = len(pvalues)
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def spread_ratio(sa: float, sb: float) -> float:
    """std B / std A (inf from zero spread)."""
    return math.inf if sa == 0 else sb / sa


def detectable(n: int, alpha: float = ALPHA) -> float:
    """The smallest change, in stds across seeds, that Welch's test calls real at `alpha` when
    both sides have n seeds and the same std: t = d / (std * sqrt(2/n)), 2n - 2 dof."""
    # Student's t quantile, as scipy.stats.t.ppf computes it, without importing scipy.stats:
    # the report stage needs only this number.
    from scipy.special import stdtrit

    return float(stdtrit(2 * n - 2, 1 - alpha / 2) * math.sqrt(2 / n))
