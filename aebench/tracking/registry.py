"""Registered models: `aebench-NAME` for model NAME, one version per replica of each training,
and the aliases a user can load by (`models:/aebench-NAME@ALIAS`):

- `@r0` .. `@r{K-1}`: the replicas of the latest training that finished (train sets them, once
  every replica is registered: a failed training moves no alias);
- `@best`: the replica with the lowest test MSE in the latest evaluation of those weights
  (evaluate sets it; a training removes it, as it no longer describes the newest versions).

Both describe the committed run (`dvc repro`): a training or evaluation that DVC runs as an
experiment (`dvc exp run`, a queued or swept one; DVC names it in DVC_EXP_NAME) registers its
versions, tagged with the experiment, and moves no alias and no tag of the registered model.

Each version's description leads with its model's test MSE (mean ± std over the replicas of
its training, and this replica's) and links its runs; the registered model's tags `best` and
`test_mse` carry the same on the registry's list, where MLflow's UI shows tags but not the
description, and shows only one alias (the one on the highest version).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence

from .runs import active_run, quoted
from .store import store_errors

PREFIX = "aebench-"
BEST = "best"
_REPLICA_ALIAS = re.compile(r"r\d+")
# Set by DVC in every stage command of `dvc exp run` (dvc/env.py; dvc/repo/experiments/queue)
EXP_NAME_ENV = "DVC_EXP_NAME"
EXP_BASELINE_ENV = "DVC_EXP_BASELINE_REV"
EXP_TAG = "dvc_exp_name"  # as common_tags names the runs of an experiment
BASELINE_TAG = "dvc_exp_baseline_rev"
FINAL_MSE, FINAL_STD = "final/test_mse", "final/test_mse_std"  # on the training run (runs.py)
TEST_MSE_TAG = "test_mse"
LIST_TAGS = (BEST, TEST_MSE_TAG)  # first, in this order: what the registry's list shows


def registered_name(name: str) -> str:
    """The registered model of model `name` (deep3 -> aebench-deep3)."""
    return f"{PREFIX}{name}"


def replica_alias(index: int) -> str:
    return f"r{index}"


def dvc_experiment() -> str | None:
    """The name of the DVC experiment this stage runs in, or None in `dvc repro` or by hand."""
    return os.environ.get(EXP_NAME_ENV) or None


def mse_text(value: float) -> str:
    """A test MSE as the report writes it: 5 decimals, scientific below 1e-3."""
    return f"{value:.5f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def mean_std_text(mean: float, std: float | None, n: int) -> str:
    """"0.03076 ± 0.00028 over 3 replicas", "0.07484 (1 replica)"."""
    if n < 2 or std is None:
        return f"{mse_text(mean)} ({n} replica{'s' * (n != 1)})"
    fmt = ".5f" if abs(mean) >= 1e-3 else ".2e"
    return f"{mean:{fmt}} ± {std:{fmt}} over {n} replicas"


def run_link(experiment_id: str, run_id: str, text: str) -> str:
    """A markdown link to a run's page in the MLflow UI (its hash route), for descriptions."""
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


