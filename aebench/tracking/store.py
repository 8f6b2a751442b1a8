"""The MLflow store: where runs go, the experiment, and the tags every run carries."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

from .. import cli

EXPERIMENT = "aebench"
CHECK_TIMEOUT_S = 5.0  # how long open_store waits on an HTTP tracking server


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


def store_file(uri: str) -> str:
    """The file of an sqlite store (what to move, free space for, or make writable), else the
    URI itself."""
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else uri


# (words in the reason, what to do), first match wins; {file} is the store's file or URI
_ADVICE = (
    (("malformed", "not a database", "file is encrypted"),
     "the store is damaged: move {file} aside (the next run starts a new store) or put back a "
     "copy"),
    (("disk i/o error", "disk is full", "file too large", "no space left", "quota"),
     "check the free space and the file-size limit (`ulimit -f`) where {file} lies"),
    (("database is locked",), "another process holds the store: try again when it is done"),
    (("readonly database", "read-only", "permission denied"), "make {file} writable"),
)


def _reason(err: BaseException) -> str:
    """The root cause in a few words: the sqlite or OS error MLflow wraps, without the SQL."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or e in seen:
            continue
        seen.append(e)
        if isinstance(e, OSError) and e.strerror:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        if type(e).__module__ == "sqlite3":
            return f"sqlite: {e}"
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    lines = [line for line in str(err).splitlines() if line.strip()
             and not line.lstrip().startswith(("[SQL:", "[parameters:", "(Background on"))]
    text = " ".join(lines) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def store_error(err: BaseException, uri: str) -> TrackingError:
    """One line for a failure of MLflow on the store `uri`: the store, why, what to do."""
    reason = _reason(err)
    advice = next((todo for words, todo in _ADVICE if any(w in reason.lower() for w in words)),
                  "fix the store, or set MLFLOW_TRACKING_URI to another one")
    advice = advice.format(file=store_file(uri))
    return TrackingError(f"MLflow tracking store {uri}: {reason}; {advice} (AEBENCH_DEBUG=1 for "
                         "the traceback)")


@contextmanager
def store_errors() -> Iterator[None]:
    """MLflow calls inside the block: any failure (MLflow's, SQLAlchemy's, a file it writes) as
    one TrackingError line (store_error). Works as a decorator too."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for one broken store
        import mlflow

        raise store_error(err, mlflow.get_tracking_uri()) from err


class _NoTraceback(logging.Filter):
    """MLflow logs a database error with its traceback, then raises it: the one line that
    store_errors makes of it says the same (tracebacks: AEBENCH_DEBUG=1 or --debug)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.exc_info is None or cli.debugging()


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
    db_errors = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _NoTraceback) for f in db_errors.filters):
        db_errors.addFilter(_NoTraceback())
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
        raise TrackingError(f"cannot open the {store_error(err, uri)}") from err


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

