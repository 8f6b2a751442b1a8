"""score@NAME's output and evaluate's input: one model's replicas scored, one JSON file per model
(`<folder>/<model>.json`).

A file holds the model's name, kind, latent_dim, params (parameter count), loss and device, and
`replicas`: per replica its seed, the sha256 of the weights file scored and every metric of
aebench.metrics.evaluate_model. The floats are kept exact (not rounded as the metrics files
are), so that evaluate's means and stds over replicas are those of the values computed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .files import read_json, write_text

SUFFIX = ".json"


def path(folder: str | Path, name: str) -> Path:
    return Path(folder) / f"{name}{SUFFIX}"


def write(file: str | Path, scores: dict[str, Any]) -> None:
    write_text(file, json.dumps(scores, indent=2) + "\n")


def read(folder: str | Path, name: str, replicas: int) -> dict[str, Any]:
    """The scores of model `name` with `replicas` replicas; a file of another model or another
    number of replicas (params.yaml changed since it was scored) is one line naming it."""
    file = path(folder, name)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing; model {name!r} has not been scored (run "
                                f"`dvc repro score@{name}`)")
    scores = read_json(file)
    held = (scores.get("name"), len(scores.get("replicas", []))) if isinstance(scores, dict) \
        else (None, 0)
    if held != (name, replicas):
        raise ValueError(f"{file}: holds {held[1]} replica(s) of model {held[0]!r}, not "
                         f"{replicas} of {name!r}; rerun `dvc repro score@{name}`")
    return scores
