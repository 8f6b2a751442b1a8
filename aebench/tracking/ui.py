"""`make ui`: the MLflow UI on the store of the last run, or on the one named.

    python -m aebench.tracking.ui [STORE] [--port N]      (make ui [STORE=...] [PORT=...])

Without STORE: the store the working copy's last run wrote (`.mlflow-last-store`: after
`make smoke` that is .smoke/mlflow.db, after `dvc repro` the working copy's mlflow.db;
$MLFLOW_TRACKING_URI when set). STORE is a folder holding mlflow.db, a .db file, or a URI.
Prints the store and the address of the experiment's runs in the "Model training" view, then
runs `mlflow ui` on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .store import EXPERIMENT, TrackingError, last_store, sqlite_path, store_errors

HOST = "127.0.0.1"
# MLflow 3's UI shows its GenAI views unless told otherwise; a run page opened from the runs
# list can still fall back to them (upstream): clicking "Model training" once switches back.
WORKFLOW = "workflowType=machine_learning"


def store_uri(store: str | None = None) -> str:
    """The URI of STORE (a folder with mlflow.db, a .db file, or a URI), else last_store()."""
    if not store:
        return last_store()
    if "://" in store:
        return store
    path = Path(store).resolve()
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise TrackingError(f"STORE={store}: no MLflow store at {path}")
    return f"sqlite:///{path}"


def runs_address(port: int, experiment_id: str | None) -> str:
    """The UI's list of the experiment's runs in the Model training view (the experiments
    list when the store has no such experiment yet)."""
    base = f"http://{HOST}:{port}/#/experiments"
    return f"{base}/{experiment_id}/runs?{WORKFLOW}" if experiment_id else f"{base}?{WORKFLOW}"


@store_errors()
def _experiment_id(uri: str) -> str | None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    return experiment.experiment_id if experiment else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ui", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", nargs="?", help="a folder with mlflow.db, a .db file or a URI")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        uri = store_uri(args.store)
        experiment_id = _experiment_id(uri)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = sqlite_path(uri)
    print(f"MLflow store: {uri}" + ("" if args.store else " (the last run's; make ui STORE=... "
                                    "for another)"))
    if path is None:
        print(f"not a local store: open its server's own UI, {uri}")
        return 0
    print(f"open {runs_address(args.port, experiment_id)}")
    print('(a page that opens in the GenAI view: click "Model training" at the top left once)')
    sys.stdout.flush()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin) if mlflow_bin.is_file() else "mlflow", "ui",
               "--backend-store-uri", uri, "--host", HOST, "--port", str(args.port)]
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
