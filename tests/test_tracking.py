"""aebench.tracking against a real MLflow sqlite store (one per module: creating it costs
seconds), with a tiny autoencoder that has encode / decode / latent_dim like the real ones."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import store_folder

from aebench import cli, kinds, tracking


def readme_snippet() -> str:
    """The first Python block of docs/mlflow.md's "Reusing a trained model" section, as
    written."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "mlflow.md").read_text()
    section = text.split("## Reusing a trained model", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def tiny(pixels: str = "-1,1", latent: int = 3):
    """A tiny autoencoder of aebench's own kind mlp, as a params.yaml entry would make it."""
    return kinds.validate_model("tiny", {
        "kind": "mlp", "encoder": [784, latent], "decoder": [latent, 784], "activation": "relu",
        "code_activation": "none", "output_activation": "tanh" if pixels == "-1,1" else "sigmoid",
        "dropout": 0.0, "init": "torch", "pixels": pixels, "input_noise": 0.0,
        "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0}, "loss": "mse",
        "batch_size": 8, "epochs": 1})


TINY = tiny()


def sha(name: str, index: int) -> str:
    return f"{name}-r{index}".encode().hex().ljust(64, "0")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(experiment id, store folder) of a fresh sqlite store for this module."""
    folder = tmp_path_factory.mktemp("store")
    before = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        yield tracking.open_store(), folder
    mlflow.set_tracking_uri(before)


@pytest.fixture(autouse=True)
def _store_uri(store, monkeypatch):
    """Each test starts on the module's store (the README snippet switches to a relative URI),
    outside any DVC experiment."""
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store[1] / 'mlflow.db'}")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])


EPOCHS = [{"epoch": e, "train_loss": 1 / e, "test_mse": 0.5 / e} for e in (1, 2, 3)]
# what training.curve_rows makes of the replicas' epochs: mean and std per epoch
CURVE = [{"epoch": e, "test_mse": 0.5 / e, "test_mse_std": 0.01 * e, "train_loss": 1 / e,
          "train_loss_std": 0.02 * e} for e in (1, 2, 3)]


@pytest.fixture(scope="module")
def trained(store):
    """deep3 trained as 2 replicas by `dvc repro` (not an experiment): {"parent": run id,
    "children": [run id], "models": [model id], "nets": [module]}; the nets are left in train
    mode."""
    experiment_id, folder = store
    out = {"children": [], "models": [], "nets": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("DVC_EXP_NAME", raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        assert tracking.open_store() == experiment_id  # an earlier test may have moved MLflow
        params = {"kind": "mlp", "optimizer.lr": 1e-3, "n_train": 50, "device": "cpu"}
        with tracking.training_run(experiment_id, "deep3", params,
                                   color=tracking.model_color(0)) as parent:
            out["parent"] = parent
            for i in range(2):
                with tracking.replica_run("deep3", i, seed=i) as child:
                    torch.manual_seed(i)
                    net = TINY.build()
                    tracking.log_epochs(EPOCHS, {"train_seconds": 1.5})
                    out["models"].append(tracking.log_replica_model(
                        net, name="deep3", index=i, pixels="-1,1", weights_sha256=sha("deep3", i),
                        params=params, cfg=TINY))
                    out["children"].append(child)
                    out["nets"].append(net)
            tracking.log_training_curve(CURVE)
            out["versions"] = tracking.register_training("deep3", out["models"])
    return out


def test_store_uri_follows_the_working_copy(monkeypatch):
    root = Path("/home/u/project")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri(root / ".dvc/tmp/exps/tmpab12") == \
        "sqlite:////home/u/project/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(root) == "http://127.0.0.1:5000"


def test_open_store_reuses_its_experiment(store):
    experiment_id, folder = store
    assert tracking.open_store() == experiment_id
    exp = mlflow.get_experiment(experiment_id)
    assert exp.name == "aebench"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (folder / "mlartifacts").as_uri()


def test_a_new_store_is_created_without_a_word_unless_debugging():
    code = "from aebench import tracking; tracking.open_store()"
    said = {}
    for debug in ("0", "1"):
        with store_folder() as folder:
            env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
                   "AEBENCH_DEBUG": debug}
            said[debug] = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                         capture_output=True, text=True).stderr
    assert said["0"] == "" and "Creating initial MLflow database tables" in said["1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_store_where_nothing_listens_fails_fast(monkeypatch):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError) as err:
        tracking.open_store()
    assert time.monotonic() - start < 10
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_http_store_that_never_answers_times_out(monkeypatch):
    # A socket that accepts connections (the kernel's backlog) but never replies.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        uri = f"http://127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(tracking.store, "CHECK_TIMEOUT_S", 1)
        start = time.monotonic()
        with pytest.raises(tracking.TrackingError, match="cannot open the MLflow tracking store"):
            tracking.open_store()
        assert time.monotonic() - start < 10
    # the shortened HTTP settings were for the check only
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_unwritable_sqlite_store_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "blocker").write_text("a file where the store's folder should be")
    uri = f"sqlite:///{tmp_path / 'blocker' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(tracking.TrackingError) as err:
        tracking.open_store()
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_training_is_one_parent_run_with_one_child_per_replica(store, trained):
    client = mlflow.MlflowClient()
    parent = client.get_run(trained["parent"])
    assert parent.info.run_name == "deep3" and parent.info.status == "FINISHED"
    assert parent.data.params == {"kind": "mlp", "optimizer.lr": "0.001", "n_train": "50",
                                  "device": "cpu"}
    assert parent.data.tags["model"] == "deep3"
    assert "dvc_exp_name" not in parent.data.tags  # not an experiment
    assert parent.data.tags["git_commit"] == tracking.git_commit()
    assert "smoke" not in parent.data.tags
    assert parent.data.tags["mlflow.runColor"] == "#1f77b4"  # the UI's colour of its runs
    # the results over replicas, per epoch, on the parent: its row and curve in the UI (counts
    # and sizes are params, not metrics)
    # and the final test MSE and its std, at the CSV's 6 digits, as one value at step 0: the
    # chart view draws a bar chart of them, in the section "final", before the curves
    # per epoch at the CSV's 6 digits too: 0.166667, not 0.16666666666666666 beside it
    assert parent.data.metrics == {"test_mse": 0.166667, "test_mse_std": 0.03,
                                   "train_loss": 0.333333, "train_loss_std": 0.06,
                                   "final/test_mse": 0.166667, "final/test_mse_std": 0.03,
                                   "final/sse_per_image": 130.667}  # 784 x 0.166667
    for key in ("test_mse", "test_mse_std", "train_loss", "train_loss_std"):
        history = client.get_metric_history(trained["parent"], key)
        assert [(m.step, m.value) for m in history] == \
            [(r["epoch"], float(f"{r[key]:.6g}")) for r in CURVE]
    # its best replica (a tie here: the first by name), named and linked
    assert parent.data.tags["best_replica"] == "deep3-r0"
    assert parent.data.tags["best_replica_run_id"] == trained["children"][0]
    assert parent.data.tags["mlflow.note.content"].startswith(
        f"Best replica: [deep3-r0](#/experiments/{store[0]}/runs/{trained['children'][0]}) "
        "(seed 0), last-epoch test MSE 0.167, of 2 replica(s).")
    for key, value in (("final/test_mse", 0.166667), ("final/test_mse_std", 0.03)):
        assert [(m.step, m.value) for m in client.get_metric_history(trained["parent"], key)] \
            == [(0, value)]

    children = client.search_runs(
        [store[0]], f"tags.mlflow.parentRunId = '{trained['parent']}'",
        order_by=["attributes.run_name"])
    assert [r.info.run_name for r in children] == ["deep3-r0", "deep3-r1"]
    assert [r.info.run_id for r in children] == trained["children"]
    for i, run in enumerate(children):
        assert run.info.status == "FINISHED"
        assert run.data.params["seed"] == str(i) and run.data.tags["replica"] == str(i)
        history = client.get_metric_history(run.info.run_id, "test_mse")
        # a replica's values at the committed files' digits too
        assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.25), (3, 0.166667)]
        assert client.get_metric_history(run.info.run_id, "train_seconds")[0].step == 3
        assert set(run.data.metrics) == {"train_loss", "test_mse", "train_seconds"}
        assert run.data.tags["mlflow.runColor"] == "#1f77b4"  # its model's


def test_run_colours_are_the_pngs_and_dvc_plots_colours():
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    tab10 = [to_hex(c) for c in colormaps["tab10"].colors]  # drawing.model_colors; category10
    assert [tracking.model_color(i) for i in range(12)] == tab10 + tab10[:2]


def test_misuse_is_named(store):
    with pytest.raises(RuntimeError, match="inside training_run"):
        with tracking.replica_run("deep3", 0, seed=0):
            pass
    with tracking.training_run(store[0], "misused", {}):
        with tracking.replica_run("misused", 0, seed=0):
            with pytest.raises(RuntimeError, match="after the replica runs have ended"):
                tracking.log_training_curve(CURVE)
            with pytest.raises(RuntimeError, match="after its replica runs"):
                tracking.register_training("misused", [])
    with pytest.raises(RuntimeError, match="log_epochs must run inside replica_run"):
        tracking.log_epochs(EPOCHS)
    with pytest.raises(ValueError, match="pixels '0,255' is not one of 0,1, -1,1"):
        tracking.log_replica_model(TINY.build(), name="deep3", index=0, pixels="0,255",
                                   weights_sha256="0" * 64)


def test_logged_model_loads_as_the_module_itself(trained):
    model_id = trained["models"][0]
    uri = f"models:/{model_id}"
    net = tracking.load_model(uri)
    assert isinstance(net, type(trained["nets"][0])) and net.latent_dim == 3 and not net.training
    assert trained["nets"][0].training  # the caller's module keeps its mode
    x = torch.rand(4, 784) * 2 - 1
    with torch.no_grad():
        assert torch.equal(net.decode(net.encode(x)), trained["nets"][0].eval()(x))
        trained["nets"][0].train()
        # MLflow's generic loader finds the same module through the loader module
        pyfunc = mlflow.pyfunc.load_model(uri)
        assert torch.equal(pyfunc.get_raw_model().encode(x), net.encode(x))
        assert np.array_equal(pyfunc.predict(x.numpy()), net(x).numpy())
    info = mlflow.models.get_model_info(uri)
    assert info.metadata == {"pixels": "-1,1", "latent_dim": 3,
                             "loads_with": "aebench.tracking.load_model"}
    for spec in (info.signature.inputs, info.signature.outputs):
        [tensor] = spec.inputs
        assert (tensor.type, tensor.shape) == (np.dtype("float32"), (-1, 784))
    logged = mlflow.get_logged_model(model_id)
    assert logged.name == "deep3-r0" and logged.source_run_id == trained["children"][0]
    assert logged.tags["weights_sha256"] == sha("deep3", 0)
    # weights and the MLmodel file, which names aebench's installed loader: no pickled module,
    # no stored code, no pytorch flavor (whose loader unpickles)
    files = {f.path for f in mlflow.MlflowClient().list_logged_model_artifacts(model_id)}
    assert "code" not in files and "data" in files
    assert [f.path for f in mlflow.MlflowClient().list_logged_model_artifacts(
        model_id, "data")] == ["data/replica.pt"]
    assert set(info.flavors) == {"python_function"}
    assert info.flavors["python_function"]["loader_module"] == "aebench.tracking.models"
    assert "code" not in info.flavors["python_function"] or \
        not info.flavors["python_function"]["code"]


def test_loading_a_model_that_is_not_there_is_one_line(trained):
    for uri in ("models:/aebench-deep3@nope", "models:/aebench-nothing/1"):
        with pytest.raises(ValueError) as err:
            tracking.load_model(uri)
        assert str(err.value).startswith(f"{uri}: ") and "\n" not in str(err.value)


def test_a_module_its_config_cannot_rebuild_is_not_logged(store):
    with tracking.training_run(store[0], "mismatch", {}):
        with tracking.replica_run("mismatch", 0, seed=0):
            with pytest.raises(ValueError, match="models.mismatch does not rebuild this module"):
                tracking.log_replica_model(tiny(latent=5).build(), name="mismatch", index=0,
                                           pixels="-1,1", weights_sha256="0" * 64, cfg=TINY)
    assert tracking.find_logged_model("mismatch", "0" * 64) is None


def train_tiny(experiment_id: str, name: str, replicas: int, fail_at: int | None = None):
    """Model `name` trained as the train stage records it: `replicas` replica runs each logging
    a tiny mlp, then the curve and the registration; replica `fail_at` raises instead. Returns
    (logged model ids, registered versions)."""
    ids = []
    with tracking.training_run(experiment_id, name, {}):
        for i in range(replicas):
            with tracking.replica_run(name, i, seed=i):
                if i == fail_at:
                    raise ValueError("diverged")
                tracking.log_epochs(EPOCHS)
                ids.append(tracking.log_replica_model(TINY.build(), name=name, index=i,
                                                      pixels="-1,1", weights_sha256=sha(name, i),
                                                      cfg=TINY))
        tracking.log_training_curve(CURVE)
        return ids, tracking.register_training(name, ids)


def test_the_training_run_names_its_best_replica(store):
    with tracking.training_run(store[0], "picky", {}) as parent:
        for i, last in enumerate((0.031, 0.029, 0.030)):  # replica 1 is the best
            with tracking.replica_run("picky", i, seed=10 + i):
                tracking.log_epochs([{"epoch": 1, "test_mse": 0.5}, {"epoch": 2, "test_mse": last}])
        tracking.log_training_curve(CURVE)
    client = mlflow.MlflowClient()
    run = client.get_run(parent)
    [best] = client.search_runs([store[0]], "attributes.run_name = 'picky-r1'")
    assert run.data.tags["best_replica"] == "picky-r1"
    assert run.data.tags["best_replica_run_id"] == best.info.run_id
    assert "(seed 11), last-epoch test MSE 0.029, of 3 replica(s)" in \
        run.data.tags["mlflow.note.content"]


def test_each_replica_is_a_version_of_the_registered_model(trained):
    client = mlflow.MlflowClient()
    registered = client.get_registered_model("aebench-deep3")
    assert tracking.registry.aliases("deep3") == {"r0": trained["versions"][0],
                                                  "r1": trained["versions"][1]}
    assert "@best" in registered.description
    for i, version in enumerate(trained["versions"]):
        mv = client.get_model_version("aebench-deep3", version)
        assert mv.source == f"models:/{trained['models'][i]}"
        assert mv.run_id == trained["children"][i]
        assert mv.tags == {"model": "deep3", "replica": str(i), "weights_sha256": sha("deep3", i),
                           "model_id": trained["models"][i], "training_run_id": trained["parent"]}
    net = tracking.load_model("models:/aebench-deep3@r1")
    x = torch.rand(2, 784)
    with torch.no_grad():
        assert torch.equal(net(x), trained["nets"][1].eval()(x))
    trained["nets"][1].train()


def test_a_training_moves_the_aliases_once_all_replicas_are_in(store):
    client = mlflow.MlflowClient()
    ids, versions = train_tiny(store[0], "moved", 3)
    assert tracking.registry.set_best("moved", sha("moved", 2)) == versions[2]
    assert tracking.registry.aliases("moved") == {"r0": "1", "r1": "2", "r2": "3", "best": "3"}

    # a failed training registers nothing and moves no alias (its replica 0 is logged)
    with pytest.raises(ValueError, match="diverged"):
        train_tiny(store[0], "moved", 2, fail_at=1)
    assert tracking.registry.aliases("moved") == {"r0": "1", "r1": "2", "r2": "3", "best": "3"}
    assert len(client.search_model_versions("name = 'aebench-moved'")) == 3

    # a new training with fewer replicas: @r2 and the stale @best go
    ids, versions = train_tiny(store[0], "moved", 2)
    assert versions == ["4", "5"]
    assert tracking.registry.aliases("moved") == {"r0": "4", "r1": "5"}
    assert client.get_model_version_by_alias("aebench-moved", "r1").source == f"models:/{ids[1]}"


def test_best_of_an_unregistered_model_is_a_warning(trained, capsys):
    before = tracking.registry.aliases("deep3")
    assert tracking.registry.set_best("deep3", "f" * 64) is None
    assert "aebench-deep3: no registered version with weights sha256 ffffffffffff..." in \
        capsys.readouterr().err
    assert tracking.registry.aliases("deep3") == before


def test_versions_carry_their_test_mse_and_link_their_runs(store, trained):
    client = mlflow.MlflowClient()
    exp = store[0]
    for i, version in enumerate(trained["versions"]):
        text = client.get_model_version("aebench-deep3", version).description
        # the curve's last epoch (mean ± std over the 2 replicas), then this replica's own
        assert text.startswith("test MSE 0.16667 ± 0.03000 over 2 replicas; this replica: "
                               "0.16667\n")
        assert f"[deep3](#/experiments/{exp}/runs/{trained['parent']})" in text
        assert f"[deep3-r{i}](#/experiments/{exp}/runs/{trained['children'][i]})" in text
        assert "(seed " + str(i) + ")" in text
        # the logged model names its version: the Models tab's "Registered models" column
        held = mlflow.get_logged_model(trained["models"][i]).tags["mlflow.modelVersions"]
        assert json.loads(held) == [{"name": "aebench-deep3", "version": version}]
    registered = client.get_registered_model("aebench-deep3")
    assert registered.tags == {"test_mse": "0.16667 ± 0.03000 over 2 replicas"}
    assert 'aebench.tracking.load_model("models:/aebench-deep3@best")' in \
        registered.description


def test_best_is_named_in_a_tag_the_registry_list_shows(store):
    ids, versions = train_tiny(store[0], "tagged", 2)
    client = mlflow.MlflowClient()
    assert "best" not in client.get_registered_model("aebench-tagged").tags
    assert tracking.registry.set_best("tagged", sha("tagged", 1)) == versions[1]
    # first among the tags: the registry's list shows the first three, in their order
    assert list(client.get_registered_model("aebench-tagged").tags.items()) == [
        ("best", f"version {versions[1]}, test MSE 0.16667"),
        ("test_mse", "0.16667 ± 0.03000 over 2 replicas")]
    train_tiny(store[0], "tagged", 2)  # a new training: @best and its tag describe the old one
    assert "best" not in client.get_registered_model("aebench-tagged").tags
    assert "best" not in tracking.registry.aliases("tagged")


def test_an_experiment_registers_versions_and_moves_no_alias(store, monkeypatch, capsys):
    client = mlflow.MlflowClient()
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    _, committed = train_tiny(store[0], "exp", 2)
    tracking.registry.set_best("exp", sha("exp", 1))
    before = tracking.registry.aliases("exp")
    tags_before = client.get_registered_model("aebench-exp").tags
    assert before == {"r0": committed[0], "r1": committed[1], "best": committed[1]}

    # what DVC sets in the stage commands of `dvc exp run -n lr-3e-4` (and a sweep's runs)
    monkeypatch.setenv("DVC_EXP_NAME", "lr-3e-4")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    ids, versions = train_tiny(store[0], "exp", 3)
    assert f"aebench-exp: versions {', '.join(versions)} registered for experiment lr-3e-4" \
        in capsys.readouterr().err
    assert tracking.registry.set_best("exp", sha("exp", 2)) is None  # its evaluate
    assert tracking.registry.aliases("exp") == before
    assert client.get_registered_model("aebench-exp").tags == tags_before
    for i, version in enumerate(versions):
        mv = client.get_model_version("aebench-exp", version)
        assert mv.tags["dvc_exp_name"] == "lr-3e-4" and mv.tags["replica"] == str(i)
        assert mv.tags["dvc_exp_baseline_rev"] == "a" * 40
        assert "DVC experiment `lr-3e-4`: no alias points here" in mv.description
        assert client.get_run(mv.tags["training_run_id"]).data.tags["dvc_exp_name"] == "lr-3e-4"

    # back in the committed run: an evaluation of weights an experiment also registered picks
    # the committed run's version; the next committed training moves the aliases again
    monkeypatch.delenv("DVC_EXP_NAME")
    monkeypatch.delenv("DVC_EXP_BASELINE_REV")
    assert tracking.registry.set_best("exp", sha("exp", 0)) == committed[0]
    _, again = train_tiny(store[0], "exp", 2)
    assert tracking.registry.aliases("exp") == {"r0": again[0], "r1": again[1]}


class Payload:
    """A pickle that creates `marker` when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loading_runs_no_code_from_the_store(store, tmp_path):
    """Whoever can write the artifact store replaces a logged model's weights with a pickle that
    runs code when it is unpickled: loading refuses it, naming the file, and runs nothing."""
    import pickle

    ids, _ = train_tiny(store[0], "attacked", 1)
    artifacts = Path(mlflow.get_logged_model(ids[0]).artifact_location.removeprefix("file://"))
    weights = artifacts / "data" / "replica.pt"
    assert weights.is_file()
    marker = tmp_path / "ran"
    uri = "models:/aebench-attacked@r0"
    buffer = io.BytesIO()
    torch.save({"name": "attacked", "config": TINY.model_dump(), "state_dict": Payload(marker)},
               buffer)
    for label, payload in [("bare pickle", pickle.dumps(Payload(marker))),
                           ("torch.save zip", buffer.getvalue())]:
        weights.write_bytes(payload)
        for load in (tracking.load_model, mlflow.pyfunc.load_model):
            with pytest.raises(ValueError) as err:
                load(uri)
            message = str(err.value)
            assert "data/replica.pt" in message and "\n" not in message, (label, message)
            assert not marker.exists(), (label, load)
        assert uri in str(pytest.raises(ValueError, tracking.load_model, uri).value)
        # the payload is live: an unrestricted unpickler runs it (then fails, or not)
        with contextlib.suppress(Exception):
            torch.load(weights, weights_only=False)
        assert marker.exists(), label
        marker.unlink()

    # the whole model swapped for an older aebench's (a pickled module, mlflow.pytorch's
    # loader): refused unread, by name
    weights.unlink()
    (artifacts / "data" / "model.pth").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match=r"models:/aebench-attacked@r0: data/model.pth is a "
                                         r"pickled module.*re-log it"):
        tracking.load_model(uri)
    assert not marker.exists()


