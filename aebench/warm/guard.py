"""What a warm server runs, and for whom: its own user's requests, for this project's stages,
in the folder it serves; anything else is refused (nothing runs, the connection is closed),
logged in the private folder's refused.log and told, once, on the stderr of the next stage it
runs."""

from __future__ import annotations

import contextlib
import os
import socket
import time

from . import is_stage
from .place import LOG, Unsafe, open_place, peer

PENDING_MAX = 10  # refusals kept for the next stage's stderr; the log has every one


def stranger(conn: socket.socket) -> str | None:
    """Why the peer may not use this server (another user), or None."""
    pid, uid, _ = peer(conn)
    if uid != os.getuid():
        return f"a connection from pid {pid}, uid {uid}: not this server's user ({os.getuid()})"
    return None


def bad_request(request: object, fds: list[int], folder: str) -> str | None:
    """Why a stage request from this user may not run here, or None."""
    if not isinstance(request, dict) or set(request) != {"module", "args", "cwd", "env"}:
        return f"a malformed request: {str(request)[:200]!r}"
    module, args, cwd, env = (request[k] for k in ("module", "args", "cwd", "env"))
    if cwd != folder:
        return f"{str(module)[:100]!r} in {str(cwd)[:200]!r}: not the folder this server serves"
    if not isinstance(module, str) or not is_stage(folder, module):
        return f"module {str(module)[:100]!r}: not one of this project's stages (stages/NAME.py)"
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)
            and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in env.items()) and len(fds) == 3):
        return f"{module}: malformed arguments, environment or streams"
    return None


class Refusals:
    """The refusals of one server: logged at once, told on the next stage's stderr."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.pending: list[str] = []

    def refuse(self, conn: socket.socket, fds: list[int], why: str) -> None:
        for fd in fds:
            os.close(fd)
        conn.close()
        where = "not logged: no private folder"
        with contextlib.suppress(OSError, Unsafe):
            place = open_place(self.folder)
            if place is not None:
                with place:
                    place.log(f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')} {self.folder}: "
                              f"refused {why}")
                    where = f"logged in {place.path}/{LOG}"
        if len(self.pending) < PENDING_MAX:
            self.pending.append(f"aebench.warm: the warm server refused {why}; nothing ran "
                                f"({where})\n")

    def tell(self, stderr: int) -> None:
        """Write the refusals not yet told to `stderr` (a stage's, before it starts)."""
        text, self.pending = "".join(self.pending), []
        with contextlib.suppress(OSError):
            os.write(stderr, text.encode())
