"""The model kinds: `kind:` in a params.yaml entry -> the config class that builds its model.

Adding a kind (a VAE, say) is one file: a `ModelConfig` subclass with `kind: Literal["vae"]`,
its keys, `build()` returning an nn.Module with `encode`, `decode` and `latent_dim` that takes
and returns flat (N, 784) batches, and, if its objective is more than the source loss,
`training_loss()`. Then `register` it here (or from anywhere, as tests/test_kinds.py does).
"""

from __future__ import annotations

import functools
import operator
import re
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import Field, TypeAdapter, ValidationError

from ..config import PARAMS, ConfigError, describe
from .base import ModelConfig
from .conv import ConvConfig
from .mlp import MLPConfig

KINDS: dict[str, type[ModelConfig]] = {}
# A name becomes a folder, a DVC stage name (train@NAME) and a params key (models.NAME.epochs),
# so no slash, space or dot; and file names (NAME.csv, a temporary .NAME.csv.XXXXXXXX.tmp) that
# must fit in 255 bytes (143 on eCryptfs), hence a length well below.
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
MAX_NAME_LENGTH = 100


def register(cls: type[ModelConfig]) -> type[ModelConfig]:
    (tag,) = get_args(cls.model_fields["kind"].annotation)
    KINDS[tag] = cls
    _adapter.cache_clear()
    return cls



@functools.cache
def _adapter() -> TypeAdapter:
    # A discriminated union on `kind` over every registered kind (a union needs two).
    classes = tuple(KINDS.values())
    entry = Annotated[functools.reduce(operator.or_, classes), Field(discriminator="kind")] \
        if len(classes) > 1 else classes[0]
    return TypeAdapter(entry)


register(MLPConfig)
register(ConvConfig)


def validate_model(name: str, entry: Any, source: str | Path = PARAMS) -> ModelConfig:
    """One `models.NAME` entry as its kind's config; ConfigError naming key and value."""
    key = f"models.{name}"
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"{source}: models: {name!r} is not allowed as a model name; use "
                          "letters, digits, '_' and '-', starting with a letter (it names a "
                          "folder, a DVC stage and a params key)")
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(f"{source}: models: {name[:20]}... ({len(name)} characters) is too "
                          f"long for a model name; use at most {MAX_NAME_LENGTH} (it names "
                          "folders and files, and a file name holds at most 255 bytes)")
    if not isinstance(entry, dict):
        raise ConfigError(f"{source}: {key}: {entry!r} is not allowed; expected a mapping")
    if "kind" not in entry:
        raise ConfigError(f"{source}: {key}.kind: missing key")
    if entry["kind"] not in KINDS:
        raise ConfigError(f"{source}: {key}.kind: {entry['kind']!r} is not allowed; allowed "
                          f"values: {', '.join(KINDS)}")
    try:
        return _adapter().validate_python(entry)
    except ValidationError as err:
        raise ConfigError(describe(err, key, source, skip=1 if len(KINDS) > 1 else 0)) from None


def validate_models(models: Any, source: str | Path = PARAMS) -> dict[str, ModelConfig]:
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{source}: models: expected a non-empty mapping of name to settings")
    cfgs = {name: validate_model(name, entry, source) for name, entry in models.items()}
    check_case(models, source)
    return cfgs


def check_case(names: Any, source: str | Path = PARAMS, name: str | None = None) -> None:
    """Refuse two model names that differ only in case (`deep3`, `Deep3`): each names a folder
    and files (data/models/NAME, plots/curves/NAME.csv), and on a case-insensitive file system
    (macOS's and Windows's defaults) the two are one, which both train stages overwrite. With
    `name`, only a clash that involves that name (a stage for one model)."""
    seen: dict[str, str] = {}
    for other in names:
        if not isinstance(other, str):
            continue
        first = seen.setdefault(other.casefold(), other)
        if first != other and name in (None, first, other):
            raise ConfigError(f"{source}: models: {first!r} and {other!r} differ only in case: "
                              "on a case-insensitive file system (macOS, Windows) they are one "
                              "folder; rename one")



def read_models(params: dict, source: str | Path = PARAMS) -> dict[str, ModelConfig]:
    """The `models:` section of loaded params.yaml, every entry validated."""
    return validate_models(params.get("models"), source)


def read_model(params: dict, name: str, source: str | Path = PARAMS) -> ModelConfig:
    """One entry of the `models:` section, validated alone (a stage for one model reads only
    its own entry)."""
    models = params.get("models")
    if not isinstance(models, dict) or name not in models:
        known = ", ".join(models) if isinstance(models, dict) else "none"
        raise ConfigError(f"{source}: models.{name}: missing; models in {source}: {known}")
    cfg = validate_model(name, models[name], source)
    check_case(models, source, name)
    return cfg
