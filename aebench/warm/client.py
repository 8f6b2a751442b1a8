"""The command's side: hand the stage to the server and stand in for it until it ends."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

from .. import cli
from . import STATUS, fingerprint
from .place import Place, Unsafe, connect, open_place


def place_here(cwd: str, module: str = "stages") -> Place | None:
    """This folder's private place for servers; None, after one line on stderr if it is not
    private, where there is none: `module` then runs cold."""
    try:
        return open_place(cwd)
    except Unsafe as e:
        print(f"aebench.warm: not using {e}; {module} runs cold", file=sys.stderr)
        return None


def start_server(key: str, cwd: str, cold: int | None = None) -> subprocess.Popen:
    """Start a server in the background, in its own session (it outlives this process); it
    stays up at least until the stage `cold` (this process, running cold) has ended."""
    cold_arg = [str(cold)] if cold else []
    return subprocess.Popen([sys.executable, "-m", "aebench.warm", "--serve", key, *cold_arg],
                            cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def start(cwd: str, timeout: float = 120.0) -> bool:
    """Start this folder's server unless one runs, and wait until it has imported everything
    (for `make smoke`, benchmarks and tests); whether it serves."""
    place = place_here(cwd)
    if place is None:
        return False
    with place:
        key = fingerprint(cwd)
        deadline = time.monotonic() + timeout
        server = None
        while (sock := connect(place, place.name(key))) is None:
            server = server or start_server(key, cwd)
            if server.poll() is not None:  # exit 0: another server has the address, or the
                deadline = min(deadline, time.monotonic() + 1.0)  # code changed: none then
            if server.poll() or time.monotonic() > deadline:  # it failed, or is too slow
                return False
            time.sleep(0.05)
    with sock:
        sock.settimeout(max(0.0, deadline - time.monotonic()))
        try:
            sock.send(json.dumps({"ping": True}).encode())
            return len(sock.recv(STATUS.size)) == STATUS.size  # once it has imported
        except OSError:  # it died importing, or is too slow
            return False


def stop(cwd: str) -> int:
    """Ask every server of this folder (whatever environment or limits it serves) to exit once
    the stages under way have ended; how many there were."""
    place = place_here(cwd)
    if place is None:
        return 0
    with place:
        return stop_all(place)


def stop_all(place: Place, keep: str | None = None) -> int:
    """Tell every server of `place`'s folder but `keep` to exit once its stages have ended, and
    remove the sockets of killed ones; how many were told."""
    told = 0
    for name in place.names():
        if name == keep:
            continue
        if (sock := connect(place, name)) is not None:
            with sock, contextlib.suppress(OSError):  # OSError: it died meanwhile
                sock.send(json.dumps({"stop": True}).encode())
                told += 1
            continue
        with place.locked(), contextlib.suppress(OSError):  # none listens: a killed server's
            if (again := connect(place, name)) is None:
                os.unlink(name, dir_fd=place.fd)
            else:
                again.close()
    return told


def run_warm(module: str, args: list[str]) -> int | None:
    """Run the stage in a fork of the server; its exit code, or None if no server took it."""
    cwd = os.getcwd()
    place = place_here(cwd, module)
    if place is None:
        return None
    with place:
        try:
            key = fingerprint(cwd)
        except OSError:  # a file of the code went away while hashed: an edit under way
            return None
        sock = connect(place, place.name(key))
    if sock is None:  # none: this stage runs cold, and a server imports alongside it
        start_server(key, cwd, cold=os.getpid())
        return None
    with sock:
        request = {"module": module, "args": args, "cwd": cwd, "env": dict(os.environ)}
        # Held until the stage's pid is known, then forwarded to it
        signal.pthread_sigmask(signal.SIG_BLOCK, cli.STOPS)
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            reply = sock.recv(STATUS.size)
        except OSError:
            reply = b""
        if not reply:  # it died or exited before forking: nothing ran
            signal.pthread_sigmask(signal.SIG_UNBLOCK, cli.STOPS)
            return None
        (pid,) = STATUS.unpack(reply)
        for signum in cli.STOPS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, lambda n, _frame: os.kill(pid, n))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, cli.STOPS)
        if "DVC_STAGE" in os.environ:  # DVC gone: SIGTERM to us, forwarded, as in a cold stage
            try:
                cli.watch_parent()
            except cli.Interrupted:  # it died before we could watch it
                os.kill(pid, signal.SIGTERM)
        reply = sock.recv(STATUS.size)  # from the stage as it exits, or the server (a signal)
    if not reply:  # neither could say: the stage was killed while its server was gone
        print(f"error: {module} (pid {pid}) ended, and its warm server is gone: its exit code "
              "is lost (AEBENCH_WARM=0 runs stages without a server)", file=sys.stderr)
        return 1
    return STATUS.unpack(reply)[0]


def exit_as(code: int, *, now: bool = False) -> None:
    """Exit with `code` (-N: by signal N, so that the caller sees the same); `now`: at once."""
    if code < 0:
        if -code != signal.SIGKILL:  # whose action cannot be changed
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    if now:
        os._exit(code)
    sys.exit(code)
