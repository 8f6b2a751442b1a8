"""Training speed: the seed tutorials' loop against the project's training path, side by side.

    python benchmarks/train_speed.py data/csv [--epochs N] [--models a,b] [--device auto]
        [--out benchmarks/results/train_speed-<device>.json]
    python benchmarks/train_speed.py data/csv --pipeline   # time every stage after `convert`

The seed-style loop is what seeds 000-002 run: a torchvision-style Dataset that turns each image
into a PIL image and then a tensor (ToTensor, Normalize) one at a time on the CPU, a DataLoader,
and `loss.item()` each step. Both loops train the same model (same params.yaml entry, seed,
batch size) for the same number of epochs; the table gives seconds per epoch each way, their
ratio, GFLOP/s each way, and the test MSE on [0,1] pixels each way. Run it on an idle machine:
it measures wall-clock time (the load average before and after is recorded); our loop's CPU
seconds (time.process_time) are given too, which a busy machine inflates less.

FLOPs are the model's own count: torch.utils.flop_counter.FlopCounterMode over one training
step (noise, forward, loss, backward) of a full batch, per image. It counts matrix products and
convolutions, 2 per multiply-add, forward and backward (an MLP comes to about 6 x weights per
image, less the first layer's input gradient, which is not needed); the optimizer's and the
activations' elementwise work is not counted. Replica parallelism: the workers `train.workers:
0` (auto) would start here, and from the measured s/epoch, the training time of the default
params' train stages on k cores (ceil(replicas / k) x epochs x s/epoch, summed over models).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aebench import config, data, kinds, models, training, workers  # noqa: E402


class SeedStyleMNIST(Dataset):
    """What torchvision.datasets.MNIST does per item: uint8 row -> PIL image -> transform."""

    def __init__(self, pixels: np.ndarray, transform):
        self.images = torch.from_numpy(pixels).view(-1, 28, 28)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i].numpy(), mode="L")), 0


def seed_style_train(model, cfg, train_pixels, device, seed):
    """The tutorials' loop, with their per-image conversion; returns seconds."""
    steps = [transforms.ToTensor()]
    if cfg.pixels == "-1,1":
        steps.append(transforms.Normalize((0.5,), (0.5,)))
    torch.manual_seed(seed)
    loader = DataLoader(SeedStyleMNIST(train_pixels, transforms.Compose(steps)),
                        batch_size=cfg.batch_size, shuffle=True)
    optimizer = training.make_optimizer(model.parameters(), cfg, fast=False)
    model.to(device).train()
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        for img, _ in loader:
            img = img.view(img.size(0), -1).to(device)
            loss = cfg.training_loss(model, models.mask_noise(img, cfg.input_noise), img)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            loss.item()  # the tutorials print or collect it
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def flops_per_image(cfg) -> float:
    """FLOPs of one training step (noise, forward, loss, backward) per image, counted by
    FlopCounterMode on a full batch of the model's batch size."""
    model = cfg.make().train()
    x = models.to_model_scale(torch.zeros(cfg.batch_size, 784, dtype=torch.uint8), cfg.pixels)
    with FlopCounterMode(display=False) as counter:
        cfg.training_loss(model, models.mask_noise(x, cfg.input_noise), x).backward()
    return counter.get_total_flops() / cfg.batch_size


def benchmark_model(name, cfg, train_pixels, test_x, device, seed, path):
    torch.manual_seed(seed)
    seed_model = cfg.make()
    cpu = time.process_time()
    seed_seconds = seed_style_train(seed_model, cfg, train_pixels, device, seed)
    seed_cpu = time.process_time() - cpu
    seed_mse = training.test_mse(seed_model, models.to_model_scale(test_x.to(device), cfg.pixels),
                                 cfg.pixels).item()
    torch.manual_seed(seed)
    ours = cfg.make()
    # One warm-up epoch first: CUDA graph capture and allocator warm-up are one-off costs.
    if device.type == "cuda":
        training.train(cfg.make(), cfg.model_copy(update={"epochs": 1}),
                       torch.from_numpy(train_pixels), test_x, device=device, seed=seed,
                       path=path, progress=False)
    cpu = time.process_time()
    history = training.train(ours, cfg, torch.from_numpy(train_pixels), test_x, device=device,
                             seed=seed, path=path, name=name, progress=False)
    ours_cpu = time.process_time() - cpu  # the seconds this process ran: less load-bound
    epochs = cfg.epochs
    flops = flops_per_image(cfg)
    per_epoch = flops * len(train_pixels)
    weights = sum(p.numel() for n, p in ours.named_parameters() if n.endswith("weight"))
    return {"model": name, "epochs": epochs, "batch_size": cfg.batch_size,
            "seed_style_s_per_epoch": seed_seconds / epochs,
            "ours_s_per_epoch": history.seconds / epochs,
            "seed_style_cpu_s_per_epoch": seed_cpu / epochs, "ours_cpu_s_per_epoch":
            ours_cpu / epochs, "ours_gflops_per_cpu_s": per_epoch * epochs / ours_cpu / 1e9,
            "speedup": seed_seconds / history.seconds, "path": history.path,
            "flops_per_image": flops, "six_x_weights": 6 * weights,
            "seed_style_gflops": per_epoch * epochs / seed_seconds / 1e9,
            "ours_gflops": per_epoch * epochs / history.seconds / 1e9,
            "seed_style_test_mse": seed_mse, "ours_test_mse": history.final["test_mse"]}


