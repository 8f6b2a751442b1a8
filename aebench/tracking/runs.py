"""MLflow runs: their life cycle (FINISHED, FAILED, KILLED; stale RUNNING ones ended) and the
training runs of a model and its replicas."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from ..temporaries import process_alive
from .store import common_tags, store_errors

Scalar = str | int | float | bool


def _process_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(tag: str | None) -> bool:
    """Whether the process named by a run's `process` tag (host:pid) still runs on this host.
    Another host's process cannot be checked: it counts as alive (its run is left alone)."""
    host, _, pid = (tag or "").rpartition(":")
    return pid.isdigit() and process_alive(host, int(pid))


@contextmanager
def tracked_run(experiment_id: str, run_name: str, tags: Mapping[str, str], *,
         nested: bool) -> Iterator[str]:
    """Start a run; end it FINISHED, FAILED on an exception, KILLED on KeyboardInterrupt or
    SystemExit. Yields the run id."""
    import mlflow

    with store_errors():
        run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, nested=nested,
                               tags={**tags, "process": _process_tag()})
    status = "FINISHED"
    try:
        yield run.info.run_id
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        with store_errors():
            mlflow.end_run(status)


def active_run(caller: str, inside: str):
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{caller} must run inside {inside}")
    return run


def quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"MLflow search: a quote in {value!r} is not supported")
    return f"'{value}'"


@store_errors()
def end_stale_runs(experiment_id: str, **tags: str) -> list[str]:
    """Mark KILLED the runs with these tags (model="deep3", stage="evaluate") still RUNNING
    whose process is gone (a SIGKILL, a power cut); return their ids. Runs of a live process
    (a parallel `dvc exp` job) are left alone."""
    import mlflow

    if not tags:
        raise ValueError("end_stale_runs: name at least one tag, e.g. model='deep3'")
    client = mlflow.MlflowClient()
    match = " AND ".join(f"tags.{key} = {quoted(value)}" for key, value in tags.items())
    runs = client.search_runs([experiment_id], f"{match} AND attributes.status = 'RUNNING'",
                              max_results=1000)
    what = ", ".join(f"{key} {value}" for key, value in tags.items())
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    ended = []
    for run in runs:
        if _process_alive(run.data.tags.get("process")):
            continue
        note = (f"Left RUNNING by process {run.data.tags.get('process', '?')}, which ended "
                f"without closing it (killed); marked KILLED at {when} when {what} started "
                "again.")
        client.set_tag(run.info.run_id, "mlflow.note.content", note)
        client.set_tag(run.info.run_id, "ended_by", "end_stale_runs")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    if ended:
        print(f"MLflow: marked {len(ended)} run(s) of {what} left RUNNING as KILLED",
              file=sys.stderr)
    return ended


@contextmanager
def training_run(experiment_id: str, name: str, params: Mapping[str, Scalar],
                 tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """The parent run of model `name`: its params (flat str -> scalar: config, n_train,
    device...) and tags (git commit, DVC experiment, model). Yields the run id.

    Ends stale RUNNING runs of this model first (end_stale_runs); ends KILLED on Ctrl-C or
    SIGTERM, FAILED on an exception, FINISHED otherwise."""
    import mlflow

    end_stale_runs(experiment_id, model=name)
    run_tags = {**common_tags(), "stage": "train", "model": name, **(tags or {})}
    with tracked_run(experiment_id, name, run_tags, nested=False) as run_id:
        with store_errors():
            mlflow.log_params(dict(params))
        yield run_id


@contextmanager
def replica_run(name: str, index: int, seed: int,
                params: Mapping[str, Scalar] | None = None) -> Iterator[str]:
    """Child run NAME-r{index} of the active training_run(name): seed (and `params`) as params.
    Yields the run id. Ends like training_run; the parent then ends the same way."""
    import mlflow

    inside = f"training_run(..., {name!r}, ...)"
    parent = active_run(f"replica_run({name!r})", inside)
    if parent.data.tags.get("model") != name:
        raise RuntimeError(f"replica_run({name!r}) must run inside {inside}")
    tags = {**common_tags(), "stage": "train", "model": name, "replica": str(index)}
    with tracked_run(parent.info.experiment_id, f"{name}-r{index}", tags, nested=True) as run_id:
        with store_errors():
            mlflow.log_params({"seed": seed, **(params or {})})
        yield run_id


def log_epochs(epochs: Sequence[Mapping[str, float]],
               summary: Mapping[str, float] | None = None) -> None:
    """Per-epoch metrics (each dict has "epoch" and floats; step = epoch) and `summary` metrics
    (train_seconds...; step = last epoch) into the active run, in one log_batch."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(rec["epoch"]))
               for rec in epochs for key, value in rec.items() if key != "epoch"]
    last = int(epochs[-1]["epoch"]) if epochs else 0
    metrics += [Metric(key, float(value), now, last) for key, value in (summary or {}).items()]
    run = active_run("log_epochs", "replica_run(...)")
    with store_errors():
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics)