def test_find_logged_model_by_weights_sha256(store, trained):
    assert tracking.find_logged_model("deep3", sha("deep3", 1)) == trained["models"][1]
    assert tracking.find_logged_model("deep3", "0" * 64) is None
    assert tracking.find_logged_model("shallow128", sha("deep3", 1)) is None
    # a retrained replica with the same weights: the newest logged model wins
    with tracking.training_run(store[0], "deep3", {}):
        with tracking.replica_run("deep3", 1, seed=1):
            newer = tracking.log_replica_model(TINY.build(), name="deep3", index=1,
                                               pixels="-1,1", weights_sha256=sha("deep3", 1),
                                               cfg=TINY)
    assert tracking.find_logged_model("deep3", sha("deep3", 1)) == newer


def test_evaluation_is_a_new_run_attached_to_the_logged_model(store, trained, tmp_path):
    client = mlflow.MlflowClient()
    train_child = trained["children"][0]
    points_before = len(client.get_metric_history(train_child, "test_mse"))
    rng = np.random.default_rng(0)
    dataset = tracking.eval_dataset(rng.integers(0, 256, (20, 784), dtype=np.uint8),
                                    np.arange(20) % 10, source=tmp_path / "mnist_test.csv")
    figure = tmp_path / "test_mse.png"
    figure.write_bytes(b"\x89PNG")
    evaluations = []
    for mse in (0.02, 0.03):  # evaluate run twice
        with tracking.evaluation_run(store[0]) as run_id:
            model_id = tracking.log_evaluation("deep3", 0, sha("deep3", 0),
                                               {"test_mse": mse, "psnr": 17.0}, dataset)
            tracking.log_artifacts([figure])
        evaluations.append(run_id)
    assert model_id == trained["models"][0]

    assert evaluations[0] != evaluations[1]
    parent = client.get_run(evaluations[1])
    assert parent.info.run_name == "evaluate" and parent.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "figures")] == \
        ["figures/test_mse.png"]
    [child] = client.search_runs([store[0]], f"tags.mlflow.parentRunId = '{evaluations[1]}'")
    assert child.info.run_name == "deep3-r0-eval"
    assert child.data.tags["training_run_id"] == train_child
    assert child.data.tags["training_parent_run_id"] == trained["parent"]
    assert child.data.tags["mlflow.runColor"] == "#1f77b4"  # the model's colour
    assert parent.data.tags["mlflow.runColor"] == "#444444"  # not a model's run
    assert child.data.metrics == {"test_mse": 0.03, "psnr": 17.0}
    assert [d.dataset.name for d in child.inputs.dataset_inputs] == ["mnist_test"]

    # the logged model carries both evaluations, on the dataset; the training run is untouched
    metrics = mlflow.get_logged_model(model_id).metrics
    assert sorted(m.value for m in metrics if m.key == "test_mse") == [0.02, 0.03]
    assert {m.dataset_name for m in metrics} == {"mnist_test"}
    assert len(client.get_metric_history(train_child, "test_mse")) == points_before
    assert client.list_artifacts(train_child, "figures") == []


