"""`aebench review [BASE]`: the pull-request check, run in a clean clone of the PR's head.

It refuses YAML alias bombs before DVC reads anything (aebench/yaml_bounds.py), gets what it
can from the DVC remote, and re-runs every stage whose dvc.lock entry differs from BASE's (and
any stage `dvc status` finds out of date, missing its outputs, or whose committed outputs are
not what dvc.lock records: forged, aebench/forged.py). It then checks that the re-run outputs
equal the committed ones: byte for byte, or, where retrained weights differ (another CPU family
or a GPU rounds differently), every model within seed noise and every model whose weights are
unchanged bit-identical (aebench/reproduction.py). It writes one Markdown report
(aebench/review_report.py): the verdict, the compare summary BASE -> HEAD as re-run (never a
committed number that was not reproduced), `dvc params diff`, the stages re-run and their
times. The re-run results stay in the working copy (`git status` shows what differs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

from . import forged, stats, yaml_bounds
from .changes import compare
from .compare import alpha_arg, render
from .files import write_text
from .reproduction import TRAIN, verify
from .review_report import Rerun, report
from .revisions import WORKSPACE, BadInput, load

HELP = """\
exit codes: 0 the committed results are what the code produces (byte-identical, or within
  seed noise where retrained weights differ); 1 they are not (the report names the stages and
  files); 2 an error (not a clean git + DVC checkout, a bad BASE, a stage that failed).
"""


class Failed(RuntimeError):
    """An error that ends the review with exit 2; str() is one line."""


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


def to_rerun(status: dict, base_lock: dict, head_lock: dict) -> dict[str, str]:
    """stage -> why: its dvc.lock entry differs from BASE's, or `dvc status` finds it out of
    date (its outputs missing after the pull, or not the ones dvc.lock records, or its deps not
    the ones dvc.lock records)."""
    why = {s: "dvc.lock differs from BASE" for s in head_lock if head_lock[s] != base_lock.get(s)}
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


def default_remote(root: Path) -> str:
    """The default DVC remote's name; "" where none is set (`dvc pull` then pulls nothing)."""
    proc = dvc("remote", "default", cwd=root, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else ""


def announce(order: list[str], remote: str) -> None:
    """One line before the long work: what will run, and why all of it without a remote."""
    stages = f"{len(order)} stage{'s' * (len(order) != 1)}: {', '.join(order)}" if order \
        else "nothing"
    trains = sum(s.startswith(f"{TRAIN}@") for s in order)
    if remote:
        print(f"aebench review: re-running {stages}", file=sys.stderr)
    else:
        print(f"aebench review: no DVC remote is configured (`dvc remote default` names none), "
              f"so every output this clone lacks is re-made: {stages}"
              + (f" ({trains} of them train models: hours at full size; set a remote with "
                 "main's results, docs/compare.md)" if trains else ""), file=sys.stderr)


def pull(root: Path, remote: str) -> str:
    """`dvc pull` what the remote has; what the report says of it."""
    if not remote:
        return "none configured: every output this clone lacks is re-made."
    proc = dvc("pull", "--allow-missing", cwd=root, check=False)
    if proc.returncode == 0:
        return f"{remote}: pulled what it had."
    last = ((proc.stderr or proc.stdout).strip().splitlines() or ["?"])[-1]
    return f"{remote}: nothing pulled ({last}); missing outputs are re-made."


def reproduced(root: Path, base: str, head_sha: str, alpha: float) -> str:
    """The summary BASE -> the re-run outputs in the working copy (HEAD as re-run here)."""
    side_a = load(base, str(root))
    side_b = replace(load(WORKSPACE, str(root)), typed="HEAD, re-run", commit=head_sha)
    return render(compare(side_a, side_b, alpha), side_a, side_b, alpha)


def review(root: Path, base: str, verify_: bool, exact: bool, alpha: float) -> tuple[str, int]:
    if run("git", "status", "--porcelain", cwd=root).stdout.strip():
        raise Failed("the working copy has uncommitted changes: review checks commits; commit "
                     "or stash them first")
    base_sha = run("git", "rev-parse", "--verify", "-q", f"{base}^{{commit}}", cwd=root,
                   check=False).stdout.strip()
    if not base_sha:
        raise Failed(f"BASE {base!r} is not a commit here (fetch it, e.g. `git fetch origin`)")
    head_sha = run("git", "rev-parse", "HEAD", cwd=root).stdout.strip()
    for rev in (head_sha, base_sha):  # before DVC parses any of it
        yaml_bounds.check_revision(root, rev)
    side_a, side_b = load(base, str(root)), load("HEAD", str(root))  # bad metrics: exit 2 now
    params = dvc("params", "diff", base, "HEAD", "--md", cwd=root).stdout
    if not verify_:
        compared = render(compare(side_a, side_b, alpha), side_a, side_b, alpha)
        return report(base, base_sha, head_sha, compared, params, None, ""), 0
    remote = default_remote(root)
    pulled = pull(root, remote)
    head_lock = lock_at(root, "HEAD")
    status = json.loads(dvc("status", "--json", cwd=root).stdout or "{}")
    rerun = Rerun(stages=to_rerun(status, lock_at(root, base_sha), head_lock),
                  forged=forged.forged_outs(root, status))
    order = in_order(root, rerun.stages)
    rerun.stages = {s: rerun.stages[s] for s in order}
    announce(order, remote)
    try:
        rerun.seconds = rerun_stages(root, order) if order else {}
    except Failed as e:  # the report still says what ran and where it stopped
        rerun.error = str(e)
        rerun.problems = forged.problems(root, rerun.forged, reproduced=False)
        return report(base, base_sha, head_sha, "Not shown: the re-run stopped, so no number "
                      "here was reproduced.", params, rerun, pulled), 2
    verify(root, rerun, head_lock, exact, alpha)
    rerun.problems[:0] = forged.problems(root, rerun.forged, reproduced=True)
    return report(base, base_sha, head_sha, reproduced(root, base, head_sha, alpha), params,
                  rerun, pulled), 1 if rerun.problems else 0


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


def check_output(path: Path | None) -> None:
    """Refuse an --output that cannot be written, before the review's long work."""
    if path is None:
        return
    if not path.parent.is_dir():
        raise Failed(f"--output {path}: no such folder: {path.parent}")
    if path.is_dir():
        raise Failed(f"--output {path}: is a folder")
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as err:
        raise Failed(f"--output {path}: cannot write in {path.parent} "
                     f"({err.strerror or err})") from None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        check_output(args.output)
        root = Path(run("git", "rev-parse", "--show-toplevel", cwd=Path.cwd()).stdout.strip())
        base = args.base or default_base(root)
        text, code = review(root, base, not args.no_verify, args.exact, args.alpha)
    except (Failed, BadInput, yaml_bounds.TooLarge) as e:
        print(f"aebench review: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DVC's own errors: exit 2 (an error), never 1 (not reproduced)
        print(f"aebench review: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 2
    print(text, end="")
    if args.output:
        try:
            write_text(args.output, text)
        except OSError as e:  # checked at the start; gone or full since
            print(f"aebench review: {e}", file=sys.stderr)
            return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
