"""Evaluation records: a run per evaluation, a child per replica whose metrics attach to the
replica's logged model and the test dataset, and a child per model with its headline (mean and
std over replicas); on the run itself the headline table, the metrics files and details, and
(from the report stage) the report; the figures as artifacts of a `figures` run."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import N_PIXELS
from ..files import read_json, rounded
from .description import description, figures, ranking
from .models import find_logged, sha256_file
from .registry import set_best
from .runs import COLOR_TAG, OTHER_COLOR, active_run, end_stale_runs, quoted, tidy, tracked_run
from .store import common_tags, store_errors

if TYPE_CHECKING:  # mlflow is imported inside the functions: importing it costs seconds
    from mlflow.data.dataset import Dataset

HEADLINE_TABLE = "headline.json"  # the evaluation run's table: one row per model
DETAILS_TAG = "details_sha256"    # ties an evaluation run to the details.json it wrote
BEST_TAG = "best_model"           # the model with the lowest mean test MSE (the run page's Tags)
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
        mlflow.log_metrics({k: tidy(v) for k, v in metrics.items()}, model_id=model_id,
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


def model_evaluation_name(name: str) -> str:
    """The evaluation run's child that holds model `name`'s headline: deep3-eval (its replicas'
    are deep3-r0-eval, ...)."""
    return f"{name}-eval"


def headline_table(headline: Mapping[str, Mapping[str, Any]],
                   details: Mapping[str, Mapping[str, Any]]) -> dict[str, list]:
    """One row per model, best (lowest mean test MSE) first: its rank, the test MSE and its
    std, how many times the best model's it is, the same as SSE/image, the MSE over PCA's at
    the model's latent size and whether the model beats it (where PCA is exact, k >= 784, no
    ratio exists: the words say so), PCA's MSE and k, the latent size, the test loss and n; as
    columns for mlflow.log_table, numbers at the metrics files' digits."""
    order = ranking(headline)
    best = headline[order[0]]["mse"]["mean"] if order else 0.0
    rows = []
    for rank, name in enumerate(order, 1):
        h, d = headline[name], details[name]
        pca_k, pca_mse = d["pca"]["k"], d["pca"]["mse"]
        mse = h["mse"]["mean"]
        exact = pca_k >= N_PIXELS
        row = {"rank": rank, "model": name, "test_mse": mse, "test_mse_std": h["mse"]["std"],
               "mse_over_best": mse / best if best > 0 else None}
        for key in ("sse_per_image", "test_loss"):
            stat = h.get(key) or h["mse"]  # test_loss is left out where it is the mse itself
            row[_metric_name(key)] = stat["mean"]
            row[f"{_metric_name(key)}_std"] = stat["std"]
        row.update({"mse_over_pca": (f"n/a: PCA exact (k = {pca_k} >= {N_PIXELS})" if exact
                                     else mse / pca_mse if pca_mse else None),
                    "beats_pca": "n/a (PCA exact)" if exact else ("yes" if mse < pca_mse
                                                                  else "no"),
                    "pca_mse": pca_mse, "pca_k": pca_k, "latent_dim": d["latent_dim"],
                    "n": h["n"]})
        rows.append(rounded(row))
    return {key: [r[key] for r in rows] for key in rows[0]} if rows else {}


