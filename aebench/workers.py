"""The replicas of one model: one after another in this process, or side by side in worker
processes on the CPU, with the same bytes either way.

A worker is a `fork` of the stage: it starts with torch imported and the training and test
images in memory, shared with the stage (copy-on-write pages that nobody writes), so it costs
milliseconds, not the 4-5 s of a fresh interpreter importing torch and unpickling the data.
Forking is safe here because of what a worker does first and never does:
- torch's intra-op thread pool (GNU OpenMP) does not survive a fork: a child that runs a
  parallel region on two threads after its parent has used the pool hangs for ever. A worker
  sets one thread before any torch operation, as the stage's own training does, and one thread
  never enters the pool (tests/test_workers.py starts the pool in the parent, then forks).
- CUDA cannot be used after a fork. Workers train only on the CPU, and a stage that has
  initialised CUDA (a device other than the CPU) trains in its own process.
- Whatever the stage's other threads held at the fork (MLflow's, tqdm's) stays held in the
  child: a worker touches no lock of theirs (tqdm gets a fresh one) and writes no MLflow record.
Each worker trains by training.train_replica, as this process would, and sends back the weights
(a state_dict as torch.save bytes) and the History. Only this process writes files and MLflow
records (sqlite takes one writer). Workers write nothing, so one can be killed at any moment
without loss: on a failure or an interruption this process kills them all, and each dies with
it even when it is SIGKILLed (PR_SET_PDEATHSIG on Linux).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import io
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import training
from .kinds import ModelConfig

CPU = torch.device("cpu")


class ReplicaError(RuntimeError):
    """A replica's worker failed: an exception in it, or a signal (the OOM killer's SIGKILL)."""


class Stopped(BaseException):  # noqa: N818 - it is not an error: a run it ends is KILLED
    """Raised by Replicas.result(r) for a replica whose worker was stopped because another one
    failed. Not an Exception, as KeyboardInterrupt is not: its MLflow run ends KILLED."""


# What a failed allocation says: torch's CPU allocator, numpy.
_ALLOCATION = re.compile(r"you tried to allocate (\d+) bytes|Unable to allocate ([\d.]+ \w+)")


def out_of_memory(name: str, replica: int, kind: str, message: str, workers: int
                  ) -> ReplicaError | None:
    """The one-line error for replica `replica` of model `name` that failed with `kind`:
    `message` for want of memory (MemoryError, or torch's allocator), naming what it asked for
    and what to lower; None for any other failure."""
    if kind != "MemoryError" and "can't allocate memory" not in message:
        return None
    found = _ALLOCATION.search(message)
    size = (f"{int(found[1]) / 2**20:.1f} MiB" if found and found[1] else
            found[2] if found else "memory")
    cure = (f"a smaller train.workers than {workers} in params.yaml (each worker holds its own "
            "copy of the data in the model's scale), or a smaller train.limit" if workers > 1
            else "a smaller train.limit in params.yaml, or more memory (ulimit -v, the "
            "cgroup's memory.max)")
    return ReplicaError(f"model {name}-r{replica}: out of memory: could not allocate {size} "
                        f"more; try {cure}")


# --------------------------------------------------------------------------- how many workers


# The most memory of its own one worker held (conv16 on the full data: 854 MiB, its test MSE's
# activations; benchmarks/workers.py memory), with room to spare: what the stage shares with
# its forks (torch's libraries, the images) is held once, by the stage. Auto starts no more
# workers than memory has room for at this much each.
WORKER_MEMORY = 1024 * 2**20
# Auto trains in this process when a replica is smaller than this (epochs x training images).
# Measured on an idle 2-core machine with the cheapest model per sample (under30, 3 replicas,
# docs/speed.md "When workers pay"): at 300-3,000 samples two workers saved nothing beyond the
# noise (0.93-0.98x the wall) for ~2 CPU s more; at 6,000, 0.88x.
MIN_SAMPLES = 5_000


def _cgroup_folders(mounts: str, own: str) -> list[Path]:
    """This process's cgroup v2 folder and those above it, up to the root; [] without v2."""
    try:
        root = next(Path(line.split()[1]) for line in Path(mounts).read_text().splitlines()
                    if line.split()[2:3] == ["cgroup2"])
        path = next(line[3:] for line in Path(own).read_text().splitlines()
                    if line.startswith("0::"))
    except (OSError, StopIteration):
        return []
    folder = root / path.strip().lstrip("/")
    return [folder, *(p for p in folder.parents if p == root or root in p.parents)]


def cgroup_cpus(mounts: str = "/proc/self/mounts", own: str = "/proc/self/cgroup"
                ) -> float | None:
    """The CPUs that cgroup v2 `cpu.max` quotas leave this process (the tightest of its own
    cgroup and those above it), or None: no quota, or no cgroup v2."""
    limits = []
    for folder in _cgroup_folders(mounts, own):
        try:
            quota, period = (folder / "cpu.max").read_text().split()
            if quota != "max":
                limits.append(int(quota) / int(period))
        except (OSError, ValueError):  # no cpu.max here (the root has none)
            pass
    return min(limits) if limits else None


def available_memory(meminfo: str = "/proc/meminfo", mounts: str = "/proc/self/mounts",
                     own: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process may still take: the machine's MemAvailable, within any cgroup v2
    `memory.max`; None where neither is known (not Linux)."""
    room = []
    try:
        fields = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines())
        room.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    for folder in _cgroup_folders(mounts, own):
        try:
            limit = (folder / "memory.max").read_text().strip()
            if limit != "max":
                room.append(int(limit) - int((folder / "memory.current").read_text()))
        except (OSError, ValueError):
            pass
    return min(room) if room else None


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, within its cgroup's quota (a quota of
    1.5 CPUs counts as 2: two workers at 75 % still finish sooner than one)."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:  # macOS, Windows: no affinity
        cores = os.cpu_count() or 1
    quota = cgroup_cpus()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def count(asked: int, replicas: int, device: torch.device, samples: int | None = None) -> int:
    """Worker processes for `replicas` replicas of `samples` training samples each (epochs x
    images): `asked` (train.workers), at most one per replica; 0 = auto: one per usable core,
    as many as memory has room for (WORKER_MEMORY each), and none (this process) for replicas
    too small to pay for a worker (MIN_SAMPLES); 1, this process, on CUDA and MPS."""
    if device.type != "cpu" or torch.cuda.is_initialized():  # no CUDA state in a fork
        return 1
    if asked:
        return min(asked, replicas)
    if samples is not None and samples < MIN_SAMPLES:
        return 1
    room = available_memory()
    fit = replicas if room is None else room // WORKER_MEMORY
    return max(1, min(usable_cores(), replicas, fit))


# --------------------------------------------------------------------------- the worker side


def _die_with(parent: int) -> None:
    """End this process as soon as `parent` is gone, SIGKILLed or not."""
    if sys.platform == "linux":  # the kernel kills us the moment the parent exits
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG, <linux/prctl.h>
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
    if sys.platform != "linux":
        def poll() -> None:
            while os.getppid() == parent:
                time.sleep(1.0)
            os._exit(1)

        threading.Thread(target=poll, name="aebench-watch-parent", daemon=True).start()


def memory() -> tuple[int, int]:
    """(peak resident, resident now) bytes of this process, from /proc/self/status (VmHWM,
    VmRSS); (0, 0) where there is no /proc."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").open())
        return tuple(int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS"))
    except (OSError, KeyError, ValueError):
        return 0, 0


def _own_from_here() -> Callable[[], tuple[int, int]]:
    """In a fresh fork: a function that gives (peak resident, the most memory of its own) of
    this process, its own being what its peak added to what it shares with the stage from the
    fork on (the stage's pages, torch's libraries: resident in both, held once)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # 5: VmHWM starts again from VmRSS
    shared = memory()[1]
    return lambda: (memory()[0], max(0, memory()[0] - shared))


def _send_epoch(conn, replica: int, record: dict) -> None:
    conn.send(("epoch", replica, record))


def _work(conn, parent: int, cfg: ModelConfig, path: str, name: str, train_x: np.ndarray,
          test_x: np.ndarray) -> None:
    """A worker's life, in a fork of the stage: train each replica the parent sends, until
    None. It starts with SIGINT ignored (see Replicas._start)."""
    torch.set_num_threads(1)  # first: one thread never enters the pool the fork left broken
    _die_with(parent)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the stage's cleanup: it has none here
    gc.enable()  # Replicas._start froze what the stage holds and paused collection to fork
    tqdm.set_lock(threading.RLock())  # the stage's may have been held at the fork
    own = _own_from_here()
    train, test = torch.from_numpy(train_x), torch.from_numpy(test_x)  # shared, not copied
    while (task := conn.recv()) is not None:
        replica, seed = task
        try:
            model, history = training.train_replica(
                cfg, train, test, device=CPU, seed=seed, path=path, name=f"{name}-r{replica}",
                progress=False, on_epoch=functools.partial(_send_epoch, conn, replica))
        except Exception as err:  # noqa: BLE001 - every failure goes to the parent, named
            conn.send(("error", replica, isinstance(err, training.TrainingError),
                       type(err).__name__, str(err), traceback.format_exc()))
            return
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        conn.send(("done", replica, buffer.getvalue(), history, own()))


# --------------------------------------------------------------------------- the parent side


class Replicas:
    """`with Replicas(...) as replicas:`, then `model, history = replicas.result(r)` for
    r = 0, 1, ... in order: replica r's model (on the CPU, in eval mode) and History, as
    training.train_replica returns them, trained from seeds[r].

    One worker: result(r) trains replica r here, as it is asked for. More: the workers start
    on entering, each takes the next replica in order when it is free, and result(r) waits for
    replica r. The first failure stops every worker: result() then raises it for the replica
    that failed, and Stopped for those that were still training. Leaving kills what runs."""

    def __init__(self, cfg: ModelConfig, train_x: np.ndarray, test_x: np.ndarray, *, name: str,
                 seeds: list[int], device: torch.device, path: str, workers: int):
        self.cfg, self.train_x, self.test_x, self.name = cfg, train_x, test_x, name
        self.seeds, self.device, self.path, self.workers = seeds, device, path, workers
        self.procs: list = []
        self.conns: list = []
        self.busy: dict[int, int] = {}  # worker -> the replica it trains
        self.done: dict[int, tuple[bytes, training.History]] = {}
        self.failure: tuple[int, BaseException] | None = None
        self.next = 0
        self.peaks: list[tuple[int, int]] = []  # per replica, its worker's (resident, own)
        self.bar = None

    def __enter__(self) -> Replicas:
        if self.workers > 1:
            try:
                self._start()
            except BaseException:
                self._kill()
                raise
        return self

    def __exit__(self, kind, err, tb) -> None:
        if kind is None:
            for proc in self.procs:  # each was told to stop when no replica was left
                proc.join(timeout=30)
        self._kill()
        if kind is None and self.peaks:
            resident, own = (max(p[i] for p in self.peaks) / 2**20 for i in (0, 1))
            print(f"{self.name}: {self.workers} workers, each at most {own:.0f} MiB of its own "
                  f"memory ({resident:.0f} MiB resident with what it shares with the stage)",
                  file=sys.stderr)

    def result(self, replica: int) -> tuple[torch.nn.Module, training.History]:
        if self.workers == 1:
            try:
                return training.train_replica(
                    self.cfg, torch.from_numpy(self.train_x), torch.from_numpy(self.test_x),
                    device=self.device, seed=self.seeds[replica], path=self.path,
                    name=f"{self.name}-r{replica}")
            except (MemoryError, RuntimeError) as err:
                if short := out_of_memory(self.name, replica, type(err).__name__, str(err), 1):
                    raise short from err
                raise
        while replica not in self.done and self.failure is None:
            if not self.busy:  # nothing could ever bring it: fail rather than wait forever
                raise ReplicaError(f"model {self.name}-r{replica}: no worker is training it")
            self._receive()
        if replica in self.done:
            blob, history = self.done.pop(replica)
            model = self.cfg.build()
            model.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
            return model.eval(), history
        failed, err = self.failure
        if failed == replica:
            raise err
        raise Stopped(replica)

    def _start(self) -> None:
        context = multiprocessing.get_context("fork")
        # Ctrl-C reaches the whole process group; this process decides what stops, and stops
        # the workers. They are forked with SIGINT ignored.
        main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        # The stage's objects into the permanent generation, and no collection while forking:
        # a worker's collector would otherwise write to (and so copy) every page that holds
        # one of them.
        gc.disable()
        gc.freeze()
        try:
            for w in range(self.workers):
                here, there = context.Pipe()
                proc = context.Process(target=_work, name=f"{self.name}-worker{w}", daemon=True,
                                       args=(there, os.getpid(), self.cfg, self.path, self.name,
                                             self.train_x, self.test_x))
                proc.start()
                there.close()
                self.procs.append(proc)
                self.conns.append(here)
        finally:
            gc.unfreeze()
            gc.enable()
            if before is not None:
                signal.signal(signal.SIGINT, before)
        epochs = self.cfg.epochs * len(self.seeds)
        self.bar = tqdm(total=epochs, desc=f"train {self.name} ({self.workers} workers)",
                        unit="epoch", dynamic_ncols=True)
        for w in range(self.workers):
            self._assign(w)

    def _send(self, worker: int, message) -> None:
        try:
            self.conns[worker].send(message)
        except OSError:  # it died: its sentinel tells how
            pass

    def _assign(self, worker: int) -> None:
        """Give `worker` the next replica, or tell it to stop when none is left."""
        if self.next < len(self.seeds) and self.failure is None:
            self.busy[worker] = self.next
            self._send(worker, (self.next, self.seeds[self.next]))
            self.next += 1
        else:
            self.busy.pop(worker, None)
            self._send(worker, None)

    def _receive(self) -> None:
        """Wait for any worker to send something or to end; handle all that arrived."""
        sentinels = {self.procs[w].sentinel: w for w in self.busy}
        for ready in wait([*(self.conns[w] for w in self.busy), *sentinels]):
            w = sentinels.get(ready)
            if w is None:
                w = self.conns.index(ready)
            self._drain(w)
            if w in self.busy and not self.procs[w].is_alive():
                self._fail(self.busy[w], self._death(w))
        if self.failure is not None:
            for w in list(self.busy):  # what already arrived still counts (a finished replica)
                self._drain(w)
            self._kill()

    def _drain(self, worker: int) -> None:
        conn = self.conns[worker]
        try:
            while worker in self.busy and conn.poll():
                self._handle(worker, conn.recv())
        except (EOFError, OSError):  # it ended; _receive names how
            pass

    def _handle(self, worker: int, message: tuple) -> None:
        kind, replica, *rest = message
        if kind == "epoch":
            record = rest[0]
            self.bar.update(1)
            self.bar.set_postfix(replica=replica, loss=f"{record['train_loss']:.4g}",
                                 test_mse=f"{record['test_mse']:.4g}")
        elif kind == "done":
            blob, history, peak = rest
            self.done[replica] = (blob, history)
            self.peaks.append(peak)
            self._assign(worker)
        else:  # "error"
            training_error, kind_name, message, trace = rest
            self.busy.pop(worker, None)
            # TrainingError already names the model and replica; anything else gets them here
            err = (training.TrainingError(message) if training_error
                   else out_of_memory(self.name, replica, kind_name, message, self.workers)
                   or ReplicaError(f"model {self.name}-r{replica}: {kind_name}: {message}"))
            err.add_note(f"in worker process {self.procs[worker].pid}:\n{trace}")
            self._fail(replica, err)

    def _death(self, worker: int) -> ReplicaError:
        proc, replica = self.procs[worker], self.busy.pop(worker)
        proc.join()
        if proc.exitcode < 0:
            try:
                signame = signal.Signals(-proc.exitcode).name
            except ValueError:  # a signal without a name (a real-time one)
                signame = f"signal {-proc.exitcode}"
            how = f"was killed by {signame}" + (
                " (the kernel's OOM killer sends it when memory runs out: try fewer "
                "train.workers)" if proc.exitcode == -signal.SIGKILL else "")
        else:
            how = f"exited with code {proc.exitcode} (its error is printed above)"
        return ReplicaError(f"model {self.name}-r{replica}: its worker process (pid {proc.pid}) "
                            f"{how}")

    def _fail(self, replica: int, err: BaseException) -> None:
        if self.failure is None or replica < self.failure[0]:
            self.failure = (replica, err)

    def _kill(self) -> None:
        """Kill every worker still running and wait for it: they hold nothing to save."""
        for proc in self.procs:
            if proc.exitcode is None:
                proc.kill()
        for proc in self.procs:
            proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.busy = [], [], {}
        if self.bar is not None:
            self.bar.close()
            self.bar = None
