"""The MLflow store: where runs go, the experiment, and the tags every run carries."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

EXPERIMENT = "aebench"
CHECK_TIMEOUT_S = 5.0  # how long open_store waits on an HTTP tracking server


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

