"""`aebench sweep` on a Ray cluster on loopback: a head with no CPUs and two 1-CPU worker
nodes (ray.cluster_utils.Cluster), a bare git remote, a folder DVC remote, PostgreSQL and the
MLflow server on 127.0.0.1, all in a network namespace of their own (`unshare --net`, then
`ip link set lo up`): outside one, Ray advertises the machine's interface address.

`test_in_a_network_namespace` runs this file's other tests in such a namespace (they skip
outside one). A project of two models at smoke size (3,000 images, 1 epoch, 1 replica) is run
once as the base commit; each test sweeps two configurations of deep3's learning rate.
Marked `cluster`: `python -m pytest -m cluster tests/test_sweep_cluster.py` (minutes).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from sweep_servers import (
    ROOT,
    have_server,
    private_temp,
    start_server,
    stop,
)

pytestmark = pytest.mark.cluster
INSIDE = os.environ.get("AEBENCH_TEST_NETNS") == "1"
WAIT_LIMIT_S = 900  # a limit on waiting for a sweep's state, not a timing
SWEEPS = ("lr", "node", "kill", "srv")  # the sweeps' names, one per test


def why_not() -> str | None:
    if os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("ip"):
        return "needs root, unshare and ip (a network namespace of its own)"
    if not os.environ.get("MNIST_MIRROR"):
        return "needs $MNIST_MIRROR (the base run downloads nothing)"
    try:
        import ray  # noqa: F401
    except ImportError:
        return "ray not installed (pip install -e '.[sweep]')"
    return have_server()


@pytest.mark.skipif(INSIDE or bool(why_not()), reason=str(why_not()))
def test_in_a_network_namespace():
    """This file's tests, inside `unshare --net` with loopback up."""
    env = {**os.environ, "AEBENCH_TEST_NETNS": "1"}
    proc = subprocess.run(
        ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
         "-m", "pytest", "-m", "cluster", "-p", "no:cacheprovider", "-x", "-q", "-k",
         "not test_in_a_network_namespace", str(Path(__file__))], cwd=ROOT, env=env,
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, proc.stdout[-3000:]


inside = pytest.mark.skipif(not INSIDE, reason="runs inside test_in_a_network_namespace")


def run(args: list[str], cwd: Path, **kwargs) -> str:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc.stdout


@pytest.fixture(scope="module")
def world():
    """The project (base commit run and pushed), its two remotes, the server, the cluster."""
    from ray.cluster_utils import Cluster

    from aebench.smoke import copy_repo, slice_params

    base = private_temp("aebench-test-sweep-")
    proj, git_remote, dvc_remote = base / "proj", base / "git.git", base / "dvc-remote"
    proj.mkdir()
    copy_repo(proj)
    slice_params(proj / "params.yaml", limit=3000, epochs=1, replicas=1)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    # two models: a sweep of deep3 re-runs evaluate, which reads shallow128's weights too
    params["models"] = {m: params["models"][m] for m in ("deep3", "shallow128")}
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    py = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{py}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{base}/base-mlflow.db"}
    run(["git", "init", "-q", "--bare", str(git_remote)], base)
    run(["git", "remote", "add", "origin", str(git_remote)], proj)
    run(["dvc", "remote", "add", "-d", "store", str(dvc_remote)], proj, env=env)
    run(["dvc", "repro", "--quiet"], proj, env=env)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "base: one model at smoke size"], proj)
    run(["dvc", "push", "--run-cache", "--quiet"], proj, env=env)
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], proj)
    server = start_server(base / "srv", 5123)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    world = {"base": base, "proj": proj, "git": git_remote, "server": server,
             "cluster": cluster, "nodes": nodes, "env": {**env, "MLFLOW_TRACKING_URI":
                                                         server.url}}
    try:
        yield world
    finally:
        cluster.shutdown()
        stop(world["server"])
        shutil.rmtree(base, ignore_errors=True)
        # the clones of tasks killed with their node or driver (a finished task removes its own)
        for name in SWEEPS:
            for clone in Path(tempfile.gettempdir()).glob(f"aebench-sweep-{name}-*"):
                shutil.rmtree(clone, ignore_errors=True)


def spec(world, name: str, lrs: list[float]) -> Path:
    path = world["base"] / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "grid": {"models.deep3.optimizer.lr": lrs}}))
    return path


def sweep(world, path: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aebench", "sweep", str(path), "--address",
                             world["cluster"].address], cwd=world["proj"], env=world["env"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT_LIMIT_S)
    return proc.returncode, out, err


def remote_refs(world, name: str) -> dict[str, str]:
    out = run(["git", "ls-remote", str(world["git"]), "refs/exps/*"], world["proj"])
    return {ref.rsplit("/", 1)[1]: sha for sha, ref in
            (line.split("\t") for line in out.splitlines())
            if ref.rsplit("/", 1)[1].startswith(f"{name}-")}