HEADLINE = {"deep3": {"mse": {"mean": 0.03, "std": 0.001}, "sse_per_image": {"mean": 23.52,
                                                                           "std": 0.784},
                      "test_loss": {"mean": 0.12, "std": 0.004}, "n": 2},
            "conv16": {"mse": {"mean": 0.001, "std": 0.0002},
                       "sse_per_image": {"mean": 0.784, "std": 0.1568}, "n": 2}}
DETAILS = {"deep3": {"latent_dim": 3, "pca": {"k": 3, "mse": 0.05}},
           "conv16": {"latent_dim": 2304, "pca": {"k": 784, "mse": 0.0}}}


def test_the_evaluation_run_holds_the_results_and_the_report(store, trained, tmp_path):
    client = mlflow.MlflowClient()
    for folder in ("metrics", "reports"):
        (tmp_path / folder).mkdir()
    files = [tmp_path / "metrics/models.json", tmp_path / "reports/details.json"]
    for f in files:
        f.write_text(f"{{\"{f.stem}\": 1}}\n")
    with tracking.evaluation_run(store[0]) as run_id:
        for i, mse in enumerate((0.031, 0.029)):  # replica 1 is the best
            tracking.log_evaluation("deep3", i, sha("deep3", i), {"test_mse": mse})
        tracking.log_results(HEADLINE, DETAILS, files, files[1])
    run = client.get_run(run_id)
    # the headline per model on a child NAME-eval in the model's colour, under its replicas'
    # names; none on the run itself (it would make chart rows above the training curves)
    assert run.data.metrics == {}
    children = {r.info.run_name: r for r in client.search_runs(
        [store[0]], f"tags.mlflow.parentRunId = '{run_id}'")}
    assert set(children) == {"deep3-r0-eval", "deep3-r1-eval", "deep3-eval", "conv16-eval"}
    assert children["deep3-eval"].data.metrics == {
        "test_mse": 0.03, "test_mse_std": 0.001, "test_sse_per_image": 23.52,
        "test_sse_per_image_std": 0.784, "test_loss": 0.12, "test_loss_std": 0.004,
        "pca_mse": 0.05, "mse_over_pca": 0.6, "mse_over_best": 30.0}
    assert children["conv16-eval"].data.metrics == {  # no pca_mse: PCA at 784 is exact
        "test_mse": 0.001, "test_mse_std": 0.0002, "test_sse_per_image": 0.784,
        "test_sse_per_image_std": 0.1568, "mse_over_best": 1.0}
    # the worst made first: newest first (the UI's default order) lists them best first
    assert children["deep3-eval"].info.start_time <= children["conv16-eval"].info.start_time
    deep3 = children["deep3-eval"].data.tags
    assert (deep3["model"], deep3["replicas"], deep3["stage"]) == ("deep3", "2", "evaluate")
    assert deep3["mlflow.runColor"] == "#1f77b4"  # its replicas' colour
    assert "mlflow.runColor" not in children["conv16-eval"].data.tags  # no replica logged
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert run.data.tags["details_sha256"] == tracking.sha256_file(files[1])
    assert run.data.tags["best_model"] == "conv16"  # the lowest mean test MSE
    assert {a.path for a in client.list_artifacts(run_id)} >= {"headline.json", "metrics",
                                                              "reports"}
    assert [a.path for a in client.list_artifacts(run_id, "metrics")] == ["metrics/models.json"]
    table = client.load_table(store[0], "headline.json", run_ids=[run_id])
    assert list(table["model"]) == ["conv16", "deep3"]  # best first
    assert list(table.columns[:9]) == ["rank", "model", "test_mse", "test_mse_std",
                                       "mse_over_best", "test_sse_per_image",
                                       "test_sse_per_image_std", "test_loss", "test_loss_std"]
    assert list(table.columns[9:]) == ["mse_over_pca", "beats_pca", "pca_mse", "pca_k",
                                       "latent_dim", "n"]
    assert list(table["rank"]) == [1, 2] and list(table["mse_over_best"]) == [1.0, 30.0]
    assert list(table["beats_pca"]) == ["n/a (PCA exact)", "yes"]
    assert table["test_loss"].tolist() == [0.001, 0.12]  # conv16's loss is the mse itself
    # no null: where PCA is exact there is no ratio, and the cell says why
    assert table["mse_over_pca"][0] == "n/a: PCA exact (k = 784 >= 784)"
    assert table["mse_over_pca"][1] == pytest.approx(0.6)
    # @best: the replica with the lowest test mse of this evaluation
    assert tracking.registry.aliases("deep3")["best"] == trained["versions"][1]

    report = tmp_path / "reports/summary.md"
    report.write_text("# aebench\n\n| model | test MSE |\n|---|---|\n| deep3 | 0.03 |\n")
    with tracking.evaluation_run(store[0]) as other:  # another evaluation, other details
        tracking.log_results(HEADLINE, DETAILS, [], files[0])
    figures = tmp_path / "figures"
    figures.mkdir()
    for name in ("reconstructions.png", "test_mse.png"):
        (figures / name).write_bytes(b"\x89PNG")
    with tracking.evaluation_run(store[0], name="figures") as figures_run:
        tracking.log_artifacts(sorted(figures.iterdir()))
    files[1].write_text(json.dumps(DETAILS))  # what attach_report reads back
    client.set_tag(run_id, "details_sha256", tracking.sha256_file(files[1]))
    assert tracking.attach_report(store[0], files[1], report) == run_id
    assert other != run_id
    run = client.get_run(run_id)
    text = run.data.tags["mlflow.note.content"]
    # first the verdict, then the models best first, the figures shown (headline first), and
    # the report
    assert text.splitlines()[0] == ("**Best: conv16**, test MSE 0.001 ± 0.0002 (SSE/image "
                                    "0.78 ± 0.16, n = 2), 30× better than the next, deep3 "
                                    "(0.03 ± 0.001).")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[1:3] == [
        "| 1 | conv16 | 0.001 ± 0.0002 | 0.78 ± 0.16 | best | n/a: PCA exact (k = 784 ≥ 784) "
        "| 2304 | 2 |",
        "| 2 | deep3 | 0.03 ± 0.001 | 23.52 ± 0.78 | 30× | 0.6× (beats PCA) | 3 | 2 |"]
    assert rows[-1] == "| deep3 | 0.03 |"  # the report's own table, last
    images = [line for line in text.splitlines() if line.startswith("![")]
    assert images == [f"![{n}](get-artifact?path=figures%2F{n}&run_uuid={figures_run})"
                      for n in ("test_mse.png", "reconstructions.png")]
    assert text.endswith(report.read_text())
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == \
        ["reports/details.json", "reports/summary.md"]


