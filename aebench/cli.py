"""The one entry point of every stage: arguments, one-line errors, signals, parent death.

    if __name__ == "__main__":  # main(args) gets args.csv_dir, args.curve_csv; raises on error
        cli.run(main, "python -m stages.pca CSV_DIR CURVE_CSV", __doc__)

Exits 0 done, 1 error (one line; AEBENCH_DEBUG=1 or --debug: the traceback), 2 usage, 128 + N
on signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) once `finally` and `with` cleanup has run."""

from __future__ import annotations

import argparse
import atexit
import ctypes
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox", "fish"}


def _name_and_parent(pid: int) -> tuple[str, int] | None:
    try:  # /proc/PID/stat is "pid (comm) state ppid ...", and comm may hold ")"
        with open(f"/proc/{pid}/stat") as f:
            comm, rest = f.read().split("(", 1)[1].rsplit(")", 1)
        return comm, int(rest.split()[1])
    except (OSError, IndexError, ValueError):  # gone, or no /proc (not Linux)
        return None


PARENT_WATCHED = False  # set by aebench.warm in a stage it forked: it watches its client instead
_PARENT = os.getppid()  # at import, as early as a stage can: a later death is seen as a change
_PARENT_PROC = _name_and_parent(_PARENT)


class Interrupted(KeyboardInterrupt):
    """Interrupted(signum): raised in the main thread by a signal, so that cleanup runs."""
    signum = property(lambda self: self.args[0])


def _on_signal(signum, frame):
    # One shutdown may bring more signals (a process-group kill, then the parent-death one):
    # they must not cut the cleanup short. A second Ctrl-C still can, and SIGKILL always does.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise Interrupted(signum)


STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what ends a stage, with its cleanup


@contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP that arrive inside the block act when it ends, as they would
    have on arrival (the stage's handler raises Interrupted then): for a few renames that must
    all happen or none. In the main thread only (Python runs handlers there); elsewhere a
    no-op. SIGKILL cannot be deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {}
    for signum in STOPS:
        handler = signal.getsignal(signum)
        if handler not in (signal.SIG_IGN, None):
            previous[signum] = signal.signal(signum, lambda n, _frame: held.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # the restored handler acts now


def debugging() -> bool:
    """Whether tracebacks are wanted: `--debug` (cli.run sets AEBENCH_DEBUG) or AEBENCH_DEBUG=1."""
    return os.environ.get("AEBENCH_DEBUG") == "1"


def watch_parent() -> None:
    """SIGTERM this process when the process that runs it goes away, at once or within ~1 s.

    DVC runs a stage as `$SHELL -c CMD` and does not forward SIGTERM. bash execs a single
    command, so DVC is our parent; dash does not, so our parent is a shell that outlives DVC:
    then the shell's own parent is watched too (the shell is re-parented when DVC dies)."""
    via_shell = _PARENT_PROC is not None and _PARENT_PROC[0] in SHELLS

    def orphaned() -> bool:
        return os.getppid() != _PARENT or (via_shell and _name_and_parent(_PARENT) != _PARENT_PROC)

    if sys.platform == "linux":  # the kernel signals us the moment our parent exits
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG, <linux/prctl.h>
    if orphaned():  # it died before prctl took effect
        raise Interrupted(signal.SIGTERM)

    def poll() -> None:
        while not orphaned():
            time.sleep(1.0)
        # to the main thread, so that a blocking call there (sleep, read) is interrupted
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=poll, name="aebench-watch-parent", daemon=True).start()


def parse(usage: str, argv: list[str], doc: str | None = None) -> argparse.Namespace:
    """Parse `argv` by `usage`: its UPPER-CASE words are the positionals, attributes in lower
    case (CSV_DIR -> args.csv_dir); `--debug` is added. A usage error exits 2 with the usage."""
    words = usage.split()
    first = next((i for i, w in enumerate(words) if w.isupper()), len(words))
    parser = argparse.ArgumentParser(prog=" ".join(words[:first]), description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in words[first:]:
        parser.add_argument(name.lower(), metavar=name)
    parser.add_argument("--debug", action="store_true", help="print an error's traceback")
    return parser.parse_args(argv)


def _verdict(err: BaseException, usage: str) -> tuple[str, int]:
    if isinstance(err, KeyboardInterrupt):
        stage = next((w for w in reversed(usage.split()) if not w.isupper()), "stage")
        signum = getattr(err, "signum", signal.SIGINT)
        return f"interrupted: {stage} ({signal.Signals(signum).name})", 128 + signum
    msg = "; ".join(s.strip() for s in str(err).splitlines() if s.strip())
    if isinstance(err, MemoryError):  # numpy names the size; Python's own says nothing
        return (f"error: out of memory{': ' + msg if msg else ''} (this process's limit: "
                "the machine's memory, ulimit -v or the cgroup's memory.max)"), 1
    # ours (ValueError, OSError, raised by our code) carry the whole story in the message
    if isinstance(err, (ValueError, OSError)) or type(err).__module__.split(".")[0] in (
            "aebench", "stages"):
        return f"error: {msg or type(err).__name__}", 1
    return f"error: {type(err).__name__}: {msg} (AEBENCH_DEBUG=1 for the traceback)", 1


def quick_exit() -> None:
    """Make the interpreter's shutdown take milliseconds instead of seconds.

    At exit Python collects the reference cycles of every module still loaded: with torch (and
    torch._dynamo, which the optimizers import) and MLflow that took 1.5-2 s of every stage on a
    2-core machine. Registered first among the stage's exit handlers, `gc.freeze` runs after all
    the others (MLflow's flushes, logging's): the final collection then skips the objects still
    alive. Everything a stage writes is closed by then (`with`, atomic renames, runs ended), and
    Python does not promise to finalize objects alive at exit anyway. Threads are still joined,
    exit handlers run and stdout and stderr flushed."""
    atexit.unregister(gc.freeze)  # once, however often run() is called in one process
    atexit.register(gc.freeze)


def run(main, usage: str, doc: str | None = None, argv: list[str] | None = None):
    """Parse the arguments by `usage`, call `main(args)` and exit; never returns."""
    args = parse(usage, sys.argv[1:] if argv is None else argv, doc)
    quick_exit()
    if args.debug:  # one switch for the code that decides what a library may print
        os.environ["AEBENCH_DEBUG"] = "1"
    for signum in STOPS:
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's choice is respected
            signal.signal(signum, _on_signal)
    try:
        if "DVC_STAGE" in os.environ and not PARENT_WATCHED:  # DVC sets it for every stage
            watch_parent()
        code = main(args)
    except (KeyboardInterrupt, Exception) as err:
        line, code = _verdict(err, usage)
        try:
            if debugging():
                traceback.print_exc()
            print(line, file=sys.stderr, flush=True)
        except OSError:  # stderr may be a closed pipe or a hung-up terminal by now
            pass
    sys.exit(code or 0)