def runs(world, name: str, **filters: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(world["server"].url)
    exp = client.get_experiment_by_name(f"aebench-sweep-{name}")
    if exp is None:
        return []
    query = " AND ".join([f"tags.sweep = '{name}'"] +
                         [f"tags.{k} = '{v}'" for k, v in filters.items()])
    return client.search_runs([exp.experiment_id], query, max_results=1000)


def wait_until(what: str, check, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + WAIT_LIMIT_S
    while time.monotonic() < deadline:
        if (value := check()):
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the driver ended (exit {proc.returncode}) before {what}: "
                        f"{proc.stderr.read()[-3000:]}")
        time.sleep(1)
    pytest.fail(f"not in {WAIT_LIMIT_S} s: {what}")


def trained_once(world, name: str, configs) -> None:
    """Each configuration has exactly one finished training run, in the sweep's experiment,
    tagged with the sweep, its overrides and its experiment's name; Default has none."""
    import mlflow

    for config in configs:
        finished = [r for r in runs(world, name, stage="train", sweep_experiment=config)
                    if r.info.status == "FINISHED" and "replica" not in r.data.tags]
        assert len(finished) == 1, (config, [r.info.status for r in finished])
        tags = finished[0].data.tags
        assert tags["dvc_exp_name"] == config and "models.deep3.optimizer.lr" in \
            json.loads(tags["sweep_overrides"])
    client = mlflow.MlflowClient(world["server"].url)
    assert client.search_runs(["0"], max_results=5) == []  # Default


@inside
def test_a_sweep_of_two(world):
    path = spec(world, "lr", [3.0e-3, 3.0e-4])
    code, out, err = finish(sweep(world, path))
    assert code == 0, err[-3000:]
    refs = remote_refs(world, "lr")
    assert len(refs) == 2
    assert "0 failed" in err and "running" in err and "left" in err
    for name in refs:
        assert name in out  # the table
    assert "| deep3 |" in out and "one run" in out
    trained_once(world, "lr", refs)
    # its data pullable from the DVC remote, in a fresh clone
    clone = world["base"] / "check"
    run(["git", "clone", "-q", str(world["git"]), str(clone)], world["base"])
    name, sha = next(iter(refs.items()))
    run(["git", "fetch", "-q", "origin", f"+{sha}"], clone)
    run(["git", "checkout", "-q", sha], clone)
    run(["dvc", "pull", "--quiet"], clone, env=world["env"])
    assert any((clone / "data" / "models" / "deep3").iterdir())
    shutil.rmtree(clone)
    # run again: nothing to do, nothing run
    before = len(runs(world, "lr"))
    code, out, err = finish(sweep(world, path))
    assert code == 0 and "2 already on origin" in err, err[-2000:]
    assert len(runs(world, "lr")) == before


@inside
def test_a_name_collision_is_a_failure(world):
    """A ref of this name on the remote that holds other params: failed, nothing pushed."""
    from aebench.sweep import spec as specs
    from aebench.sweep.worker import Job, run_configuration

    refs = remote_refs(world, "lr")
    taken = next(iter(refs))
    commit = run(["git", "rev-parse", "HEAD"], world["proj"]).strip()
    cfg = specs.Configuration(taken, {"models.deep3.optimizer.lr": 0.5})
    result = run_configuration(Job("lr", taken, cfg.overrides, cfg.set_args(),
                                   str(world["git"]), commit, world["server"].url, "0", "x"))
    assert not result.ok and result.message.startswith("name collision") and \
        "models.deep3.optimizer.lr" in result.message, result
    assert remote_refs(world, "lr") == refs


@inside
def test_a_node_removed_mid_task(world):
    """Both configurations running, one on each node: one node goes; its task runs again on
    the other, and each configuration trains to completion once."""
    path = spec(world, "node", [2.0e-3, 5.0e-4])
    proc = sweep(world, path)
    wait_until("both configurations training", lambda: len(
        runs(world, "node", stage="train")) >= 2, proc)
    world["cluster"].remove_node(world["nodes"].pop())
    code, out, err = finish(proc)
    world["nodes"].append(world["cluster"].add_node(num_cpus=1))
    assert code == 0, err[-3000:]
    refs = remote_refs(world, "node")
    assert len(refs) == 2
    trained_once(world, "node", refs)


@inside
def test_the_driver_killed_and_run_again(world):
    """The driver killed once a configuration is on the remote: a re-run runs only what is
    missing; a configuration done before the kill is not trained again."""
    path = spec(world, "kill", [1.5e-3, 7.0e-4])
    proc = sweep(world, path)
    done = wait_until("a configuration on the remote", lambda: remote_refs(world, "kill"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    done = remote_refs(world, "kill")
    code, out, err = finish(sweep(world, path))
    assert code == 0, err[-3000:]
    refs = remote_refs(world, "kill")
    assert len(refs) == 2
    assert f"{len(done)} already on origin" in err
    assert {name: refs[name] for name in done} == done
    trained_once(world, "kill", list(done))


@inside
def test_the_server_stopped_mid_sweep(world):
    """The MLflow server stopped while both train: they fail with a line naming it; with the
    server back, a re-run completes them."""
    path = spec(world, "srv", [2.5e-3, 6.0e-4])
    proc = sweep(world, path)
    wait_until("both configurations training", lambda: len(
        runs(world, "srv", stage="train")) >= 2, proc)
    server = world["server"]
    stop(server)
    code, out, err = finish(proc)
    world["server"] = start_server(server.folder, 5123)
    failed = [line for line in err.splitlines() if line.strip().startswith("FAILED")]
    assert code == 1 and failed, err[-3000:]
    for line in failed:  # the stage's own line, naming the server
        assert "error: " in line and server.url.removeprefix("http://") in line, line
    code, out, err = finish(sweep(world, path))
    assert code == 0, err[-3000:]
    assert len(remote_refs(world, "srv")) == 2
