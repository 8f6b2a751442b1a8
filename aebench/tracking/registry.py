"""Registered models: `aebench-NAME` for model NAME, one version per replica of each training,
and the aliases a user can load by (`models:/aebench-NAME@ALIAS`):

- `@r0` .. `@r{K-1}`: the replicas of the latest training that finished (train sets them, once
  every replica is registered: a failed training moves no alias);
- `@best`: the replica with the lowest test MSE in the latest evaluation of those weights
  (evaluate sets it; a training removes it, as it no longer describes the newest versions).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence

from .runs import active_run, quoted
from .store import store_errors

PREFIX = "aebench-"
BEST = "best"
_REPLICA_ALIAS = re.compile(r"r\d+")


def registered_name(name: str) -> str:
    """The registered model of model `name` (deep3 -> aebench-deep3)."""
    return f"{PREFIX}{name}"


def replica_alias(index: int) -> str:
    return f"r{index}"


@store_errors()
def register_training(name: str, model_ids: Sequence[str]) -> list[str]:
    """Register each replica's logged model (`model_ids[i]` is replica i's) as a new version of
    aebench-NAME, then point @r{i} at replica i's version, and drop @best and any @r{j} of a
    replica this training does not have. Runs inside training_run(name), once every replica has
    finished; returns the versions.

    A failure part-way leaves versions without aliases (harmless); the aliases are set only once
    every version exists."""
    import mlflow

    parent = active_run("register_training", f"training_run(..., {name!r}, ...)")
    if parent.data.tags.get("model") != name or "mlflow.parentRunId" in parent.data.tags:
        raise RuntimeError(f"register_training({name!r}) must run inside "
                           f"training_run(..., {name!r}, ...), after its replica runs")
    client = mlflow.MlflowClient()
    registered = _ensure_registered(client, name)
    versions = []
    for index, model_id in enumerate(model_ids):
        logged = client.get_logged_model(model_id)
        # weights_sha256: how evaluate finds the version of a checkpoint (set_best); model_id,
        # as the sqlite store keeps it only inside `source`
        tags = {"model": name, "replica": str(index), "model_id": model_id,
                "weights_sha256": logged.tags.get("weights_sha256", ""),
                "training_run_id": parent.info.run_id}
        version = client.create_model_version(registered, f"models:/{model_id}",
                                              run_id=logged.source_run_id, tags=tags,
                                              model_id=model_id)
        versions.append(str(version.version))
    wanted = {replica_alias(i) for i in range(len(versions))}
    for alias in client.get_registered_model(registered).aliases:
        if alias == BEST or (_REPLICA_ALIAS.fullmatch(alias) and alias not in wanted):
            client.delete_registered_model_alias(registered, alias)
    for index, version in enumerate(versions):
        client.set_registered_model_alias(registered, replica_alias(index), version)
    return versions


@store_errors()
def set_best(name: str, weights_sha256: str) -> str | None:
    """Point aebench-NAME@best at the newest version whose weights file has this sha256 (a
    re-run of the same training registers the same bytes again); return it. None, with a
    warning, when no version has them (weights logged before registration existed, or pulled
    from a DVC remote into a fresh store)."""
    import mlflow

    client = mlflow.MlflowClient()
    registered = registered_name(name)
    found = client.search_model_versions(f"name = {quoted(registered)} AND "
                                         f"tags.weights_sha256 = {quoted(weights_sha256)}")
    if not found:
        print(f"warning: {registered}: no registered version with weights sha256 "
              f"{weights_sha256[:12]}...; @{BEST} not set", file=sys.stderr)
        return None
    version = str(max(int(v.version) for v in found))
    client.set_registered_model_alias(registered, BEST, version)
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


def _ensure_registered(client, name: str) -> str:
    """aebench-NAME, created (with a description for the UI) if this store lacks it."""
    from mlflow.exceptions import MlflowException

    registered = registered_name(name)
    if client.search_registered_models(f"name = {quoted(registered)}"):
        return registered
    try:
        client.create_registered_model(registered, tags={"model": name}, description=(
            f"Model `{name}` of aebench (params.yaml `models.{name}`): one version per replica "
            f"of each training. Aliases: `@r0`, `@r1`, ... the replicas of the latest training; "
            f"`@{BEST}` the one with the lowest test MSE in the latest evaluation. Load one with "
            f"`mlflow.pytorch.load_model(\"models:/{registered_name(name)}@{BEST}\")`."))
    except MlflowException as err:  # a parallel `dvc exp` job created it meanwhile
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    return registered
