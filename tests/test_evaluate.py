"""The score and evaluate stages, on the session's project (conftest): two tiny trained models,
two replicas each, scored and evaluated in-process; their error cases on copies, one of them as
a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, STALE_MODEL, TINY_MODELS, dvc_args, run_stage

from aebench import files, kinds, models, tracking

DIGITS = {str(d) for d in range(10)}


def read(project, path):
    return json.loads((project.root / path).read_text())


def test_headline_is_mean_std_and_n_per_model(project):
    # one file per model, the stale folder's model has none
    assert sorted(p.name for p in (project.root / "metrics").iterdir()) == \
        sorted(f"{n}.json" for n in TINY_MODELS)
    headline = {n: read(project, f"metrics/{n}.json") for n in TINY_MODELS}
    details = read(project, "reports/details.json")
    for name, h in headline.items():
        assert h["n"] == 2
        mses = [r["mse"] for r in details[name]["replicas"]]
        assert h["mse"]["mean"] == pytest.approx(np.mean(mses), rel=1e-5)
        # (the replicas' mse in the file have 6 digits: their difference fewer)
        assert h["mse"]["std"] == pytest.approx(np.std(mses, ddof=1), rel=1e-3)
        assert 0 < h["mse"]["std"] < h["mse"]["mean"]  # two seeds, two different models
        assert h["sse_per_image"]["mean"] == pytest.approx(784 * h["mse"]["mean"], rel=1e-5)
    # deep3 trains on [-1,1] pixels: its loss is its own number; convnoisy's mse on [0,1] is
    # the common metric itself, so the headline does not repeat it
    # deep3's code of 3 has a PCA bar; convnoisy's 1152 >= 784 gets exact PCA, left out
    assert set(headline["deep3"]) == {"mse", "sse_per_image", "test_loss", "n", "pca_mse"}
    assert set(headline["convnoisy"]) == {"mse", "sse_per_image", "n"}
    assert headline["deep3"]["test_loss"]["mean"] == \
        pytest.approx(4 * headline["deep3"]["mse"]["mean"], rel=1e-4)


def test_details_have_every_replica_per_digit_and_pca(project):
    details = read(project, "reports/details.json")
    assert list(details) == list(TINY_MODELS)
    curve = files.read_columns(project.root / "plots/pca_curve.csv", ("components", "test_mse"))
    for name, d in details.items():
        cfg = kinds.validate_model(name, TINY_MODELS[name])
        model = cfg.build()
        assert d["kind"] == cfg.kind and d["loss"] == "mse" and d["device"] == "cpu"
        assert d["latent_dim"] == model.latent_dim
        assert d["params"] == sum(p.numel() for p in model.parameters())
        assert [r["seed"] for r in d["replicas"]] == [0, 1]  # train.seed + replica
        for r in d["replicas"]:
            assert set(r["mse_per_digit"]) == DIGITS  # 40 test images, labels cycling 0..9
            assert np.mean(list(r["mse_per_digit"].values())) == pytest.approx(r["mse"],
                                                                              rel=1e-4)
        assert d["mean"]["mse"] == pytest.approx(np.mean([r["mse"] for r in d["replicas"]]),
                                                 rel=1e-5)
        k = min(model.latent_dim, 784)
        assert d["pca"] == {"k": k, "mse": pytest.approx(curve["test_mse"][k], rel=1e-5)}
    assert details["convnoisy"]["pca"]["k"] == 784  # a code of 1152: full-rank PCA
    noisy = details["convnoisy"]["replicas"][0]
    assert noisy["noisy_input_mse"] > noisy["denoise_mse"] > 0
    assert "denoise_mse" not in details["deep3"]["replicas"][0]


def test_pca_mse_is_pca_at_the_latent_size(project):
    curve = files.read_columns(project.root / "plots/pca_curve.csv", ("components", "test_mse"))
    assert read(project, "metrics/deep3.json")["pca_mse"] == \
        pytest.approx(curve["test_mse"][3], rel=1e-5)


def test_metrics_reach_mlflow_attached_to_the_logged_models(project, mlflow_client):
    details = read(project, "reports/details.json")
    client = mlflow_client
    experiment = client.get_experiment_by_name("aebench").experiment_id
    (parent,) = client.search_runs([experiment], "tags.stage = 'evaluate' AND "
                                   "attributes.run_name = 'evaluate'")
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_name = {run.info.run_name: run for run in children}
    assert set(by_name) == {f"{n}-r{i}-eval" for n in TINY_MODELS for i in range(2)} | \
        {f"{n}-eval" for n in TINY_MODELS}  # and one per model, its headline
    for name in TINY_MODELS:
        for i in range(2):
            run = by_name[f"{name}-r{i}-eval"]
            assert run.data.metrics["test_mse"] == \
                pytest.approx(details[name]["replicas"][i]["mse"], rel=1e-5)
            assert "test_mse_digit_3" in run.data.metrics
            # found by the sha256 of the checkpoint that evaluate read: the replica's model
            model = client.get_logged_model(run.data.tags["model_id"])
            assert model.tags["weights_sha256"] == run.data.tags["weights_sha256"]
            assert model.tags["model"] == name and model.tags["replica"] == str(i)
    assert "test_denoise_mse" in by_name["convnoisy-r0-eval"].data.metrics


def test_the_evaluate_run_holds_the_headline_and_sets_best(project_copy, mlflow_client):
    run_stage("evaluate")  # its own evaluation: other tests retrain (and drop @best)
    headline = {n: files.read_json(project_copy / f"metrics/{n}.json") for n in TINY_MODELS}
    details = files.read_json(project_copy / "reports/details.json")
    client = mlflow_client
    experiment = client.get_experiment_by_name("aebench").experiment_id
    (run, *_) = client.search_runs([experiment], "attributes.run_name = 'evaluate'",
                                   order_by=["attributes.start_time DESC"])
    assert run.data.tags["details_sha256"] == \
        tracking.sha256_file(project_copy / "reports/details.json")
    assert run.data.metrics == {}  # the headline is on a child per model, NAME-eval
    assert run.data.tags["best_model"] == min(headline, key=lambda n: headline[n]["mse"]["mean"])
    models = {r.info.run_name: r for r in client.search_runs(
        [experiment], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
    for name in TINY_MODELS:
        metrics = models[f"{name}-eval"].data.metrics
        assert metrics["test_mse"] == pytest.approx(headline[name]["mse"]["mean"], rel=1e-5)
        assert metrics["test_mse_std"] == pytest.approx(headline[name]["mse"]["std"], rel=1e-5)
        if "pca_mse" in headline[name]:
            assert metrics["pca_mse"] == pytest.approx(headline[name]["pca_mse"], rel=1e-5)
        else:  # PCA at 784 or more is exact: left out, as in the metrics file
            assert "pca_mse" not in metrics
        assert models[f"{name}-eval"].data.tags["mlflow.runColor"] == \
            models[f"{name}-r0-eval"].data.tags["mlflow.runColor"]  # the model's colour
        # @best: the version of the checkpoint with the lowest test mse
        mses = [r["mse"] for r in details[name]["replicas"]]
        best = mses.index(min(mses))
        version = client.get_model_version_by_alias(f"aebench-{name}", "best")
        assert version.tags["weights_sha256"] == tracking.sha256_file(
            project_copy / f"data/models/{name}/r{best}.pt")
    assert "test_loss" in models["deep3-eval"].data.metrics
    assert "test_loss" not in models["convnoisy-eval"].data.metrics  # mse on [0,1]: the mse
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "metrics")) == \
        sorted(f"metrics/{n}.json" for n in TINY_MODELS)  # the metrics folder, file by file
    table = client.load_table(experiment, "headline.json", run_ids=[run.info.run_id])
    assert sorted(table["model"]) == sorted(TINY_MODELS) and list(table["n"]) == [2, 2]


def test_same_weights_give_byte_identical_files(project, project_copy):
    # the weights of a model no longer in params.yaml are not read, let alone scored
    (project_copy / "data/models" / STALE_MODEL / "r0.pt").write_bytes(b"garbage")
    for name in TINY_MODELS:
        run_stage("score", key=name)  # the arguments of dvc.yaml
    run_stage("evaluate")
    for path in [f"metrics/{n}.json" for n in TINY_MODELS] + ["reports/details.json"] + \
            [f"data/scores/{n}.json" for n in TINY_MODELS]:
        assert (project_copy / path).read_bytes() == (project.root / path).read_bytes(), path
    assert STALE_MODEL not in (project_copy / "reports/details.json").read_text()
    assert not list(project_copy.rglob("*.tmp"))


def test_scores_are_exact_and_name_the_weights_they_scored(project):
    """score@NAME keeps every float as computed (evaluate's means are of these), and the sha256
    of each weights file, by which evaluate finds the replica's logged model."""
    details = read(project, "reports/details.json")
    for name in TINY_MODELS:
        scores = read(project, f"data/scores/{name}.json")
        assert scores["name"] == name and scores["latent_dim"] == details[name]["latent_dim"]
        for r, replica in enumerate(scores["replicas"]):
            assert replica["weights_sha256"] == tracking.sha256_file(
                project.root / f"data/models/{name}/r{r}.pt")
            assert files.rounded(replica["mse"]) == details[name]["replicas"][r]["mse"]
            assert len(repr(replica["mse"])) > 10  # not rounded to the metrics files' digits


def test_scores_of_another_replica_count_are_refused_naming_the_file(project_copy):
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    params["train"]["replicas"] = 3  # params.yaml changed, the scores not re-run
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ValueError, match=r"^data/scores/deep3.json: holds 2 replica\(s\) of "
                                         r"model 'deep3', not 3 of 'deep3'; rerun `dvc repro "
                                         r"score@deep3`$"):
        run_stage("evaluate")
    (project_copy / "data/scores/deep3.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"^data/scores/deep3.json: missing; model "
                                                r"'deep3' has not been scored \(run `dvc repro "
                                                r"score@deep3`\)$"):
        run_stage("evaluate")


