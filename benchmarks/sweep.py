"""A 4-configuration sweep at smoke size: `aebench sweep` on a local 2-node Ray cluster against
the same 4 through `dvc queue start -j 2` on one host.

    unshare --net sh -c 'ip link set lo up && exec python benchmarks/sweep.py \\
        [--out benchmarks/results/sweep.json]'

Needs root for `unshare --net` (Ray on loopback only), PostgreSQL, $MNIST_MIRROR and the
`sweep` extra. A scratch project as `make smoke` makes one (every model, 3,000 images,
1 epoch, 1 replica), with a bare git remote and a folder DVC remote, its base run pushed; one
`aebench mlflow-server` that both sides log to. Then:

- sweep: a Ray cluster of a head with no CPUs and two 1-CPU nodes (ray.cluster_utils), and
  `aebench sweep` of 4 learning rates of deep3: wall time, and each configuration's clone,
  run (`dvc exp run --pull`) and push (data, refs, the check), as the driver prints them;
- queue: 4 other learning rates (nothing cached) as `dvc exp run --queue`, then
  `dvc queue start -j 2` in the project itself: wall time until the queue is empty.

Both sides re-run train@deep3, score@deep3, evaluate, figures and report per configuration. The
machine's load average is recorded beside: the numbers are from whatever else the machine ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from sweep_servers import private_temp, start_server, stop  # noqa: E402

from aebench.smoke import copy_repo, slice_params  # noqa: E402

SWEEP_LRS = [2.0e-3, 1.5e-3, 7.0e-4, 5.0e-4]
QUEUE_LRS = [2.5e-3, 1.2e-3, 8.0e-4, 6.0e-4]


def run(args, cwd, env=None) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, args))}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def setup(base: Path, env: dict) -> Path:
    proj = base / "proj"
    proj.mkdir()
    copy_repo(proj)
    slice_params(proj / "params.yaml", limit=3000, epochs=1, replicas=1)
    run(["git", "init", "-q", "--bare", str(base / "git.git")], base)
    run(["git", "remote", "add", "origin", str(base / "git.git")], proj)
    run(["dvc", "remote", "add", "-d", "store", str(base / "dvc-remote")], proj, env)
    run(["dvc", "repro", "--quiet"], proj, env)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "base at smoke size"], proj)
    run(["dvc", "push", "--run-cache", "--quiet"], proj, env)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], proj)
    return proj


def sweep_side(base: Path, proj: Path, env: dict) -> dict:
    from ray.cluster_utils import Cluster

    spec = base / "bench.yaml"
    spec.write_text(yaml.safe_dump({"name": "bench",
                                    "grid": {"models.deep3.optimizer.lr": SWEEP_LRS}}))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "aebench", "sweep", str(spec),
                               "--address", cluster.address], cwd=proj, env=env,
                              capture_output=True, text=True)
        wall = time.monotonic() - start
        out = proc.stderr
    finally:
        cluster.shutdown()
    steps = ("clone", "pull", "run", "push")
    configs = [dict(zip(steps, map(float, m))) for m in re.findall(
        r"\(clone ([\d.]+) s, pull ([\d.]+) s, run ([\d.]+) s, push ([\d.]+) s\)", out)]
    return {"wall_s": round(wall, 1), "configs": configs,
            "mean_s": {k: round(sum(c[k] for c in configs) / len(configs), 1)
                       for k in steps} if configs else None,
            "exit": proc.returncode, "stderr": proc.stderr.splitlines(),
            "stdout": proc.stdout.splitlines()}


def queue_side(proj: Path, env: dict) -> dict:
    for lr in QUEUE_LRS:
        run(["dvc", "exp", "run", "--queue", "-S", f"models.deep3.optimizer.lr={lr}"], proj,
            env)
    start = time.monotonic()
    run(["dvc", "queue", "start", "-j", "2"], proj, env)
    while True:
        status = run(["dvc", "queue", "status"], proj, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        time.sleep(2)
    wall = time.monotonic() - start
    subprocess.run(["dvc", "queue", "stop"], cwd=proj, env=env, capture_output=True)
    return {"wall_s": round(wall, 1), "done": status.count("Success"),
            "failed": status.count("Failed"), "status": status.splitlines()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/sweep.json")
    args = parser.parse_args()
    base = private_temp("aebench-bench-sweep-")
    py = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{py}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{base}/base-mlflow.db"}
    server = None
    try:
        start = time.monotonic()
        proj = setup(base, env)
        setup_s = time.monotonic() - start
        server = start_server(base / "srv", 5124)
        env["MLFLOW_TRACKING_URI"] = server.url
        load_before = os.getloadavg()
        swept = sweep_side(base, proj, env)
        queued = queue_side(proj, env)
        result = {"machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                              "load_avg_before": load_before,
                              "load_avg_after": os.getloadavg()},
                  "setup_s": round(setup_s, 1), "configurations": 4,
                  "sweep_2_nodes": swept, "dvc_queue_j2": queued}
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({k: v for k, v in result.items()}, indent=1)[:4000])
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