@store_errors()
def log_results(headline: Mapping[str, Mapping[str, Any]],
                details: Mapping[str, Mapping[str, Any]], artifacts: Sequence[str | Path],
                details_file: str | Path) -> None:
    """The evaluation's results on the active evaluation_run, once every replica is logged:
    per model a child run NAME-eval (model_evaluation_name) in the model's colour with the
    headline means and stds under the names its replicas' runs use (test_mse, test_mse_std,
    test_sse_per_image, ...), pca_mse (PCA at its latent size, where PCA is not exact, as in
    the metrics files) and the ratios mse_over_pca and mse_over_best (its test MSE over the
    best model's), created worst first so that a list newest first shows them best first; the
    headline table (HEADLINE_TABLE); `artifacts`
    (files or folders: the metrics files and details.json) under their folder's name; @best of
    each model's registered model (its lowest test MSE replica, from this run's children); the
    tag best_model (BEST_TAG: the lowest mean test MSE); last, the tag details_sha256 by which
    attach_report finds this run.

    The headline goes to children, not to this run: MLflow's chart view draws a chart per
    metric key of every visible run, this one included, in sections that come before the
    training curves, and per-model keys on one run are single-bar charts. As runs, the models
    compare in one bar chart per metric once this run is expanded, and the chart view opens on
    the training runs' final test MSE and curves (runs.FINAL_METRICS)."""
    import mlflow

    run = active_run("log_results", "evaluation_run(...)")
    replicas = _replica_evaluations(run.info.run_id)
    tags = {**common_tags(), "stage": run.data.tags.get("stage", "evaluate")}
    order = ranking(headline)
    best = headline[order[0]]["mse"]["mean"] if order else 0.0
    # The worst first: a list of runs newest first (the UI's default) then shows them best first
    for name in reversed(order):
        h, pca = headline[name], details[name]["pca"]
        metrics = {}
        if pca["k"] < N_PIXELS:  # else PCA is exact: no PCA MSE to compare with
            metrics["pca_mse"] = tidy(pca["mse"])
            if pca["mse"]:
                metrics["mse_over_pca"] = tidy(h["mse"]["mean"] / pca["mse"])
        if best > 0:
            metrics["mse_over_best"] = tidy(h["mse"]["mean"] / best)
        for key, stat in h.items():
            if isinstance(stat, Mapping):
                metrics[_metric_name(key)] = tidy(stat["mean"])
                metrics[f"{_metric_name(key)}_std"] = tidy(stat["std"])
        color = next((r.data.tags[COLOR_TAG] for r in replicas
                      if r.data.tags.get("model") == name and COLOR_TAG in r.data.tags), None)
        model_tags = {**tags, "model": name, "replicas": str(h["n"]),
                      **({COLOR_TAG: color} if color else {})}
        with tracked_run(run.info.experiment_id, model_evaluation_name(name), model_tags,
                         nested=True):
            mlflow.log_metrics(metrics)
    mlflow.log_table(headline_table(headline, details), HEADLINE_TABLE)
    for path in map(Path, artifacts):
        if path.is_dir():
            mlflow.log_artifacts(str(path), path.name)
        else:
            mlflow.log_artifact(str(path), path.parent.name or None)
    for name, weights_sha256 in _best_replicas(replicas).items():
        set_best(name, weights_sha256)
    if headline:
        mlflow.set_tag(BEST_TAG, min(headline, key=lambda name: headline[name]["mse"]["mean"]))
    mlflow.set_tag(DETAILS_TAG, sha256_file(details_file))


def _replica_evaluations(run_id: str) -> list:
    """The evaluation run's children so far: one per evaluated replica (log_evaluation)."""
    import mlflow

    client = mlflow.MlflowClient()
    return client.search_runs([client.get_run(run_id).info.experiment_id],
                              f"tags.mlflow.parentRunId = {quoted(run_id)}",
                              max_results=10_000)


def _best_replicas(children: Sequence) -> dict[str, str]:
    """{model: weights sha256} of each model's lowest test_mse replica among an evaluation's
    replica children."""
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
    and as the run's description, which the UI shows first on the run's page, led by the
    verdict, the models best first and the figures of the `figures` run that followed it
    (description.description). Returns the run id; None, with a warning, when this store has no
    such run (the details pulled from a DVC remote or a fresh mlflow.db)."""
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
    run = runs[0]
    report_file = Path(report_file)
    client.log_artifact(run.info.run_id, str(report_file), report_file.parent.name or None)
    details = read_json(details_file)
    headline = _logged_headline(run.info.run_id, experiment_id, list(details))
    text = description(headline, {n: details[n] for n in headline},
                       figures_md=_figures_of(experiment_id, run.info.start_time),
                       report=report_file.read_text(),
                       report_name=f"{report_file.parent.name}/{report_file.name}",
                       limit=MAX_DESCRIPTION)
    client.set_tag(run.info.run_id, "mlflow.note.content", text)
    return run.info.run_id


def _logged_headline(run_id: str, experiment_id: str, names: Sequence[str]) -> dict[str, dict]:
    """The headline of each model (in `names`' order) as log_results put it on the evaluation
    run's child NAME-eval: {"mse": {mean, std}, "sse_per_image": {mean, std}, "n"}."""
    import mlflow

    children = mlflow.MlflowClient().search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = {quoted(run_id)}", max_results=10_000)
    by_name = {r.info.run_name: r for r in children}
    headline = {}
    for name in names:
        run = by_name.get(model_evaluation_name(name))
        if run is None or "test_mse" not in run.data.metrics:
            continue
        m = run.data.metrics
        headline[name] = {"mse": {"mean": m["test_mse"], "std": m.get("test_mse_std", 0.0)},
                          "n": int(run.data.tags.get("replicas", "0") or 0)}
        if "test_sse_per_image" in m:
            headline[name]["sse_per_image"] = {"mean": m["test_sse_per_image"],
                                               "std": m.get("test_sse_per_image_std", 0.0)}
    return headline


def _figures_of(experiment_id: str, since_ms: int) -> str:
    """The PNGs of the newest FINISHED `figures` run started after `since_ms` (the evaluation
    run's start: the figures drawn from its results) as Markdown images; "" when there is none."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([experiment_id], "tags.stage = 'figures' AND "
                              f"attributes.status = 'FINISHED' AND attributes.start_time >= "
                              f"{int(since_ms)}", order_by=["attributes.start_time DESC"],
                              max_results=1)
    if not runs:
        return ""
    run_id = runs[0].info.run_id
    return figures(run_id, [a.path for a in client.list_artifacts(run_id, "figures")])
