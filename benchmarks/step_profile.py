"""Where a CPU training step's time goes: arithmetic, or per-step overhead (Python, autograd,
the optimizer's dispatch)?

    python benchmarks/step_profile.py [--models deep32,under30] [--steps 300] [--repeats 3]

For each model, on one thread as training runs: seconds per step of the fast path's step, by
phase (zero_grad, forward with noise and loss, backward, the foreach optimizer), at the model's
batch size and at batch size 1, where forward and backward do 1/batch of the arithmetic and
what is left is the per-step overhead (Python, dispatch, autograd); then torch.profiler's ops
with the most self CPU time.
Data: random uint8 images (a step's time does not depend on the pixels). Times are the minimum
over --repeats (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aebench import config, kinds, training  # noqa: E402
from aebench.models import mask_noise, to_model_scale  # noqa: E402


def step_of(cfg):
    """The fast path's step on a fresh replica (as training does per batch), each phase timed:
    step(x, times) adds its phases' seconds to the dict `times`. On the CPU every op is done
    when it returns (backward too: the calling thread runs the CPU autograd graph)."""
    torch.manual_seed(0)
    model = cfg.make().train()
    optimizer = training.make_optimizer(model.parameters(), cfg, fast=True)

    def step(x, times):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        t1 = time.perf_counter()
        loss = cfg.training_loss(model, mask_noise(x, cfg.input_noise), x)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        for key, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key] += seconds

    return step


PHASES = ("zero_grad", "forward", "backward", "optimizer")


def seconds_per_step(cfg, batch: int, steps: int, repeats: int) -> dict[str, float]:
    """Per step: each phase's seconds and the total, from the repeat with the least total."""
    gen = torch.Generator().manual_seed(0)
    x = to_model_scale(torch.randint(0, 256, (batch, 784), generator=gen, dtype=torch.uint8),
                       cfg.pixels)
    best = None
    for _ in range(repeats):
        step, times = step_of(cfg), dict.fromkeys(PHASES, 0.0)
        for _ in range(10):  # warm-up: allocator, optimizer state
            step(x, dict.fromkeys(PHASES, 0.0))
        for _ in range(steps):
            step(x, times)
        times = {k: v / steps for k, v in times.items()}
        times["step"] = sum(times.values())
        best = times if best is None or times["step"] < best["step"] else best
    return best


def top_ops(cfg, steps: int, n: int = 8) -> list[dict]:
    """torch.profiler: the `n` ops with the most self CPU time, per step."""
    x = to_model_scale(torch.randint(0, 256, (cfg.batch_size, 784), dtype=torch.uint8),
                       cfg.pixels)
    step, sink = step_of(cfg), dict.fromkeys(PHASES, 0.0)
    for _ in range(10):
        step(x, sink)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(x, sink)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in events[:n]]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="deep32,under30")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/step_profile-cpu.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # as training on the CPU
    torch.set_flush_denormal(True)
    cfgs = kinds.read_models(config.load_params(ROOT / "params.yaml"))
    load, rows = [os.getloadavg()[0]], []
    for name in args.models.split(","):
        cfg = cfgs[name]
        full = seconds_per_step(cfg, cfg.batch_size, args.steps, args.repeats)
        one = seconds_per_step(cfg, 1, args.steps, args.repeats)
        rows.append({"model": name, "batch_size": cfg.batch_size, "per_step_s": full,
                     "per_step_s_batch_1": one, "top_ops": top_ops(cfg, args.steps)})
        for label, t in ((f"batch {cfg.batch_size}", full), ("batch 1", one)):
            print(f"{name} {label:>9}: {t['step'] * 1e3:7.3f} ms/step = "
                  + " + ".join(f"{k} {t[k] * 1e3:.3f}" for k in PHASES), flush=True)
        print("  top ops (ms/step): " + ", ".join(
            f"{o['op']} {o['ms_per_step']:.3f}" for o in rows[-1]["top_ops"]), flush=True)
    load.append(os.getloadavg()[0])
    result = {"device": "cpu", "threads": 1, "torch": torch.__version__, "steps": args.steps,
              "repeats": args.repeats, "load1_before_after": load, "models": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average (1 min) {load[0]:.1f} -> {load[1]:.1f}; written {args.out}")


if __name__ == "__main__":
    main()
