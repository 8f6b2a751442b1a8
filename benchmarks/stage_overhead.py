"""Fixed cost per stage: where each stage's time goes at smoke size, for one or more code trees
side by side (before and after a change).

    python benchmarks/stage_overhead.py CSV_DIR [--tree LABEL=DIR ...] [--repeats 3]
        [--stages GLOB,...] [--limit 3000] [--epochs 1] [--replicas 1] [--server]
        [--smoke N] [--again K] [--out benchmarks/results/stage_overhead.json]

Per tree (default: this working copy, labelled `this`) a scratch project is made as `make
smoke` makes one (aebench.smoke: the tree's files without results, params sliced to --limit
images, --epochs, --replicas), with data/csv linked to CSV_DIR and its own mlflow.db. Then,
--repeats times, every stage command of the tree's dvc.yaml after `convert` runs under
benchmarks/stage_probe.py, the trees interleaved stage by stage so that a burst of load hits
all alike. Each run gives its wall time (spawn to exit, seen from here) and its parts:
startup (interpreter up to the stage's first import), import, store (opening the MLflow store),
first_use (the first optimizer), compute (training, evaluation, PCA, drawing), mlflow (runs,
metrics, logged models), read (params, CSV, checkpoints), write (outputs), at_exit (from
main's return through joining threads and the atexit handlers), teardown (the interpreter's
finalization, up to the process's end) and other. The table shows medians; `fixed` is
wall - compute.

--server adds, per tree, a variant whose stages talk to a local `mlflow server` (sqlite
backend, artifacts through the server, as docs/pipeline.md starts one) instead of opening the
sqlite file themselves. --smoke N runs `python -m
aebench.smoke` of each tree N times, interleaved (the whole pipeline by `dvc repro`, with
download and convert; needs MNIST_MIRROR), then one-model experiments in each smoke copy
(`dvc exp run -S models.under30.epochs=2`: train@under30, score@under30, evaluate, figures,
report; then --again K times the same with another learning rate each time). The first starts
cold (the smoke run's warm server has the smoke's environment), the others find the server the
first started, as the next run of the edit-run loop does (experiment_s; experiment_again_s,
the median of the K). A `python` first in PATH during the
experiments times each stage command DVC runs (experiment_stages_s, experiment_again_stages_s):
the issue's own count, the stages without DVC's bookkeeping and with nothing of the probe's.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "stage_probe.py"
PARTS = ("startup", "import", "store", "first_use", "compute", "mlflow", "read", "write",
         "at_exit", "teardown", "other")
SKIP = ("download", "convert")  # real work on the full data, not fixed cost
EXPERIMENT = ["dvc", "exp", "run", "-S", "models.under30.epochs=2"]


def again_argv(k: int) -> list[str]:
    """The k-th warm repeat of the experiment: another learning rate each time (a new
    experiment, not DVC's run cache)."""
    return [*EXPERIMENT, "-S", f"models.under30.optimizer.lr={0.002 + 0.0001 * k:g}"]


@dataclass
class Variant:
    label: str
    tree: Path
    server: bool = False
    cold: bool = False  # AEBENCH_WARM=0: a tree with aebench.warm runs each stage on its own
    project: Path | None = None
    env: dict = field(default_factory=dict)
    server_proc: subprocess.Popen | None = None


def stage_commands(project: Path) -> list[tuple[str, list[str]]]:
    """(stage name, argv after `python -m`) for every stage after convert, as DVC runs them."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    models = yaml.safe_load((project / "params.yaml").read_text())["models"]
    out = []
    for name, stage in stages.items():
        if name in SKIP:
            continue
        if "foreach" in stage:
            out += [(f"{name}@{key}", shlex.split(stage["do"]["cmd"].replace("${key}", key)))
                    for key in models]
        else:
            out.append((name, shlex.split(stage["cmd"])))
    for name, argv in out:
        if argv[:2] != ["python", "-m"]:
            raise SystemExit(f"{name}: command {' '.join(argv)!r} is not `python -m ...`")
    return [(name, argv[2:]) for name, argv in out]


def is_warm(argv: list[str]) -> bool:
    """Whether the command goes through aebench.warm (`python -m aebench.warm stages.X ...`)."""
    return argv[0] == "aebench.warm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(v: Variant, work: Path, csv_dir: Path, limit: int, epochs: int, replicas: int,
            base_env: dict) -> None:
    # the tree's own copy function: what its `make smoke` would copy
    code = ("import sys; from pathlib import Path; from aebench.smoke import copy_repo, "
            "slice_params; d = Path(sys.argv[1]); copy_repo(d); slice_params(d / "
            "'params.yaml', limit=int(sys.argv[2]), epochs=int(sys.argv[3]), "
            "replicas=int(sys.argv[4]))")
    v.project = work / v.label
    v.project.mkdir(parents=True)
    subprocess.run([sys.executable, "-c", code, str(v.project), str(limit), str(epochs),
                    str(replicas)], cwd=v.tree, check=True, env=base_env)
    (v.project / "data").mkdir(exist_ok=True)
    (v.project / "data" / "csv").symlink_to(csv_dir.resolve())
    # one of the project's stages there: what aebench.warm runs (this tree's runs nothing else)
    shutil.copy(PROBE, v.project / "stages" / PROBE.name)
    v.env = {**base_env, "STAGE_PROBE_OUT": str(v.project / ".probe.json")}
    if v.cold:
        v.env["AEBENCH_WARM"] = "0"
    if v.server:
        port = free_port()
        v.server_proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{v.project}/mlflow.db",
             "--artifacts-destination", str(v.project / "mlartifacts"),  # as docs/pipeline.md
             "--workers", "1"], cwd=v.project, env=base_env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or v.server_proc.poll() is not None:
                    raise SystemExit(f"{v.label}: mlflow server did not start") from None
                time.sleep(0.5)
        v.env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{port}"


def probe(v: Variant, stage: str, argv: list[str]) -> dict:
    """One run of the stage under the probe, as its dvc.yaml command runs it: `python -m
    stages.X` under benchmarks/stage_probe.py, or through aebench.warm (the probe, copied into
    the project's stages/, is then the stage the server's fork runs; the server is started,
    untimed, before)."""
    out = Path(v.env["STAGE_PROBE_OUT"])
    out.unlink(missing_ok=True)
    warm = is_warm(argv)
    if warm:
        cmd = [sys.executable, "-m", "aebench.warm", f"stages.{PROBE.stem}", *argv[1:]]
        if not v.cold:
            subprocess.run([sys.executable, "-m", "aebench.warm", "--start"], cwd=v.project,
                           env=v.env, check=True, stdout=subprocess.DEVNULL)
    else:
        cmd = [sys.executable, str(PROBE), *argv]
    load = os.getloadavg()[0]
    cpu_before, start = children_cpu(), time.monotonic()
    proc = subprocess.run(cmd, cwd=v.project, env=v.env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end, cpu_total = time.monotonic(), children_cpu() - cpu_before
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{v.label}: {stage}: exit {proc.returncode}: {tail}")
    rec = json.loads(out.read_text())
    forked = warm and not v.cold  # its CPU is the server's child's, not ours: add it
    if forked:
        cpu_total += rec["cpu_handlers_done"]
    parts = {**rec["parts"], "startup": rec["start"] - start,
             "at_exit": rec["handlers_done"] - rec["end"], "teardown": end - rec["handlers_done"]}
    cpu = {**rec["cpu"], "startup": rec["cpu_start"],
           "at_exit": rec["cpu_handlers_done"] - rec["cpu_end"],
           "teardown": cpu_total - rec["cpu_handlers_done"]}
    return {"variant": v.label, "stage": stage, "wall": end - start, "load_1min": load,
            "forked": forked, "cpu_total": round(cpu_total, 4),
            "parts": {p: round(parts.get(p, 0.0), 4) for p in PARTS},
            "cpu": {p: round(cpu.get(p, 0.0), 4) for p in PARTS},
            "imports": {k: round(t, 4) for k, t in sorted(rec["imports"].items(),
                                                          key=lambda kv: -kv[1]) if t >= 0.01}}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def summarize(runs: list[dict]) -> dict:
    """Per variant and stage: medians of wall, fixed (wall - compute) and each part, the same
    in CPU seconds under "cpu", and the imports by package; and a "total" row per variant."""
    by: dict = {}
    for r in runs:
        by.setdefault(r["variant"], {}).setdefault(r["stage"], []).append(r)
    median = statistics.median
    summary = {}
    for label, stages in by.items():
        rows = {}
        for stage, rs in stages.items():
            row = {"wall": median(r["wall"] for r in rs),
                   "fixed": median(r["wall"] - r["parts"]["compute"] for r in rs),
                   **{p: median(r["parts"][p] for r in rs) for p in PARTS}}
            row = {k: round(t, 3) for k, t in row.items()}
            row["cpu"] = {k: round(t, 3) for k, t in {
                "total": median(r["cpu_total"] for r in rs),
                "fixed": median(r["cpu_total"] - r["cpu"]["compute"] for r in rs),
                **{p: median(r["cpu"][p] for r in rs) for p in PARTS}}.items()}
            keys = {k for r in rs for k in r["imports"]}
            imports = {k: median(r["imports"].get(k, 0.0) for r in rs) for k in keys}
            row["imports"] = {k: round(t, 3) for k, t in sorted(
                imports.items(), key=lambda kv: -kv[1]) if t >= 0.05}
            rows[stage] = row
        stage_rows = list(rows.values())
        rows["total"] = {k: round(sum(r[k] for r in stage_rows), 3)
                         for k in ("wall", "fixed", *PARTS)}
        rows["total"]["cpu"] = {k: round(sum(r["cpu"][k] for r in stage_rows), 3)
                                for k in ("total", "fixed", *PARTS)}
        summary[label] = rows
    return summary


def print_table(summary: dict) -> None:
    cols = ("wall", "fixed", *PARTS)
    stages = list(next(iter(summary.values())))
    for title, get in (("seconds", lambda row: row),
                       ("CPU seconds (total in the wall column)",
                        lambda row: {**row["cpu"], "wall": row["cpu"]["total"]})):
        print(f"{title}, medians:")
        print(f"{'stage':18s} {'variant':14s} " + " ".join(f"{c[:8]:>8s}" for c in cols))
        for stage in stages:
            for label, rows in summary.items():
                if stage in rows:
                    row = get(rows[stage])
                    print(f"{stage:18s} {label:14s} " + " ".join(f"{row[c]:8.2f}" for c in cols))
    for label, rows in summary.items():
        for stage, row in rows.items():
            if row.get("imports"):
                print(f"imports {stage} {label}: " + ", ".join(
                    f"{k} {t:.2f}" for k, t in row["imports"].items()))


def timed_run(argv: list[str], cwd: Path, env: dict) -> float:
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{' '.join(argv)} in {cwd}: exit {proc.returncode}: {tail}")
    return time.monotonic() - start


def timed_stages(argv: list[str], cwd: Path, env: dict, shim: Path) -> tuple[float, dict]:
    """timed_run, plus the wall time of each stage command DVC ran (by the `python` of shim/,
    first in PATH: it runs the real one and notes the stage's start and end)."""
    log = shim / "stages.log"
    log.unlink(missing_ok=True)
    wall = timed_run(argv, cwd, {**env, "PATH": f"{shim}{os.pathsep}{env['PATH']}"})
    stages = {}
    for line in log.read_text().splitlines():
        start, end, *args = line.split()
        stage = next(a for a in args if a.startswith("stages."))
        stages[stage.removeprefix("stages.")] = round(float(end) - float(start), 2)
    return wall, stages


def make_shim(work: Path) -> Path:
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    # `python -m aebench.warm stages.X ...` (or, in older trees, `python -m stages.X ...`)
    (shim / "python").write_text(f"""#!/bin/sh
start=$(date +%s.%N)
{shlex.quote(sys.executable)} "$@"
rc=$?
echo "$start $(date +%s.%N) $2 $3" >> {shlex.quote(str(shim / "stages.log"))}
exit $rc
""")
    (shim / "python").chmod(0o755)
    return shim


def smoke(variants: list[Variant], work: Path, n: int, env: dict, rows: list, save,
          again_n: int = 1) -> None:
    """`python -m aebench.smoke` of each tree, then the one-model experiment in its copy: once
    cold, then `again_n` times warm (medians in experiment_again_*, each in
    experiment_again_runs)."""
    if not env.get("MNIST_MIRROR"):
        raise SystemExit("--smoke: set MNIST_MIRROR (the smoke run downloads MNIST from it)")
    shim = make_shim(work)
    for i in range(n):
        for v in (v for v in variants if not v.server):
            copy = work / f"smoke-{v.label}"
            load = os.getloadavg()[0]
            run_env = {**env, "AEBENCH_WARM": "0"} if v.cold else env
            wall = timed_run([sys.executable, "-m", "aebench.smoke", str(copy)], v.tree, run_env)
            # not the smoke run's warm server: that one has the smoke's environment (its own
            # MLflow store), so the first experiment's first stage starts cold
            exp, exp_stages = timed_stages(EXPERIMENT, copy, run_env, shim)
            runs = [timed_stages(again_argv(k), copy, run_env, shim) for k in range(again_n)]
            again = statistics.median(wall for wall, _ in runs)
            again_stages = {stage: round(statistics.median(t[stage] for _, t in runs), 2)
                            for stage in runs[0][1]}
            subprocess.run([sys.executable, "-m", "aebench.warm", "--stop"], cwd=copy,
                           env=run_env, capture_output=True)  # a tree without it: an error
            rows.append({"variant": v.label, "repeat": i, "smoke_s": round(wall, 2),
                         "experiment_s": round(exp, 2), "experiment_again_s": round(again, 2),
                         "experiment_stages_s": exp_stages,
                         "experiment_again_stages_s": again_stages, "load_1min": load,
                         "experiment_again_runs": [{"wall": round(w, 2), "stages": t,
                                                    "total": round(sum(t.values()), 2)}
                                                   for w, t in runs]})
            print(f"smoke {v.label}: {wall:.1f} s; one-model experiment {exp:.1f} s, "
                  f"again {again:.1f} s (its stage commands: "
                  + ", ".join(f"{k} {t:.2f}" for k, t in again_stages.items())
                  + f"; load {load:.2f})", flush=True)
            save()


def commit_of(tree: Path) -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=tree, capture_output=True,
                           text=True).stdout.strip()
    return proc.stdout.strip() + ("+uncommitted" if dirty else "")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv_dir", type=Path)
    ap.add_argument("--tree", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--cold", action="append", default=[], metavar="LABEL=DIR",
                    help="a tree with AEBENCH_WARM=0: each stage in a process of its own")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stages", default="*", help="comma-separated globs (train@*,evaluate)")
    ap.add_argument("--limit", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--server", action="store_true", help="also each tree with an mlflow server")
    ap.add_argument("--smoke", type=int, default=0, metavar="N")
    ap.add_argument("--again", type=int, default=1, metavar="K",
                    help="warm repeats of the one-model experiment per smoke run (medians)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch projects")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/stage_overhead.json")
    args = ap.parse_args(argv)
    if not (args.csv_dir / "mnist_train.csv").is_file():
        raise SystemExit(f"{args.csv_dir}: no mnist_train.csv (run `dvc repro convert`)")
    trees = [t.split("=", 1) for t in args.tree] or [["this", str(ROOT)]]
    variants = [Variant(label, Path(tree).resolve()) for label, tree in trees]
    variants += [Variant(label, Path(tree).resolve(), cold=True)
                 for label, tree in (t.split("=", 1) for t in args.cold)]
    if args.server:
        variants += [Variant(f"{v.label}+server", v.tree, server=True) for v in variants]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    work = Path(tempfile.mkdtemp(prefix="stage_overhead-"))
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").open()
                if line.startswith("model name")), platform.machine())
    result = {"device": "cpu", "cpu": cpu, "cores": os.cpu_count(),
              "python": platform.python_version(),
              **{p: metadata.version(p) for p in ("torch", "mlflow", "dvc")},
              "limit": args.limit, "epochs": args.epochs, "replicas": args.replicas,
              "repeats": args.repeats, "loadavg_before_after": [os.getloadavg()],
              "variants": [{"label": v.label, "tree": str(v.tree), "commit": commit_of(v.tree),
                            "server": v.server, "cold": v.cold} for v in variants],
              "summary": {}, "smoke": [], "runs": []}

    def save() -> None:  # after each part, so that a later failure loses nothing measured
        result["loadavg_before_after"][1:] = [os.getloadavg()]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")

    runs = result["runs"]
    try:
        for v in variants:
            prepare(v, work, args.csv_dir, args.limit, args.epochs, args.replicas, env)
        commands = {v.label: dict(stage_commands(v.project)) for v in variants}
        order = [s for s in commands[variants[0].label]
                 if any(fnmatch.fnmatch(s, g) for g in args.stages.split(","))]
        for i in range(args.repeats):
            for stage in order:
                for v in variants:
                    if stage in commands[v.label]:
                        runs.append({"repeat": i, **probe(v, stage, commands[v.label][stage])})
                        r = runs[-1]
                        print(f"[{i + 1}/{args.repeats}] {stage:18s} {v.label:14s} "
                              f"{r['wall']:6.2f} s (compute {r['parts']['compute']:.2f}, "
                              f"load {r['load_1min']:.2f})", flush=True)
        if runs:
            result["summary"] = summarize(runs)
            print_table(result["summary"])
        save()
        if args.smoke:
            smoke(variants, work, args.smoke, env, result["smoke"], save, args.again)
    finally:
        for v in variants:
            if v.server_proc:
                v.server_proc.terminate()
                v.server_proc.wait()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    load = result["loadavg_before_after"]
    print(f"load average (1 min) before {load[0][0]:.2f}, after {load[1][0]:.2f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    main()
