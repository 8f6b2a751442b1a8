"""The one entry point of every stage: arguments, one-line errors, interruptions, parent death.

    USAGE = "python -m stages.report MODELS_JSON PCA_JSON FIGURES_DIR REPORT_MD"
    def main(args): ...        # args.models_json, ... (str); raises on error
    if __name__ == "__main__":
        cli.run(main, USAGE, __doc__)

Exit codes: 0 done, 1 error (one line; AEBENCH_DEBUG=1 or --debug for the traceback), 2 usage,
128 + N on signal N (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) after `finally`/`with` cleanup ran.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import threading
import time
import traceback

SHELLS = {"sh", "dash", "bash", "zsh", "ksh", "mksh", "ash", "busybox", "fish"}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ppid_of(pid: int) -> int | None:
    """The parent of `pid` from /proc (Linux); None when it is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:  # "pid (comm) state ppid ..."; comm may hold ")"
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


# Taken at import, as early as a stage can: a parent that dies before run() is seen as a change.
_PARENT = os.getppid()
_GRANDPARENT = _ppid_of(_PARENT)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread by a signal, so that `with` blocks and `finally` clauses run."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum, frame):
    # One shutdown often brings several signals (a process-group kill, then the parent-death
    # signal): ignore the next SIGTERM/SIGHUP so they cannot cut the cleanup short. A second
    # Ctrl-C still can (KeyboardInterrupt), and SIGKILL always does.
    for other in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(other, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise Interrupted(signum)


def watch_parent() -> None:
    """Stop this process (SIGTERM to itself) when the process that runs it goes away.

    DVC runs a stage as `$SHELL -c CMD` and does not forward SIGTERM. bash execs a single
    command, so DVC is our parent; dash does not, so our parent is the shell, which outlives
    DVC: then the shell's own parent is watched too (it changes when DVC dies)."""
    try:
        with open(f"/proc/{_PARENT}/comm") as f:
            via_shell = f.read().strip() in SHELLS
    except OSError:
        via_shell = False

    def orphaned() -> bool:
        return os.getppid() != _PARENT or (via_shell and _ppid_of(_PARENT) != _GRANDPARENT)

    if sys.platform == "linux":  # the kernel signals us the moment our parent exits
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if orphaned():  # it died before prctl took effect
        raise Interrupted(signal.SIGTERM)

    def poll() -> None:
        while not orphaned():
            time.sleep(1.0)
        # to the main thread, so that a blocking call there (sleep, read) is interrupted
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    threading.Thread(target=poll, name="aebench-watch-parent", daemon=True).start()


def _split(usage: str) -> tuple[list[str], list[str]]:
    """("python -m stages.x A B") -> (["python", "-m", "stages.x"], ["A", "B"])"""
    words = usage.split()
    first = next((i for i, w in enumerate(words) if w.isupper()), len(words))
    return words[:first], words[first:]


def parse(usage: str, argv: list[str], doc: str | None = None) -> argparse.Namespace:
    """Parse `argv` by `usage`: its UPPER-CASE words are the positionals, attributes in lower
    case (CSV_DIR -> args.csv_dir); `--debug` is added. A usage error exits 2 with the usage."""
    prog, names = _split(usage)
    parser = argparse.ArgumentParser(prog=" ".join(prog), description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in names:
        parser.add_argument(name.lower(), metavar=name)
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the full traceback (as AEBENCH_DEBUG=1 does)")
    return parser.parse_args(argv)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr may be a closed pipe or a hung-up terminal by now
        pass


def _is_ours(err: Exception) -> bool:
    """An error whose message is the whole story: ValueError, OSError, or raised by our code."""
    return (isinstance(err, (ValueError, OSError))
            or type(err).__module__.split(".")[0] in ("aebench", "stages"))


def run(main, usage: str, doc: str | None = None, argv: list[str] | None = None):
    """Parse the arguments by `usage`, call `main(args)` and exit; never returns."""
    args = parse(usage, sys.argv[1:] if argv is None else argv, doc)
    debug = args.debug or os.environ.get("AEBENCH_DEBUG") == "1"
    stage = (_split(usage)[0] or ["stage"])[-1]  # "stages.train"
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup's choice is respected
            signal.signal(signum, _on_signal)
    try:
        if "DVC_STAGE" in os.environ:  # set by DVC for every stage command it runs
            watch_parent()
        code = main(args)
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        if debug:
            traceback.print_exc()
        _say(f"interrupted: {stage} ({signal.Signals(signum).name})")
        sys.exit(128 + signum)
    except Exception as err:
        if debug:
            traceback.print_exc()
            sys.exit(1)
        msg = "; ".join(s.strip() for s in str(err).splitlines() if s.strip())
        if _is_ours(err):
            _say(f"error: {msg or type(err).__name__}")
        else:
            _say(f"error: {type(err).__name__}: {msg} (AEBENCH_DEBUG=1 for the traceback)")
        sys.exit(1)
    sys.exit(code or 0)
