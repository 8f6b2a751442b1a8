"""Writing outputs so that a failure or an interruption never leaves a half-written file or a
mix of old and new outputs behind, and numbers at a stated precision (constants.DIGITS
significant digits) that float noise cannot reach.

Every output is written under a temporary name, then renamed into place. The temporaries live
in `.dvc/tmp/aebench/<host>-<pid>/` of the DVC repository the output belongs to (the nearest
folder above it holding `.dvc/`, on the same file system, so that the rename is atomic): DVC
and git ignore that folder and no stage depends on it, so a run killed outright (SIGKILL) leaves
nothing inside a folder that another stage hashes, and the next writer removes what a dead
process left there. Outside a DVC repository (or with `.dvc/` on another file system) they sit
beside the output as `.NAME.XXXXXXXX.tmp`, as no stage hashes anything there.

Inside `with output_group():` (a stage's whole set of outputs) every atomic_path and atomic_dir
waits with its final rename until the block ends; the renames then run together with SIGINT,
SIGTERM and SIGHUP deferred (aebench.cli), so the outputs change all together or not at all.
"""

from __future__ import annotations

import csv
import errno
import json
import math
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from . import cli
from .constants import DIGITS

_UMASK = os.umask(0)
os.umask(_UMASK)
TEMP_FOLDER = ("tmp", "aebench")  # under a repository's .dvc/
_OWN: set[Path] = set()  # this process's folders under TEMP_FOLDER (the pid is in the name)


def process_alive(host: str, pid: int) -> bool:
    """Whether process `pid` of `host` may still run. Another host's cannot be checked and
    counts as alive; this very process's pid counts as gone (whatever names it was left by an
    earlier process that had the same pid)."""
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False
    if os.name != "posix":
        return False  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(root: str | Path) -> list[Path]:
    """Remove the folders under `root` (a repository's .dvc/tmp/aebench) of this host's
    processes that are gone (SIGKILL, a power cut); return those that held anything."""
    host = socket.gethostname()
    removed = []
    for folder in sorted(Path(root).glob(f"{host}-*")):
        pid = folder.name[len(host) + 1:]
        if pid.isdigit() and not process_alive(host, int(pid)):
            if any(folder.iterdir()):
                removed.append(folder)
            shutil.rmtree(folder, ignore_errors=True)
    if removed:
        print(f"removed what {len(removed)} killed run(s) left: "
              f"{', '.join(map(str, removed))}", file=sys.stderr)
    return removed


def _repository_temp(folder: Path) -> Path | None:
    """.dvc/tmp/aebench of the nearest folder at or above `folder` (which exists) that holds
    `.dvc/` on `folder`'s file system; None when there is none."""
    device = folder.stat().st_dev
    for above in (folder, *folder.parents):
        try:
            if above.stat().st_dev != device:  # a mount point: os.replace cannot cross it
                return None
            dvc = above / ".dvc"
            if dvc.is_dir() and dvc.stat().st_dev == device:
                return dvc.joinpath(*TEMP_FOLDER)
        except OSError:
            return None
    return None


def temp_folder(path: str | Path) -> Path:
    """The folder for the temporaries of output `path` (see the module's docstring); creates
    `path`'s folder."""
    folder = Path(os.path.abspath(path)).parent
    folder.mkdir(parents=True, exist_ok=True)
    root = _repository_temp(folder)
    if root is None:
        return folder
    own = root / f"{socket.gethostname()}-{os.getpid()}"
    if own not in _OWN:
        if root.is_dir():
            remove_leftovers(root)
        own.mkdir(parents=True, exist_ok=True)
        _OWN.add(own)
    return own


class _Group:
    """The outputs of one output_group: temporaries, and the renames that put them in place."""

    def __init__(self):
        self.pid = os.getpid()
        self.pending: dict[Path, Path] = {}  # temporary -> output, in order
        self.temporaries: dict[Path, Path] = {}  # each one -> its output; all removed at the end

    def temporary(self, path: Path, *, folder: bool) -> Path:
        where = temp_folder(path)
        if folder:
            tmp = Path(tempfile.mkdtemp(dir=where, prefix=f".{path.name}.", suffix=".tmp"))
        else:
            fd, name = tempfile.mkstemp(dir=where, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
        self.temporaries[tmp] = path
        return tmp

    def inside_temporary(self, path: Path) -> Path | None:
        """The temporary folder of this group that holds `path`, if any."""
        path = Path(os.path.abspath(path))
        return next((t for t in self.temporaries if t in path.parents), None)

    def shown(self, path: Path) -> Path:
        """`path` as it will be named once in place (a file inside a temporary folder)."""
        holder = self.inside_temporary(path)
        if holder is None:
            return path
        return self.temporaries[holder] / Path(os.path.abspath(path)).relative_to(holder)

    def put(self, tmp: Path, path: Path) -> None:
        """Rename `tmp` onto `path` when the group ends; at once when `path` is itself inside
        a temporary folder of the group (a checkpoint inside a new weights folder)."""
        if self.inside_temporary(path) is not None:
            os.replace(tmp, path)
        else:
            self.pending[tmp] = path

    def commit(self) -> None:
        # Old folders go aside first (a folder cannot be renamed onto a full one); their
        # removal waits until every new output is in place.
        aside = {path: self.temporary(path, folder=True) for tmp, path in self.pending.items()
                 if tmp.is_dir() and path.is_dir()}
        with cli.deferred_signals():
            for tmp, path in self.pending.items():
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    if path in aside:
                        os.replace(path, aside[path])
                    os.replace(tmp, path)
                except OSError as err:
                    raise OSError(f"{path}: cannot move the new output into place "
                                  f"({err.strerror or err})") from err

    def discard(self) -> None:
        for tmp in reversed(self.temporaries):
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            elif tmp.exists() or tmp.is_symlink():
                tmp.unlink()
        for own in [o for o in _OWN if o.name.endswith(f"-{self.pid}")]:
            try:  # empty now: a folder left behind then always holds something of a dead run
                own.rmdir()
                _OWN.discard(own)
            except OSError:
                pass


_ACTIVE: _Group | None = None


@contextmanager
def _group() -> Iterator[_Group]:
    """The active group of this process, or a new one that commits when the block ends."""
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE.pid == os.getpid():
        yield _ACTIVE
        return
    group = _ACTIVE = _Group()
    try:
        yield group
        _ACTIVE = None
        group.commit()
    finally:
        _ACTIVE = None
        group.discard()


@contextmanager
def output_group() -> Iterator[None]:
    """Every atomic_path and atomic_dir inside the block (writes of aebench.files, drawing,
    data and models included) is renamed into place when the block ends, all together, with
    SIGINT, SIGTERM and SIGHUP deferred until the last is in place; after a failure or an
    interruption inside the block, none is. A stage wraps all of its outputs in one."""
    with _group():
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
    with _group() as group:
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
    with _group() as group:
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
