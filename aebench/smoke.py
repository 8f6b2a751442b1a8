"""`make smoke`: the whole pipeline on a slice of MNIST in a scratch copy, to try a change in
minutes without touching the committed results.

    python -m aebench.smoke [DIR] [--limit N] [--epochs N] [--replicas N]

Copies the working copy's files (tracked, and untracked but not ignored: your uncommitted
change too) into DIR (default .smoke/, ignored by git), without the committed results, sets
train.limit, every model's epochs and train.replicas, and runs `dvc repro` there, with its own
mlflow.db, which it records as the last run's store (`make ui` opens it). Its runs carry the
project's commit in `git_commit` and a `smoke` tag. The data comes from $MNIST_MIRROR or the
mirrors in params.yaml.

One run at a time per DIR: a second `make smoke` while one runs is refused in one line (a lock
held with flock in a folder of this user's alone), rather than re-copied under the first. The
scratch copy stages what a run changes in its own git (DVC's core.autostage), and DVC's closing
"dvc push" hint is left out: neither applies to a scratch copy. The run ends with what to look
at next, and with how long the stages' warm server stays up and how to end it.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import fnmatch
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from . import warm
from .config import MAX_EPOCHS, MAX_LIMIT, MAX_REPLICAS
from .tracking.store import COMMIT_ENV, SMOKE_ENV, git_commit, record_last_store

ROOT = Path(__file__).resolve().parents[1]
# What `dvc repro` prints last after a run that changed something; a scratch copy has nothing to
# push (and with core.autostage, DVC's "git add dvc.lock ..." hint is not printed at all).
DVC_PUSH_HINT = "Use `dvc push` to send your updates to remote storage."
SCRATCH_DVC_CONFIG = "[core]\n    autostage = true\n"  # the copy's .dvc/config.local
COLD_FIRST = "convert"  # it and what it depends on (download): no torch, no MLflow


def result_paths(src: Path = ROOT) -> list[str]:
    """What a run writes: dvc.lock and every out, metric and plot of dvc.yaml's stages, as
    patterns (a path a foreach fills in, plots/curves/${key}.csv, as plots/curves/*.csv)."""
    stages = yaml.safe_load((src / "dvc.yaml").read_text())["stages"]
    paths = ["dvc.lock"]
    for stage in stages.values():
        for key in ("outs", "metrics", "plots"):
            for out in stage.get("do", stage).get(key, []):
                path = out if isinstance(out, str) else next(iter(out))
                paths.append(re.sub(r"\$\{[^}]*\}", "*", path).rstrip("/"))
    return paths


def is_result(name: str, results: list[str]) -> bool:
    """Whether the file `name` is, or lies in a folder that is, one of `results`."""
    return any(fnmatch.fnmatchcase(name, p) or name.startswith(f"{p}/") for p in results)


def copy_repo(dest: Path, src: Path = ROOT, *, results: bool = False) -> Path:
    """What a fresh clone of `src` would hold plus uncommitted work, in `dest` (a new git
    repository with one commit, as DVC's experiments need); without the run's results
    (result_paths) unless `results`, so a run there starts from nothing."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=src, check=True, capture_output=True).stdout.decode().split("\0")
    skip = [] if results else result_paths(src)
    for name in filter(None, names):
        if (src / name).is_file() and not is_result(name, skip):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, dest / name)
    for args in (["init", "-q"], ["config", "user.name", "aebench"],
                 ["config", "user.email", "aebench@localhost"], ["add", "-A"],
                 ["commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


def slice_params(path: Path, *, limit: int, epochs: int, replicas: int) -> None:
    """Rewrite params.yaml at `path` for a quick run (comments are lost: it is a scratch copy)."""
    params = yaml.safe_load(path.read_text())
    params["train"].update(limit=limit, replicas=replicas)
    for cfg in params["models"].values():
        cfg["epochs"] = epochs
        cfg.pop("replicas", None)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def smoke_env(dest: Path, shrunk: str, src: Path = ROOT) -> dict[str, str]:
    """The environment of the smoke run (the stages' and the warm server's: one environment,
    so that the stages use the server started for them): its own store in `dest`, this venv's
    `python` first, unbuffered output, and for every MLflow run the project's commit (not the
    copy's) and a `smoke` tag saying what was shrunk (and whether uncommitted changes were
    copied)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{dest.resolve()}/mlflow.db"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal"],
                            cwd=src, capture_output=True, text=True).stdout
    env["PYTHONUNBUFFERED"] = "1"  # the stages' lines pass through repro's pipe as printed
    env[COMMIT_ENV] = git_commit(src)
    env[SMOKE_ENV] = shrunk + (", with uncommitted changes" if status.strip() else "")
    return env


def private_folder() -> Path:
    """A folder only this user can use ($XDG_RUNTIME_DIR, else the temporary folder, then
    aebench-UID), made 0700; SystemExit (one line) if it is someone else's or open to others."""
    base = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    folder = base / f"aebench-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    st = folder.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise SystemExit(f"error: {folder}: not a folder of this user's alone (owner uid "
                         f"{st.st_uid}, mode {stat.filemode(st.st_mode)}); remove it")
    return folder


@contextlib.contextmanager
def one_run(folder: Path) -> Iterator[None]:
    """Held while a smoke run uses `folder`: a second one there is refused with one line
    (SystemExit) before it touches anything. The lock is the kernel's (flock): it goes with
    the process, a killed run leaves none behind."""
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    lock = private_folder() / f"smoke-{key}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise SystemExit(f"error: another `make smoke` (pid {pid}) is running in {folder}; "
                             "wait for it to end") from None
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


def repro(folder: Path, env: dict[str, str]) -> int:
    """`dvc repro` in the scratch copy, its output passed on as it comes but DVC_PUSH_HINT (and
    the second step's "didn't change" lines of the first step's stages); its exit code. `env`
    should have PYTHONUNBUFFERED=1 (smoke_env), so that the stages' lines come through the pipe
    as they print them.

    In two steps: download and convert first, cold (AEBENCH_WARM=0: each in a process of its
    own, under a second of imports, neither needs torch or MLflow), on one core while the warm
    server imports on the other; then the rest, forked from the server. In one `dvc repro`,
    download waited for the server's imports (4-5 s on 2 cores) and ran warm."""
    return dvc_repro(folder, {**env, "AEBENCH_WARM": "0"}, [COLD_FIRST], {DVC_PUSH_HINT}) or \
        dvc_repro(folder, env, [], {DVC_PUSH_HINT, *(f"Stage '{s}' didn't change, skipping"
                                                    for s in ("download", COLD_FIRST))})


def dvc_repro(folder: Path, env: dict[str, str], targets: list[str], hide: set[str]) -> int:
    """`dvc repro TARGETS`, its lines passed on but those in `hide`; its exit code."""
    with subprocess.Popen(["dvc", "repro", *targets], cwd=folder, env=env,
                          stdout=subprocess.PIPE, text=True, errors="replace") as proc:
        for line in proc.stdout:
            if line.strip() not in hide:
                sys.stdout.write(line)
                sys.stdout.flush()
    return proc.returncode


def count(low: int, high: int):
    """An argparse type: an integer in low..high, or a usage error naming the bounds (before
    anything is copied or run)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; use {low}..{high}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aebench.smoke", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", nargs="?", default=str(ROOT / ".smoke"), type=Path)
    parser.add_argument("--limit", type=count(0, MAX_LIMIT), default=3000,
                        help="training images (3000; 0 = all)")
    parser.add_argument("--epochs", type=count(1, MAX_EPOCHS), default=1,
                        help="epochs of every model (1)")
    parser.add_argument("--replicas", type=count(1, MAX_REPLICAS), default=1,
                        help="replicas per model (1)")
    args = parser.parse_args(argv)
    with one_run(args.dir):
        return run(args)


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    copy_repo(args.dir)
    (args.dir / ".dvc" / "config.local").write_text(SCRATCH_DVC_CONFIG)
    slice_params(args.dir / "params.yaml", limit=args.limit, epochs=args.epochs,
                 replicas=args.replicas)
    env = smoke_env(args.dir, f"limit={args.limit} epochs={args.epochs} "
                              f"replicas={args.replicas}")
    record_last_store(env["MLFLOW_TRACKING_URI"], ROOT)  # `make ui` opens it
    # The stages' warm server (aebench.warm), started now: its imports overlap DVC's start,
    # download and convert (run cold: see repro), so that the first train stage is forked
    # from it
    starter = subprocess.Popen([sys.executable, "-m", "aebench.warm", "--start"], cwd=args.dir,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    code = repro(args.dir, env)
    starter.wait()
    print(outcome(code, args.dir, time.monotonic() - start), file=sys.stderr)
    return code


def outcome(code: int, folder: Path, seconds: float) -> str:
    """The end: where the summary is and what to do next (next_steps), or (it was not written)
    that the run failed."""
    if code == 0:
        return f"smoke: done in {seconds:.0f} s; see {folder / 'reports' / 'summary.md'}\n" + \
            next_steps(folder)
    return (f"smoke: FAILED in {seconds:.0f} s (dvc repro exit {code}; its error is above); the "
            f"scratch copy is {folder}")


def next_steps(folder: Path, idle_s: float | None = None) -> str:
    """What to look at after a smoke run in `folder`, and what it leaves running: the stages'
    warm server, for `idle_s` (default: as aebench.warm reads it, AEBENCH_WARM_IDLE or
    IDLE_S; none where warm stages are off)."""
    if idle_s is None:
        idle_s = warm.idle_seconds() if warm.available() else 0.0
    try:
        shown = folder.resolve().relative_to(Path.cwd())
    except ValueError:
        shown = folder
    server = (f"The stages' warm server for {shown} stays up {idle_s / 60:g} min after its last "
              "stage (about 0.9 GB; AEBENCH_WARM_IDLE=seconds sets how long); to end it now: "
              f"cd {shown} && python -m aebench.warm --stop") if idle_s > 0 else \
        "No warm server stays up (AEBENCH_WARM=0)."
    return "\n".join([
        "next:",
        "  make ui      the MLflow UI on this run's store, http://127.0.0.1:5000 (it prints the "
        "address of the view \"Models, best first\"; PORT=... for another port)",
        f"  figures      {shown / 'plots' / 'figures'}/ (test_mse.png: the models, best first)",
        f"  plots page   cd {shown} && dvc plots show   ({shown / 'dvc_plots' / 'index.html'}; "
        "`make plots` here draws the committed run's)",
        server,
    ])


if __name__ == "__main__":
    sys.exit(main())
