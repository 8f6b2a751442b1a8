"""Writing outputs so that a failure or an interruption never leaves a half-written file or a
mix of old and new outputs behind, and numbers at a stated precision (constants.DIGITS
significant digits) that float noise cannot reach.

Every output is written under a temporary name, then renamed into place; where the temporaries
live, and how a dead process's are cleaned up, is aebench/temporaries.py. Inside `with
output_group():` (a stage's whole set of outputs) every atomic_path and atomic_dir waits with
its final rename until the block ends; the renames then run together with SIGINT, SIGTERM and
SIGHUP deferred (aebench.cli), so the outputs change all together or not at all.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import temporaries
from .constants import DIGITS

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def output_group() -> Iterator[None]:
    """Every atomic_path and atomic_dir inside the block (writes of aebench.files, drawing,
    data and models included) is renamed into place when the block ends, all together, with
    SIGINT, SIGTERM and SIGHUP deferred until the last is in place; after a failure or an
    interruption inside the block, none is. A stage wraps all of its outputs in one."""
    with temporaries.joined():
        yield


_ADVICE = {errno.EFBIG: "a file-size limit (`ulimit -f`) is below its size: raise the limit",
           errno.ENOSPC: "the disk is full: free some space",
           errno.EDQUOT: "the disk quota is used up: free some space",
           errno.EROFS: "the file system is read-only",
           errno.EACCES: "fix the folder's permissions",
           errno.EPERM: "fix the folder's permissions"}


def write_error(path: str | Path, err: OSError) -> str:
    """One line for an output that could not be written: the path, why, what to do."""
    advice = _ADVICE.get(err.errno, "check the path and the disk")
    return f"{path}: cannot write this output ({err.strerror or err}); {advice}"


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path for the output `path`; on success it is renamed onto `path` (when
    the active output_group ends, if there is one). An OSError while writing names `path`."""
    path = Path(path)
    with temporaries.joined() as group:
        tmp = group.temporary(path, folder=False)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
        try:
            yield tmp
        except OSError as err:
            raise OSError(write_error(group.shown(path), err)) from err
        group.put(tmp, path)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder for the output folder `path`; on success it replaces `path`
    whole (when the active output_group ends, if there is one), so readers see all of its files
    or none."""
    path = Path(path)
    with temporaries.joined() as group:
        tmp = group.temporary(path, folder=True)
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        group.put(tmp, path)


def check_writable(*paths: str | Path) -> None:
    """Fail now, naming the path, if an output cannot be written there (before hours of work)."""
    for path in map(Path, paths):
        folder = path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            raise OSError(f"{path}: cannot write this output ({err.strerror or err}); fix the "
                          "permissions or the path in dvc.yaml") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` for the stage that writes it") \
            from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from None


def read_columns(path: str | Path, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Named numeric columns of a CSV file with a header; other columns too if present."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; run `dvc repro` for the stage that writes it") \
            from None
    missing = [c for c in columns if not rows or c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: no rows or no column(s) {', '.join(missing)}")
    try:
        return {c: np.array([float(r[c]) for r in rows]) for c in rows[0]}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def rounded(obj: Any, digits: int = DIGITS) -> Any:
    """Floats to `digits` significant digits, recursively, so `dvc metrics diff` and git diffs
    show changes rather than float noise. inf / nan become None (null): JSON has no such
    numbers."""
    if isinstance(obj, float):
        return float(f"{obj:.{digits}g}") if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    return obj


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(rounded(obj), indent=2) + "\n")


def write_csv_rows(path: str | Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rounded(rows))
