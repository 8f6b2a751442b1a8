"""MLflow: where runs go, and the few calls the stages make.

The store defaults to `sqlite:///<working copy>/mlflow.db`, an absolute URI. `dvc exp run --temp`
and `--queue` execute in a copy under `<working copy>/.dvc/tmp/exps/`; the root is taken from
above that folder so those runs land in the user's own store too. MLFLOW_TRACKING_URI overrides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .files import write_json

EXPERIMENT = "aebench"
RUN_INFO = "run.json"  # beside the weights: which MLflow run trained them, on what, how long


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


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


def open_store(cwd: str | Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return the experiment id.

    Fails with TrackingError (naming the URI) before any training starts."""
    import mlflow

    uri = tracking_uri(cwd)
    mlflow.set_tracking_uri(uri)
    try:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is not None:
            return exp.experiment_id
        artifacts = None
        if uri.startswith("sqlite:///"):
            # Keep artifacts beside the database, by absolute path, whatever the cwd of a run.
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        # MLflow 3 marks an experiment as model training (rather than GenAI) with this tag.
        return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store
        raise TrackingError(f"cannot open the MLflow tracking store {uri!r}: {err}. Set "
                            "MLFLOW_TRACKING_URI to a store you can write to.") from None


def git_commit(cwd: str | Path | None = None) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(stage: str) -> dict[str, str]:
    tags = {"git_commit": git_commit(), "dvc_stage": stage}
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return tags


def write_run_info(model_dir: str | Path, info: dict[str, Any]) -> None:
    write_json(Path(model_dir, RUN_INFO), info)


def read_run_info(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir, RUN_INFO)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; rerun the model's train stage") from None


def log_to_run(run_id: str, *, metrics: dict[str, float] | None = None, step: int = 0,
               artifacts: list[str | Path] = (), artifact_path: str | None = None,
               what: str = "metrics") -> bool:
    """Add metrics (at `step`) and files to an existing run (the run that trained the model).

    A run missing from this store (models pulled from a DVC remote, a fresh mlflow.db) is a
    warning, not a failure: the files DVC tracks are the record. Returns whether it was logged."""
    import mlflow
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        if metrics:
            now = mlflow.utils.time.get_current_time_millis()
            client.log_batch(run_id, metrics=[Metric(k, float(v), now, step)
                                              for k, v in metrics.items()])
        for path in artifacts:
            client.log_artifact(run_id, str(path), artifact_path)
    except MlflowException as err:
        print(f"warning: {what} not logged to MLflow run {run_id} at {mlflow.get_tracking_uri()}: "
              f"{err.message}", file=sys.stderr)
        return False
    return True
