"""The driver's waiting: a line as each configuration ends (with its clone, run and push
times), and a progress line (done, running, failed, waiting, time left at the pace so far) at
least every PROGRESS_S seconds. "running" counts the cluster's slots for the tasks still out.
"""

from __future__ import annotations

import sys
import time

from . import spec as specs
from .worker import Result

PROGRESS_S = 30.0      # a progress line at least this often


def duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


class Progress:
    """done, running, failed, waiting, and the time left: the mean task so far, once per round
    of the cluster's slots still to go."""

    def __init__(self, name: str, total: int, slots: int):
        self.name, self.total, self.slots = name, total, max(1, slots)
        self.done = self.failed = 0
        self.seconds: list[float] = []  # each finished task's own time

    def line(self, pending: int) -> str:
        running = min(pending, self.slots)
        left = "time left unknown"
        if self.seconds:
            task = sum(self.seconds) / len(self.seconds)
            left = f"about {duration(task * -(-pending // self.slots))} left"
        return (f"sweep {self.name}: {self.done} done, {running} running, {self.failed} failed, "
                f"{pending - running} waiting; {left}")


def collect(refs: dict, progress: Progress) -> list[Result]:
    """Wait for every task; a task lost for good (its node died NODE_RETRIES times) is a failed
    Result too."""
    import ray

    results, pending = [], list(refs)
    last = time.monotonic()
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=PROGRESS_S)
        for ref in ready:
            job = refs[ref]
            try:
                result = ray.get(ref)
            except Exception as err:  # noqa: BLE001 - Ray's errors for a lost task, many types
                text = " ".join(str(err).split())
                result = Result(job.name, ok=False, message=f"{type(err).__name__}: "
                                f"{text[:300]}")
            results.append(result)
            progress.done += result.ok
            progress.failed += not result.ok
            took = sum(result.seconds.values())
            if took and result.ok:
                progress.seconds.append(took)
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
            print(f"  {'done' if result.ok else 'FAILED'} {job.name} "
                  f"({specs.Configuration(job.name, job.overrides).label()}) on {result.host}"
                  + (f" in {duration(took)} ({parts})" if took else "")
                  + (f": {result.message}" if result.message else ""), file=sys.stderr,
                  flush=True)
        if ready or time.monotonic() - last >= PROGRESS_S:
            print(progress.line(len(pending)), file=sys.stderr, flush=True)
            last = time.monotonic()
    return results
