"""The server's side: import once, then fork a fresh process for each stage."""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import runpy
import select
import selectors
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from .. import cli
from . import CHECK_S, STATUS, code_folders, code_version, fingerprint, idle_seconds, stage_folder
from .client import exit_as, stop_all
from .guard import Refusals, bad_request, stranger
from .inherited import inherited
from .place import Place, Unsafe, bind, connect, open_place, still_bound, unbind


def preload() -> None:
    """Import what the stages import, then forget the stage modules (runpy runs them anew)."""
    folder = stage_folder()
    for path in sorted(folder.glob("[!_]*.py")) if folder else []:
        with contextlib.suppress(Exception):  # a stage that cannot import says so when run
            importlib.import_module(f"stages.{path.stem}")
    for name in [m for m in sys.modules if m.startswith("stages.")]:
        del sys.modules[name]
    # What the stages look up on first use, where their imports show they will: torch's
    # compiler, which the first optimizer of a process imports (stages that train); MLflow and
    # its sqlite store, which aebench.tracking imports inside its functions, and the installed
    # packages, which MLflow scans to check a logged model's requirements (0.25 s), here by
    # saving a throwaway model outside the project (stages that record runs). A project whose
    # stages do neither (a test's toy project) skips the ~5 s of CPU these take. Missing, the
    # stages fail as they would.
    if "aebench.training" in sys.modules:
        import torch

        torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    if "aebench.tracking" in sys.modules:
        with contextlib.suppress(ImportError):
            import mlflow.data
            import mlflow.pyfunc
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401

        # only a warm-up: whatever goes wrong here, the stage meets (and reports) itself
        with contextlib.suppress(Exception):
            from ..tracking.models import warm_up

            warm_up()  # saves a throwaway model as the train stage logs one


def serve(key: str, cold: int | None = None) -> tuple[socket.socket, dict, list[int]] | None:
    """Serve stages until idle; returns None in the server, the request in a forked child.
    `cold`: the pid of the stage that started this server and runs cold meanwhile (for
    minutes, maybe): the server stays up until it has ended, for the stage after it."""
    idle = idle_seconds()
    folder = os.getcwd()
    folders = code_folders()
    version = code_version(folders)  # what it imports now; the key says what its clients have
    if fingerprint(folder, version) != key:  # edited since the client looked: serve no one
        return None
    if stage_folder() != Path(folder, "stages"):  # not a project's root: nothing to serve
        return None
    try:
        place = open_place(folder)
    except Unsafe:
        return None
    if place is None:
        return None
    with place:
        name = place.name(key)
        bound = bind(place, name)
        if bound is None:  # another server has it: that one waits for this stage then
            if cold:
                tell(place, name, cold)
            return None
    listener, identity = bound
    try:
        return loop(listener, name, identity, folder, folders, version, idle, cold)
    finally:
        if listener.fileno() >= 0:  # the server's end (the forked child has closed it)
            unbind(folder, name, identity)
            listener.close()


