"""Logged models: each replica's weights logged for reuse, loaded back without running any code
from the store, and found again by its weights file.

A replica is logged as an MLflow model of the `python_function` flavor with a loader module
(MLflow's "custom flavor" workflow, `loader_module` + `data_path`): its one data file,
`data/replica.pt`, holds the model's name, its params.yaml entry and its state_dict, as the
DVC checkpoints do. Loading (load_model here, or `mlflow.pyfunc.load_model`, which imports this
module by the name the MLmodel file gives) reads that file with `torch.load(weights_only=True)`
and builds the module with aebench's own kinds: no unpickler but torch's restricted one, and no
code from the store (no pickled module, no stored Python file, no `code_paths`).
"""

from __future__ import annotations

import functools
import hashlib
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..constants import N_PIXELS
from .runs import Scalar, quoted
from .store import EXPERIMENT, store_error, store_errors

if TYPE_CHECKING:  # mlflow and torch are imported inside the functions: importing costs seconds
    from mlflow.entities import LoggedModel
    from torch import nn

    from ..kinds import ModelConfig

PIXEL_SCALES = ("0,1", "-1,1")
WEIGHTS = "replica.pt"  # the logged model's one data file: data/replica.pt
PICKLED = "model.pth"  # what aebench logged before: a pickled module (mlflow.pytorch, "pickle")
LOADER = __name__  # MLflow's loader_module: it calls _load_pyfunc(path of data/replica.pt)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file: the key that ties a checkpoint to its logged model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def log_replica_model(model: nn.Module, *, name: str, index: int, pixels: str,
                      weights_sha256: str, params: Mapping[str, Scalar] | None = None,
                      cfg: ModelConfig | None = None) -> str:
    """Log `model` as NAME-r{index} to the active replica run; return its model id.

    Logged as its weights and its config (`cfg`; default: params.yaml `models.NAME` of the
    working directory, what the train stage built it from), checked here to rebuild it, so
    that load_model gives back the module with encode / decode / latent_dim. Signature:
    float32 (-1, 784) in and out, on the pixel scale `pixels` ("0,1" or "-1,1"), named in the
    metadata with the latent size. Tagged with the weights file's sha256 for
    find_logged_model."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if pixels not in PIXEL_SCALES:
        raise ValueError(f"log_replica_model: pixels {pixels!r} is not one of "
                         f"{', '.join(PIXEL_SCALES)}")
    if cfg is None:
        from ..config import PARAMS

        cfg = _params_entry(name, Path(PARAMS).resolve(), Path(PARAMS).stat().st_mtime_ns)
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    try:  # what load_model will do: an entry that cannot rebuild this module fails here
        cfg.build().load_state_dict(state)
    except RuntimeError as err:
        first = str(err).splitlines()[-1].strip()
        raise ValueError(f"log_replica_model: models.{name} does not rebuild this module "
                         f"({first})") from None
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))])
    with tempfile.TemporaryDirectory(prefix="aebench-model-") as tmp:
        weights = Path(tmp) / WEIGHTS
        torch.save({"name": name, "config": cfg.model_dump(), "state_dict": state}, weights)
        with store_errors():
            info = mlflow.pyfunc.log_model(
                name=f"{name}-r{index}", loader_module=LOADER, data_path=str(weights),
                signature=ModelSignature(inputs=spec, outputs=spec),
                # one black image: shown on the model's page, and MLflow loads the logged model
                # (through _load_pyfunc) and runs it once on it before this returns
                input_example=np.zeros((1, N_PIXELS), np.float32),
                # explicit requirements: inferring them loads the model in a subprocess (seconds)
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"pixels": pixels, "latent_dim": int(model.latent_dim),
                          "loads_with": "aebench.tracking.load_model"},
                tags={"model": name, "replica": str(index), "weights_sha256": weights_sha256},
                params={key: str(value) for key, value in (params or {}).items()} or None)
    return info.model_id


@functools.lru_cache(maxsize=16)
def _params_entry(name: str, path: Path, mtime_ns: int) -> ModelConfig:
    """params.yaml `models.NAME`, read once per file version (a stage logs several replicas).
    The stage has checked the file already (config.load_params): read here with libyaml's safe
    loader where PyYAML has it (0.02 s instead of 0.1-0.25 s)."""
    import yaml

    from .. import kinds

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return kinds.read_model(yaml.load(path.read_text(), Loader=loader), name, path)


def warm_up() -> None:
    """Save a throwaway model outside any store the way log_replica_model logs one: the first
    save of a process imports MLflow's pyfunc code and scans the installed packages (seconds),
    which the warm server (aebench.warm) pays ahead of the stages it forks."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))])
    with tempfile.TemporaryDirectory(prefix="aebench-warm-") as tmp:
        torch.save({}, Path(tmp) / WEIGHTS)
        mlflow.pyfunc.save_model(f"{tmp}/model", loader_module=LOADER,
                                 data_path=str(Path(tmp) / WEIGHTS),
                                 signature=ModelSignature(inputs=spec, outputs=spec),
                                 input_example=np.zeros((1, N_PIXELS), np.float32),
                                 pip_requirements=["torch"])


