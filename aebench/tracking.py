"""MLflow: where runs go, and how training and evaluation are recorded.

The store defaults to `sqlite:///<working copy>/mlflow.db`, an absolute URI. `dvc exp run --temp`
and `--queue` execute in a copy under `<working copy>/.dvc/tmp/exps/`; the root is taken from
above that folder so those runs land in the user's own store too. MLFLOW_TRACKING_URI overrides.

What the store holds, in one experiment (`aebench`):

- training: one run per model, named NAME (its params and tags), with one child run per
  replica, NAME-r{i} (seed, per-epoch metrics at step = epoch, and the logged model NAME-r{i}).
  The logged model is a pickled torch module (`mlflow.pytorch.load_model` returns the
  autoencoder with `encode`, `decode` and `latent_dim`), tagged with the sha256 of the weights
  file that DVC tracks: evaluation finds it from the checkpoint alone, so no run id ever has to
  be written into a DVC output (it would make re-runs non-reproducible).
- evaluation: a separate run per invocation, with one child run per evaluated replica; the test
  metrics are attached to the replica's logged model (`model_id`) and to the test dataset.
  A training run is never written to after it ends; figures go to the evaluation run.

Every run ends FINISHED, FAILED (an exception) or KILLED (Ctrl-C, or SIGTERM and the death of
`dvc repro`, which aebench.cli turns into KeyboardInterrupt). A run left RUNNING by SIGKILL is
marked KILLED when that model's training starts again.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .constants import N_PIXELS

if TYPE_CHECKING:  # mlflow is imported inside the functions: importing it costs seconds
    from mlflow.data.dataset import Dataset
    from mlflow.entities import LoggedModel
    from torch import nn

EXPERIMENT = "aebench"
PIXEL_SCALES = ("0,1", "-1,1")
CHECK_TIMEOUT_S = 5.0  # how long open_store waits on an HTTP tracking server

Scalar = str | int | float | bool


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


# --------------------------------------------------------------------------- the store


def working_copy_root(cwd: str | Path | None = None) -> Path:
    path = Path(cwd or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 3):
        if parts[i:i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def tracking_uri(cwd: str | Path | None = None) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{working_copy_root(cwd) / 'mlflow.db'}"


@contextmanager
def _quick_http_requests() -> Iterator[None]:
    """No retries and a short timeout for MLflow's HTTP requests, unless the user set them:
    MLflow's defaults (7 retries with backoff, 120 s timeout) take minutes to give up."""
    overrides = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, CHECK_TIMEOUT_S)))}
    added = [key for key in overrides if key not in os.environ]
    os.environ.update({key: overrides[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _check_reachable(uri: str) -> None:
    """An HTTP store must accept a TCP connection: a port where nothing listens fails now, in
    milliseconds, with one line."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CHECK_TIMEOUT_S).close()
    except OSError as err:
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: cannot connect to "
                            f"{parts.hostname}:{port} ({err.strerror or err}). Start the "
                            "server, or set "
                            "MLFLOW_TRACKING_URI to a store you can reach.") from None


def open_store(cwd: str | Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return the experiment id.

    Call it before any work: an unusable store fails here with a one-line TrackingError naming
    the URI, within CHECK_TIMEOUT_S (+ a few seconds) for an HTTP server."""
    import mlflow

    uri = tracking_uri(cwd)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _quick_http_requests():
            exp = mlflow.get_experiment_by_name(EXPERIMENT)
            if exp is not None:
                return exp.experiment_id
            artifacts = None
            if uri.startswith("sqlite:///"):
                # Artifacts beside the database, by absolute path, whatever the cwd of a run.
                artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            # MLflow 3's UI opens a "custom_model_development" experiment on its runs (rather
            # than on the GenAI views).
            return mlflow.create_experiment(
                EXPERIMENT, artifact_location=artifacts,
                tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {first_line}. Set "
                            "MLFLOW_TRACKING_URI to a store you can write to.") from None


def git_commit(cwd: str | Path | None = None) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def common_tags() -> dict[str, str]:
    """Tags of every run: the git commit, and the DVC experiment's name when DVC runs one."""
    tags = {"git_commit": git_commit()}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file: the key that ties a checkpoint to its logged model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- runs


def _process_tag() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _process_alive(tag: str | None) -> bool:
    """Whether the process named by a run's `process` tag (host:pid) still runs on this host.
    Another host's process cannot be checked: it counts as alive (its run is left alone)."""
    host, _, pid = (tag or "").rpartition(":")
    if not pid.isdigit():
        return False
    if host != socket.gethostname():
        return True
    if int(pid) == os.getpid():
        return False  # a run of this very process that is RUNNING has been left behind
    if os.name != "posix":
        return False  # os.kill(pid, 0) would terminate the process on Windows
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _run(experiment_id: str, run_name: str, tags: Mapping[str, str], *,
         nested: bool) -> Iterator[str]:
    """Start a run; end it FINISHED, FAILED on an exception, KILLED on KeyboardInterrupt or
    SystemExit. Yields the run id."""
    import mlflow

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
        mlflow.end_run(status)


def _active_run(caller: str, inside: str):
    import mlflow

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{caller} must run inside {inside}")
    return run


def _quoted(value: str) -> str:
    if "'" in value:
        raise ValueError(f"MLflow search: a quote in {value!r} is not supported")
    return f"'{value}'"


def end_stale_runs(experiment_id: str, **tags: str) -> list[str]:
    """Mark KILLED the runs with these tags (model="deep3", stage="evaluate") still RUNNING
    whose process is gone (a SIGKILL, a power cut); return their ids. Runs of a live process
    (a parallel `dvc exp` job) are left alone."""
    import mlflow

    if not tags:
        raise ValueError("end_stale_runs: name at least one tag, e.g. model='deep3'")
    client = mlflow.MlflowClient()
    match = " AND ".join(f"tags.{key} = {_quoted(value)}" for key, value in tags.items())
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
    with _run(experiment_id, name, run_tags, nested=False) as run_id:
        mlflow.log_params(dict(params))
        yield run_id


@contextmanager
def replica_run(name: str, index: int, seed: int,
                params: Mapping[str, Scalar] | None = None) -> Iterator[str]:
    """Child run NAME-r{index} of the active training_run(name): seed (and `params`) as params.
    Yields the run id. Ends like training_run; the parent then ends the same way."""
    import mlflow

    inside = f"training_run(..., {name!r}, ...)"
    parent = _active_run(f"replica_run({name!r})", inside)
    if parent.data.tags.get("model") != name:
        raise RuntimeError(f"replica_run({name!r}) must run inside {inside}")
    tags = {**common_tags(), "stage": "train", "model": name, "replica": str(index)}
    with _run(parent.info.experiment_id, f"{name}-r{index}", tags, nested=True) as run_id:
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
    run = _active_run("log_epochs", "replica_run(...)")
    mlflow.MlflowClient().log_batch(run.info.run_id, metrics=metrics)


def _aebench_dir() -> str:
    return str(Path(__file__).resolve().parent)


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def log_replica_model(model: nn.Module, *, name: str, index: int, pixels: str,
                      weights_sha256: str, params: Mapping[str, Scalar] | None = None) -> str:
    """Log `model` as NAME-r{index} to the active replica run; return its model id.

    Pickled (not torch.export), with the aebench package as code, so that
    `mlflow.pytorch.load_model` returns the module itself with encode / decode / latent_dim.
    Signature: float32 (-1, 784) in and out, on the pixel scale `pixels` ("0,1" or "-1,1"),
    named in the metadata with the latent size. Tagged with the weights file's sha256 for
    find_logged_model. The model is saved in eval mode; its own mode is restored after."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if pixels not in PIXEL_SCALES:
        raise ValueError(f"log_replica_model: pixels {pixels!r} is not one of "
                         f"{', '.join(PIXEL_SCALES)}")
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))])
    was_training = model.training
    model.eval()
    # Pickle is the point here (the module itself comes back, not an exported graph): drop
    # MLflow's warning against it, which would repeat for every replica.
    pickle_warning = _DropMessages("Saving pytorch model by Pickle")
    logging.getLogger("mlflow.pytorch").addFilter(pickle_warning)
    try:
        info = mlflow.pytorch.log_model(
            model, name=f"{name}-r{index}", serialization_format="pickle",
            code_paths=[_aebench_dir()],
            signature=ModelSignature(inputs=spec, outputs=spec),
            # explicit requirements: inferring them imports the model in a subprocess (seconds)
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
            metadata={"pixels": pixels, "latent_dim": int(model.latent_dim)},
            tags={"model": name, "replica": str(index), "weights_sha256": weights_sha256},
            params={key: str(value) for key, value in (params or {}).items()} or None)
    finally:
        logging.getLogger("mlflow.pytorch").removeFilter(pickle_warning)
        model.train(was_training)
    return info.model_id


# --------------------------------------------------------------------------- evaluation


def _find(name: str, weights_sha256: str, experiment_id: str | None) -> LoggedModel | None:
    import mlflow

    if experiment_id is None:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        experiment_id = exp.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.model = {_quoted(name)} AND "
                      f"tags.weights_sha256 = {_quoted(weights_sha256)}",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1, output_format="list")
    return found[0] if found else None


def find_logged_model(name: str, weights_sha256: str, *,
                      experiment_id: str | None = None) -> str | None:
    """The model id of model `name`'s logged model whose weights file has this sha256 (the
    newest if several), or None when this store has none (weights pulled from a DVC remote,
    a fresh mlflow.db). `experiment_id` defaults to the `aebench` experiment."""
    found = _find(name, weights_sha256, experiment_id)
    return found.model_id if found else None


@contextmanager
def evaluation_run(experiment_id: str, name: str = "evaluate",
                   tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A new run for one evaluation (never a training run): log_evaluation adds one child per
    replica, log_artifacts the figures. Yields the run id; ends like training_run (stale
    RUNNING runs of the same `name` first)."""
    end_stale_runs(experiment_id, stage=name)
    run_tags = {**common_tags(), "stage": name, **(tags or {})}
    with _run(experiment_id, name, run_tags, nested=False) as run_id:
        yield run_id


def eval_dataset(images: Any, labels: Any = None, *, name: str = "mnist_test",
                 source: str | Path | None = None) -> Dataset:
    """The test set as an MLflow dataset (digest of the arrays), for log_evaluation."""
    import mlflow.data

    with warnings.catch_warnings():
        # MLflow registers its local-file source under two schemes and warns that a path
        # matches both; either reading is the same.
        warnings.filterwarnings("ignore", message="The specified dataset source can be")
        return mlflow.data.from_numpy(images, targets=labels, name=name,
                                      source=str(source) if source is not None else None)


def log_evaluation(name: str, index: int, weights_sha256: str, metrics: Mapping[str, float],
                   dataset: Dataset | None = None) -> str | None:
    """Record replica `index` of model `name` evaluated: a child run NAME-r{index}-eval of the
    active evaluation_run, with `metrics` (and `dataset` as input), the metrics attached to the
    replica's logged model, found by the sha256 of its weights file. Returns that model id.

    When this store has no such logged model: a warning, and the metrics are in the
    evaluation run only; None is returned."""
    import mlflow

    parent = _active_run("log_evaluation", "evaluation_run(...)")
    experiment_id = parent.info.experiment_id
    logged = _find(name, weights_sha256, experiment_id)
    tags = {**common_tags(), "stage": parent.data.tags.get("stage", "evaluate"), "model": name,
            "replica": str(index), "weights_sha256": weights_sha256}
    if logged is None:
        print(f"warning: {name}-r{index}: no logged model with weights sha256 "
              f"{weights_sha256[:12]}... in {mlflow.get_tracking_uri()} (weights pulled from a "
              "DVC remote, or a fresh mlflow.db?); test metrics go to the evaluation run only",
              file=sys.stderr)
    else:
        train_run = mlflow.MlflowClient().get_run(logged.source_run_id)
        tags.update({"model_id": logged.model_id, "training_run_id": logged.source_run_id,
                     "training_parent_run_id": train_run.data.tags.get("mlflow.parentRunId", "")})
    model_id = logged.model_id if logged else None
    with _run(experiment_id, f"{name}-r{index}-eval", tags, nested=True):
        if dataset is not None:
            mlflow.log_input(dataset, context="test")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=model_id,
                           dataset=dataset)
    return model_id


def log_artifacts(paths: Sequence[str | Path], artifact_path: str | None = "figures") -> None:
    """Files (figures) into the active run, the evaluation run, under `artifact_path`."""
    import mlflow

    _active_run("log_artifacts", "evaluation_run(...)")
    for path in paths:
        mlflow.log_artifact(str(path), artifact_path)
