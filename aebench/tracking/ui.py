"""`make ui`: the MLflow UI on the store of the last run, or on the one named.

    python -m aebench.tracking.ui [STORE] [--port N]      (make ui [STORE=...] [PORT=...])

Without STORE: the store the working copy's last run wrote (`.mlflow-last-store`: after
`make smoke` that is .smoke/mlflow.db, after `dvc repro` the working copy's mlflow.db;
$MLFLOW_TRACKING_URI when set). STORE is a folder holding mlflow.db, a .db file, or a URI.
Saves the view "Models, best first" in the experiment (the model runs sorted by final test MSE,
with its column), prints the store and the addresses of that view as a table and as charts and
of all runs, in the "Model training" view, then runs `mlflow ui` on it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

from .runs import BEST_REPLICA_TAG, FINAL_SECTION, FINAL_SSE, final_metric
from .store import EXPERIMENT, TrackingError, last_store, sqlite_path, store_errors

HOST = "127.0.0.1"
# MLflow 3's UI shows its GenAI views unless told otherwise; a run page opened from the runs
# list can still fall back to them (upstream): clicking "Model training" once switches back.
WORKFLOW = {"workflowType": "machine_learning"}
# MLflow's saved views (3.15+, "Views" on the runs page): an experiment tag
# VIEW_TAG_PREFIX + id holding {"name", "createdAt", "state"}, where state is the JSON of the
# page's search (searchFilter, orderByKey, orderByAsc: the parameters the runs page also reads
# from its address) and table settings (selectedColumns, runsHiddenMode); the page opens one
# by the address parameter viewStateShareKey=id. An address alone can sort and filter but not
# show a column: the saved view does both.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "viewStateShareKey"
VIEW_ID = "aebench-models"
VIEW_NAME = "Models, best first"
CHART_MODE = {"compareRunsMode": "CHART"}  # the runs page's chart view


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


def column(kind: str, key: str) -> str:
    """A runs-table column, and sort key, as the UI names it: metrics.`final/test_mse`."""
    return f"{kind}.`{key}`"


def _section(uuid: str, name: str) -> dict:
    return {"uuid": uuid, "name": name, "display": True, "isReordered": False, "deleted": False,
            "isGenerated": True}


def _chart(kind: str, key: str, section: str, title: str = "", *, shown: bool = True,
           log: bool = False) -> dict:
    """A chart of the runs page's chart view (its saved form: MLflow's RunsChartsCardConfig);
    `shown` False hides the chart the UI would otherwise generate for `key`."""
    chart = {"type": kind, "uuid": f"aebench-{key}", "metricSectionId": section,
             "isGenerated": True, "deleted": not shown, "metricKey": key,
             "selectedMetricKeys": [key], "displayName": title or key, "runsCountToCompare": 100}
    if kind == "LINE":
        chart.update({"scaleType": "log" if log else "linear", "xAxisKey": "step",
                      "xAxisScaleType": "linear", "selectedXAxisMetricKey": "",
                      "lineSmoothness": 0, "useGlobalXaxisKey": False,
                      "useGlobalLineSmoothing": False, "displayPoints": True,
                      "range": {"xMin": None, "xMax": None, "yMin": None, "yMax": None}})
    return chart


# The chart view of the saved view: MLflow sorts metric sections by name and the bar labels
# show two decimals, which for a test MSE (0.0009 .. 0.034) reads 0.00 .. 0.03. So it opens on
# SSE per image (784 x the MSE, 0.71 .. 26.49: labels that differ), one bar per model in the
# runs' order (best first), then the curves on a log scale; the charts that say nothing at a
# glance (the std's bars, the MSE's 2-decimal bars) are hidden, a click away under "Add chart".
FINAL, CURVES = "aebench-final", "aebench-curves"
VIEW_SECTIONS = [_section(FINAL, FINAL_SECTION), _section(CURVES, "Model metrics")]
VIEW_CHARTS = [
    _chart("BAR", final_metric(FINAL_SSE), FINAL,
           "SSE per image after the last epoch (784 × test MSE; lower is better)"),
    _chart("BAR", final_metric("test_mse"), FINAL, shown=False),
    _chart("BAR", final_metric("test_mse_std"), FINAL, shown=False),
    _chart("LINE", "test_mse", CURVES, "test MSE per epoch, mean over replicas (log scale)",
           log=True),
    _chart("LINE", "train_loss", CURVES, "training loss per epoch, each source's own loss "
           "(log scale)", log=True),
    _chart("LINE", "test_mse_std", CURVES, shown=False),
    _chart("LINE", "train_loss_std", CURVES, shown=False),
]


def models_view() -> dict:
    """The saved view's state: the training runs of the models (the runs that have a final
    test MSE), lowest final test MSE first, with it, its std, SSE/image, the best replica, the
    latent size and the parameter count as columns; every run drawn in the charts (not only
    the first 10), as VIEW_CHARTS says."""
    mse = column("metrics", final_metric("test_mse"))
    return {"searchFilter": f"{mse} >= 0", "orderByKey": mse, "orderByAsc": True,
            "selectedColumns": [mse, column("metrics", final_metric("test_mse_std")),
                                column("metrics", final_metric(FINAL_SSE)),
                                column("tags", BEST_REPLICA_TAG),
                                column("params", "latent_dim"), column("params", "n_params")],
            "runsHiddenMode": "SHOW_ALL", "compareRunSections": VIEW_SECTIONS,
            "compareRunCharts": VIEW_CHARTS, "isAccordionReordered": True,
            "hideEmptyCharts": True}


@store_errors()
def save_models_view(experiment_id: str) -> None:
    """Save (or refresh) the view VIEW_NAME in the experiment, for runs_address(view=True)."""
    import mlflow

    envelope = {"name": VIEW_NAME, "createdAt": int(time.time() * 1000),
                "state": json.dumps(models_view())}
    mlflow.MlflowClient().set_experiment_tag(experiment_id, VIEW_TAG_PREFIX + VIEW_ID,
                                             json.dumps(envelope))


def runs_address(port: int, experiment_id: str | None, *, view: bool = False,
                 charts: bool = False) -> str:
    """The UI's list of the experiment's runs in the Model training view (the experiments
    list when the store has no such experiment yet): as saved in the view "Models, best first"
    when `view`, as charts when `charts`."""
    base = f"http://{HOST}:{port}/#/experiments"
    if not experiment_id:
        return f"{base}?{urlencode(WORKFLOW)}"
    query = {**({VIEW_KEY: VIEW_ID} if view else {}), **(CHART_MODE if charts else {}),
             **WORKFLOW}
    return f"{base}/{experiment_id}/runs?{urlencode(query)}"


def port_taken(port: int, host: str = HOST) -> bool:
    """Whether another program already listens on host:port. The MLflow server binds it as
    uvicorn does (SO_REUSEADDR: a port left in TIME_WAIT by the last UI counts as free), and
    when it cannot it logs "Address already in use" and exits 0: so this is asked first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def port_error(port: int) -> str | None:
    """Why the UI cannot listen on HOST:port (one line), or None."""
    try:
        if not port_taken(port):
            return None
    except OSError as err:
        return f"--port {port}: {HOST}:{port} cannot be bound: {err.strerror}"
    return (f"--port {port}: {HOST}:{port} is taken by another program; stop it, or choose "
            "another port (make ui PORT=5001)")


