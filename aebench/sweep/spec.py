"""A sweep's SPEC file: its name and its configurations, each checked against params.yaml
before anything is submitted.

    name: deep3-lr          # experiment names: <name>-<8 hex digits of the sorted overrides>
    grid:                   # every combination of these values
      models.deep3.optimizer.lr: [1.0e-3, 3.0e-4]
      models.deep3.epochs: [10, 20]
    configs:                # and/or a list of override dicts
      - {models.deep3.batch_size: 64}

Every key must be a key of params.yaml (dotted, as `dvc exp run -S` takes it), and the params
with a configuration's overrides applied must pass the pipeline's own validation
(aebench.config, aebench.kinds). Errors are one line naming the SPEC file (SpecError).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .. import config, kinds

NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"
MAX_CONFIGS = 1000  # a typo in a grid (a list of 1,000 values) is refused, not submitted


class SpecError(ValueError):
    """A SPEC file that cannot be swept; str() is the whole one-line story."""


class Spec(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    name: str = Field(pattern=NAME, max_length=60)
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    configs: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class Configuration:
    """One point of the sweep: its experiment's name and its overrides (sorted by key)."""
    name: str
    overrides: dict[str, Any]

    def set_args(self) -> list[str]:
        """`dvc exp run`'s arguments: -S key=value, each value as YAML reads it back."""
        return [arg for key, value in self.overrides.items()
                for arg in ("-S", f"{key}={as_yaml(value)}")]

    def label(self) -> str:
        return " ".join(f"{key}={as_yaml(value)}" for key, value in self.overrides.items())


def as_yaml(value: Any) -> str:
    """`value` in YAML's flow style on one line, which `dvc exp run -S` parses back to it."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix(
        "\n").removesuffix("\n...")


def experiment_name(sweep: str, overrides: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()
    return f"{sweep}-{digest[:8]}"


def load(path: str | Path) -> Spec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read it: {' '.join(str(err).split())}") from None
    try:
        spec = Spec.model_validate(data)
    except ValidationError as err:
        raise SpecError(config.describe(err, "spec", path).replace(": spec.", ": ", 1)
                        .replace(": spec:", ":", 1)) from None
    for key, values in spec.grid.items():
        if not values:
            raise SpecError(f"{path}: grid.{key}: [] is not allowed; give at least one value")
    if not spec.grid and not spec.configs:
        raise SpecError(f"{path}: nothing to sweep; give a `grid:`, a `configs:` list or both")
    return spec


def configurations(spec: Spec, source: str | Path = "SPEC") -> list[Configuration]:
    """The grid's every combination, then the `configs:` entries; the same overrides once."""
    keys = list(spec.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*spec.grid.values())] \
        if keys else []
    points += list(spec.configs)
    if len(points) > MAX_CONFIGS:
        raise SpecError(f"{source}: {len(points)} configurations; at most {MAX_CONFIGS}")
    seen: dict[str, Configuration] = {}
    for point in points:
        overrides = dict(sorted(point.items()))
        if not overrides:
            raise SpecError(f"{source}: configs: {{}} is not allowed; the base commit is the "
                            "comparison already")
        cfg = Configuration(experiment_name(spec.name, overrides), overrides)
        seen.setdefault(cfg.name, cfg)
    return list(seen.values())


def apply(params: dict[str, Any], overrides: dict[str, Any], source: str | Path,
          params_file: str | Path) -> dict[str, Any]:
    """A copy of params with the overrides set; every key must exist there already."""
    out = copy.deepcopy(params)
    for key, value in overrides.items():
        node, parts = out, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i + 1])
                raise SpecError(f"{source}: {key}: not a key of {params_file} (no {where})")
            if i == len(parts) - 1:
                node[part] = value
            node = node[part]
    return out


def check(configs: list[Configuration], params_file: str | Path,
          source: str | Path = "SPEC") -> dict[str, dict[str, Any]]:
    """Every configuration's params, validated as the stages validate them (ConfigError's line
    prefixed with the SPEC file and the configuration); returns name -> params."""
    try:
        params = config.load_params(params_file)
    except config.ConfigError as err:
        raise SpecError(str(err)) from None
    out = {}
    for cfg in configs:
        for key, value in cfg.overrides.items():
            if yaml.safe_load(as_yaml(value)) != value:
                raise SpecError(f"{source}: {key}: {value!r} does not survive `dvc exp run -S` "
                                "as YAML; write it as a plain number, string or list")
        swept = apply(params, cfg.overrides, source, params_file)
        try:
            config.section(swept, "download", config.Download, params_file)
            config.section(swept, "train", config.Train, params_file)
            config.section(swept, "evaluate", config.Evaluate, params_file)
            kinds.validate_models(swept.get("models"), params_file)
        except config.ConfigError as err:
            raise SpecError(f"{source}: configuration {cfg.label()}: {err}") from None
        out[cfg.name] = swept
    return out


def cpus(params: dict[str, Any]) -> int:
    """The cores a configuration's training uses at most: its largest replica count (one
    worker process per replica on the CPU, aebench.workers)."""
    base = params["train"]["replicas"]
    return max([base] + [m.get("replicas", base) for m in params["models"].values()])
