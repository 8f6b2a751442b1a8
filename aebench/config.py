"""Reading and validating params.yaml: one pydantic model per section.

Each stage reads its own section once. Every check runs before any work starts, and every error
names the file, the key path, the bad value and what is allowed, so a typo costs seconds rather
than a failed run. The `models:` entries are validated by `aebench.kinds`, which owns their
configs; this module stays free of torch so that download and convert start fast.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

PARAMS = "params.yaml"
# Bounds that keep a typo from failing hours later (or overflowing a C integer). Replicas: the
# std over n seeds is known to about 1 / sqrt(2 (n - 1)) of itself, 7 % at 100; more costs
# hours and gigabytes of weights and MLflow artifacts and tells no more.
MAX_REPLICAS = 100
MAX_EPOCHS = 100_000
MAX_SEED = 2**32 - 1  # what every seeding API takes (numpy's legacy one is the narrowest)
MAX_LIMIT = 10**9     # train.limit: far above any CSV here; a larger number is a typo


class ConfigError(ValueError):
    """A value in params.yaml that the pipeline cannot use."""


class Section(BaseModel):
    """Strict: YAML's types are taken as written (`1e-3` is a string in YAML, not a number), and
    an unknown key is an error rather than a silently ignored typo."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Download(Section):
    mirrors: list[str]  # may be empty when $MNIST_MIRROR names one
    timeout: float = Field(gt=0, allow_inf_nan=False)


class Train(Section):
    seed: int = Field(ge=0, le=MAX_SEED)
    replicas: int = Field(ge=1, le=MAX_REPLICAS)
    device: Literal["auto", "cuda", "mps", "cpu"]
    path: Literal["fast", "eager"]
    limit: int = Field(ge=0, le=MAX_LIMIT)
    workers: int = Field(ge=0, le=MAX_REPLICAS)  # 0: auto (see aebench/workers.py)


class Evaluate(Section):
    noise_seed: int = Field(ge=0, le=MAX_SEED)


S = TypeVar("S", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; DVC refuses such a file, and so
    does a stage run by hand."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(f"line {line}: duplicate key {key!r} (also on line "
                                  f"{seen[key]}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: str | Path = PARAMS) -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.object[err.start]:#04x} at "
                          f"offset {err.start})") from None
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


def section(params: dict[str, Any], key: str, model: type[S], source: str | Path = PARAMS) -> S:
    """params[key] validated as `model`; ConfigError naming `source` and the key otherwise."""
    if key not in params:
        raise ConfigError(f"{source}: {key}: missing section")
    return validate(model, params[key], key, source)


def validate(model: type[S], value: Any, key: str, source: str | Path = PARAMS) -> S:
    try:
        return model.model_validate(value)
    except ValidationError as err:
        raise ConfigError(describe(err, key, source)) from None


def describe(err: ValidationError, key: str, source: str | Path, skip: int = 0) -> str:
    """pydantic's first error as one line: `file: key.path: value is not allowed; why`.

    `skip` drops that many leading parts of the error's location (a union's tag)."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"][skip:]]
    path = ".".join([key, *loc])
    value, kind, msg = first.get("input"), first["type"], first["msg"]
    if kind == "missing":
        return f"{source}: {path}: missing key"
    if kind == "value_error":  # a check across keys: its message names the values
        return f"{source}: {path}: {msg.removeprefix('Value error, ')}"
    if kind == "extra_forbidden":
        return f"{source}: {path}: {value!r} is not allowed; unknown key"
    if kind in ("literal_error", "enum"):
        msg = msg.replace("Input should be", "allowed values:").replace("'", "")
    if kind in ("less_than", "less_than_equal", "greater_than", "greater_than_equal"):
        (bound,) = first["ctx"].values()  # as Python writes it: 1e+30, not 31 digits
        msg = f"{msg.rsplit(' ', 1)[0]} {bound}"
    hint = ""
    if isinstance(value, str) and _is_number(value):
        hint = (f" (YAML reads {value} as a string: write it with a dot and a signed exponent, "
                f"e.g. 1.0e-3)")
    return f"{source}: {path}: {value!r} is not allowed; {msg}{hint}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 1}} -> {'optimizer.lr': 1} (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
