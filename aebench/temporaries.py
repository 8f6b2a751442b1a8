"""Where the temporaries of outputs live, the group that renames them into place, and the
cleanup of what a dead process left (aebench.files is the API: atomic_path, atomic_dir,
output_group).

The temporaries live in `.dvc/tmp/aebench/<host>-<pid>/` of the DVC repository the output
belongs to (the nearest folder above it holding `.dvc/`, on the same file system, so that the
rename is atomic): DVC and git ignore that folder and no stage depends on it, so a run killed
outright (SIGKILL) leaves nothing inside a folder that another stage hashes, and the next
writer removes what a dead process left there. Outside a DVC repository (or with `.dvc/` on
another file system) they sit beside the output as `.NAME.XXXXXXXX.tmp`, where no stage hashes
anything.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import cli

TEMP_FOLDER = ("tmp", "aebench")  # under a repository's .dvc/
_OWN: set[Path] = set()  # this process's folders under TEMP_FOLDER (named with its pid)


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


class Group:
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


_ACTIVE: Group | None = None


@contextmanager
def joined() -> Iterator[Group]:
    """The active group of this process, or a new one that commits when the block ends."""
    global _ACTIVE
    if _ACTIVE is not None and _ACTIVE.pid == os.getpid():
        yield _ACTIVE
        return
    group = _ACTIVE = Group()
    try:
        yield group
        _ACTIVE = None
        group.commit()
    finally:
        _ACTIVE = None
        group.discard()
