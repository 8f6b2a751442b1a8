"""The MLflow store: where runs go, the experiment, and the tags every run carries."""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlsplit

from .. import cli

EXPERIMENT = "aebench"
MAX_REASON = 200  # characters of the cause that a store error's line quotes
CHECK_TIMEOUT_S = 5.0  # how long open_store waits on an HTTP tracking server
# open_store runs sqlite's quick_check on a sqlite store up to this size: it reads every page
# (about 25 ms for a 1.4 MB store after `make smoke`, 0.35 s for 146 MB, on a busy 2-core
# machine); a larger store is opened unchecked (docs/faults.md says how to check it by hand).
QUICK_CHECK_MAX_BYTES = 256 * 2**20
# The store the working copy's last run wrote, one URI, beside mlflow.db (ignored by git): the
# stages record their default store there, `make smoke` its copy's; `make ui` and the reuse
# snippet (last_store) open it.
LAST_STORE_FILE = ".mlflow-last-store"
# Set by `make smoke` (aebench.smoke) for the stages it runs in its scratch copy: the project's
# commit (the copy's own is meaningless), and what the smoke run shrank.
COMMIT_ENV = "AEBENCH_GIT_COMMIT"
SMOKE_ENV = "AEBENCH_SMOKE"
# Set by a sweep's worker (aebench.sweep.worker) for the stages of its experiment: the MLflow
# experiment the sweep's driver created once (MLflow's own variable: runs never look an
# experiment up by name, which concurrent workers would race on), and more tags for every run
# (a JSON object: the sweep, the configuration's overrides, the experiment's name).
EXPERIMENT_ID_ENV = "MLFLOW_EXPERIMENT_ID"
RUN_TAGS_ENV = "AEBENCH_RUN_TAGS"


class TrackingError(RuntimeError):
    """The MLflow tracking store cannot be used."""


