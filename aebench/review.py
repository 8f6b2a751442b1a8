"""`aebench review [BASE]`: the pull-request check, run in a clean clone of the PR's head.

It gets what it can from the DVC remote, re-runs every stage whose dvc.lock entry differs
from BASE's (and any stage `dvc status` finds out of date or missing its outputs), and checks
that the re-run outputs equal the committed ones: byte for byte, or, where retrained weights
differ (another CPU family or a GPU rounds differently), every model within seed noise and
every model whose weights are unchanged bit-identical. It writes one Markdown report: the
compare summary BASE -> HEAD, `dvc params diff`, the stages re-run and their times, and the
verdict. The re-run results stay in the working copy (`git status` shows what differs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import stats
from .changes import compare
from .compare import alpha_arg, render
from .revisions import WORKSPACE, BadInput, Side, load

TRAIN = "train"  # dvc.yaml's foreach stage: train@<model> writes that model's weights
HELP = """\
exit codes: 0 the committed results are what the code produces (byte-identical, or within
  seed noise where retrained weights differ); 1 they are not (the report names the stages and
  files); 2 an error (not a clean git + DVC checkout, a bad BASE, a stage that failed).
"""


class Failed(RuntimeError):
    """An error that ends the review with exit 2; str() is one line."""


@dataclass
class Rerun:
    stages: dict[str, str] = field(default_factory=dict)    # stage -> why it was re-run
    seconds: dict[str, float] = field(default_factory=dict)
    differ: dict[str, list[str]] = field(default_factory=dict)  # stage -> outs not as committed
    stale: dict[str, list[str]] = field(default_factory=dict)   # stage -> deps/params not either
    problems: list[str] = field(default_factory=list)       # why it is not reproduced
    note: str = ""                                           # how it was reproduced
    error: str = ""                                          # why the re-run stopped


def environ() -> dict[str, str]:
    """This environment with this Python's folder first on PATH: dvc.yaml's `python` is ours."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=environ(), capture_output=True, text=True)
    if check and proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise Failed(f"`{' '.join(args)}` failed: {tail[0]}")
    return proc


