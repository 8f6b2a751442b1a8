"""K replicas of each model on the CPU: K sequential training loops against one vmapped step.

    python benchmarks/replicas_cpu.py [--steps 200] [--warmup 20] [--replicas 3] [--repeats 3]
        [--cap 4] [--threads 1,2] [--models a,b] [--out benchmarks/results/replicas_cpu.json]

Sequential: replica after replica, training's fast-path step (data resident in the model's
scale, shuffled batches gathered from it, foreach optimizer). Vmapped: the K replicas' weights
stacked (torch.func.stack_module_state), torch.vmap of a functional_call over a (K, B, 784)
batch (each replica its own shuffle), loss = sum of the replicas' mean losses (so each gets
its own gradient), one Adam / NAdam over the stacked tensors (elementwise: K independent ones).
Data: random uint8 images of MNIST's size (a step's time does not depend on the pixels). Times:
the minimum over `--repeats` (the machine is shared), scaled to an epoch of 60,000 images
(ceil(60000 / batch) steps per replica), for each torch thread count asked.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aebench import config, kinds, training  # noqa: E402
from aebench.models import mask_noise, to_model_scale  # noqa: E402

N_TRAIN = 60_000


class Objective(nn.Module):
    """A model with its training loss as forward, so functional_call reaches whatever
    `cfg.training_loss` calls (forward, encode, ...) with the stacked weights."""

    def __init__(self, model: nn.Module, cfg):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x):
        return self.cfg.training_loss(self.model, mask_noise(x, self.cfg.input_noise), x)


def replicas(cfg, k: int) -> list[Objective]:
    """K fresh models of `cfg`, replica r built from seed r as training builds them."""
    out = []
    for r in range(k):
        torch.manual_seed(r)
        out.append(Objective(cfg.make().train(), cfg))
    return out


def sequential_step(obj: Objective):
    """What training's fast path runs per batch (as training._step_fn), one replica."""
    opt = training.make_optimizer(obj.parameters(), obj.cfg, fast=True)

    def step(x):
        opt.zero_grad(set_to_none=False)
        loss = obj(x)
        loss.backward()
        opt.step()
        return loss

    return step


def vmapped_step(objs: list[Objective]):
    """One step for all replicas; returns (step, stacked params)."""
    params, buffers = stack_module_state(objs)
    base = copy.deepcopy(objs[0]).to("meta")  # the structure only; weights come from params
    opt = training.make_optimizer(params.values(), objs[0].cfg, fast=True)

    # "different": each replica draws its own dropout and input-noise masks.
    losses_of = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)),
                           randomness="different")

    def step(x):  # x: (K, B, 784)
        opt.zero_grad(set_to_none=False)
        losses = losses_of(params, buffers, x)
        losses.sum().backward()
        opt.step()
        return losses

    return step, params


def time_steps(step, batches, steps: int, warmup: int, cap: float) -> float:
    """Seconds per step over `steps` steps (fewer if they pass `cap` seconds: conv16's step
    is slow) after `warmup` untimed ones, on the batches of the iterator `batches`."""
    for _ in range(warmup):
        step(next(batches))
    start, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - start < cap):
        loss = step(next(batches))
        done += 1
    loss.sum().item()  # the fast path reads the loss once per epoch; here once per run
    return (time.perf_counter() - start) / done


def batches(data: torch.Tensor, bs: int, k: int | None, gen: torch.Generator):
    """Full shuffled batches as the fast path draws them: a permutation per epoch, sliced.
    With `k`, K independent permutations and (K, B, 784) batches."""
    n = data.shape[0]
    while True:
        perm = torch.stack([torch.randperm(n, generator=gen) for _ in range(k or 1)])
        for i in range(0, n - bs + 1, bs):
            yield data[perm[:, i:i + bs]] if k else data[perm[0, i:i + bs]]