# (words in the reason, what to do), first match wins; {file} is the store's file or URI
_ADVICE = (
    (("malformed", "not a database", "file is encrypted"),
     "the store is damaged: move {file} aside (the next run starts a new store) or put back a "
     "copy"),
    (("disk i/o error", "disk is full", "file too large", "no space left", "quota"),
     "check the free space and the file-size limit (`ulimit -f`) where {file} lies"),
    (("filesystem tracking backend",),  # MLflow 3 refuses file:// stores unless told
     "use a sqlite store (sqlite:///PATH/mlflow.db; `mlflow migrate-filestore` moves a file "
     "store's runs there), or set MLFLOW_ALLOW_FILE_STORE=true"),
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
    return shortened(" ".join(lines) or type(err).__name__)


def shortened(text: str, limit: int = MAX_REASON) -> str:
    """`text` cut to `limit` characters at the end of a sentence (MLflow's messages go on with
    links and guides), else of a word, never inside one."""
    if len(text) <= limit:
        return text
    kept = ""
    for sentence in re.split(r"(?<=[.!?])\s+", text):
        if len(kept) + len(sentence) + 1 > limit:
            break
        kept = f"{kept} {sentence}".lstrip()
    if kept:
        return kept
    return text[:limit - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def store_error(err: BaseException, uri: str) -> TrackingError:
    """One line for a failure of MLflow on the store `uri`: the store, why, what to do."""
    reason = _reason(err).rstrip(".")
    advice = next((todo for words, todo in _ADVICE if any(w in reason.lower() for w in words)),
                  "fix the store, or set MLFLOW_TRACKING_URI to another one")
    advice = advice.format(file=sqlite_path(uri) or uri)  # the file to move, free, unlock
    return TrackingError(f"MLflow tracking store {uri}: {reason}; {advice} (AEBENCH_DEBUG=1 for "
                         "the traceback)")


def interrupt_under_way(err: BaseException) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl-C, SIGTERM: cli.Interrupted) that was being handled when `err` was
    raised, if any: an error of the cleanup (MLflow's end_run KILLED, a session's rollback)
    is then not the story, the interrupt is."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen):
            continue
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return None


def _local(uri: str) -> bool:
    """Whether the store is a file on this machine (sqlite, file://): its writes take
    milliseconds."""
    return urlsplit(uri).scheme in ("sqlite", "file", "")


@contextmanager
def store_errors() -> Iterator[None]:
    """MLflow calls inside the block: any failure (MLflow's, SQLAlchemy's, a file it writes) as
    one TrackingError line (store_error). Works as a decorator too.

    On a local store (sqlite, file://) Ctrl-C, SIGTERM and SIGHUP that come inside the block act
    when it ends (cli.deferred_signals): an interrupt that lands inside SQLAlchemy can leave the
    sqlite file locked by this very process (SQLAlchemy drops the interrupted connection, and
    what the interrupt's traceback still holds keeps its lock until garbage collection), so
    that the cleanup's end_run(KILLED) waited 20 s and failed with "database is locked".
    Over HTTP an interrupt acts at once (a slow server would hold it for minutes). A store
    failure raised while an interrupt is handled gives way to the interrupt: the stage exits
    130 (143, 129) as interrupted, not 1."""
    import mlflow

    hold = cli.deferred_signals() if _local(mlflow.get_tracking_uri()) else nullcontext()
    try:
        with hold:
            yield
    except TrackingError:
        raise
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for one broken store
        if (interrupt := interrupt_under_way(err)) is not None:
            raise interrupt  # noqa: B904 - its context is the store's error, for --debug
        raise store_error(err, mlflow.get_tracking_uri()) from err


class _Quiet(logging.Filter):
    """MLflow logs a database error with its traceback, then raises it: the one line that
    store_errors makes of it says the same (tracebacks: AEBENCH_DEBUG=1 or --debug). It also
    logs, at INFO, that it creates the tables of a new store: not a stage's news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.exc_info is None and record.levelno > logging.INFO) or cli.debugging()


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


def check_integrity(uri: str) -> None:
    """A sqlite store's pages must hold together (sqlite's `PRAGMA quick_check`): a page
    overwritten at random is otherwise found only by the query that reads it, maybe hours later
    or never (MLflow reads most tables only for the UI). One line naming the file; nothing for a
    new store, another kind of store, or one over QUICK_CHECK_MAX_BYTES."""
    import sqlite3
    from contextlib import closing

    path = sqlite_path(uri)
    if path is None or not path.is_file() or path.stat().st_size > QUICK_CHECK_MAX_BYTES:
        return
    try:
        # read-write, as MLflow opens it: a hot journal left by a killed writer is rolled back
        with closing(sqlite3.connect(path, timeout=20)) as db:  # 20 s: MLflow's busy_timeout
            found = [row[0] for row in db.execute("PRAGMA quick_check(1)")]
    except sqlite3.Error as err:
        raise TrackingError(f"cannot open the {store_error(err, uri)}") from err
    if found != ["ok"]:
        what = shortened(" ".join(" ".join(found).split()), 120)
        raise TrackingError(f"MLflow tracking store {uri}: damaged (sqlite's quick_check: "
                            f"{what}); move {path} aside (the next run starts a new store) or "
                            "put back a copy")


def open_store(cwd: str | Path | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; return the experiment id.

    Call it before any work: an unusable store fails here with a one-line TrackingError naming
    the URI, within CHECK_TIMEOUT_S (+ a few seconds) for an HTTP server."""
    import mlflow

    uri = tracking_uri(cwd)
    by_hand = bool(os.environ.get("MLFLOW_TRACKING_URI"))  # set_tracking_uri sets it too
    _check_reachable(uri)
    check_integrity(uri)
    mlflow.set_tracking_uri(uri)
    db_errors = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, _Quiet) for f in db_errors.filters):
        db_errors.addFilter(_Quiet())
    try:
        with _quick_http_requests():
            experiment_id = _experiment(uri)
    except Exception as err:  # noqa: BLE001 - MLflow raises many types for an unusable store
        if (interrupt := interrupt_under_way(err)) is not None:
            raise interrupt  # noqa: B904
        raise TrackingError(f"cannot open the {store_error(err, uri)}") from err
    if not by_hand:  # a store set by hand is not recorded (nor make smoke's: it records it)
        record_last_store(uri, working_copy_root(cwd))
    return experiment_id


def _experiment(uri: str) -> str:
    """The id of the experiment in the current store, created if missing."""
    import mlflow

    if os.environ.get(EXPERIMENT_ID_ENV):  # a sweep's: it exists (get_experiment raises if not)
        return mlflow.get_experiment(os.environ[EXPERIMENT_ID_ENV]).experiment_id
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if (db := sqlite_path(uri)) is not None:
        # Artifacts beside the database, by absolute path, whatever the cwd of a run.
        artifacts = (db.parent / "mlartifacts").as_uri()
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
    return {**tags, **extra_tags()}


def extra_tags() -> dict[str, str]:
    """$AEBENCH_RUN_TAGS (a JSON object of strings, set by a sweep's worker) as tags."""
    import json

    text = os.environ.get(RUN_TAGS_ENV)
    if not text:
        return {}
    try:
        tags = json.loads(text)
    except ValueError as err:
        raise TrackingError(f"${RUN_TAGS_ENV}: not JSON ({err})") from None
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise TrackingError(f"${RUN_TAGS_ENV}: {text[:80]!r} is not a JSON object of strings")
    return tags

