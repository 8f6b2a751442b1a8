"""What a sweep's worker hands the stages through the environment: the sweep's MLflow
experiment (MLFLOW_EXPERIMENT_ID) and more tags for every run (AEBENCH_RUN_TAGS)."""

from __future__ import annotations

import json

import pytest

from aebench.tracking import store


def test_run_tags_from_the_environment(monkeypatch):
    tags = {"sweep": "lr", "sweep_overrides": json.dumps({"models.deep3.epochs": 2}),
            "sweep_experiment": "lr-0123abcd"}
    monkeypatch.setenv(store.RUN_TAGS_ENV, json.dumps(tags))
    assert store.common_tags().items() >= tags.items()
    monkeypatch.setenv(store.RUN_TAGS_ENV, "{not json")
    with pytest.raises(store.TrackingError, match="AEBENCH_RUN_TAGS: not JSON"):
        store.common_tags()
    monkeypatch.setenv(store.RUN_TAGS_ENV, '{"a": 1}')
    with pytest.raises(store.TrackingError, match="not a JSON object of strings"):
        store.common_tags()
    monkeypatch.delenv(store.RUN_TAGS_ENV)
    assert "sweep" not in store.common_tags()


@pytest.mark.cluster  # a new sqlite store's migrations: 5-20 s, kept out of `make test`
def test_the_sweeps_experiment_not_aebench(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    swept = mlflow.create_experiment("aebench-sweep-lr")
    monkeypatch.setenv(store.EXPERIMENT_ID_ENV, swept)
    assert store.open_store(tmp_path) == swept
    assert mlflow.get_experiment_by_name(store.EXPERIMENT) is None
    monkeypatch.setenv(store.EXPERIMENT_ID_ENV, "999")
    with pytest.raises(store.TrackingError, match=uri):
        store.open_store(tmp_path)