@store_errors()
def register_training(name: str, model_ids: Sequence[str]) -> list[str]:
    """Register each replica's logged model (`model_ids[i]` is replica i's) as a new version of
    aebench-NAME, described by its test MSE and linked to its runs; then, unless DVC runs this
    as an experiment, point @r{i} at replica i's version, drop @best and any @r{j} of a replica
    this training does not have, and set the registered model's `test_mse` tag. Runs inside
    training_run(name), after log_training_curve; returns the versions.

    A failure part-way leaves versions without aliases (harmless); the aliases are set only once
    every version exists."""
    import mlflow

    parent = active_run("register_training", f"training_run(..., {name!r}, ...)")
    if parent.data.tags.get("model") != name or "mlflow.parentRunId" in parent.data.tags:
        raise RuntimeError(f"register_training({name!r}) must run inside "
                           f"training_run(..., {name!r}, ...), after its replica runs")
    client = mlflow.MlflowClient()
    parent = client.get_run(parent.info.run_id)  # with the curve logged since it started
    registered = _ensure_registered(client, name)
    experiment = dvc_experiment()
    model_mse = _model_mse(parent.data.metrics, len(model_ids))
    versions = []
    for index, model_id in enumerate(model_ids):
        logged = client.get_logged_model(model_id)
        replica = client.get_run(logged.source_run_id)
        # weights_sha256: how evaluate finds the version of a checkpoint (set_best); model_id,
        # as the sqlite store keeps it only inside `source`
        tags = {"model": name, "replica": str(index), "model_id": model_id,
                "weights_sha256": logged.tags.get("weights_sha256", ""),
                "training_run_id": parent.info.run_id}
        if experiment:
            tags[EXP_TAG] = experiment
            if os.environ.get(EXP_BASELINE_ENV):
                tags[BASELINE_TAG] = os.environ[EXP_BASELINE_ENV]
        version = client.create_model_version(
            registered, f"models:/{model_id}", run_id=logged.source_run_id, tags=tags,
            model_id=model_id, description=_version_description(
                name, index, parent, replica, model_mse, experiment))
        _link_logged_model(client, model_id, registered, str(version.version))
        versions.append(str(version.version))
    if experiment:
        print(f"{registered}: version{'s' * (len(versions) > 1)} {', '.join(versions)} "
              f"registered for experiment {experiment}; @r0.. and @{BEST} stay on the "
              f"committed run's", file=sys.stderr)
        return versions
    wanted = {replica_alias(i) for i in range(len(versions))}
    for alias in client.get_registered_model(registered).aliases:
        if alias == BEST or (_REPLICA_ALIAS.fullmatch(alias) and alias not in wanted):
            client.delete_registered_model_alias(registered, alias)
    for index, version in enumerate(versions):
        client.set_registered_model_alias(registered, replica_alias(index), version)
    _list_tags(client, registered, {BEST: None, TEST_MSE_TAG: model_mse})
    return versions


def _list_tags(client, registered: str, values: Mapping[str, str | None]) -> None:
    """Set (a text) or remove (None) the registered model's tags in `values`, and keep `best`
    and `test_mse` its first tags: the registry's list shows a model's first three tags, in
    the order they were set, in a narrow column. The tag `model` of older aebench versions
    (the name says it) is removed."""
    held = dict(client.get_registered_model(registered).tags)
    tags = {key: value for key, value in {**held, "model": None, **values}.items()
            if value is not None}
    order = [key for key in LIST_TAGS if key in tags] + \
        [key for key in tags if key not in LIST_TAGS]
    if list(held.items()) == [(key, tags[key]) for key in order]:
        return
    for key in held:
        client.delete_registered_model_tag(registered, key)
    for key in order:
        client.set_registered_model_tag(registered, key, tags[key])


def _model_mse(metrics: Mapping[str, float], n: int) -> str | None:
    if FINAL_MSE not in metrics:
        return None
    return mean_std_text(metrics[FINAL_MSE], metrics.get(FINAL_STD), n)


def _version_description(name: str, index: int, parent, replica, model_mse: str | None,
                         experiment: str | None) -> str:
    """Markdown: the model's test MSE (mean ± std) and this replica's, then its runs as links."""
    exp_id = parent.info.experiment_id
    lines = []
    if model_mse:  # plain text first: the model's versions table shows its start, unrendered
        own = replica.data.metrics.get("test_mse")
        lines.append(f"test MSE {model_mse}" + (f"; this replica: {mse_text(own)}"
                                                if own is not None and "±" in model_mse else ""))
    seed = replica.data.params.get("seed")
    training = run_link(exp_id, parent.info.run_id, parent.info.run_name or name)
    own_run = run_link(exp_id, replica.info.run_id, replica.info.run_name or replica.info.run_id)
    lines.append(f"Replica {index}" + (f" (seed {seed})" if seed is not None else "")
                 + f" of the training {training}; source run {own_run}.")
    if experiment:
        lines.append(f"From DVC experiment `{experiment}`: no alias points here.")
    return "\n\n".join(lines)


