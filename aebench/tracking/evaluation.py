"""Evaluation records: a run per evaluation, a child per replica whose metrics attach to the
replica's logged model and the test dataset; on the run itself the headline metrics, the
headline table, the metrics files and details, and (from the report stage) the report; the
figures as artifacts of a `figures` run."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import N_PIXELS
from ..files import rounded
from .models import find_logged, sha256_file
from .registry import set_best
from .runs import COLOR_TAG, OTHER_COLOR, active_run, end_stale_runs, quoted, tracked_run
from .store import common_tags, store_errors

if TYPE_CHECKING:  # mlflow is imported inside the functions: importing it costs seconds
    from mlflow.data.dataset import Dataset

HEADLINE_TABLE = "headline.json"  # the evaluation run's table: one row per model
DETAILS_TAG = "details_sha256"    # ties an evaluation run to the details.json it wrote
EVALUATION_SECTION = "evaluation"  # the prefix of the evaluation run's per-model metrics
MAX_DESCRIPTION = 8000            # MLflow's longest tag value (the run description is a tag)


@contextmanager
def evaluation_run(experiment_id: str, name: str = "evaluate",
                   tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A new run for one evaluation (never a training run): log_evaluation adds one child per
    replica, log_artifacts the figures. Yields the run id; ends like training_run (stale
    RUNNING runs of the same `name` first)."""
    end_stale_runs(experiment_id, stage=name)
    run_tags = {**common_tags(), "stage": name, COLOR_TAG: OTHER_COLOR, **(tags or {})}
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
                     "training_parent_run_id": train_run.data.tags.get("mlflow.parentRunId", ""),
                     **{k: v for k, v in train_run.data.tags.items() if k == COLOR_TAG}})
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


def _metric_name(key: str) -> str:
    """A headline key as the replicas' eval runs name it: mse -> test_mse (test_loss stays)."""
    return key if key.startswith("test_") else f"test_{key}"


def evaluation_metric(metric: str, name: str) -> str:
    """The evaluation run's metric `metric` of model `name`: evaluation/test_mse.deep3. One
    prefix, so the UI's chart view puts them all in one section ("evaluation", which it shows
    before the unprefixed "Model metrics", the training curves), each metric's models side by
    side; model-first names would make a section per model."""
    return f"{EVALUATION_SECTION}/{metric}.{name}"


def headline_table(headline: Mapping[str, Mapping[str, Any]],
                   details: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """One row per model, best (lowest mean test MSE) first: the test MSE, PCA at the model's
    latent size and whether the model beats it, then n and the other headline means and stds;
    as columns for mlflow.log_table, numbers at the metrics files' digits."""
    rows = []
    for name, h in headline.items():
        d = details[name]
        pca_k, pca_mse = d["pca"]["k"], d["pca"]["mse"]
        mse = h["mse"]["mean"]
        exact = pca_k >= N_PIXELS
        row = {"model": name, "test_mse": mse, "test_mse_std": h["mse"]["std"],
               "latent_dim": d["latent_dim"], "pca_k": pca_k, "pca_mse": pca_mse,
               "mse_over_pca": None if exact or not pca_mse else mse / pca_mse,
               "beats_pca": "n/a (PCA exact)" if exact else ("yes" if mse < pca_mse else "no"),
               "n": h["n"]}
        for key in ("sse_per_image", "test_loss"):
            stat = h.get(key) or h["mse"]  # test_loss is left out where it is the mse itself
            row[_metric_name(key)] = stat["mean"]
            row[f"{_metric_name(key)}_std"] = stat["std"]
        rows.append(rounded(row))
    rows.sort(key=lambda r: r["test_mse"])
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


@store_errors()
def log_results(headline: Mapping[str, Mapping[str, Any]],
                details: Mapping[str, Mapping[str, Any]], artifacts: Sequence[str | Path],
                details_file: str | Path) -> None:
    """The evaluation's results on the active evaluation_run, once every replica is logged:
    per model evaluation/test_mse.NAME, evaluation/test_mse_std.NAME, ... (the headline means
    and stds) and evaluation/pca_mse.NAME as metrics (evaluation_metric); the headline table
    (HEADLINE_TABLE); `artifacts` (files or folders: the metrics files and details.json)
    under their folder's name; @best of each
    model's registered model (its lowest test MSE replica, from this run's children); last,
    the tag details_sha256 by which attach_report finds this run."""
    import mlflow

    run = active_run("log_results", "evaluation_run(...)")
    metrics = {}
    for name, h in headline.items():
        for key, stat in h.items():
            if isinstance(stat, Mapping):
                metrics[evaluation_metric(_metric_name(key), name)] = float(stat["mean"])
                metrics[evaluation_metric(f"{_metric_name(key)}_std", name)] = float(stat["std"])
        metrics[evaluation_metric("pca_mse", name)] = float(details[name]["pca"]["mse"])
    mlflow.log_metrics(metrics)
    mlflow.log_table(headline_table(headline, details), HEADLINE_TABLE)
    for path in map(Path, artifacts):
        if path.is_dir():
            mlflow.log_artifacts(str(path), path.name)
        else:
            mlflow.log_artifact(str(path), path.parent.name or None)
    for name, weights_sha256 in _best_replicas(run.info.run_id).items():
        set_best(name, weights_sha256)
    mlflow.set_tag(DETAILS_TAG, sha256_file(details_file))


def _best_replicas(run_id: str) -> dict[str, str]:
    """{model: weights sha256} of each model's lowest test_mse replica among the evaluation's
    children."""
    import mlflow

    client = mlflow.MlflowClient()
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = {quoted(run_id)}",
                                  max_results=10_000)
    best: dict[str, tuple[float, str]] = {}
    for child in children:
        name, sha = child.data.tags.get("model"), child.data.tags.get("weights_sha256")
        mse = child.data.metrics.get("test_mse")
        if name and sha and mse is not None and (name not in best or mse < best[name][0]):
            best[name] = (mse, sha)
    return {name: sha for name, (_, sha) in best.items()}


@store_errors()
def attach_report(experiment_id: str, details_file: str | Path,
                  report_file: str | Path) -> str | None:
    """Attach the report (reports/summary.md) to the evaluation run that wrote `details_file`
    (the newest FINISHED one whose details_sha256 tag is that file's sha256): as an artifact,
    and as the run's description, which the UI shows on the run's page. Returns the run id;
    None, with a warning, when this store has no such run (the details pulled from a DVC remote
    or a fresh mlflow.db)."""
    import mlflow

    sha = sha256_file(details_file)
    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], f"tags.{DETAILS_TAG} = {quoted(sha)} AND "
                              "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        print(f"warning: no evaluation run in {mlflow.get_tracking_uri()} wrote {details_file} "
              f"(sha256 {sha[:12]}...); the report is not attached to one", file=sys.stderr)
        return None
    run_id = runs[0].info.run_id
    report_file = Path(report_file)
    client.log_artifact(run_id, str(report_file), report_file.parent.name or None)
    text = report_file.read_text()
    note = (f"The report of this evaluation ({report_file.parent.name}/{report_file.name}, also "
            "under Artifacts); its figure links point into the repository, the PNGs are in the "
            "`figures` run.\n\n")
    if len(note) + len(text) <= MAX_DESCRIPTION:
        client.set_tag(run_id, "mlflow.note.content", note + text)
    return run_id