def loop(listener: socket.socket, name: str, identity: tuple[int, ...], folder: str,
         folders: list, version: str, idle: float, cold: int | None
         ) -> tuple[socket.socket, dict, list[int]] | None:
    before, env = inherited(), dict(os.environ)
    preload()
    # What the imports set in the environment (aebench.kinds: ONEDNN_MAX_CPU_ISA=AVX2 unless
    # set), as they would in a cold stage: a forked stage takes its command's environment, and
    # has these imports done already.
    imported = {k: v for k, v in os.environ.items() if env.get(k) != v}
    if inherited() != before:  # the imports changed a limit its forks would inherit: they
        return None  # would not run under their commands' limits, so serve none
    with contextlib.suppress(OSError, Unsafe):  # ready: at most one server per folder, the
        if (place := open_place(folder)) is not None:  # others end once their stages have
            with place:
                stop_all(place, keep=name)
    os.chdir("/")  # hold no folder; each stage changes to its own
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    refusals = Refusals(folder)
    # the stages under way, by pidfd: (pid, connection) of a stage forked here, whose command
    # waits for its exit status; (pid, None) of a stage that runs cold
    stages: dict[int, tuple[int, socket.socket | None]] = {}

    def watch(pid: int, conn: socket.socket | None = None) -> None:
        with contextlib.suppress(OSError):  # a cold stage may have ended already
            pidfd = os.pidfd_open(pid)
            stages[pidfd] = pid, conn
            sel.register(pidfd, selectors.EVENT_READ)

    def stale() -> bool:  # its code changed, its folder or its socket is gone
        try:
            return code_version(folders) != version or not still_bound(folder, name, identity)
        except OSError:
            return True

    def stop_listening() -> None:  # the next command starts a new server
        sel.unregister(listener)
        unbind(folder, name, identity)
        listener.close()

    if cold:
        watch(cold)
    last = time.monotonic()  # when the last stage ended
    while stages or listener.fileno() >= 0:
        wait = None if stages else min(CHECK_S, max(0.0, last + idle - time.monotonic()))
        events = sel.select(wait)
        if not events and not stages and (time.monotonic() >= last + idle or stale()):
            break
        for event, _ in events:
            if event.fileobj is not listener:  # a stage ended
                pid, conn = stages.pop(event.fd)
                sel.unregister(event.fd)
                os.close(event.fd)
                last = time.monotonic()
                if conn is not None:  # ours: tell its command how it ended
                    _, status = os.waitpid(pid, 0)
                    with contextlib.suppress(OSError), conn:
                        conn.send(STATUS.pack(os.waitstatus_to_exitcode(status)))
                continue
            conn, _ = listener.accept()
            if why := stranger(conn):  # another user: read nothing of it
                refusals.refuse(conn, [], why)
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
            except OSError:
                conn.close()
                continue
            if not msg:  # connected and closed, asking nothing: a check that a server listens
                for fd in fds:
                    os.close(fd)
                conn.close()
                continue
            try:
                request = json.loads(msg)
            except ValueError:
                request = msg[:200]
            control = isinstance(request, dict) and {"cold", "stop", "ping"} & set(request)
            if not control and (why := bad_request(request, fds, folder)):
                refusals.refuse(conn, fds, why)
                continue
            if control:
                for fd in fds:
                    os.close(fd)
                if type(request.get("cold")) is int and request["cold"] > 0:
                    watch(request["cold"])
                elif "stop" in request and listener.fileno() >= 0:  # end once the stages
                    stop_listening()  # under way have
                elif "ping" in request:  # --start: the imports are done
                    with contextlib.suppress(OSError):
                        conn.send(STATUS.pack(0))
                conn.close()
                continue
            refusals.tell(fds[2])
            pid = os.fork()
            if pid == 0:  # the stage's process: keep only its own connection and fds
                sel.close()
                listener.close()
                for pidfd, (_, other) in stages.items():
                    os.close(pidfd)
                    if other is not None:
                        other.close()
                return conn, {**request, "env": {**request["env"], **imported}}, fds
            for fd in fds:
                os.close(fd)
            watch(pid, conn)
            with contextlib.suppress(OSError):  # if its command is gone, the stage sees it
                conn.send(STATUS.pack(pid))
    return None


def tell(place: Place, name: str, cold: int) -> None:
    """Ask the server at `name` to stay up until the cold stage `cold` ends; while it binds,
    try again until it listens (or the stage has ended)."""
    try:
        pidfd = os.pidfd_open(cold)
    except ProcessLookupError:
        return
    try:
        while (sock := connect(place, name)) is None:
            if select.select([pidfd], [], [], 0.1)[0]:
                return
        with sock:
            sock.send(json.dumps({"cold": cold}).encode())
    finally:
        os.close(pidfd)


def become(conn: socket.socket, request: dict, fds: list[int]) -> socket.socket:
    """Turn the forked child into the process the client would have started; its connection
    to the client."""
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
    cli.PARENT_WATCHED = True  # the thread above takes the place of cli.watch_parent
    return conn


def run_forked(module: str, conn: socket.socket) -> None:
    """Run the stage as the interpreter runs a main module, but end the process once the exit
    handlers have run, telling the command its exit code (the server tells it only of a death
    by signal, and if the server itself died meanwhile, the code still arrives). Tearing down
    an interpreter that holds every stage's modules (torch, MLflow, matplotlib) took 0.6 s even
    with `gc.freeze`, and only frees memory: threads are joined and exit handlers run (MLflow's,
    logging's) as in any exit, the streams flushed; the stages close every file they write
    before they return (`with`, atomic renames)."""
    code = 0

    def end() -> None:
        for signum in cli.STOPS:  # too late to act on (the client ends when told the code)
            signal.signal(signum, signal.SIG_IGN)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        with contextlib.suppress(OSError):
            conn.send(STATUS.pack(code))
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