def _link_logged_model(client, model_id: str, registered: str, version: str) -> None:
    """Name the version on its logged model (the tag `mlflow.modelVersions`), which the
    experiment's Models tab reads for its "Registered models" column. MLflow's server does this
    for create_model_version, and `mlflow.register_model` on the client side; a sqlite store
    reached by MlflowClient.create_model_version does not."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    held = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    listed = json.loads(held) if held else []
    entry = {"name": registered, "version": version}
    if entry not in listed:
        client.set_logged_model_tags(model_id,
                                     {MLFLOW_MODEL_VERSIONS: json.dumps([*listed, entry])})


@store_errors()
def set_best(name: str, weights_sha256: str) -> str | None:
    """Point aebench-NAME@best at the newest version whose weights file has this sha256 (a
    re-run of the same training registers the same bytes again), preferring the committed
    run's versions to an experiment's, and name it in the registered model's tag `best`;
    return it. None, with a warning, when no version has them (weights logged before
    registration existed, or pulled from a DVC remote into a fresh store); None, moving
    nothing, in a DVC experiment."""
    import mlflow

    if dvc_experiment():
        return None
    client = mlflow.MlflowClient()
    registered = registered_name(name)
    found = client.search_model_versions(f"name = {quoted(registered)} AND "
                                         f"tags.weights_sha256 = {quoted(weights_sha256)}")
    if not found:
        print(f"warning: {registered}: no registered version with weights sha256 "
              f"{weights_sha256[:12]}...; @{BEST} not set", file=sys.stderr)
        return None
    best = max([v for v in found if EXP_TAG not in v.tags] or found, key=lambda v: int(v.version))
    version = str(best.version)
    client.set_registered_model_alias(registered, BEST, version)
    own = client.get_run(best.run_id).data.metrics.get("test_mse") if best.run_id else None
    _list_tags(client, registered, {BEST: f"version {version}" + (
        f", test MSE {mse_text(own)}" if own is not None else "")})
    return version


def aliases(name: str) -> Mapping[str, str]:
    """aebench-NAME's aliases, {alias: version}; empty when it is not registered."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow.MlflowClient().get_registered_model(registered_name(name)).aliases
    except MlflowException:
        return {}
    return {alias: str(version) for alias, version in found.items()}


def registered_description(name: str) -> str:
    return (f"Model `{name}` of aebench (params.yaml `models.{name}`): one version per replica of "
            f"each training, described by its test MSE and linked to its runs. Aliases, the "
            f"committed run's: `@r0`, `@r1`, ... the replicas of the latest training; `@{BEST}` "
            f"the one with the lowest test MSE in the latest evaluation (also the tag `{BEST}`). "
            f"A DVC experiment's versions carry the tag `{EXP_TAG}` and no alias. Load one with "
            f"`aebench.tracking.load_model(\"models:/{registered_name(name)}@{BEST}\")`: its "
            f"weights only, read with `torch.load(weights_only=True)`, no code from the store.")


def _ensure_registered(client, name: str) -> str:
    """aebench-NAME, created (with a description for the UI) if this store lacks it, its
    description brought up to date if an older aebench wrote it."""
    from mlflow.exceptions import MlflowException

    registered = registered_name(name)
    description = registered_description(name)
    if found := client.search_registered_models(f"name = {quoted(registered)}"):
        if found[0].description != description:
            client.update_registered_model(registered, description=description)
        return registered
    try:
        client.create_registered_model(registered, description=description)
    except MlflowException as err:  # a parallel `dvc exp` job created it meanwhile
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return registered