def tcp_port(text: str) -> int:
    """An argparse type: a TCP port, 1..65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a TCP port; use 1..65535")
    return port


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
    parser.add_argument("--port", type=tcp_port, default=5000)
    args = parser.parse_args(argv)
    try:
        uri = store_uri(args.store)
        experiment_id = _experiment_id(uri)
    except TrackingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    path = sqlite_path(uri)
    error = port_error(args.port) if path is not None else None  # before any address
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"MLflow store: {uri}" + ("" if args.store else " (the last run's; make ui STORE=... "
                                    "for another)"))
    if path is None:
        print(f"not a local store: open its server's own UI, {uri}")
        return 0
    if experiment_id:
        try:
            save_models_view(experiment_id)
        except TrackingError as err:  # a store it cannot write to: the plain list still opens
            print(f"warning: the view {VIEW_NAME!r} is not saved: {err}", file=sys.stderr)
        else:
            print(f"{VIEW_NAME}: {runs_address(args.port, experiment_id, view=True)}")
            print(f"  as charts: {runs_address(args.port, experiment_id, view=True, charts=True)}")
    print(f"all runs: {runs_address(args.port, experiment_id)}")
    print('(a page that opens in the GenAI view: click "Model training" at the top left once)')
    sys.stdout.flush()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow_bin) if mlflow_bin.is_file() else "mlflow", "ui",
               "--backend-store-uri", uri, "--host", HOST, "--port", str(args.port)]
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
