"""A sweep's worker task: one configuration, run as one DVC experiment in a clone of its own.

1. A fresh clone of the git remote in a temporary folder, at the sweep's exact commit (one
   clone per task: never two DVC processes in one clone).
2. The remote already holds this experiment's ref (an earlier attempt pushed it, then its node
   died): the ref's params are checked against the overrides; the same -> done, without
   running it again; others -> a name collision, a failure.
3. `dvc pull` (the base commit's outputs), then `dvc exp run --pull -n NAME -S ...` (the run
   cache too) from the DVC remote; every MLflow run goes to the sweep's experiment on the
   shared server, tagged with the sweep, the overrides and the experiment's name
   (aebench.tracking.store).
   A failed run pushes what its finished stages made (and their run cache) all the same.
4. Data first (`dvc push --run-cache`), refs second (`dvc exp push --no-cache`), then the
   remote's ref must be this experiment's commit (`git ls-remote`): `dvc exp push` exits 0
   having pushed nothing when the name has diverged, so its exit code is not trusted.
5. The clone is removed whatever happens.

A configuration that fails by itself returns a failed Result with one line (Ray does not retry
it); only a lost node makes Ray run the task again, on another node.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..tracking.store import EXPERIMENT_ID_ENV, RUN_TAGS_ENV

GIT_REMOTE = "origin"  # the clone's name for the git remote it came from
# The only variables a task takes from the driver's environment: a basic-auth server's login.
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


@dataclass(frozen=True)
class Job:
    sweep: str
    name: str                       # the DVC experiment's name
    overrides: dict[str, Any]
    set_args: list[str]             # -S key=value ...
    git_url: str                    # what the workers clone and push refs to
    commit: str                     # the base commit (the sweep's HEAD)
    tracking_uri: str
    experiment_id: str              # the sweep's MLflow experiment, created by the driver
    experiment: str                 # its name


@dataclass
class Result:
    name: str
    ok: bool
    message: str = ""               # one line: why it failed, or "already on the remote"
    commit: str | None = None       # the experiment's commit on the remote
    seconds: dict[str, float] = field(default_factory=dict)  # clone, pull, run, push
    host: str = field(default_factory=socket.gethostname)


class StepFailed(RuntimeError):
    """A step of the task failed; str() is the one line for the sweep's report."""


def exp_ref(commit: str, name: str) -> str:
    """Where DVC keeps an experiment of base `commit`: refs/exps/<2 hex>/<38 hex>/<name>."""
    return f"refs/exps/{commit[:2]}/{commit[2:]}/{name}"


