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

The server is one per project folder, interpreter, environment and version of the code (a
hash of every .py file's size and time under aebench/ and stages/): an edit starts a new one.
It stays up while a stage it forked, or the cold stage that started it, runs, and exits 10 min
after the last one ended (AEBENCH_WARM_IDLE), so that the next `dvc repro` or `dvc exp run` in
the folder starts warm too; sooner once its code no longer matches the folder's (an edit, an
install, the folder removed), and on `python -m aebench.warm --stop`. AEBENCH_WARM=0, or an OS
without Linux's abstract sockets and pidfds, runs the stage in this process instead, as `python
-m stages.X` would.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
import sys
import sysconfig
from pathlib import Path

# How long an idle server waits for the next stage; AEBENCH_WARM_IDLE sets another. Long enough
# for the edit between two runs (an experiment's first stage then starts warm too): what it
# holds is the imports, ~0.9 GB resident, and nothing of any run.
IDLE_S = 600.0
CHECK_S = 5.0  # how often an idle server checks that its code is still the folder's
STATUS = struct.Struct("q")  # the stage's pid, then its exit code (-N: killed by signal N)
VOLATILE = ("_", "PWD", "OLDPWD", "SHLVL")  # what a shell changes between commands


def available() -> bool:
    """Linux (abstract sockets, pidfds), and not switched off (AEBENCH_WARM=0)."""
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


def fingerprint(cwd: str, version: str | None = None) -> str:
    """What the server's imports depend on, so that one that no longer matches is never used:
    the interpreter, the folder, the environment (but what DVC and the shell set per command)
    and the code_version (`version`, if already known)."""
    h = hashlib.sha256(f"{sys.executable}\0{cwd}\0".encode())
    env = sorted((k, v) for k, v in os.environ.items()
                 if k not in VOLATILE and not k.startswith("DVC_"))
    h.update(json.dumps(env).encode())
    h.update((version or code_version(code_folders())).encode())
    return h.hexdigest()[:32]


def code_folders() -> list[Path]:
    """aebench/ and the `stages` package this folder imports."""
    return [Path(__file__).parents[1], *filter(None, [stage_folder()])]


def code_version(folders: list[Path]) -> str:
    """Every .py file's size and time in `folders` and the installed packages' folder's time
    (which an install changes). OSError if a folder is gone."""
    h = hashlib.sha256()
    files = [Path(sysconfig.get_paths()["purelib"]), *folders]
    for folder in folders:
        files += sorted(folder.rglob("*.py"))
    for path in files:
        st = path.stat()
        h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def address(key: str) -> bytes:
    return b"\0aebench-warm-" + key.encode()  # Linux's abstract namespace: no file to clean