def test_a_report_without_its_evaluation_run_is_a_warning(store, tmp_path, capsys):
    details = tmp_path / "details.json"
    details.write_text("{}\n")
    (tmp_path / "summary.md").write_text("# report\n")
    assert tracking.attach_report(store[0], details, tmp_path / "summary.md") is None
    assert "warning: no evaluation run in sqlite:///" in capsys.readouterr().err


def test_checkpoint_without_logged_model_is_a_warning(store, capsys):
    with tracking.evaluation_run(store[0]) as run_id:
        assert tracking.log_evaluation("conv16", 0, "f" * 64, {"test_mse": 0.01}) is None
    assert "warning: conv16-r0: no logged model with weights sha256 ffffffffffff" in \
        capsys.readouterr().err
    [child] = mlflow.MlflowClient().search_runs([store[0]],
                                                f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.data.metrics == {"test_mse": 0.01} and "model_id" not in child.data.tags


def interrupt_by_sigterm():
    # What a stage's SIGTERM handler (aebench.cli) raises.
    raise cli.Interrupted(signal.SIGTERM)


def fail():
    raise ValueError("diverged")


def keyboard_interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop, raised, status", [
    (keyboard_interrupt, KeyboardInterrupt, "KILLED"),
    (interrupt_by_sigterm, cli.Interrupted, "KILLED"),
    (fail, ValueError, "FAILED"),
])
def test_an_interrupted_training_ends_its_runs(store, stop, raised, status):
    name = f"stopped-{stop.__name__}"
    with pytest.raises(raised):
        with tracking.training_run(store[0], name, {}):
            with tracking.replica_run(name, 0, seed=0):
                stop()
    runs = mlflow.MlflowClient().search_runs([store[0]], f"tags.model = '{name}'")
    assert sorted(r.info.status for r in runs) == [status, status]
    assert mlflow.active_run() is None