def last_line(stderr: str, stdout: str = "") -> str:
    """The line that says why: a stage's own one-line error (`error: ...`, aebench.cli), else
    the last line on stderr that is not DVC's summary of it, else the last line at all."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    own = [line for line in lines if not line.startswith(("ERROR: failed to reproduce",
                                                          "ERROR: failed to run"))]
    rest = [line.strip() for line in stdout.splitlines() if line.strip()]
    return (errors or own or lines or rest or ["(no output)"])[-1][:400]


def step(what: str, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    # DVC ends with this task's process (a lost node, a killed driver): setpriv asks the kernel
    # for SIGTERM when the parent dies, and the stages end with DVC (aebench.cli)
    if args[0] == "dvc" and shutil.which("setpriv"):
        args = ["setpriv", "--pdeathsig", "TERM", *args]
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StepFailed(f"{what} failed (exit {proc.returncode}): "
                         f"{last_line(proc.stderr, proc.stdout)}")
    return proc.stdout


def remote_commit(clone: Path, ref: str) -> str | None:
    out = step("git ls-remote", ["git", "ls-remote", GIT_REMOTE, ref], clone)
    return out.split()[0] if out.strip() else None


def local_commit(clone: Path, ref: str) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", ref], cwd=clone,
                          capture_output=True, text=True)
    return proc.stdout.strip() or None


def same_overrides(clone: Path, commit: str, overrides: dict[str, Any]) -> str | None:
    """None when params.yaml at `commit` holds every override; else the first that differs."""
    params = yaml.safe_load(step("git show", ["git", "show", f"{commit}:params.yaml"], clone))
    for key, value in overrides.items():
        node: Any = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return f"{key}={node!r} there, {value!r} here"
    return None


def task_env(job: Job) -> dict[str, str]:
    tags = {"sweep": job.sweep, "sweep_overrides": json.dumps(job.overrides, sort_keys=True),
            "sweep_experiment": job.name}
    # A server gone for good fails a stage in seconds, not after MLflow's 7 retries with
    # backoff (minutes); a blip of a few seconds is still retried. The user's settings win.
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
           **os.environ, "MLFLOW_TRACKING_URI": job.tracking_uri,
           EXPERIMENT_ID_ENV: job.experiment_id, RUN_TAGS_ENV: json.dumps(tags)}
    # `python` and `dvc` of this environment first, as in an activated venv
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def run_configuration(job: Job) -> Result:
    """The whole task; a failure of the configuration is a Result, never an exception."""
    result = Result(job.name, ok=False)
    folder = Path(tempfile.mkdtemp(prefix=f"aebench-sweep-{job.name}-"))
    clone = folder / "repo"
    ref = exp_ref(job.commit, job.name)
    env = task_env(job)
    try:
        start = time.monotonic()
        step("git clone", ["git", "clone", "--quiet", "--no-checkout", job.git_url, str(clone)],
             folder)
        step("git checkout", ["git", "checkout", "--quiet", "--detach", job.commit], clone)
        for key, value in (("user.name", "aebench sweep"), ("user.email", "sweep@localhost")):
            step("git config", ["git", "config", key, value], clone)
        result.seconds["clone"] = time.monotonic() - start
        if (there := remote_commit(clone, ref)) is not None:
            step("git fetch", ["git", "fetch", "--quiet", GIT_REMOTE, ref], clone)
            differs = same_overrides(clone, there, job.overrides)
            if differs:
                raise StepFailed(f"name collision: {ref} on {job.git_url} holds other params "
                                 f"({differs}); rename the sweep or delete that ref")
            result.ok, result.commit, result.message = True, there, "already on the remote"
            return result
        start = time.monotonic()
        try:
            # every output of the base commit first: `--pull --allow-missing` alone skips an
            # unchanged stage without pulling its outputs, which a changed stage downstream
            # reads (evaluate reads every model's scores, figures every model)
            step("dvc pull", ["dvc", "pull", "--quiet"], clone, env)
            result.seconds["pull"] = time.monotonic() - start
            start = time.monotonic()
            step("dvc exp run", ["dvc", "exp", "run", "--pull", "-n", job.name,
                                 *job.set_args], clone, env)
        except StepFailed:
            # what the stages that did finish made, and their run-cache entries: a re-run
            # restores them instead of running them again
            subprocess.run(["dvc", "push", "--run-cache", "--quiet"], cwd=clone, env=env,
                           capture_output=True)
            raise
        result.seconds["run"] = time.monotonic() - start
        start = time.monotonic()
        mine = local_commit(clone, ref)
        if mine is None:
            raise StepFailed(f"dvc exp run made no ref {ref}")
        step("dvc push", ["dvc", "push", "--run-cache", "--quiet"], clone, env)
        step("dvc exp push", ["dvc", "exp", "push", "--no-cache", GIT_REMOTE, job.name], clone,
             env)
        there = remote_commit(clone, ref)
        if there != mine:
            raise StepFailed(f"{ref} on {job.git_url} is {there or 'missing'}, not this "
                             f"run's {mine[:12]}: a diverged ref or a name collision; the "
                             "run's data is pushed, its ref is not")
        result.seconds["push"] = time.monotonic() - start
        result.ok, result.commit = True, mine
    except StepFailed as err:
        result.message = str(err)
    except OSError as err:  # git or dvc not found, a full disk
        result.message = f"{type(err).__name__}: {err}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return result
