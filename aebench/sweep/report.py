"""The sweep's table: every configuration against the base commit, best first.

Each configuration's side is compared with the base by `aebench compare`'s machinery
(aebench.changes: paired by seed where both sides have the same seeds, Welch otherwise); the
p-values are then Holm-adjusted over every model of every configuration tested, so that the
chance of any false "better" or "worse" in the whole sweep stays at most alpha.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import stats
from ..changes import PRIMARY, Row, compare, holm_verdicts
from ..revisions import Side

DASH = "—"


@dataclass
class Line:
    config: str          # the experiment's name
    overrides: str       # key=value ...
    row: Row


def sweep_rows(base: Side, sides: list[tuple[str, str, Side]],
               alpha: float = stats.ALPHA) -> list[Line]:
    """(name, overrides, side) of each configuration -> one Line per model that is not
    bit-identical to the base, Holm-adjusted over all of them, best first."""
    lines = [Line(name, label, row) for name, label, side in sides
             for row in compare(base, side, alpha) if row.verdict != "identical"]
    holm_verdicts([line.row for line in lines], alpha)  # over every configuration at once
    return sorted(lines, key=lambda line: change(line.row) if change(line.row) is not None
                  else float("inf"))


def change(r: Row) -> float | None:
    if r.a is None or r.b is None or not r.a[PRIMARY]["mean"]:
        return None
    return (r.b[PRIMARY]["mean"] - r.a[PRIMARY]["mean"]) / r.a[PRIMARY]["mean"]


def stat(entry: dict | None) -> str:
    if entry is None:
        return DASH
    s = entry[PRIMARY]
    return f"{s['mean']:.4g} ± {s['std']:.2g} ({entry['n']})"


def render(lines: list[Line], base_label: str, failed: list[tuple[str, str, str]],
           alpha: float = stats.ALPHA) -> str:
    """The table, then the failed configurations (name, overrides, why), then how it was
    tested."""
    tested = sum(line.row.p is not None for line in lines)
    out = [f"Against the base {base_label}, best first (test mse, mean ± std (n)):", "",
           "| configuration | overrides | model | mse base | mse config | change | test | "
           f"p (Holm over {tested}) | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        r, c = line.row, change(line.row)
        p = DASH if r.p_adj is None else f"{r.p_adj:.2g}"
        verdict = r.verdict + (f"; {r.spread}" if r.spread else "")
        out.append(f"| {line.config} | {line.overrides} | {r.model} | {stat(r.a)} | "
                   f"{stat(r.b)} | {DASH if c is None else f'{c:+.1%}'} | {r.test or DASH} | "
                   f"{p} | {verdict} |")
    if not lines:
        out.append("| (every configuration bit-identical to the base) | | | | | | | | |")
    for name, overrides, why in failed:
        out.append(f"| {name} | {overrides} | | | | | | | FAILED: {why} |")
    beat = sorted({line.config for line in lines if line.row.verdict == "better"})
    out += ["", f"Beat the base beyond seed noise (α = {alpha}, Holm over every model of every "
            f"configuration): {', '.join(beat) if beat else 'none'}.",
            "'within noise' means not shown, not no change; 'one run' means n = 1 on a side "
            "(no test: train more seeds)."]
    return "\n".join(out) + "\n"