def stage_hours(rows, cfgs, replicas: int, cores: int) -> float:
    """Training time of the default params' train stages on `cores` cores, from s/epoch."""
    return sum(math.ceil((cfgs[r["model"]].replicas or replicas) / cores) * r["ours_s_per_epoch"]
               * cfgs[r["model"]].epochs for r in rows) / 3600


def time_pipeline(root: Path) -> list[dict]:
    """Run each stage command of dvc.yaml after `convert`, as DVC would, and time each."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    params = config.load_params(root / "params.yaml")
    commands = []
    for stage_name, stage in stages.items():
        if stage_name in ("download", "convert"):
            continue
        if "foreach" in stage:
            commands += [(f"{stage_name}@{key}", stage["do"]["cmd"].replace("${key}", key))
                         for key in params["models"]]
        else:
            commands.append((stage_name, stage["cmd"]))
    rows = []
    for label, cmd in commands:
        start = time.perf_counter()
        subprocess.run(shlex.split(cmd.replace("python ", f"{sys.executable} ", 1)), cwd=root,
                       check=True, stdout=subprocess.DEVNULL)
        rows.append({"stage": label, "seconds": time.perf_counter() - start})
        print(f"{label:22s} {rows[-1]['seconds']:7.1f} s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv_dir", type=Path)
    ap.add_argument("--epochs", type=int, default=1, help="epochs per model each way")
    ap.add_argument("--models", default="", help="comma-separated names (default: all)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--path", default="fast", choices=("fast", "eager"))
    ap.add_argument("--pipeline", action="store_true", help="time the stages after convert")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = training.pick_device(args.device)
    # The project's training flushes subnormal floats and uses one thread on the CPU (see
    # aebench/training.py); do the same for the seed-style loop, so the table compares loops.
    torch.set_flush_denormal(True)
    if device.type == "cpu":
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    info = {"device": str(device), "device_name": name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cores": os.cpu_count(),
            "usable_cores": workers.usable_cores(), "load1_before": os.getloadavg()[0]}
    print(f"# device {device} ({name}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    if args.pipeline:
        start = time.perf_counter()
        rows = time_pipeline(ROOT)
        result = {**info, "mode": "pipeline", "stages": rows,
                  "total_seconds": time.perf_counter() - start}
        print(f"{'total':22s} {result['total_seconds']:7.1f} s")
    else:
        params = config.load_params(ROOT / "params.yaml")
        train = config.section(params, "train", config.Train)
        seed = train.seed
        cfgs = kinds.read_models(params)
        chosen = args.models.split(",") if args.models else list(params["models"])
        _, train_pixels = data.read_mnist_csv(args.csv_dir / "mnist_train.csv")
        _, test_pixels = data.read_mnist_csv(args.csv_dir / "mnist_test.csv")
        test_x = torch.from_numpy(test_pixels)
        print("| model | epochs | batch | MFLOP/image | seed-style s/epoch | ours s/epoch | "
              "speed-up | seed-style GFLOP/s | ours GFLOP/s | ours CPU s/epoch | ours GFLOP "
              "per CPU s | seed-style test MSE | ours test MSE |\n" + "|---" * 13 + "|",
              flush=True)
        rows = []
        for model_name in chosen:
            cfg = cfgs[model_name].model_copy(update={"epochs": args.epochs})
            r = benchmark_model(model_name, cfg, train_pixels, test_x, device, seed, args.path)
            rows.append(r)
            print(f"| {model_name} | {r['epochs']} | {r['batch_size']} | "
                  f"{r['flops_per_image'] / 1e6:.2f} | "
                  f"{r['seed_style_s_per_epoch']:.2f} | {r['ours_s_per_epoch']:.3f} | "
                  f"{r['speedup']:.1f}x | {r['seed_style_gflops']:.1f} | "
                  f"{r['ours_gflops']:.1f} | {r['ours_cpu_s_per_epoch']:.3f} | "
                  f"{r['ours_gflops_per_cpu_s']:.1f} | {r['seed_style_test_mse']:.5f} | "
                  f"{r['ours_test_mse']:.5f} |", flush=True)
        auto = workers.count(0, train.replicas, device)
        hours = {k: stage_hours(rows, cfgs, train.replicas, k)
                 for k in range(1, train.replicas + 1)}
        print(f"# replicas: {train.replicas} per model; train.workers auto starts {auto} here "
              f"({info['usable_cores']} usable cores); the train stages of the default params "
              "would take " + ", ".join(f"{h:.2f} h on {k} core(s)" for k, h in hours.items())
              + " (the models benchmarked, from these s/epoch)")
        result = {**info, "mode": "train", "epochs": args.epochs, "path": args.path,
                  "replicas": train.replicas, "auto_workers": auto,
                  "train_stage_hours_on_k_cores": hours, "models": rows}
    result["load1_after"] = os.getloadavg()[0]
    out = args.out or ROOT / "benchmarks" / "results" / (
        f"{'pipeline' if args.pipeline else 'train_speed'}-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# written {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")


if __name__ == "__main__":
    main()
