"""Time of logging one replica's model (aebench.tracking.log_replica_model) for code trees side
by side, e.g. before and after a change of the logged format.

    python benchmarks/log_model.py [--tree LABEL=DIR ...] [--model deep3] [--calls 7]
        [--rounds 3] [--out benchmarks/results/log_model.json]

Per tree and round, a fresh process (the tree's aebench first on sys.path, its params.yaml in a
scratch folder, a fresh sqlite store there) warms up as the warm server does before it forks a
stage (aebench.warm: a throwaway model saved outside any store), then logs model --model, built
from the tree's params.yaml, --calls times in one replica run, timing each call. The trees are
interleaved round by round. Reported per tree: the median of all calls, and of each round's
first call (what a warm train stage's first replica pays).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time, tempfile
tree, model, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path.insert(0, tree)
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{os.getcwd()}/mlflow.db"
from aebench import config, kinds, tracking
import mlflow, torch
try:  # the tree's warm server's warm-up
    from aebench.tracking.models import warm_up
except ImportError:  # before: a pickled throwaway module
    import mlflow.pytorch
    def warm_up():
        with tempfile.TemporaryDirectory() as tmp:
            mlflow.pytorch.save_model(torch.nn.Linear(1, 1), f"{tmp}/model",
                                      serialization_format="pickle", pip_requirements=["torch"])
warm_up()
cfg = kinds.read_model(config.load_params(), model)
experiment = tracking.open_store()
times = []
with tracking.training_run(experiment, model, {}):
    with tracking.replica_run(model, 0, seed=0):
        net = cfg.build()
        for i in range(calls):
            start = time.perf_counter()
            tracking.log_replica_model(net, name=model, index=0, pixels=cfg.pixels,
                                       weights_sha256=f"{i:064x}")
            times.append(time.perf_counter() - start)
print(json.dumps(times))
"""


def run(tree: Path, model: str, calls: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="log-model-") as tmp:
        shutil.copy(tree / "params.yaml", tmp)
        done = subprocess.run([sys.executable, "-c", CHILD, str(tree), model, str(calls)],
                              cwd=tmp, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{tree}: {done.stderr.strip().splitlines()[-1]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    parser.add_argument("--model", default="deep3")
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    trees = dict(t.split("=", 1) for t in args.tree) or {"this": str(ROOT)}
    times: dict[str, list[list[float]]] = {label: [] for label in trees}
    for _ in range(args.rounds):
        for label, tree in trees.items():
            times[label].append(run(Path(tree).resolve(), args.model, args.calls))
    result = {"model": args.model, "calls": args.calls, "rounds": args.rounds,
              "machine": f"{platform.processor() or platform.machine()}, "
                         f"{len(__import__('os').sched_getaffinity(0))} usable cores",
              "trees": {}}
    for label, rounds in times.items():
        every = [t for r in rounds for t in r]
        result["trees"][label] = {"median_s": round(statistics.median(every), 3),
                                  "first_call_median_s":
                                      round(statistics.median(r[0] for r in rounds), 3),
                                  "calls_s": [[round(t, 3) for t in r] for r in rounds]}
        print(f"{label}: median {statistics.median(every):.3f} s per call, first call "
              f"{statistics.median(r[0] for r in rounds):.3f} s (median of {args.rounds})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
