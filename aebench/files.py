"""Writing outputs so that a failure never leaves a half-written file behind, and numbers at a
stated precision (constants.DIGITS significant digits) that float noise cannot reach."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .constants import DIGITS

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give outputs the usual mode
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole, so readers
    see all of its files or none (nothing half-written after a failure or an interruption)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
