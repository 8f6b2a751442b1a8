"""Evaluation records: a run per evaluation, a child per replica whose metrics attach to the
replica's logged model and the test dataset; the figures as artifacts."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models import find_logged
from .runs import active_run, end_stale_runs, tracked_run
from .store import common_tags, store_errors

if TYPE_CHECKING:  # mlflow is imported inside the functions: importing it costs seconds
    from mlflow.data.dataset import Dataset

@contextmanager
def evaluation_run(experiment_id: str, name: str = "evaluate",
                   tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A new run for one evaluation (never a training run): log_evaluation adds one child per
    replica, log_artifacts the figures. Yields the run id; ends like training_run (stale
    RUNNING runs of the same `name` first)."""
    end_stale_runs(experiment_id, stage=name)
    run_tags = {**common_tags(), "stage": name, **(tags or {})}
    with tracked_run(experiment_id, name, run_tags, nested=False) as run_id:
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

    parent = active_run("log_evaluation", "evaluation_run(...)")
    experiment_id = parent.info.experiment_id
    logged = find_logged(name, weights_sha256, experiment_id)
    tags = {**common_tags(), "stage": parent.data.tags.get("stage", "evaluate"), "model": name,
            "replica": str(index), "weights_sha256": weights_sha256}
    if logged is None:
        print(f"warning: {name}-r{index}: no logged model with weights sha256 "
              f"{weights_sha256[:12]}... in {mlflow.get_tracking_uri()} (weights pulled from a "
              "DVC remote, or a fresh mlflow.db?); test metrics go to the evaluation run only",
              file=sys.stderr)
    else:
        with store_errors():
            train_run = mlflow.MlflowClient().get_run(logged.source_run_id)
        tags.update({"model_id": logged.model_id, "training_run_id": logged.source_run_id,
                     "training_parent_run_id": train_run.data.tags.get("mlflow.parentRunId", "")})
    model_id = logged.model_id if logged else None
    with tracked_run(experiment_id, f"{name}-r{index}-eval", tags, nested=True), \
            store_errors():
        if dataset is not None:
            mlflow.log_input(dataset, context="test")
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, model_id=model_id,
                           dataset=dataset)
    return model_id


def log_artifacts(paths: Sequence[str | Path], artifact_path: str | None = "figures") -> None:
    """Files (figures) into the active run, the evaluation run, under `artifact_path`."""
    import mlflow

    active_run("log_artifacts", "evaluation_run(...)")
    with store_errors():
        for path in paths:
            mlflow.log_artifact(str(path), artifact_path)
