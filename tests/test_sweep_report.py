"""The sweep's table: each configuration against the base, paired by seed, Holm over all."""

from __future__ import annotations

import statistics

from aebench.revisions import Details, Replica, Side
from aebench.sweep.report import render, sweep_rows


def side(name: str, mse: dict[str, list[float]]) -> Side:
    models = {m: {"n": len(v), "mse": {"mean": statistics.mean(v), "std": statistics.stdev(v)}}
              for m, v in mse.items()}
    replicas = {m: Details(replicas=[Replica(seed=i, mse=x) for i, x in enumerate(v)])
                for m, v in mse.items()}
    return Side(name, name * 4, models, {m: f"metrics/{m}.json" for m in mse}, replicas,
                "reports/details.json")


BASE = {"deep3": [0.030, 0.031, 0.032], "under30": [0.014, 0.0142, 0.0141]}


def test_best_first_paired_and_holm_over_every_configuration():
    base = side("base", BASE)
    better = side("aaa", {"deep3": [0.020, 0.0212, 0.0219], "under30": BASE["under30"]})
    worse = side("bbb", {"deep3": [0.0301, 0.0312, 0.0319], "under30": BASE["under30"]})
    lines = sweep_rows(base, [("s-better", "lr=0.003", better), ("s-worse", "lr=3e-05", worse)])
    assert [line.config for line in lines] == ["s-better", "s-worse"]  # under30: identical
    assert all(line.row.test == "paired" for line in lines)
    # Holm over the two tests of the whole sweep: the smaller p doubled, the larger kept
    raw = sorted(line.row.p for line in lines)
    adjusted = sorted(line.row.p_adj for line in lines)
    assert adjusted[0] == min(1.0, 2 * raw[0]) and adjusted[1] == max(adjusted[0], raw[1])
    assert lines[0].row.verdict == "better" and lines[1].row.verdict == "within noise"
    text = render(lines, "base", [("s-bad", "lr=1", "dvc exp run failed (exit 1): boom")])
    rows = [row for row in text.splitlines() if row.startswith("| s-")]
    assert rows[0].startswith("| s-better | lr=0.003 | deep3 |")
    assert "| -32.2% | paired |" in rows[0]
    assert rows[-1] == "| s-bad | lr=1 | | | | | | | FAILED: dvc exp run failed (exit 1): boom |"
    assert "p (Holm over 2)" in text and "beyond seed noise" in text and \
        "): s-better." in text


def test_progress_line():
    from aebench.sweep.progress import Progress

    progress = Progress("lr", total=5, slots=2)
    assert progress.line(5) == "sweep lr: 0 done, 2 running, 0 failed, 3 waiting; " \
        "time left unknown"
    progress.done, progress.failed, progress.seconds = 1, 1, [100.0]
    assert progress.line(3) == "sweep lr: 1 done, 2 running, 1 failed, 1 waiting; about 3 min " \
        "left"  # two rounds of 2 slots at 100 s each
