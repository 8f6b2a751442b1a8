"""Replicas in worker processes: how many, the same bytes as one after another, and faults
(a NaN loss, an exception, a SIGKILL in a worker; the parent SIGKILLed) stopping every worker."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch
from conftest import REPO, ToyAutoencoder

from aebench import kinds, training, workers
from aebench.config import MAX_EPOCHS
from aebench.kinds import ModelConfig
from aebench.losses import source_loss

CPU = torch.device("cpu")
OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
       "memory: you tried to allocate 188160000 bytes. Error code 12 (Cannot allocate memory)")
LONG = MAX_EPOCHS  # a replica that trains until it is stopped (minutes on 64 images)


class FlakyConfig(ModelConfig):
    """A toy kind whose replica trained from seed `fail_seed` fails at its first step: a NaN
    loss, an exception, torch's allocator out of memory, or a SIGKILL (what the kernel's OOM
    killer sends)."""

    kind: Literal["flaky"]
    fail_seed: int
    how: Literal["nan", "raise", "oom", "sigkill"]

    def build(self) -> ToyAutoencoder:
        return ToyAutoencoder(4)

    def training_loss(self, model, inputs, targets):
        loss = source_loss(model(inputs), targets, self.loss)
        if torch.initial_seed() == self.fail_seed:  # train_replica seeds torch with it
            if self.how == "nan":
                return loss * float("nan")
            if self.how == "raise":
                raise RuntimeError("flaky: out of luck")
            if self.how == "oom":  # what torch's CPU allocator raises
                raise RuntimeError(OOM)
            os.kill(os.getpid(), signal.SIGKILL)
        return loss


def flaky(how: str, fail_seed: int = 1, epochs: int = LONG) -> FlakyConfig:
    return FlakyConfig.model_validate({
        "kind": "flaky", "fail_seed": fail_seed, "how": how, "pixels": "0,1",
        "input_noise": 0.0, "init": "torch", "loss": "mse", "batch_size": 16, "epochs": epochs,
        "optimizer": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0}})


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 784), dtype=np.uint8)


def replicas(cfg, n: int, workers_: int, name: str = "m") -> workers.Replicas:
    return workers.Replicas(cfg, images(64), images(16, 1), name=name, seeds=list(range(n)),
                            device=CPU, path="fast", workers=workers_)


def alive(pid: int) -> bool:
    try:  # a zombie (dead, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- how many


def test_auto_is_one_per_usable_core_and_never_more_than_replicas(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    monkeypatch.setattr(workers, "available_memory", lambda: 64 * 2**30)
    assert workers.count(0, 3, CPU) == 3
    assert workers.count(0, 12, CPU) == 8
    assert workers.count(2, 3, CPU) == 2 and workers.count(5, 3, CPU) == 3
    assert workers.count(1, 3, CPU) == 1
    for device in ("cuda", "mps"):  # replicas stay in one process on an accelerator
        assert workers.count(0, 3, torch.device(device)) == 1


def test_auto_trains_small_replicas_in_this_process(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    monkeypatch.setattr(workers, "available_memory", lambda: None)
    assert workers.count(0, 3, CPU, workers.MIN_SAMPLES - 1) == 1
    assert workers.count(0, 3, CPU, workers.MIN_SAMPLES) == 3
    assert workers.count(2, 3, CPU, 10) == 2  # asked for by number: the user's call


def test_a_process_that_has_started_cuda_forks_no_worker(monkeypatch):
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert workers.count(0, 3, CPU) == 1 and workers.count(3, 3, CPU) == 1


@pytest.mark.parametrize("room, expect", [(None, 3), (0, 1), (2 * workers.WORKER_MEMORY, 2)])
def test_auto_starts_no_more_workers_than_memory_has_room_for(monkeypatch, room, expect):
    monkeypatch.setattr(workers, "usable_cores", lambda: 8)
    monkeypatch.setattr(workers, "available_memory", lambda: room)
    assert workers.count(0, 3, CPU) == expect
    assert workers.count(3, 3, CPU) == 3  # asked for by number: the user's call


def write_cgroup(tmp_path: Path, own: str, limits: dict[str, str],
                 name: str = "cpu.max") -> tuple[Path, Path]:
    """A fake cgroup v2 tree (mounted at tmp_path/cg) with `name` files; (mounts, own)."""
    root = tmp_path / "cg"
    for folder, value in limits.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / name).write_text(value + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    mounts = tmp_path / "mounts"
    mounts.write_text(f"proc /proc proc rw 0 0\ncgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    (tmp_path / "cgroup").write_text(f"0::{own}\n")
    return mounts, tmp_path / "cgroup"


def test_cgroup_quota_is_the_tightest_on_the_way_up(tmp_path):
    mounts, own = write_cgroup(tmp_path, "/a/b", {"a": "150000 100000", "a/b": "max 100000"})
    assert workers.cgroup_cpus(mounts, own) == 1.5
    mounts, own = write_cgroup(tmp_path, "/a/b", {"a": "max 100000", "a/b": "50000 100000"})
    assert workers.cgroup_cpus(mounts, own) == 0.5
    mounts, own = write_cgroup(tmp_path, "/a/b", {"a": "max 100000", "a/b": "max 100000"})
    assert workers.cgroup_cpus(mounts, own) is None
    (tmp_path / "mounts").write_text("proc /proc proc rw 0 0\n")  # cgroup v1 only
    assert workers.cgroup_cpus(mounts, own) is None


def test_available_memory_is_the_tightest_of_the_machine_and_the_cgroups(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    8000000 kB\n")
    mounts, own = write_cgroup(tmp_path, "/a/b", {"a": "3000000000", "a/b": "max"},
                               name="memory.max")
    (tmp_path / "cg/a/memory.current").write_text("1000000000\n")
    assert workers.available_memory(meminfo, mounts, own) == 2_000_000_000
    (tmp_path / "cg/a/memory.max").write_text("max\n")
    assert workers.available_memory(meminfo, mounts, own) == 8_000_000 * 1024
    assert workers.available_memory(tmp_path / "none", tmp_path / "none", own) is None


@pytest.mark.parametrize("affinity, quota, expect", [
    (4, None, 4), (4, 1.5, 2), (4, 0.5, 1), (2, 8.0, 2), (1, None, 1)])
def test_usable_cores_respect_affinity_and_quota(monkeypatch, affinity, quota, expect):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)),
                        raising=False)
    monkeypatch.setattr(workers, "cgroup_cpus", lambda: quota)
    assert workers.usable_cores() == expect


# --------------------------------------------------------------------------- the same bytes


def checkpoint_bytes(model) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


MLP = {"kind": "mlp", "encoder": [784, 16, 4], "decoder": [4, 16, 784], "activation": "relu",
       "code_activation": "none", "output_activation": "sigmoid", "dropout": 0.25,
       "init": "glorot", "pixels": "0,1", "input_noise": 0.25, "loss": "bce",
       "optimizer": {"name": "nadam", "lr": 1.0e-3, "weight_decay": 0.0}}
# convolutions run oneDNN's kernels, not the matrix products' (conv16's path)
CONV = {"kind": "conv", "channels": [1, 2, 4], "kernel": 3, "pool": 2, "activation": "relu",
        "output_activation": "tanh", "init": "torch", "pixels": "-1,1", "input_noise": 0.0,
        "loss": "mse", "optimizer": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0}}


@pytest.mark.parametrize("entry", [MLP, CONV], ids=["mlp", "conv"])
def test_workers_give_the_bytes_and_histories_of_one_after_another(entry):
    cfg = kinds.validate_model("m", {**entry, "batch_size": 16, "epochs": 2})
    results = {}
    for n_workers in (1, 2):
        with replicas(cfg, 3, n_workers) as pool:
            results[n_workers] = [pool.result(r) for r in range(3)]
        assert pool.procs == []  # every worker gone
    for (one, h1), (two, h2) in zip(results[1], results[2]):
        assert checkpoint_bytes(one) == checkpoint_bytes(two)
        assert not two.training and h1.epochs == h2.epochs and h2.samples == 64 * 2
    assert checkpoint_bytes(results[2][0][0]) != checkpoint_bytes(results[2][1][0])  # 2 seeds


def test_a_worker_is_a_fork_on_one_thread_without_cuda_and_sharing_the_images(monkeypatch):
    parent, real = os.getpid(), training.train_replica
    train_x = images(64)

    def spy(cfg, train, test, **kw):  # a fork runs the parent's monkeypatched module
        model, history = real(cfg, train, test, **kw)
        history.path = {"pid": os.getpid(), "cuda": torch.cuda.is_initialized(),
                        "threads": torch.get_num_threads(),
                        "shared": train.numpy().ctypes.data == train_x.ctypes.data}
        return model, history

    monkeypatch.setattr(training, "train_replica", spy)
    cfg = kinds.validate_model("m", {**MLP, "batch_size": 16, "epochs": 1})
    with workers.Replicas(cfg, train_x, images(16, 1), name="m", seeds=[0, 1], device=CPU,
                          path="fast", workers=2) as pool:
        seen = [pool.result(r)[1].path for r in range(2)]
    assert {s["pid"] for s in seen} - {parent} == {s["pid"] for s in seen}  # not this one
    assert [(s["cuda"], s["threads"], s["shared"]) for s in seen] == [(False, 1, True)] * 2


# A parent whose intra-op pool (GNU OpenMP) has run, then workers whose replicas run a
# parallel operation before training (as a big model's initialisation may): a worker that
# kept two threads would hang in it for ever (tried: it does).
POOL = """
import os, sys, torch
from aebench import kinds, training, workers
from test_workers import MLP, checkpoint_bytes, images
torch.set_num_threads(2)
x = torch.rand(1500, 1500)
(x @ x).relu_().sum()
assert len(os.listdir("/proc/self/task")) > 1  # the pool's threads exist
real = training.train_replica
def parallel_first(*args, **kw):
    torch.rand(1500, 1500).relu_().sum()
    return real(*args, **kw)