def test_runs_left_running_by_a_dead_process_are_marked_killed(store):
    client = mlflow.MlflowClient()
    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    runs = {who: client.create_run(store[0], tags={**tags, "process": process})
            for who, tags, process in [
                ("dead", {"model": "sigkilled"}, f"{host}:{dead.pid}"),
                ("alive", {"model": "sigkilled"}, f"{host}:{os.getppid()}"),
                ("elsewhere", {"model": "sigkilled"}, "other-host:1"),
                ("dead evaluation", {"stage": "evaluate-stale"}, f"{host}:{dead.pid}")]}
    with tracking.training_run(store[0], "sigkilled", {}):
        pass
    with tracking.evaluation_run(store[0], "evaluate-stale"):
        pass
    status = {who: client.get_run(r.info.run_id) for who, r in runs.items()}
    assert status["dead"].info.status == "KILLED"
    assert "marked KILLED" in status["dead"].data.tags["mlflow.note.content"]
    assert status["dead evaluation"].info.status == "KILLED"
    assert status["alive"].info.status == "RUNNING"  # a parallel job's run is left alone
    assert status["elsewhere"].info.status == "RUNNING"


def test_a_stale_run_another_process_ended_meanwhile_is_skipped(store, monkeypatch):
    # Two sweep tasks find the same dead run: the second's write fails (PostgreSQL refused the
    # duplicate tag); the run is no longer RUNNING, so that is not an error.
    client = mlflow.MlflowClient()
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = client.create_run(store[0], tags={"model": "raced",
                                            "process": f"{socket.gethostname()}:{dead.pid}"})
    set_tag = mlflow.MlflowClient.set_tag

    def raced(self, run_id, key, value, *args, **kwargs):
        if run_id == run.info.run_id and key == "mlflow.note.content":
            set_tag(self, run_id, key, value)
            self.set_terminated(run_id, "KILLED")  # the other task, just before us
            raise mlflow.exceptions.MlflowException("duplicate key value violates ...")
        return set_tag(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", raced)
    assert tracking.runs.end_stale_runs(store[0], model="raced") == []
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_readme_snippet(store, trained, mnist_csv, tmp_path, monkeypatch):
    # As after `make smoke`: the project's root names the smoke store, which has the smoke run's
    # data beside it; the snippet runs from the root, where there is no mlflow.db.
    folder = store[1]
    shutil.copytree(mnist_csv, folder / "data" / "csv", dirs_exist_ok=True)
    root = tmp_path / "project"
    root.mkdir()
    tracking.store.record_last_store(f"sqlite:///{folder / 'mlflow.db'}", root)
    tracking.registry.set_best("deep3", sha("deep3", 0))  # evaluate sets it
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    scope: dict = {}
    exec(readme_snippet(), scope)
    assert scope["pixels"] == "-1,1"
    assert scope["codes"].shape == (16, 3) and scope["reconstructions"].shape == (16, 784)
    with torch.no_grad():
        expected = trained["nets"][0].eval()(scope["x"])
    trained["nets"][0].train()
    assert torch.equal(scope["reconstructions"], expected)
    assert sorted(p.name for p in root.iterdir()) == [".mlflow-last-store"]  # no store made


def test_last_store_is_the_recorded_one_else_the_working_copys(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    root = tmp_path / "project"
    (root / ".smoke").mkdir(parents=True)
    with pytest.raises(tracking.TrackingError, match=f"no MLflow store at {root}/mlflow.db: "
                                                     "nothing has run"):
        tracking.last_store(root)
    assert not (root / "mlflow.db").exists()
    (root / "mlflow.db").write_bytes(b"")
    assert tracking.last_store(root) == f"sqlite:///{root}/mlflow.db"
    tracking.store.record_last_store(f"sqlite:///{root}/.smoke/mlflow.db", root)
    assert tracking.last_store(root) == f"sqlite:///{root}/mlflow.db"  # recorded, but deleted
    (root / ".smoke/mlflow.db").write_bytes(b"")
    assert tracking.last_store(root / ".dvc/tmp/exps/tmp1") == \
        f"sqlite:///{root}/.smoke/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.last_store(root) == "http://127.0.0.1:5000"


def test_a_stage_on_the_default_store_records_it(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    exps = tmp_path / ".dvc/tmp/exps/tmp1"  # a `dvc exp run --temp` copy: the root's store
    exps.mkdir(parents=True)
    tracking.open_store(exps)
    assert (tmp_path / ".mlflow-last-store").read_text() == f"sqlite:///{tmp_path}/mlflow.db\n"
    # a store set by hand is not recorded
    (tmp_path / ".mlflow-last-store").unlink()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    tracking.open_store(tmp_path)
    assert not (tmp_path / ".mlflow-last-store").exists()


def test_make_ui_opens_the_last_runs_store_in_the_model_training_view(store, tmp_path,
                                                                      monkeypatch, capsys):
    from aebench.tracking import ui

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    root = tmp_path / "project"
    root.mkdir()
    monkeypatch.chdir(root)
    assert ui.main([]) == 1  # nothing has run here: one line, and no empty store made
    assert "error: no MLflow store at" in capsys.readouterr().err
    assert list(root.iterdir()) == []

    smoke_store = f"sqlite:///{store[1] / 'mlflow.db'}"
    tracking.store.record_last_store(smoke_store, root)  # as `make smoke` does
    ran = []
    monkeypatch.setattr(ui.os, "execvp", lambda file, args: ran.append(args))
    ui.main(["--port", "5001"])
    out = capsys.readouterr().out
    assert f"MLflow store: {smoke_store} (the last run's" in out
    runs = f"http://127.0.0.1:5001/#/experiments/{store[0]}/runs"
    assert f"Models, best first: {runs}?viewStateShareKey=aebench-models&workflowType=" \
        "machine_learning\n" in out
    assert f"as charts: {runs}?viewStateShareKey=aebench-models&compareRunsMode=CHART&" \
        "workflowType=machine_learning\n" in out
    assert f"all runs: {runs}?workflowType=machine_learning\n" in out
    assert "Model training" in out
    assert "mlflow.sharedViewState.aebench-models" in mlflow.get_experiment(store[0]).tags
    [args] = ran
    assert args[1:] == ["ui", "--backend-store-uri", smoke_store, "--host", "127.0.0.1",
                        "--port", "5001"]
    # STORE=folder: that folder's mlflow.db
    ui.main([str(store[1])])
    assert ran[-1][3] == smoke_store
    # a store that takes no write: a warning, no view address, the UI on the runs all the same
    def refused(*args):
        raise mlflow.exceptions.MlflowException("attempt to write a readonly database")

    monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", refused)
    capsys.readouterr()
    ui.main([str(store[1]), "--port", "5001"])
    out, err = capsys.readouterr()
    assert "warning: the view 'Models, best first' is not saved: MLflow tracking store" in err
    assert "readonly database" in err and "viewStateShareKey" not in out
    assert f"all runs: {runs}?workflowType=machine_learning\n" in out and len(ran) == 3
    assert ui.main([str(tmp_path / "nowhere")]) == 1
    assert "STORE=" in capsys.readouterr().err


def test_make_ui_on_a_taken_port_says_so_in_one_line_and_fails(store, monkeypatch, capsys):
    from aebench.tracking import ui

    ran = []
    monkeypatch.setattr(ui.os, "execvp", lambda file, args: ran.append(args))
    with socket.socket() as other:  # another program listens on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert ui.main([str(store[1]), "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert err == (f"error: --port {port}: 127.0.0.1:{port} is taken by another program; stop "
                   "it, or choose another port (make ui PORT=5001)\n")
    assert out == "" and ran == []  # no address that would point at the other program
    # free again: the UI starts there
    assert ui.main([str(store[1]), "--port", str(port)]) is None and len(ran) == 1
    with pytest.raises(SystemExit) as exit_:
        ui.main(["--port", "70000"])
    assert exit_.value.code == 2 and "70000 is not a TCP port" in capsys.readouterr().err


def test_the_saved_view_lists_the_models_best_first(store, trained):
    from aebench.tracking import ui

    with tracking.training_run(store[0], "better", {}):  # a lower final test MSE than deep3's
        tracking.log_training_curve([{**CURVE[0], "test_mse": 0.0123456789}])
    ui.save_models_view(store[0])
    envelope = json.loads(mlflow.get_experiment(store[0]).tags[
        "mlflow.sharedViewState.aebench-models"])
    assert envelope["name"] == "Models, best first" and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])
    assert state["selectedColumns"][:2] == ["metrics.`final/test_mse`",
                                            "metrics.`final/test_mse_std`"]
    assert state["orderByAsc"] is True and state["runsHiddenMode"] == "SHOW_ALL"
    # the page's search, as the UI sends it (order by KEY ASC): the models' training runs only,
    # without replicas or evaluations, lowest final test MSE first
    runs = mlflow.MlflowClient().search_runs([store[0]], state["searchFilter"],
                                             order_by=[f"{state['orderByKey']} ASC"])
    names = [r.info.run_name for r in runs]
    assert names[0] == "better" and "deep3" in names
    assert all(r.data.tags["stage"] == "train" and "mlflow.parentRunId" not in r.data.tags
               for r in runs)
    finals = [r.data.metrics["final/test_mse"] for r in runs]
    assert finals[0] == 0.0123457 and finals == sorted(finals)
    # its chart view opens on SSE/image bars (labels that differ at two decimals), then the
    # curves on a log scale; the bars of the MSE (0.00 .. 0.03) and of the stds are hidden
    shown = [(c["type"], c["metricKey"]) for c in state["compareRunCharts"] if not c["deleted"]]
    assert shown == [("BAR", "final/sse_per_image"), ("LINE", "test_mse"),
                     ("LINE", "train_loss")]
    hidden = {c["metricKey"] for c in state["compareRunCharts"] if c["deleted"]}
    assert hidden == {"final/test_mse", "final/test_mse_std", "test_mse_std", "train_loss_std"}
    # a chart for every metric the listed runs hold: the UI generates none of its own
    assert {k for r in runs for k in r.data.metrics} <= shown_keys(state) | hidden
    sections = {s["uuid"]: s["name"] for s in state["compareRunSections"]}
    assert [sections[c["metricSectionId"]] for c in state["compareRunCharts"]] == \
        ["final"] * 3 + ["Model metrics"] * 4  # the names the UI files metrics under


def shown_keys(state: dict) -> set[str]:
    return {c["metricKey"] for c in state["compareRunCharts"] if not c["deleted"]}


def test_the_installed_mlflow_ui_reads_what_make_ui_writes():
    """The names make ui relies on are in the installed MLflow UI's code (its JS bundle): the
    saved views' tag and address parameter, the other address parameters, the view's keys,
    and the chart view's unprefixed section. A newer MLflow that renames one fails here: then
    check the screens again (docs/mlflow.md)."""
    from aebench.tracking import ui

    bundle = Path(mlflow.__file__).parent / "server/js/build/static/js"
    code = "".join(p.read_text(errors="replace") for p in bundle.glob("*.js"))
    names = [ui.VIEW_TAG_PREFIX, ui.VIEW_KEY, *ui.CHART_MODE, *ui.WORKFLOW, *ui.models_view(),
             ui.models_view()["runsHiddenMode"], "Model metrics",
             *{key for chart in ui.VIEW_CHARTS for key in chart},
             *{key for section in ui.VIEW_SECTIONS for key in section},
             *{chart["type"] for chart in ui.VIEW_CHARTS}]
    assert [n for n in names if n not in code] == []
