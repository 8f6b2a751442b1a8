"""Where a project folder's warm servers listen: socket files in a folder that only this user
can enter, and the log of the requests they refused.

The folder is `$XDG_RUNTIME_DIR/aebench-warm-UID/` where XDG_RUNTIME_DIR is set, belongs to this
user and is closed to everyone else (mode 0700, as a login manager makes it; `su` and `sudo`
keep another user's: then it is not used), else `.dvc/tmp/aebench-warm-UID/` in the project
folder; a folder with neither (no `.dvc/`) has no warm stages. It is created 0700 and checked
on every use, through the descriptor that is then used, so the folder checked is the one used:
one that another user owns or that its group or others can enter is refused (`Unsafe`, one
line; stages then run cold). Sockets are reached as /proc/self/fd/N/NAME, which keeps the
address short whatever the project's path.

A server's socket is FOLDER-KEY: FOLDER names the project folder (a hash of its path), KEY
what its imports and forks depend on (aebench.warm.fingerprint). Neither is a secret: the
folder's owner and mode, and each server's check of its peer's uid (guard.py), keep others
out. Binding and removing sockets take the folder's lock (FOLDER.lock), so that two servers
starting at once never remove each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import socket
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

LOG = "refused.log"
CRED = struct.Struct("3i")  # SO_PEERCRED: pid, uid, gid
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Unsafe(Exception):
    """This user's folder for sockets exists but is not private: why, in one line."""


class Place:
    """This user's private folder for one project folder's servers, open (a context manager:
    closing it closes the descriptor)."""

    def __init__(self, fd: int, path: str, project: str) -> None:
        self.fd, self.path = fd, path
        self.prefix = hashlib.sha256(project.encode()).hexdigest()[:16]

    def __enter__(self) -> Place:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def name(self, key: str) -> str:
        return f"{self.prefix}-{key}"

    def address(self, name: str) -> str:
        return f"/proc/self/fd/{self.fd}/{name}"

    def names(self) -> list[str]:
        """The sockets of this project folder's servers (live or left by a killed one)."""
        names = []
        for name in sorted(os.listdir(self.fd)):
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                if name.startswith(f"{self.prefix}-") and \
                        stat.S_ISSOCK(self.identity(name, full=True)[0]):
                    names.append(name)
        return names

    def identity(self, name: str, full: bool = False) -> tuple[int, ...]:
        st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return (st.st_mode, st.st_dev, st.st_ino) if full else (st.st_dev, st.st_ino)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(f"{self.prefix}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def log(self, line: str) -> None:
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=self.fd)
        with open(fd, "a") as f:
            f.write(line + "\n")


def open_place(project: str) -> Place | None:
    """This user's private folder for the servers of the project folder `project`; None where
    there is none (no usable XDG_RUNTIME_DIR and no `.dvc/` folder). Unsafe if this user's
    folder is there but not private."""
    base = runtime_dir() or dvc_tmp(project)
    if base is None:
        return None
    name = f"aebench-warm-{os.getuid()}"
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o700, dir_fd=base)
        fd = os.open(name, DIR_FLAGS, dir_fd=base)
    except OSError as e:
        raise Unsafe(f"cannot use {folder_path(base)}/{name}: {e.strerror}") from None
    finally:
        os.close(base)
    place = Place(fd, f"{folder_path(fd)}", project)
    try:
        check_private(fd, place.path)
    except Unsafe:
        os.close(fd)
        raise
    return place


def check_private(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        raise Unsafe(f"{path} belongs to uid {st.st_uid}, not to this user (uid {os.getuid()})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise Unsafe(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}, not 0700: other users "
                     "could reach its sockets")


def runtime_dir() -> int | None:
    """$XDG_RUNTIME_DIR, open, if it is this user's and private; else None."""
    path = os.environ.get("XDG_RUNTIME_DIR", "")
    if not os.path.isabs(path):
        return None
    try:
        fd = os.open(path, DIR_FLAGS)
    except OSError:
        return None
    try:
        check_private(fd, path)
        return fd
    except Unsafe:
        os.close(fd)
        return None


def dvc_tmp(project: str) -> int | None:
    """The project's .dvc/tmp (made if .dvc is there, as DVC itself would), open; else None."""
    dvc = Path(project, ".dvc")
    if not dvc.is_dir():
        return None
    try:
        with contextlib.suppress(FileExistsError):
            (dvc / "tmp").mkdir()
        return os.open(dvc / "tmp", DIR_FLAGS)
    except OSError:  # not ours to write (a shared checkout): no warm stages here
        return None


def folder_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def peer(sock: socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of the process at the other end, as they were when it connected."""
    return CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, CRED.size))


def connect(place: Place, name: str) -> socket.socket | None:
    """A connection to the server at `name`, if one listens there and is this user's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(place.address(name))
        if peer(sock)[1] == os.getuid():
            return sock
    except OSError:
        pass
    sock.close()
    return None


def bind(place: Place, name: str) -> tuple[socket.socket, tuple[int, ...]] | None:
    """Listen at `name` in `place` (where a killed server may have left its socket); None if
    a server listens there."""
    with place.locked():
        if (live := connect(place, name)) is not None:
            live.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=place.fd)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(place.address(name))
        # Listening before the imports: a command that comes meanwhile waits for them (they
        # are under way: sooner than its own) instead of running cold.
        listener.listen(64)
        return listener, place.identity(name)


def unbind(folder: str, name: str, identity: tuple[int, ...]) -> None:
    """Remove this server's socket, unless another server's has taken its name meanwhile."""
    with contextlib.suppress(OSError, Unsafe):
        place = open_place(folder)
        if place is None:
            return
        with place, place.locked():
            if place.identity(name) == identity:
                os.unlink(name, dir_fd=place.fd)


def still_bound(folder: str, name: str, identity: tuple[int, ...]) -> bool:
    try:
        place = open_place(folder)
        if place is None:
            return False
        with place:
            return place.identity(name) == identity
    except (OSError, Unsafe):  # the folder, or the socket, is gone
        return False