training.train_replica = parallel_first
cfg = kinds.validate_model("m", {**MLP, "batch_size": 16, "epochs": 1})
out = {}
for n in (2, 1):
    with workers.Replicas(cfg, images(64), images(16, 1), name="m", seeds=[0, 1],
                          device=torch.device("cpu"), path="fast", workers=n) as pool:
        out[n] = [checkpoint_bytes(pool.result(r)[0]) for r in range(2)]
print("same" if out[1] == out[2] else "differ")
"""


def test_workers_forked_after_the_thread_pool_ran_neither_hang_nor_change_the_bytes():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    done = subprocess.run([sys.executable, "-c", POOL], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "same"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("how, expect", [
    ("nan", r"^model m-r1: training loss is nan at epoch 1; stopping"),
    ("raise", r"^model m-r1: RuntimeError: flaky: out of luck"),
    ("sigkill", r"^model m-r1: its worker process \(pid \d+\) was killed by SIGKILL \(the "
                r"kernel's OOM killer"),
])
def test_a_failing_worker_is_named_and_stops_the_others(how, expect):
    pool = replicas(flaky(how), 3, 2)
    with pytest.raises((training.TrainingError, workers.ReplicaError), match=expect) as err, \
            pool:
        pids = [proc.pid for proc in pool.procs]
        with pytest.raises(workers.Stopped):  # replica 0 trains "forever": it is stopped
            pool.result(0)
        pool.result(1)
    assert "\n" not in str(err.value)  # one line; the worker's traceback is a note
    assert pool.next == 2  # replica 2 never started
    assert not any(alive(pid) for pid in pids)


@pytest.mark.parametrize("n_workers, cure", [(2, "a smaller train.workers than 2"),
                                              (1, "a smaller train.limit")])
def test_out_of_memory_names_the_replica_the_size_and_what_to_lower(n_workers, cure):
    with pytest.raises(workers.ReplicaError) as err, replicas(flaky("oom", 1, 1), 2, n_workers) \
            as pool:
        with contextlib.suppress(workers.Stopped):  # r0 may be stopped before it is done
            pool.result(0)
        pool.result(1)
    assert str(err.value).startswith("model m-r1: out of memory: could not allocate 179.4 MiB "
                                     f"more; try {cure}")


def test_out_of_memory_reads_numpy_and_bare_memory_errors_and_nothing_else():
    numpy = "Unable to allocate 44.9 MiB for an array with shape (784, 60000)"
    assert "could not allocate 44.9 MiB more" in str(
        workers.out_of_memory("m", 0, "MemoryError", numpy, 2))
    assert "could not allocate memory more" in str(workers.out_of_memory("m", 0, "MemoryError",
                                                                        "", 2))
    assert workers.out_of_memory("m", 0, "RuntimeError", "flaky: out of luck", 2) is None


def test_the_replica_waited_for_failing_stops_the_others():
    pool = replicas(flaky("raise", fail_seed=0), 2, 2)
    with pytest.raises(workers.ReplicaError, match=r"^model m-r0: RuntimeError"), pool:
        pids = [proc.pid for proc in pool.procs]
        pool.result(0)
    assert not any(alive(pid) for pid in pids)


PARENT = """
import sys, numpy as np, torch
from aebench import workers
from test_workers import flaky, images
pool = workers.Replicas(flaky("nan", fail_seed=-1), images(64), images(16, 1), name="m",
                        seeds=[0, 1], device=torch.device("cpu"), path="fast", workers=2)
with pool:
    print(*(proc.pid for proc in pool.procs), flush=True)
    pool.result(0)  # never returns: LONG epochs
"""


def test_workers_die_with_a_sigkilled_parent():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(Path(__file__).parent)])}
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        pids = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(pid) for pid in pids)
        time.sleep(2)  # into their imports or their training: either way they must go
    finally:
        parent.kill()  # SIGKILL: no cleanup of its own runs
        parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
