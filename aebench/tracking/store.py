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
# The store the working copy's last run wrote, one URI, beside mlflow.db (ignored by git): the
# stages record their default store there, `make smoke` its copy's; `make ui` and the reuse
# snippet (last_store) open it.
LAST_STORE_FILE = ".mlflow-last-store"
# Set by `make smoke` (aebench.smoke) for the stages it runs in its scratch copy: the project's
# commit (the copy's own is meaningless), and what the smoke run shrank.
COMMIT_ENV = "AEBENCH_GIT_COMMIT"
SMOKE_ENV = "AEBENCH_SMOKE"


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def record_last_store(uri: str, root: str | Path) -> Path:
    """Name `uri` in ROOT/.mlflow-last-store as the store of the working copy's last run."""
    from ..files import write_text

    path = Path(root) / LAST_STORE_FILE
    write_text(path, uri + "\n")
    return path


def last_store(cwd: str | Path | None = None) -> str:
    """The store of this working copy's last run: $MLFLOW_TRACKING_URI when set, else the URI
    recorded in .mlflow-last-store (by the last stage run here, or by `make smoke`: its
    .smoke/mlflow.db), else (nothing recorded, or that store deleted since) the working copy's
    own mlflow.db.

    No sqlite store there is a TrackingError naming it: opening it would create an empty store,
    and nothing has run there."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = working_copy_root(cwd)
    record = root / LAST_STORE_FILE
    candidates = [record.read_text().strip()] if record.is_file() else []
    candidates.append(tracking_uri(root))
    for uri in candidates:
        path = sqlite_path(uri)
        if path is None or path.is_file():
            return uri
    raise TrackingError(f"no MLflow store at {sqlite_path(candidates[-1])}: nothing has run in "
                        f"{root} yet (run `dvc repro` or `make smoke` first)")


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
    by_hand = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # set_tracking_uri sets it too
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _quick_http_requests():
            experiment_id = _experiment(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TrackingError(f"cannot open the MLflow tracking store {uri}: {first_line}. Set "
                            "MLFLOW_TRACKING_URI to a store you can write to.") from None
    if not by_hand:  # a store set by hand is not recorded (nor make smoke's: it records it)
        record_last_store(uri, working_copy_root(cwd))
    return experiment_id


def _experiment(uri: str) -> str:
    """The id of the experiment in the current store, created if missing."""
    import mlflow

    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if sqlite_path(uri) is not None:
        # Artifacts beside the database, by absolute path, whatever the cwd of a run.
        artifacts = (sqlite_path(uri).parent / "mlartifacts").as_uri()
    # MLflow 3's UI opens a "custom_model_development" experiment on its runs (rather than on
    # the GenAI views).
    return mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def git_commit(cwd: str | Path | None = None) -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def common_tags() -> dict[str, str]:
    """Tags of every run: the git commit (the project's, for a `make smoke` run), the DVC
    experiment's name when DVC runs one, and `smoke` (what it shrank) for a smoke run."""
    tags = {"git_commit": os.environ.get(COMMIT_ENV) or git_commit()}
    if os.environ.get(COMMIT_ENV):  # MLflow's own (the UI's "Source") would be the copy's
        tags["mlflow.source.git.commit"] = os.environ[COMMIT_ENV]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    if os.environ.get(SMOKE_ENV):
        tags["smoke"] = os.environ[SMOKE_ENV]
    return tags

