"""MLflow runs: their life cycle (FINISHED, FAILED, KILLED; stale RUNNING ones ended) and the
training runs of a model and its replicas."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from ..constants import N_PIXELS
from ..files import rounded
from ..temporaries import process_alive
from .store import common_tags, store_errors

Scalar = str | int | float | bool
# Each model's runs in the UI's charts take the model's colour, by its place in params.yaml:
# matplotlib's tab10 (which is vega's category10), as in the PNGs (up to 10 models) and the DVC
# plots, where MLflow would pick one per run id (often alike). Other runs: dark grey.
MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                "#7f7f7f", "#bcbd22", "#17becf")
OTHER_COLOR = "#444444"
COLOR_TAG = "mlflow.runColor"  # the UI reads a run's colour from this tag
# A model's final values on its training run, as single-step metrics (step 0) named
# final/KEY. MLflow's chart view (3.17) draws a bar chart for a metric whose runs all hold it
# at step 0 (a line chart once one has a step >= 1), makes a section of each key prefix before
# the "/", and puts the prefixed sections, sorted by name, before the unprefixed "Model
# metrics" (the per-epoch curves): so "final" opens the chart view, one bar per model in its
# colour, and the curves follow. Only the test MSE: it is on one scale for every model (the
# training loss is each source's own loss, on its own pixel scale: bars of it would compare
# unlike things). And the same as SSE per image (784 x test MSE): the chart labels its bars
# with two decimals, 0.00 and 0.01 for every test MSE here, while SSE/image reads 0.71 to 26.49;
# its name sorts first, so it is the first chart.
FINAL_SECTION = "final"
FINAL_METRICS = ("test_mse", "test_mse_std")
FINAL_SSE = "sse_per_image"  # N_PIXELS x the final test_mse
# On a model's training run, its best replica (lowest final test MSE; MLflow's tuning examples
# log the best child on the parent): the child's run name, and its id
BEST_REPLICA_TAG = "best_replica"
BEST_REPLICA_ID_TAG = "best_replica_run_id"


def final_metric(key: str) -> str:
    """The training run's final value of `key`: final/test_mse."""
    return f"{FINAL_SECTION}/{key}"


def model_color(index: int) -> str:
    """The colour of the runs of the model at place `index` (from 0) in params.yaml."""
    return MODEL_COLORS[index % len(MODEL_COLORS)]


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

    run, status = None, "FINISHED"
    try:
        with store_errors():  # a Ctrl-C held by it acts once `run` is set: the run ends KILLED
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name,
                                   nested=nested, tags={**tags, "process": _process_tag()})
        yield run.info.run_id
    except Exception:
        status = "FAILED"
        raise
    except BaseException:
        status = "KILLED"
        raise
    finally:
        if run is not None:
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
    from mlflow.exceptions import MlflowException

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
        try:
            client.set_tag(run.info.run_id, "mlflow.note.content", note)
            client.set_tag(run.info.run_id, "ended_by", "end_stale_runs")
            client.set_terminated(run.info.run_id, "KILLED")
        except MlflowException:  # another process ended it meanwhile (two sweep tasks at once)
            if client.get_run(run.info.run_id).info.status == "RUNNING":
                raise
            continue
        ended.append(run.info.run_id)
    if ended:
        print(f"MLflow: marked {len(ended)} run(s) of {what} left RUNNING as KILLED",
              file=sys.stderr)
    return ended


@contextmanager
def training_run(experiment_id: str, name: str, params: Mapping[str, Scalar],
                 tags: Mapping[str, str] | None = None, *,
                 color: str | None = None) -> Iterator[str]:
    """The parent run of model `name`: its params (flat str -> scalar: config, n_train,
    device...) and tags (git commit, DVC experiment, model); `color` (model_color) is its and
    its replicas' colour in the UI. Yields the run id.

    Ends stale RUNNING runs of this model first (end_stale_runs); ends KILLED on Ctrl-C or
    SIGTERM, FAILED on an exception, FINISHED otherwise."""
    import mlflow

    end_stale_runs(experiment_id, model=name)
    run_tags = {**common_tags(), "stage": "train", "model": name, **(tags or {}),
                **({COLOR_TAG: color} if color else {})}
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
    tags = {**common_tags(), "stage": "train", "model": name, "replica": str(index),
            **{k: v for k, v in parent.data.tags.items() if k == COLOR_TAG}}
    with tracked_run(parent.info.experiment_id, f"{name}-r{index}", tags, nested=True) as run_id:
        with store_errors():
            mlflow.log_params({"seed": seed, **(params or {})})
        yield run_id


