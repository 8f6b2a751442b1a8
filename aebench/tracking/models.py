"""Logged models: each replica's module logged for reuse, and found again by its weights file."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..constants import N_PIXELS
from .runs import Scalar, quoted
from .store import EXPERIMENT, store_errors

if TYPE_CHECKING:  # mlflow is imported inside the functions: importing it costs seconds
    from mlflow.entities import LoggedModel
    from torch import nn

PIXEL_SCALES = ("0,1", "-1,1")

def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file: the key that ties a checkpoint to its logged model."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()




def _aebench_dir() -> str:
    return str(Path(__file__).resolve().parents[1])


class _DropMessages(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def log_replica_model(model: nn.Module, *, name: str, index: int, pixels: str,
                      weights_sha256: str, params: Mapping[str, Scalar] | None = None) -> str:
    """Log `model` as NAME-r{index} to the active replica run; return its model id.

    Pickled (not torch.export), with the aebench package as code, so that
    `mlflow.pytorch.load_model` returns the module itself with encode / decode / latent_dim.
    Signature: float32 (-1, 784) in and out, on the pixel scale `pixels` ("0,1" or "-1,1"),
    named in the metadata with the latent size. Tagged with the weights file's sha256 for
    find_logged_model. The model is saved in eval mode; its own mode is restored after."""
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    if pixels not in PIXEL_SCALES:
        raise ValueError(f"log_replica_model: pixels {pixels!r} is not one of "
                         f"{', '.join(PIXEL_SCALES)}")
    spec = Schema([TensorSpec(np.dtype(np.float32), (-1, N_PIXELS))])
    was_training = model.training
    model.eval()
    # Pickle is the point here (the module itself comes back, not an exported graph): drop
    # MLflow's warning against it, which would repeat for every replica.
    pickle_warning = _DropMessages("Saving pytorch model by Pickle")
    logging.getLogger("mlflow.pytorch").addFilter(pickle_warning)
    try:
        with store_errors():
            info = mlflow.pytorch.log_model(
                model, name=f"{name}-r{index}", serialization_format="pickle",
                code_paths=[_aebench_dir()],
                signature=ModelSignature(inputs=spec, outputs=spec),
                # explicit requirements: inferring them imports the model in a subprocess (seconds)
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                metadata={"pixels": pixels, "latent_dim": int(model.latent_dim)},
                tags={"model": name, "replica": str(index), "weights_sha256": weights_sha256},
                params={key: str(value) for key, value in (params or {}).items()} or None)
    finally:
        logging.getLogger("mlflow.pytorch").removeFilter(pickle_warning)
        model.train(was_training)
    return info.model_id


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

