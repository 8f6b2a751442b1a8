"""Replicas in worker processes on the CPU: a train stage with train.workers 1 against auto, and
what one worker holds in memory.

    python benchmarks/workers.py data/csv ab [--model under30] [--rounds 2]
    python benchmarks/workers.py data/csv memory [--models a,b] [--epochs 1]

`ab` runs the real stage (`python -m stages.train NAME ...`, its own interpreter and outputs
in a scratch folder, one MLflow store for all runs) with train.workers 1 and 0 (auto)
alternately, A B then B A, so that a burst of load hits both alike; it reports each wall time,
the ratio of the medians, the CPU seconds of the stage and its workers, the load average around
each run, and whether every run wrote the same bytes; each invocation's result is added to the
earlier ones.
`memory` trains two replicas of each model (1 epoch, the full data) in two workers and reports
each worker's peak resident memory (VmHWM: with what it shares with the stage, torch's libraries
and the images) and the most memory of its own (that peak less what it shared at the fork).
Results go to benchmarks/results/workers-cpu.json.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aebench import config, constants, data, kinds, tracking, workers  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "workers-cpu.json"
MIB = 2**20


def run_stage(scratch: Path, csv_dir: Path, name: str, n_workers: int, epochs: int | None,
              limit: int | None) -> tuple[float, float, Path]:
    """One `python -m stages.train` in its own folder of `scratch`, recording into the MLflow
    store `scratch`/mlflow.db; (seconds, CPU seconds of the stage and its workers, folder)."""
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix=f"w{n_workers}-"))
    params = config.load_params(ROOT / "params.yaml")
    params["train"]["workers"] = n_workers
    if epochs:
        params["models"][name]["epochs"] = epochs
    if limit:
        params["train"]["limit"] = limit
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": store_uri(scratch)}
    cmd = [sys.executable, "-m", "stages.train", name, str(csv_dir.resolve()),
           f"models/{name}", f"curves/{name}.csv"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(f"workers={n_workers}: the stage failed:\n{proc.stderr[-2000:]}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return seconds, cpu, folder


def store_uri(scratch: Path) -> str:
    return f"sqlite:///{scratch}/mlflow.db"


def same_outputs(a: Path, b: Path, name: str) -> bool:
    files = [f"curves/{name}.csv", *(f"models/{name}/{p.name}"
                                     for p in sorted((a / "models" / name).iterdir()))]
    return all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def ab(csv_dir: Path, name: str, rounds: int, epochs: int | None, limit: int | None,
       other: int) -> dict:
    """train.workers 1 against `other` (0: auto) for model `name`, at its own size or at
    `epochs` epochs on the first `limit` training images."""
    params = config.load_params(ROOT / "params.yaml")
    cfg = kinds.read_model(params, name)
    epochs = epochs or cfg.epochs
    replicas = cfg.replicas or config.section(params, "train", config.Train).replicas
    auto = workers.count(other, replicas, torch.device("cpu"), epochs * (limit or 60_000))
    runs, first = [], None
    with tempfile.TemporaryDirectory(prefix="aebench-workers-") as scratch:
        # One store for every run, created first, as a working copy has it (creating one
        # takes seconds that no run should pay)
        os.environ["MLFLOW_TRACKING_URI"] = store_uri(Path(scratch))
        tracking.open_store()
        for i in range(rounds):
            for n in ((1, other) if i % 2 == 0 else (other, 1)):
                load = os.getloadavg()[0]
                seconds, cpu, folder = run_stage(Path(scratch), csv_dir, name, n, epochs, limit)
                same = True if first is None else same_outputs(first, folder, name)
                first = first or folder
                runs.append({"workers": n if n == 1 else f"{n or 'auto'} ({auto})",
                             "seconds": seconds,
                             "cpu_seconds": cpu, "load1_before": load,
                             "load1_after": os.getloadavg()[0], "same_bytes_as_first": same})
                print(f"train@{name} workers {runs[-1]['workers']}: {seconds:6.1f} s, "
                      f"{cpu:6.1f} CPU s (load {load:.1f} -> {runs[-1]['load1_after']:.1f}), "
                      f"same bytes: {same}", flush=True)
    one = statistics.median(r["seconds"] for r in runs if r["workers"] == 1)
    many = statistics.median(r["seconds"] for r in runs if r["workers"] != 1)
    print(f"median: workers 1 {one:.1f} s, {other or 'auto'} ({auto}) {many:.1f} s: ratio "
          f"{many / one:.2f}")
    return {"model": name, "replicas": replicas, "epochs": epochs, "limit": limit or 0,
            "asked": other, "workers": auto,
            "runs": runs, "median_seconds_workers_1": one, "median_seconds_b": many,
            "ratio_b_over_1": many / one}


def memory(csv_dir: Path, names: list[str], epochs: int) -> list[dict]:
    params = config.load_params(ROOT / "params.yaml")
    _, train_x = data.read_mnist_csv(csv_dir / constants.CSV_NAMES["train"])
    _, test_x = data.read_mnist_csv(csv_dir / constants.CSV_NAMES["test"])
    rows = []
    for name in names:
        cfg = kinds.read_model(params, name).model_copy(update={"epochs": epochs})
        with workers.Replicas(cfg, train_x, test_x, name=name, seeds=[0, 1],
                              device=torch.device("cpu"), path="fast", workers=2) as pool:
            for r in range(2):
                pool.result(r)
            peaks = list(pool.peaks)
        rows.append({"model": name, "peak_resident_mib": max(p[0] for p in peaks) / MIB,
                     "own_peak_mib": max(p[1] for p in peaks) / MIB})
        print(f"{name:11s} peak resident {rows[-1]['peak_resident_mib']:6.0f} MiB, its own at "
              f"its peak {rows[-1]['own_peak_mib']:6.0f} MiB", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv_dir", type=Path)
    ap.add_argument("what", choices=("ab", "memory"))
    ap.add_argument("--model", default="under30", help="ab: the model whose stage is run")
    ap.add_argument("--rounds", type=int, default=2, help="ab: rounds of (1, B) pairs")
    ap.add_argument("--workers", type=int, default=0, help="ab: B's train.workers (0: auto)")
    ap.add_argument("--limit", type=int, default=0, help="ab: train.limit (0: all images)")
    ap.add_argument("--ab-epochs", type=int, default=0, help="ab: the model's epochs")
    ap.add_argument("--models", default="", help="memory: comma-separated (default: all)")
    ap.add_argument("--epochs", type=int, default=1, help="memory: epochs per replica")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    result = json.loads(args.out.read_text()) if args.out.exists() else {}
    result.update({"device": "cpu", "cores": os.cpu_count(),
                   "usable_cores": workers.usable_cores(), "torch": torch.__version__})
    if args.what == "ab":
        # every invocation's runs are kept: on a shared machine one alone says little
        run = ab(args.csv_dir, args.model, args.rounds, args.ab_epochs, args.limit, args.workers)
        result["ab"] = [*result.get("ab", []), {"when": time.strftime("%Y-%m-%d %H:%M"), **run}]
    else:
        names = args.models.split(",") if args.models else list(
            config.load_params(ROOT / "params.yaml")["models"])
        load = os.getloadavg()[0]
        result["memory"] = {"epochs": args.epochs, "load1_before": load,
                            "models": memory(args.csv_dir, names, args.epochs),
                            "load1_after": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"# written {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