def log_epochs(epochs: Sequence[Mapping[str, float]],
               summary: Mapping[str, float] | None = None) -> None:
    """Per-epoch metrics (each dict has "epoch" and floats; step = epoch) and `summary` metrics
    (train_seconds...; step = last epoch) into the active run, in one log_batch, at the
    committed files' digits (the UI showed 17)."""
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, tidy(value), now, int(rec["epoch"]))
               for rec in epochs for key, value in rec.items() if key != "epoch"]
    last = int(epochs[-1]["epoch"]) if epochs else 0
    metrics += [Metric(key, tidy(value), now, last) for key, value in (summary or {}).items()]
    run = active_run("log_epochs", "replica_run(...)")
    with store_errors():
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics)


def tidy(value: float) -> float:
    """A value at the committed files' digits (rounded); a nan or inf as it is."""
    shown = rounded(float(value))
    return float(value) if shown is None else shown


def log_training_curve(rows: Sequence[Mapping[str, float]]) -> None:
    """The model's results on its training run, after every replica has finished: per epoch
    (step = epoch) the mean and std over replicas of each metric in `rows` (the rows of
    plots/curves/NAME.csv: test_mse, test_mse_std, train_loss, train_loss_std), at the CSV's
    digits, so the runs table shows each model's final values on its own row and the chart
    view one curve per model, without expanding the replicas; the last epoch's test MSE and its
    std as final/test_mse and final/test_mse_std (FINAL_METRICS, at step 0), and 784 x that
    test MSE as final/sse_per_image: the bar charts that open the chart view; and its best
    replica (log_best_replica)."""
    import mlflow
    from mlflow.entities import Metric

    run = active_run("log_training_curve", "training_run(...)")
    if run.data.tags.get("stage") != "train" or "mlflow.parentRunId" in run.data.tags:
        raise RuntimeError("log_training_curve must run inside training_run(...), after the "
                           "replica runs have ended")
    if not rows:
        raise ValueError("log_training_curve: no epochs")
    log_epochs(rows)
    now = int(time.time() * 1000)
    final = [Metric(final_metric(key), tidy(rows[-1][key]), now, 0) for key in FINAL_METRICS]
    final.append(Metric(final_metric(FINAL_SSE), tidy(N_PIXELS * final[0].value), now, 0))
    with store_errors():
        mlflow.MlflowClient().log_batch(run.info.run_id, metrics=final)
    log_best_replica(run.info.run_id, run.info.experiment_id)


@store_errors()
def log_best_replica(run_id: str, experiment_id: str) -> str | None:
    """Name the best of a training run's finished replicas (lowest last test MSE) on the run:
    the tags best_replica (NAME-r{i}) and best_replica_run_id, and the run's description,
    which links to it. Returns the replica's run id; None when no replica has a test MSE."""
    import mlflow

    client = mlflow.MlflowClient()
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = {quoted(run_id)} "
                                  "AND attributes.status = 'FINISHED'", max_results=10_000)
    scored = [(c.data.metrics["test_mse"], c.info.run_name, c) for c in children
              if "test_mse" in c.data.metrics]
    if not scored:
        return None
    mse, name, best = min(scored, key=lambda t: (t[0], t[1]))
    seed = best.data.params.get("seed", "?")
    client.set_tag(run_id, BEST_REPLICA_TAG, name)
    client.set_tag(run_id, BEST_REPLICA_ID_TAG, best.info.run_id)
    client.set_tag(run_id, "mlflow.note.content",
                   f"Best replica: [{name}](#/experiments/{experiment_id}/runs/"
                   f"{best.info.run_id}) (seed {seed}), last-epoch test MSE {mse:.3g}, of "
                   f"{len(scored)} replica(s). This run holds the mean and std over them per "
                   "epoch; final/* are the last epoch's.")
    return best.info.run_id
