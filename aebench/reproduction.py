"""Is the re-run what was committed? The re-run's dvc.lock against the committed one: outputs
byte-identical, or, where retrained weights differ, every model within seed noise and every
model whose weights are unchanged bit-identical; and deps, params and commands as recorded."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from . import forged
from .changes import compare
from .review_report import Rerun
from .revisions import WORKSPACE, Side, load

TRAIN = "train"  # dvc.yaml's foreach stage: train@<model> writes that model's weights


def hashes(entry: dict, key: str) -> dict[str, str]:
    """path -> hash of a lock entry's deps or outs (params: key -> value)."""
    if key == "params":
        return {f"{f}:{k}": json.dumps(v, sort_keys=True)
                for f, ps in entry.get("params", {}).items() for k, v in ps.items()}
    return {d["path"]: d.get("md5") or d.get("hash", "") for d in entry.get(key, [])}


def differing(new: dict, old: dict, key: str) -> list[str]:
    a, b = hashes(new, key), hashes(old, key)
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


def lock_differences(new_lock: dict, head_lock: dict, stages) -> tuple[dict, dict]:
    """({stage: outs that differ}, {stage: deps, params or cmd that differ}) of the re-run's
    dvc.lock against the committed one. A dep that is a re-run output which differs is that
    output's story, not a stale dvc.lock."""
    differ = {s: differing(new_lock.get(s, {}), head_lock.get(s, {}), "outs") for s in stages}
    differ = {s: outs for s, outs in differ.items() if outs}
    produced = {p for paths in differ.values() for p in paths}
    stale = {}
    for stage in stages:
        new, old = new_lock.get(stage, {}), head_lock.get(stage, {})
        found = [p for p in differing(new, old, "deps") if p not in produced]
        found += differing(new, old, "params") + (["cmd"] if new.get("cmd") != old.get("cmd")
                                                  else [])
        if found:
            stale[stage] = found
    return differ, stale


def noise_problems(committed: Side, rerun: Side, retrained: list[str],
                   alpha: float) -> list[str]:
    """Why the committed results are not the re-run's within seed noise, where the weights of
    `retrained` came out different: every other model must be bit-identical, and each of these
    within seed noise (Welch: unpaired on purpose, see docs/compare.md) without a spread flag."""
    problems = []
    for r in compare(committed, rerun, alpha, paired=False):
        if r.model not in retrained and r.verdict != "identical":
            problems.append(f"{r.model}: its weights are byte-identical but its metrics differ "
                            f"({committed.files.get(r.model, r.model)})")
        elif r.model in retrained and (r.verdict not in ("identical", "within noise")
                                       or r.spread):
            verdict = r.verdict + (f"; {r.spread}" if r.spread else "")
            problems.append(f"{r.model}: retrained, and the committed metrics are not within "
                            f"seed noise of the re-run ({verdict})")
    return problems


def changed_files(root: Path, outs: list[str], values: bool) -> list[str]:
    """The files of `outs` that differ from HEAD, where git tracks them (cache: false outputs),
    each with its committed and its reproduced value where `values`; an output in DVC's cache
    (weights, data) is named whole."""
    named = []
    for out in outs:
        files = forged.changed_files(root, out) if forged.tracked(root, out) else []
        named += [f"{f} ({forged.compared(root, f)})" if values else f for f in files] or [out]
    return named


def verify(root: Path, rerun: Rerun, head_lock: dict, exact: bool, alpha: float) -> None:
    """Fill rerun.differ / stale / problems / note from the re-run's dvc.lock."""
    new_lock = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {})
    rerun.differ, rerun.stale = lock_differences(new_lock, head_lock, rerun.stages)
    rerun.problems += [f"dvc.lock of `{s}` is out of date ({', '.join(paths)}): run `dvc "
                       "repro` and commit dvc.lock" for s, paths in rerun.stale.items()]
    if not rerun.differ:
        rerun.note = "every re-run output is byte-identical to the committed one"
        return
    retrained = sorted(s.split("@", 1)[1] for s in rerun.differ if s.startswith(f"{TRAIN}@"))
    def files(values: bool) -> str:
        return "; ".join(f"{stage}: {', '.join(changed_files(root, paths, values))}"
                         for stage, paths in rerun.differ.items())

    if exact or not retrained:
        why = "--exact" if exact else "no model's weights changed, so nothing may differ"
        rerun.problems.append(f"not byte-identical ({why}): {files(True)}")
        return
    rerun.problems += noise_problems(load("HEAD", str(root)), load(WORKSPACE, str(root)),
                                     retrained, alpha)
    if not rerun.problems:
        rerun.note = (f"within seed noise: the weights of {', '.join(retrained)} differ from the "
                      "committed ones (another CPU family or a GPU rounds differently), and "
                      "every model's committed mse is within seed noise of the re-run (Welch); "
                      f"not byte-identical: {files(False)}")