def equivalence(cfg, k: int, bs: int = 16) -> dict:
    """One vmapped step against K separate ones, same init and batch; dropout and input noise
    off (their masks differ by design). The gradients agree to float32 rounding; the weights
    to ~1e-6, because Adam's g / (|g| + eps) magnifies rounding where |g| is near eps."""
    off = {"input_noise": 0.0, **({"dropout": 0.0} if hasattr(cfg, "dropout") else {})}
    objs = replicas(cfg.model_copy(update=off), k)
    alone = copy.deepcopy(objs)
    step, params = vmapped_step(objs)
    x = torch.randint(0, 256, (k, bs, 784), generator=torch.Generator().manual_seed(1))
    x = to_model_scale(x, cfg.pixels)
    step(x)
    for r, obj in enumerate(alone):
        sequential_step(obj)(x[r])
    pairs = [(params[name], r, p) for r, obj in enumerate(alone)
             for name, p in obj.named_parameters()]
    return {"weights_max_abs_diff": max((s[r] - p).abs().max().item() for s, r, p in pairs),
            "grad_max_rel_diff": max(((s.grad[r] - p.grad).abs().max() / p.grad.abs().max())
                                     .item() for s, r, p in pairs)}


def measure(cfg, k: int, steps: int, warmup: int, repeats: int, cap: float) -> dict:
    bs, gen = cfg.batch_size, torch.Generator().manual_seed(0)
    data = to_model_scale(torch.randint(0, 256, (N_TRAIN, 784), generator=gen), cfg.pixels)
    seq, vmapped = [], []
    for _ in range(repeats):  # interleaved, so a burst of load hits both alike
        seq.append(sum(time_steps(sequential_step(o), batches(data, bs, None, gen), steps,
                                  warmup, cap) for o in replicas(cfg, k)))
        step, _ = vmapped_step(replicas(cfg, k))
        vmapped.append(time_steps(step, batches(data, bs, k, gen), steps, warmup, cap))
    per_epoch = math.ceil(N_TRAIN / bs)  # steps per replica and epoch
    return {"seq_s_per_epoch": min(seq) * per_epoch, "vmap_s_per_epoch": min(vmapped) * per_epoch,
            "speedup": min(seq) / min(vmapped), "seq_s_per_step": seq, "vmap_s_per_step": vmapped}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cap", type=float, default=4.0, help="max seconds per timed loop")
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    default_threads = torch.get_num_threads()  # torch's choice: one per core
    ap.add_argument("--threads", default=f"1,{default_threads}",
                    help="comma-separated torch thread counts (default: 1 and torch's default)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/replicas_cpu.json"))
    args = ap.parse_args(argv)
    threads = sorted({int(t) for t in args.threads.split(",")})
    torch.set_flush_denormal(True)  # as training does on the CPU
    cfgs = kinds.read_models(config.load_params(ROOT / "params.yaml"))
    names = args.models.split(",") if args.models else list(cfgs)
    load, rows = [os.getloadavg()], []
    print(f"{'model':<11} {'batch':>5} {'threads':>7} {'seq s/ep':>9} {'vmap s/ep':>9} "
          f"{'speedup':>7} {'w diff':>8} {'g rel':>8}  (K={args.replicas})")
    for name in names:
        cfg = cfgs[name]
        check = equivalence(cfg, args.replicas)
        for t in threads:
            torch.set_num_threads(t)
            rows.append(r := {"model": name, "batch_size": cfg.batch_size, "threads": t,
                              **measure(cfg, args.replicas, args.steps, args.warmup,
                                        args.repeats, args.cap), **check})
            print(f"{name:<11} {cfg.batch_size:>5} {t:>7} {r['seq_s_per_epoch']:>9.2f} "
                  f"{r['vmap_s_per_epoch']:>9.2f} {r['speedup']:>7.2f} "
                  f"{r['weights_max_abs_diff']:>8.1e} {r['grad_max_rel_diff']:>8.1e}",
                  flush=True)
    load.append(os.getloadavg())
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").open()
                if line.startswith("model name")), platform.machine())
    result = {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
              "torch_default_threads": default_threads, "replicas": args.replicas,
              "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "cap": args.cap,
              "loadavg_before_after": load, "models": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average (1 min) before {load[0][0]:.2f}, after {load[1][0]:.2f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