def load_model(model_uri: str) -> nn.Module:
    """The module logged at `model_uri` (`models:/aebench-NAME@best`, `models:/aebench-NAME/3`,
    `models:/<model id>`), in eval mode on the CPU, with encode / decode / latent_dim.

    Reads only data/replica.pt, with torch.load(weights_only=True), and builds the module with
    aebench's kinds: whatever else the store holds (the MLmodel file's loader, a pickle) is
    not run. A file that is not such weights is refused with one ValueError line naming it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="aebench-model-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri,
                                                             dst_path=tmp))
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                # no such model, version or alias: the store is fine
                raise ValueError(f"{model_uri}: {str(err).splitlines()[0]}") from None
            raise store_error(err, mlflow.get_tracking_uri()) from err
        except Exception as err:  # noqa: BLE001 - as store_errors: one line naming the store
            raise store_error(err, mlflow.get_tracking_uri()) from err
        weights = local / "data" / WEIGHTS
        if not weights.is_file():
            if (local / "data" / PICKLED).is_file():
                raise ValueError(
                    f"{model_uri}: data/{PICKLED} is a pickled module, as aebench logged models "
                    f"before loading became weights-only; loading it would run whatever it "
                    f"holds: re-log it (docs/mlflow.md, \"Models logged before\")")
            raise ValueError(f"{model_uri}: no data/{WEIGHTS}: not a model logged by aebench")
        return read_replica(weights, f"{model_uri} data/{WEIGHTS}")


def read_replica(path: str | Path, source: str | None = None) -> nn.Module:
    """The module in the weights file `path` (data/replica.pt of a logged model), built by
    aebench's kinds, in eval mode; ValueError naming `source` (default: the path) when the file
    is not weights that torch.load(weights_only=True) accepts, or not an aebench model."""
    import torch

    from ..kinds import validate_model

    source = source or str(path)
    try:  # a torch.save file is a zip; a bare pickle is refused before any unpickler sees it
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"{source}: not a torch weights file ({err}); refused unread") from None
    if damaged:
        raise ValueError(f"{source}: member {damaged} fails its CRC-32 check")
    try:
        held = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - the restricted unpickler refused something
        raise ValueError(f"{source}: torch.load(weights_only=True) refused it "
                         f"({type(err).__name__}): not plain weights") from None
    if not isinstance(held, dict) or not {"name", "config", "state_dict"} <= set(held):
        raise ValueError(f"{source}: no name, config and state_dict in it")
    model = validate_model(held["name"], held["config"], source=source).build()
    try:
        model.load_state_dict(held["state_dict"])
    except RuntimeError as err:
        first = str(err).splitlines()[-1].strip()
        raise ValueError(f"{source}: the weights do not fit its config ({first})") from None
    return model.eval()


class _Pyfunc:
    """What `mlflow.pyfunc.load_model` returns the module in: predict() reconstructs a batch,
    get_raw_model() is the module itself."""

    def __init__(self, module: nn.Module):
        self.module = module

    def get_raw_model(self) -> nn.Module:
        return self.module

    def predict(self, data: Any, params: Mapping[str, Any] | None = None):
        import numpy as np
        import torch

        x = torch.tensor(np.asarray(data, dtype=np.float32))  # a copy: MLflow's may be read-only
        with torch.no_grad():
            return self.module(x).numpy()


def _load_pyfunc(data_path: str, model_config: Mapping[str, Any] | None = None) -> _Pyfunc:
    """MLflow's loader-module entry point (`mlflow.pyfunc.load_model`): `data_path` is the
    downloaded data/replica.pt; `model_config` (a caller's) changes nothing."""
    return _Pyfunc(read_replica(data_path))


# --------------------------------------------------------------------------- evaluation


@store_errors()
def find_logged(name: str, weights_sha256: str,
                experiment_id: str | None) -> LoggedModel | None:
    import mlflow

    if experiment_id is None:
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return None
        experiment_id = exp.experiment_id
    found = mlflow.search_logged_models(
        experiment_ids=[experiment_id],
        filter_string=f"tags.model = {quoted(name)} AND "
                      f"tags.weights_sha256 = {quoted(weights_sha256)}",
        order_by=[{"field_name": "creation_time", "ascending": False}],
        max_results=1, output_format="list")
    return found[0] if found else None


def find_logged_model(name: str, weights_sha256: str, *,
                      experiment_id: str | None = None) -> str | None:
    """The model id of model `name`'s logged model whose weights file has this sha256 (the
    newest if several), or None when this store has none (weights pulled from a DVC remote,
    a fresh mlflow.db). `experiment_id` defaults to the `aebench` experiment."""
    found = find_logged(name, weights_sha256, experiment_id)
    return found.model_id if found else None

