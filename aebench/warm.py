"""Warm stage processes: `python -m aebench.warm stages.X ARGS` runs `python -m stages.X ARGS`
in a process forked from a parent that has already imported what the stages import.

Every stage is its own process, and at smoke size most of a stage was its start: torch, MLflow
with its SQLAlchemy store and matplotlib take 4-5 s to import on a 2-core machine, and the first
optimizer of a process imports torch's compiler (1.7 s). The first stage of a `dvc repro` starts
a server that imports all of it once; every stage, that one included, is then a `fork` of it:
a fresh process with the modules loaded and nothing else (the server never runs a stage, opens
a store or touches a GPU), so no stage sees another's state, as with a cold start.

The stage's process is the server's child, so this command stays in its place: it hands the
stage its stdin, stdout and stderr (a terminal stays a terminal), forwards SIGINT, SIGTERM and
SIGHUP to it, and exits with its status. If this command dies, the stage gets SIGTERM.

The server is one per project folder, interpreter, environment and version of the code (a
hash of every .py file's size and time under aebench/ and stages/): an edit starts a new one.
It exits 10 s after its last stage ended. AEBENCH_WARM=0, or an OS without Linux's abstract
sockets and pidfds, runs the stage in this process instead, as `python -m stages.X` would.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import runpy
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

IDLE_S = 10.0  # longer than DVC's pause between two stages
STATUS = struct.Struct("q")  # the stage's pid, then its exit code (-N: killed by signal N)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
VOLATILE = ("_", "PWD", "OLDPWD", "SHLVL")  # what a shell changes between commands


def available() -> bool:
    return (sys.platform == "linux" and hasattr(os, "pidfd_open")
            and os.environ.get("AEBENCH_WARM", "1") != "0")


def fingerprint(cwd: str) -> str:
    """What the server's imports depend on, so one that no longer matches is never used."""
    h = hashlib.sha256(f"{sys.executable}\0{cwd}\0".encode())
    env = sorted((k, v) for k, v in os.environ.items()
                 if k not in VOLATILE and not k.startswith("DVC_"))
    h.update(json.dumps(env).encode())
    roots = [Path(__file__).parent, Path(cwd, "stages"), Path(sysconfig.get_paths()["purelib"])]
    for root in roots:
        files = sorted(root.rglob("*.py")) if root.name != "site-packages" else [root]
        for path in files:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:32]


def address(key: str) -> bytes:
    return b"\0aebench-warm-" + key.encode()  # Linux's abstract namespace: no file to clean


# The client: this command.

def connect(key: str) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(address(key))
        return sock
    except OSError:
        sock.close()
        return None


def start_server(key: str, cwd: str) -> subprocess.Popen:
    """Start a server in the background, in its own session (it outlives this process)."""
    return subprocess.Popen([sys.executable, "-m", "aebench.warm", "--serve", key], cwd=cwd,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def start(cwd: str, timeout: float = 120.0) -> bool:
    """Start this folder's server unless one runs, and wait until it serves (for benchmarks and
    tests); whether it does."""
    key = fingerprint(cwd)
    deadline = time.monotonic() + timeout
    server = None
    while (sock := connect(key)) is None:
        server = server or start_server(key, cwd)
        if server.poll() or time.monotonic() > deadline:  # it failed, or is too slow
            return False
        time.sleep(0.05)  # exit 0: another server is importing; wait for that one
    sock.close()
    return True


def run_warm(module: str, args: list[str]) -> int | None:
    """Run the stage in a fork of the server; its exit code, or None if no server took it."""
    cwd = os.getcwd()
    key = fingerprint(cwd)
    sock = connect(key)
    if sock is None:  # none, or still importing: this stage runs cold, alongside its imports
        start_server(key, cwd)
        return None
    with sock:
        request = {"module": module, "args": args, "cwd": cwd, "env": dict(os.environ)}
        try:
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            reply = sock.recv(STATUS.size)
        except OSError:
            reply = b""
        if not reply:
            return None  # it died or exited before forking: nothing ran
        (pid,) = STATUS.unpack(reply)
        for signum in FORWARDED:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, lambda n, _frame: os.kill(pid, n))
        reply = sock.recv(STATUS.size)
    if not reply:
        print(f"error: the warm stage server died while {module} ran (AEBENCH_WARM=0 runs "
              "stages without it)", file=sys.stderr)
        return 1
    return STATUS.unpack(reply)[0]