def dvc(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run(sys.executable, "-m", "dvc", *args, cwd=cwd, check=check)


def default_base(root: Path) -> str:
    found = run("git", "rev-parse", "--verify", "-q", "origin/main", cwd=root, check=False)
    return "origin/main" if found.returncode == 0 else "main"


def lock_at(root: Path, rev: str) -> dict[str, dict]:
    """The stages of dvc.lock at a revision ({} where there is none)."""
    proc = run("git", "show", f"{rev}:dvc.lock", cwd=root, check=False)
    return (yaml.safe_load(proc.stdout) or {}).get("stages", {}) if proc.returncode == 0 else {}


def hashes(entry: dict, key: str) -> dict[str, str]:
    """path -> hash of a lock entry's deps or outs (params: key -> value)."""
    if key == "params":
        return {f"{f}:{k}": json.dumps(v, sort_keys=True)
                for f, ps in entry.get("params", {}).items() for k, v in ps.items()}
    return {d["path"]: d.get("md5") or d.get("hash", "") for d in entry.get(key, [])}


def differing(new: dict, old: dict, key: str) -> list[str]:
    a, b = hashes(new, key), hashes(old, key)
    return sorted(p for p in a.keys() | b.keys() if a.get(p) != b.get(p))


def to_rerun(root: Path, base_lock: dict, head_lock: dict) -> dict[str, str]:
    """stage -> why: its dvc.lock entry differs from BASE's, or `dvc status` finds it out of
    date (its outputs missing after the pull, or its deps not the ones dvc.lock records)."""
    why = {s: "dvc.lock differs from BASE" for s in head_lock if head_lock[s] != base_lock.get(s)}
    status = json.loads(dvc("status", "--json", cwd=root).stdout or "{}")
    for stage, changes in status.items():
        kinds = sorted({k for c in changes if isinstance(c, dict) for k in c})
        why.setdefault(stage.split(":")[-1], "dvc status: " + ", ".join(kinds))
    return why


def in_order(root: Path, stages: dict[str, str]) -> list[str]:
    """The stages in the order `dvc repro` runs them."""
    out = dvc("repro", "--dry", "--force", cwd=root).stdout
    order = [line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")]
    return [s for s in order if s in stages]


def rerun_stages(root: Path, stages: list[str]) -> dict[str, float]:
    """Force-run exactly `stages` (in that order) in one `dvc repro`; seconds per stage."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--force", "--single-item", "--no-run-cache",
           *stages]
    seconds, current, start, tail = {}, None, time.monotonic(), []
    with subprocess.Popen(cmd, cwd=root, env=environ(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", file=sys.stderr)  # the stages' own progress, as dvc shows it
            tail = [*tail[-20:], line.rstrip()]
            if line.startswith("Running stage '"):
                now = time.monotonic()
                if current:
                    seconds[current] = now - start
                current, start = line.split("'")[1], now
    if current:
        seconds[current] = time.monotonic() - start
    if proc.returncode:
        raise Failed(f"`dvc repro` failed in {current or 'its set-up'}: "
                     + next((t for t in reversed(tail) if t), "(no output)"))
    return seconds


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


def changed_files(root: Path, outs: list[str]) -> list[str]:
    """The files of `outs` that differ from HEAD, where git tracks them (cache: false outputs);
    an output in DVC's cache (weights, data) is named whole."""
    named = []
    for out in outs:
        diff = run("git", "diff", "--name-only", "HEAD", "--", out, cwd=root, check=False)
        named += diff.stdout.split() or [out]
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
    files = "; ".join(f"{stage}: {', '.join(changed_files(root, paths))}"
                      for stage, paths in rerun.differ.items())
    if exact or not retrained:
        why = "--exact" if exact else "no model's weights changed, so nothing may differ"
        rerun.problems.append(f"not byte-identical ({why}): {files}")
        return
    rerun.problems += noise_problems(load("HEAD", str(root)), load(WORKSPACE, str(root)),
                                     retrained, alpha)
    if not rerun.problems:
        rerun.note = (f"within seed noise: the weights of {', '.join(retrained)} differ from the "
                      "committed ones (another CPU family or a GPU rounds differently), and "
                      "every model's committed mse is within seed noise of the re-run (Welch); "
                      f"not byte-identical: {files}")


def report(base: str, base_sha: str, head_sha: str, compared: str, params: str,
           rerun: Rerun | None, pulled: str) -> str:
    lines = [f"# aebench review: HEAD `{head_sha[:7]}` against BASE `{base_sha[:7]}` ({base})", ""]
    if rerun is None:
        lines.append("**Not verified** (`--no-verify`): the committed results were compared only.")
    elif rerun.error:
        lines.append(f"**Error**: {rerun.error}")
    elif rerun.problems:
        lines += ["**Not reproduced**: the committed results are not what the code produces:", ""]
        lines += [f"- {p}" for p in rerun.problems]
    elif not rerun.stages:
        lines.append("**Reproduced**: no stage differs from BASE and none is out of date.")
    else:
        lines.append(f"**Reproduced**: {rerun.note}.")
    lines += ["", "## Metrics: BASE → HEAD", "", compared.rstrip(), "", "## Params", "",
              params.strip() or "No params changed.", ""]
    if rerun is not None:
        lines += ["## Stages re-run", ""]
        if rerun.stages:
            lines += ["| stage | why | seconds | outputs |", "|---|---|---|---|"]
            for s, why in rerun.stages.items():
                outs = "not checked" if rerun.error else ", ".join(rerun.differ[s]) + \
                    " differ" if s in rerun.differ else "byte-identical"
                secs = f"{rerun.seconds[s]:.1f}" if s in rerun.seconds else "—"
                lines.append(f"| {s} | {why} | {secs} | {outs} |")
        else:
            lines.append("None.")
        lines += ["", f"DVC remote: {pulled}", ""]
    return "\n".join(lines)


def review(root: Path, base: str, verify_: bool, exact: bool, alpha: float) -> tuple[str, int]:
    if run("git", "status", "--porcelain", cwd=root).stdout.strip():
        raise Failed("the working copy has uncommitted changes: review checks commits; commit "
                     "or stash them first")
    base_sha = run("git", "rev-parse", "--verify", "-q", f"{base}^{{commit}}", cwd=root,
                   check=False).stdout.strip()
    if not base_sha:
        raise Failed(f"BASE {base!r} is not a commit here (fetch it, e.g. `git fetch origin`)")
    head_sha = run("git", "rev-parse", "HEAD", cwd=root).stdout.strip()
    side_a, side_b = load(base, str(root)), load("HEAD", str(root))
    compared = render(compare(side_a, side_b, alpha), side_a, side_b, alpha)
    params = dvc("params", "diff", base, "HEAD", "--md", cwd=root).stdout
    if not verify_:
        return report(base, base_sha, head_sha, compared, params, None, ""), 0
    pull = dvc("pull", "--allow-missing", cwd=root, check=False)
    pulled = "pulled what it had." if pull.returncode == 0 else \
        "nothing pulled (" + ((pull.stderr or pull.stdout).strip().splitlines() or ["?"])[-1] + \
        "); missing outputs are re-made."
    head_lock = lock_at(root, "HEAD")
    rerun = Rerun(stages=to_rerun(root, lock_at(root, base_sha), head_lock))
    order = in_order(root, rerun.stages)
    rerun.stages = {s: rerun.stages[s] for s in order}
    try:
        rerun.seconds = rerun_stages(root, order) if order else {}
    except Failed as e:  # the report still says what ran and where it stopped
        rerun.error = str(e)
        return report(base, base_sha, head_sha, compared, params, rerun, pulled), 2
    verify(root, rerun, head_lock, exact, alpha)
    return report(base, base_sha, head_sha, compared, params, rerun, pulled), \
        1 if rerun.problems else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aebench review", description=__doc__.split("\n\n")[0],
                                epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", nargs="?", help="the branch the PR goes into (default: origin/main "
                   "where it exists, else main)")
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--no-verify", action="store_true", help="compare only: no pull, no re-run")
    p.add_argument("--exact", action="store_true",
                   help="require byte-identical outputs even where retrained weights differ")
    p.add_argument("--alpha", type=alpha_arg, default=stats.ALPHA,
                   help=f"significance level in (0, 1) (default {stats.ALPHA})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        root = Path(run("git", "rev-parse", "--show-toplevel", cwd=Path.cwd()).stdout.strip())
        base = args.base or default_base(root)
        text, code = review(root, base, not args.no_verify, args.exact, args.alpha)
    except (Failed, BadInput) as e:
        print(f"aebench review: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return code


if __name__ == "__main__":
    sys.exit(main())