def test_a_removed_model_loses_its_metrics_file(project_copy):
    (project_copy / "metrics" / f"{STALE_MODEL}.json").write_text("{}")  # from an older run
    params = yaml.safe_load((project_copy / "params.yaml").read_text())
    del params["models"]["convnoisy"]
    (project_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run_stage("evaluate")
    assert [p.name for p in (project_copy / "metrics").iterdir()] == ["deep3.json"]
    assert list(json.loads((project_copy / "reports/details.json").read_text())) == ["deep3"]


def test_missing_replica_names_the_file(project_copy):
    (project_copy / "data/models/convnoisy/r1.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"data/models/convnoisy/r1.pt: no weights for "
                                                r"model 'convnoisy'"):
        run_stage("score", key="convnoisy")


@pytest.mark.parametrize("damage", ["garbage", "overwritten", "truncated"])
def test_damaged_weights_are_one_line_naming_the_file_and_the_fix(project_copy, damage):
    path = project_copy / "data/models/deep3/r0.pt"
    good = path.read_bytes()
    bad = {"garbage": b"not a checkpoint",  # torch's reply advises weights_only=False: not ours
           "overwritten": good[:2000] + b"\xff" * 3000 + good[5000:],
           "truncated": good[:5000]}[damage]
    path.write_bytes(bad)
    with pytest.raises(ValueError) as err:
        run_stage("score", key="deep3")
    why = {"garbage": "not a zip archive: File is not a zip file",
           # torch.load itself reads these weights without a word: the zip's CRC-32 tells
           "overwritten": "member archive/data/0 fails its CRC-32 check",
           "truncated": "not a zip archive: File is not a zip file"}[damage]
    assert str(err.value) == (
        f"data/models/deep3/r0.pt: not a readable aebench checkpoint ({why}); put the folder "
        "back with `dvc checkout data/models/deep3` or retrain with `dvc repro train@deep3`")


def test_swapped_replica_files_are_refused(project_copy):
    folder = project_copy / "data/models/deep3"
    os.rename(folder / "r0.pt", folder / "swap")
    os.rename(folder / "r1.pt", folder / "r0.pt")
    os.rename(folder / "swap", folder / "r1.pt")
    with pytest.raises(ValueError) as err:
        run_stage("score", key="deep3")
    assert str(err.value).startswith(
        "data/models/deep3/r0.pt: holds model 'deep3' replica 1 (seed 1), not 'deep3' replica 0 "
        "(seed 0): files were renamed or mixed; put the folder back with `dvc checkout")


def test_checkpoint_of_other_config_names_the_file_and_keys(project_copy):
    other = kinds.validate_model("deep3", {**TINY_MODELS["deep3"], "encoder": [784, 16, 4],
                                           "decoder": [4, 16, 784]})
    models.save_checkpoint(project_copy / "data/models/deep3/r0.pt", other.make(), name="deep3",
                           cfg=other, replica=0, seed=0, device="cpu")
    with pytest.raises(ValueError, match=r"data/models/deep3/r0.pt.*decoder, encoder"):
        run_stage("score", key="deep3")


def test_failure_leaves_the_outputs_untouched(project, project_copy):
    state = torch.load(project_copy / "data/models/deep3/r1.pt", weights_only=True)
    state["state_dict"] = {k: v[..., :1] for k, v in state["state_dict"].items()}  # wrong shapes
    torch.save(state, project_copy / "data/models/deep3/r1.pt")
    with pytest.raises(ValueError, match="data/models/deep3/r1.pt: weights do not fit"):
        run_stage("score", key="deep3")
    for path in ["data/scores/deep3.json"]:  # the last good output stays
        assert (project_copy / path).read_bytes() == (project.root / path).read_bytes(), path


def test_cli_missing_model_folder_is_one_line_and_exit_1(project_copy):
    # The one real `python -m stages.score` of the suite: exit code and stderr are the point.
    os.rename(project_copy / "data/models/deep3", project_copy / "data/models/gone")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("AEBENCH_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "stages.score", *dvc_args("score", "deep3")],
                          cwd=project_copy, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["error: data/models/deep3: missing; model 'deep3' has not been trained "
                     "(run `dvc repro train@deep3`)"], proc.stderr
    assert len(json.loads((project_copy / "data/scores/deep3.json").read_text())
               ["replicas"]) == 2  # the last good output stays