def exit_as(code: int, *, now: bool = False) -> None:
    """Exit with `code` (-N: by signal N, so that the caller sees the same); `now`: at once."""
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        code = 128 - code
    if now:
        os._exit(code)
    sys.exit(code)


# The server.

def preload(cwd: str) -> None:
    """Import what the stages import, then forget the stage modules (runpy runs them anew)."""
    import importlib

    for path in sorted(Path(cwd, "stages").glob("*.py")):
        if path.stem != "__init__":
            try:
                importlib.import_module(f"stages.{path.stem}")
            except Exception:  # noqa: BLE001 the stage will say it when it runs
                pass
    for name in [m for m in sys.modules if m.startswith("stages.")]:
        del sys.modules[name]
    # What the stages import on first use: MLflow and its sqlite store; torch's compiler,
    # which the first optimizer of a process imports
    import mlflow.data
    import mlflow.pytorch
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import torch

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def serve(key: str) -> tuple[socket.socket, dict, list[int]] | None:
    """Serve stages until idle; returns None in the server, the request in a forked child."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        listener.bind(address(key))
    except OSError:
        return None  # another server has it
    preload(os.getcwd())
    listener.listen(16)  # until now a client found no server and ran its stage itself
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> pid, connection
    while True:
        events = sel.select(None if running else IDLE_S)
        if not events and not running:
            return None
        for event, _ in events:
            if event.fileobj is listener:
                conn, _ = listener.accept()
                try:
                    msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
                    request = json.loads(msg)
                except (OSError, ValueError):
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    for _, other in running.values():
                        other.close()
                    for pidfd in running:
                        os.close(pidfd)
                    return conn, request, fds
                for fd in fds:
                    os.close(fd)
                pidfd = os.pidfd_open(pid)
                running[pidfd] = pid, conn
                sel.register(pidfd, selectors.EVENT_READ)
                try:
                    conn.send(STATUS.pack(pid))
                except OSError:  # the client is gone: the child sees it too and stops
                    pass
            else:
                pidfd = event.fd
                pid, conn = running.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                try:
                    conn.send(STATUS.pack(os.waitstatus_to_exitcode(status)))
                except OSError:
                    pass
                conn.close()


def become(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """Turn the forked child into the process the client would have started."""
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    sys.argv = [request["module"], *request["args"]]
    main = threading.main_thread().ident

    def watch() -> None:  # the client died (SIGKILL): stop, as a stage whose DVC died does
        try:
            conn.recv(1)
        except OSError:
            pass
        signal.pthread_kill(main, signal.SIGTERM)

    threading.Thread(target=watch, name="aebench-warm-client", daemon=True).start()
    from . import cli

    cli.PARENT_WATCHED = True  # the thread above takes the place of cli.watch_parent


def run_forked(module: str) -> None:
    """Run the stage as the interpreter runs a main module, but end the process once the exit
    handlers have run. Tearing down an interpreter that holds every stage's modules (torch,
    MLflow, matplotlib) took 0.6 s even with `gc.freeze`, and only frees memory: threads are
    joined and exit handlers run (MLflow's, logging's) as in any exit, the streams flushed; the
    stages close every file they write before they return (`with`, atomic renames)."""
    code = 0

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        exit_as(code, now=True)

    atexit.register(end)  # first, so it runs last
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as done:  # the interpreter prints a message given as the code
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
        raise
    except KeyboardInterrupt:  # the interpreter dies by SIGINT after its traceback
        code = -signal.SIGINT
        raise
    except BaseException:  # the interpreter prints the traceback
        code = 1
        raise


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        if (served := serve(argv[1])) is not None:  # in the forked child only
            become(*served)
            run_forked(sys.argv[0])
        return
    if argv == ["--start"]:
        sys.exit(0 if available() and start(os.getcwd()) else "aebench.warm: no server started")
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m aebench.warm MODULE [ARGS...] | --start")
    module, args = argv[0], argv[1:]
    if available() and (code := run_warm(module, args)) is not None:
        exit_as(code)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
