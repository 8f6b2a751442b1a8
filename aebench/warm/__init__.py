"""Warm stage processes: `python -m aebench.warm stages.X ARGS` runs `python -m stages.X ARGS`
in a process forked from a parent that has already imported what the stages import.

Every stage is its own process, and at smoke size most of a stage was its start: torch, MLflow
with its SQLAlchemy store and matplotlib take 4-5 s to import on a 2-core machine, and the first
optimizer of a process imports torch's compiler (1.7 s). The first stage of a `dvc repro` finds
no server: it starts one in the background and runs itself, as `python -m stages.X` would (a
stage that comes while a server imports waits for it: it is further along). The server imports
all of it once; every later stage is a `fork` of it: a fresh process with the
modules loaded and nothing else (the server never runs a stage, opens a store or touches a
GPU), so no stage sees another's state, as with a cold start.

The stage's process is the server's child, so this command stays in its place: it hands the
stage its stdin, stdout and stderr (a terminal stays a terminal), forwards SIGINT, SIGTERM and
SIGHUP to it, and exits with its status. If this command dies, the stage gets SIGTERM.

Who can use a server (place.py, guard.py): its socket is a file in a folder only its user can
enter, and it runs only its own user's requests (the peer's uid), only this project's stages
(`stages.NAME`, stages/NAME.py of the folder it serves), in that folder. A forked stage inherits
the server's limits, so a server serves only commands whose limits are its own (`fingerprint`:
rlimits, umask, CPU affinity, nice, cgroup and the rest of `inherited`): a command under other
limits runs cold, as `python -m stages.X` would, and starts the server for them.

A server serves one project folder, interpreter, environment, set of limits and version of the
code (a hash of every .py file's bytes under aebench/ and stages/): anything else starts a new
one, which tells the folder's others to exit (at most one idle server per folder and user). It
stays up while a stage it forked, or the cold stage that started it, runs, and exits 10 min
after the last one ended (AEBENCH_WARM_IDLE), so that the next `dvc repro` or `dvc exp run` in
the folder starts warm too; sooner once its code no longer matches the folder's (an edit, an
install, the folder removed), and on `python -m aebench.warm --stop` (every server of the
folder). AEBENCH_WARM=0, an OS without pidfds, or a folder with no private place for the
socket (place.py) runs the stage in this process instead, as `python -m stages.X` would.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import struct
import sys
import sysconfig
from pathlib import Path

from .inherited import inherited

# How long an idle server waits for the next stage; AEBENCH_WARM_IDLE sets another. Long enough
# for the edit between two runs (an experiment's first stage then starts warm too): what it
# holds is the imports, ~0.9 GB resident, and nothing of any run.
IDLE_S = 600.0
CHECK_S = 5.0  # how often an idle server checks that its code is still the folder's
STATUS = struct.Struct("q")  # the stage's pid, then its exit code (-N: killed by signal N)
VOLATILE = ("_", "PWD", "OLDPWD", "SHLVL")  # what a shell changes between commands
STAGE = re.compile(r"stages\.([A-Za-z][A-Za-z0-9_]*)")  # what a server runs: stages.NAME


def available() -> bool:
    """Linux (pidfds, /proc), and not switched off (AEBENCH_WARM=0)."""
    return (sys.platform == "linux" and hasattr(os, "pidfd_open")
            and os.environ.get("AEBENCH_WARM", "1") != "0" and idle_seconds() > 0)


def idle_seconds() -> float:
    text = os.environ.get("AEBENCH_WARM_IDLE", "")
    try:
        return float(text) if text else IDLE_S
    except ValueError:
        raise SystemExit(f"error: AEBENCH_WARM_IDLE={text!r} is not a number of seconds") \
            from None


def stage_folder() -> Path | None:
    """The `stages` package's folder, as `python -m stages.X` would import it here."""
    spec = importlib.util.find_spec("stages")
    return Path(next(iter(spec.submodule_search_locations))) if spec else None


def is_stage(folder: str, module: str) -> bool:
    """Whether `module` is one of the stages of the project in `folder`: stages.NAME, with
    folder/stages/NAME.py a file."""
    match = STAGE.fullmatch(module)
    return bool(match) and Path(folder, "stages", f"{match[1]}.py").is_file()


def fingerprint(cwd: str, version: str | None = None) -> str:
    """What the server's imports and its forks depend on, so that one that no longer matches is
    never used: the interpreter, the folder, the environment (but what DVC and the shell set
    per command), what a forked stage inherits (`inherited`: limits, umask, affinity, nice,
    cgroup, ...) and the code_version (`version`, if already known)."""
    h = hashlib.sha256(f"{sys.executable}\0{cwd}\0".encode())
    env = sorted((k, v) for k, v in os.environ.items()
                 if k not in VOLATILE and not k.startswith("DVC_"))
    h.update(json.dumps([env, inherited()]).encode())
    h.update((version or code_version(code_folders())).encode())
    return h.hexdigest()[:32]


def code_folders() -> list[Path]:
    """aebench/ and the `stages` package this folder imports."""
    return [Path(__file__).parents[1], *filter(None, [stage_folder()])]


def code_version(folders: list[Path]) -> str:
    """A hash of every .py file's path and bytes in `folders` (~0.3 MB, 1.5-9 ms), and of the
    installed packages' folder's time (which an install changes). OSError if a folder is
    gone."""
    h = hashlib.sha256()
    purelib = os.stat(sysconfig.get_paths()["purelib"])
    h.update(f"{purelib.st_mtime_ns}\0".encode())
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        for path in sorted(folder.rglob("*.py")):
            data = path.read_bytes()
            h.update(f"{path}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()
