"""`aebench sweep SPEC.yaml`: every configuration of a SPEC as one DVC experiment, one Ray task
each, on the Ray cluster that RAY_ADDRESS (or --address) names, or a local Ray without one.

Before anything is submitted it refuses, with one line each: a SPEC key that is not a
params.yaml key or a value the pipeline's validation refuses; uncommitted changes or a HEAD
that is not on the git remote (workers clone from there); an MLflow store that the cluster's
other nodes cannot reach (a sqlite or file store while the cluster has more than one node).
It creates the sweep's MLflow experiment once and hands its id to every worker, skips the
configurations whose experiment is on the git remote already (a re-run resumes), prints its
progress, and ends with one table, best first: each configuration against the base commit
(aebench.sweep.report).

exit codes: 0 every configuration done; 1 some failed (each named, with why); 2 an error
(one line), nothing submitted; 130 interrupted (Ctrl-C: a re-run resumes).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import stats
from . import spec as specs
from .progress import Progress, collect
from .worker import CREDENTIALS, Job, Result, exp_ref

EXPERIMENT_PREFIX = "aebench-sweep-"
NODE_RETRIES = 3       # Ray runs a task again this often when its node dies


class SweepError(RuntimeError):
    """The sweep cannot start; str() is the one line."""


def git(root: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        raise SweepError(f"git {' '.join(args)}: {lines[-1]}")
    return proc.stdout


def base_commit(root: Path, remote: str) -> tuple[str, str]:
    """(HEAD's commit, the remote's URL): HEAD clean and on the remote, or SweepError."""
    dirty = git(root, "status", "--porcelain", "--untracked-files=no").splitlines()
    if dirty:
        raise SweepError(f"{root}: uncommitted changes ({dirty[0][3:]}"
                         f"{f' and {len(dirty) - 1} more' if len(dirty) > 1 else ''}); commit "
                         f"and push them: workers clone from the git remote {remote}")
    commit = git(root, "rev-parse", "HEAD").strip()
    url = git(root, "remote", "get-url", remote).strip()
    if "://" not in url and ":" not in url.split("/")[0] and not Path(url).is_absolute():
        url = str((root / url).resolve())  # a relative path: as every worker must read it
    git(root, "fetch", "--quiet", remote)
    if not git(root, "for-each-ref", "--contains", commit, f"refs/remotes/{remote}/").strip():
        raise SweepError(f"HEAD {commit[:12]} is not on the git remote {remote} ({url}); push "
                         "it first: workers clone from there")
    return commit, url


def remote_experiments(root: Path, remote: str, commit: str) -> dict[str, str]:
    """name -> commit of every experiment of base `commit` on the git remote."""
    prefix = exp_ref(commit, "")
    out = git(root, "ls-remote", remote, f"{prefix}*")
    return {ref.removeprefix(prefix): sha for sha, ref in
            (line.split("\t") for line in out.splitlines() if "\t" in line)}


def is_local_store(uri: str) -> bool:
    return urlsplit(uri).scheme in ("", "file", "sqlite")


def make_experiment(uri: str, name: str, commit: str) -> str:
    """The sweep's MLflow experiment (created once, here, never by the workers: concurrent
    `set_experiment` calls put runs in Default); its id."""
    import mlflow

    from ..tracking.store import TrackingError, sqlite_path, store_errors

    for key, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
        os.environ.setdefault(key, value)  # an unreachable server fails now, not in minutes
    mlflow.set_tracking_uri(uri)
    try:
        with store_errors():
            exp = mlflow.get_experiment_by_name(name)
            if exp is not None:
                return exp.experiment_id
            db = sqlite_path(uri)
            return mlflow.create_experiment(
                name, artifact_location=(db.parent / "mlartifacts").as_uri() if db else None,
                tags={"sweep_base_commit": commit,
                      "mlflow.experimentKind": "custom_model_development"})
    except TrackingError as err:
        raise SweepError(str(err)) from None


@dataclass(frozen=True)
class Cluster:
    nodes: int          # alive nodes
    hosts: int          # their distinct addresses
    node_cpus: int      # the most CPUs of one node
    gpu: bool           # any GPU


def end_left_running(experiment_id: str) -> int:
    """Mark KILLED the runs of the sweep's experiment still RUNNING when it starts: an earlier
    attempt's (a killed driver, a stopped server, a lost node) whose process is gone. Done
    here, once, before any task: the stages' own clean-up of stale runs (end_stale_runs) in
    two tasks at once would race on the same run (PostgreSQL refuses the second tag)."""
    import mlflow

    from ..tracking.store import TrackingError, store_errors

    when = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with store_errors():
            client = mlflow.MlflowClient()
            runs = client.search_runs([experiment_id], "attributes.status = 'RUNNING'",
                                      max_results=10000)
            for run in runs:
                client.set_tag(run.info.run_id, "mlflow.note.content",
                               "Left RUNNING by an earlier attempt of this sweep, which ended "
                               f"without closing it; marked KILLED at {when} when the sweep "
                               "started again.")
                client.set_terminated(run.info.run_id, "KILLED")
    except TrackingError as err:
        raise SweepError(str(err)) from None
    return len(runs)


def connect(address: str | None) -> Cluster:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return Cluster(len(nodes), len({n.get("NodeManagerAddress") for n in nodes}),
                   max((int(n["Resources"].get("CPU", 0)) for n in nodes), default=0),
                   any(n["Resources"].get("GPU", 0) for n in nodes))


def unreachable(uri: str, cluster: Cluster) -> str | None:
    """Why the cluster's other nodes cannot reach the store, or None."""
    if cluster.nodes > 1 and is_local_store(uri):
        return (f"a file on this machine, which the cluster's other {cluster.nodes - 1} "
                "node(s) cannot reach")
    host = urlsplit(uri).hostname or ""
    if cluster.hosts > 1 and (host == "localhost" or host.startswith("127.") or host == "::1"):
        return f"loopback, which the cluster's other {cluster.hosts - 1} host(s) cannot reach"
    return None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aebench sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("spec", type=Path, help="the SPEC file (YAML)")
    p.add_argument("--address", default=None,
                   help="the Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--remote", default="origin",
                   help="the git remote workers clone from and push to (default origin)")
    p.add_argument("--alpha", type=float, default=stats.ALPHA,
                   help=f"the tests' level (default {stats.ALPHA})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return sweep(args)
    except (SweepError, specs.SpecError) as err:
        print(f"aebench sweep: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("aebench sweep: interrupted; its running tasks end with it, and what is on the "
              "git remote stays: run it again to resume", file=sys.stderr)
        return 130


def sweep(args: argparse.Namespace) -> int:
    from ..tracking.store import tracking_uri

    root = Path(git(Path.cwd(), "rev-parse", "--show-toplevel").strip())
    spec = specs.load(args.spec)
    configs = specs.configurations(spec, args.spec)
    params = specs.check(configs, root / "params.yaml", args.spec)
    commit, url = base_commit(root, args.remote)
    uri = tracking_uri(root)
    cluster = connect(args.address)
    try:
        return on_cluster(args, root, spec, configs, params, commit, url, uri, cluster)
    finally:
        import ray

        ray.shutdown()  # disconnects; stops the local Ray that ray.init started, if it did


def on_cluster(args, root, spec, configs, params, commit, url, uri, cluster) -> int:
    if (why := unreachable(uri, cluster)) is not None:
        raise SweepError(f"MLflow store {uri}: {why}; start `aebench mlflow-server` where "
                         "every node reaches it and set MLFLOW_TRACKING_URI to its address")
    experiment = EXPERIMENT_PREFIX + spec.name
    experiment_id = make_experiment(uri, experiment, commit)
    if ended := end_left_running(experiment_id):
        print(f"sweep {spec.name}: {ended} MLflow run(s) left RUNNING by an earlier attempt "
              "marked KILLED", file=sys.stderr)
    there = remote_experiments(root, args.remote, commit)
    todo = [cfg for cfg in configs if cfg.name not in there]
    print(f"sweep {spec.name}: {len(configs)} configurations at {commit[:12]}, "
          f"{len(configs) - len(todo)} already on {args.remote}; MLflow experiment "
          f"{experiment} ({experiment_id}) at {uri}", file=sys.stderr, flush=True)
    results = submit(spec.name, todo, params, commit, url, uri, experiment_id, experiment,
                     cluster.node_cpus, cluster.gpu)
    return finish(root, args, spec.name, configs, results, commit, there)


def submit(name, todo, params, commit, url, uri, experiment_id, experiment, node_cpus,
           gpu) -> list[Result]:
    import ray

    from .worker import run_configuration

    env = {key: os.environ[key] for key in CREDENTIALS if os.environ.get(key)}
    task = ray.remote(run_configuration)
    refs, cpus = {}, 1
    for cfg in todo:
        cpus = max(1, min(specs.cpus(params[cfg.name]), node_cpus))
        job = Job(name, cfg.name, cfg.overrides, cfg.set_args(), url, commit, uri,
                  experiment_id, experiment)
        options = {"num_cpus": cpus, "num_gpus": 1 if gpu else 0,
                   "max_retries": NODE_RETRIES, "retry_exceptions": False}
        if env:
            options["runtime_env"] = {"env_vars": env}
        refs[task.options(**options).remote(job)] = job
    total = int(ray.cluster_resources().get("CPU", 1))
    return collect(refs, Progress(name, len(todo), total // cpus)) if refs else []


def finish(root: Path, args, name: str, configs, results: list[Result], commit: str,
           there: dict[str, str]) -> int:
    """Fetch every done experiment's ref, print the table; 0 all done, 1 some failed."""
    from ..revisions import BadInput, load
    from .report import render, sweep_rows

    by_name = {cfg.name: cfg for cfg in configs}
    done = {**there, **{r.name: r.commit for r in results if r.ok and r.commit}}
    done = {n: c for n, c in done.items() if n in by_name}
    failed = [(r.name, by_name[r.name].label(), r.message) for r in results if not r.ok]
    if done:
        git(root, "fetch", "--quiet", args.remote,
            *(f"+{exp_ref(commit, n)}:{exp_ref(commit, n)}" for n in done))
    try:
        base = load(commit, str(root))
        sides = [(n, by_name[n].label(), load(c, str(root))) for n, c in done.items()]
        print(render(sweep_rows(base, sides, args.alpha), base.label, failed, args.alpha))
    except BadInput as err:
        print(f"aebench sweep: the table: {err}", file=sys.stderr)
        return 1
    print(f"sweep {name}: {len(done)} of {len(configs)} configurations done, {len(failed)} "
          "failed" + ("; run it again to retry them" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
