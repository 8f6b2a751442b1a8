"""Independent pieces of one stage's work side by side, one per core, in processes forked from
the stage: each sees the stage's inputs as they are in memory (nothing is pickled or loaded
again), takes the next piece until none is left, and sends back its results, pickled.

A worker's error reaches the stage as the worker raised it (the first by piece order; its
traceback with AEBENCH_DEBUG=1), and the others take no further piece. An interrupted or failed
stage stops its workers (SIGTERM: they clean up as a stage does) before its own cleanup; a
worker whose stage died outright stops before its next piece. Where there is no fork (not
POSIX) or one core, the pieces run in the stage itself, in order.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class WorkerTraceback(Exception):
    """Where a worker's error came from (shown as the cause of the error it raised)."""


def cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def each(fn: Callable[[T], object], pieces: Iterable[T], *, workers: int,
         start: Callable[[], object] = lambda: None) -> list:
    """[fn(piece) for piece in pieces], in up to `workers` forked processes, each of which
    first calls `start()` (e.g. to use one thread); the results come back pickled."""
    pieces = list(pieces)
    workers = min(workers, len(pieces))
    if workers <= 1 or not hasattr(os, "fork"):
        return [fn(piece) for piece in pieces]
    ctx = multiprocessing.get_context("fork")
    taken = ctx.Value("i", 0)  # the next piece to take, shared by the workers
    stage = os.getpid()
    running: dict[int, int | None] = {}  # pid -> the read end of its pipe, until closed
    try:
        for _ in range(workers):
            read, write = os.pipe()
            pid = os.fork()
            if pid == 0:  # the worker: never returns
                os.close(read)
                _work(fn, pieces, taken, stage, start, write)
            os.close(write)
            running[pid] = read
        results, failures = {}, []
        for pid, read in list(running.items()):
            try:
                report = b"".join(iter(lambda read=read: os.read(read, 1 << 16), b""))
            finally:
                os.close(read)
                running[pid] = None
            os.waitpid(pid, 0)
            del running[pid]
            done, failure = pickle.loads(report) if report else ({}, None)
            results.update(done)
            failures += [failure] if failure else []
        if failures:
            index, err, text = min(failures, key=lambda f: f[0])
            raise err from WorkerTraceback(text)
        if len(results) != len(pieces):  # a worker died outright (the OOM killer)
            raise RuntimeError(f"{len(pieces) - len(results)} of {len(pieces)} pieces of work "
                               "were lost: a worker process died without a word")
        return [results[i] for i in range(len(pieces))]
    finally:  # an interrupt, or an error here: the workers stop, with their cleanup
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid, read in running.items():
            if read is not None:
                os.close(read)
            with contextlib.suppress(ChildProcessError):  # reaped already
                _reap(pid)


def _reap(pid: int, seconds: float = 10.0) -> None:
    """Wait for a worker told to stop; SIGKILL it if it has not within `seconds`."""
    deadline = time.monotonic() + seconds
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.01)


def _work(fn, pieces, taken, stage: int, start, report: int) -> None:
    """A worker's life, which never returns into the stage's code: pieces until none is left,
    then exit 0 with their results; or exit 1 with those and its error (the piece's index, the
    error, its traceback), pickled to `report`. It keeps the stage's signal handlers
    (aebench.cli): SIGTERM from the stage, or Ctrl-C, ends it through its cleanup."""
    code, index, done, failure = 1, -1, {}, None
    try:
        start()
        while os.getppid() == stage:
            with taken.get_lock():
                index = taken.value
                taken.value += 1
            if index >= len(pieces):
                break
            done[index] = fn(pieces[index])
        code = 0
    except BaseException as err:  # noqa: BLE001 - every error goes to the stage
        with contextlib.suppress(BaseException):
            with taken.get_lock():  # the other workers take no further piece
                taken.value = len(pieces)
            failure = (index, err, traceback.format_exc())
            try:
                pickle.dumps(err)
            except Exception:  # noqa: BLE001 - an error that cannot be pickled: its text then
                failure = (index, RuntimeError(f"{type(err).__name__}: {err}"), failure[2])
    finally:
        with contextlib.suppress(BaseException):  # the stage may be gone, or not listening
            with os.fdopen(report, "wb") as pipe:
                pipe.write(pickle.dumps((done, failure)))
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)  # not the stage's exit handlers: they are the stage's
