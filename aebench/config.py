"""Reading and validating params.yaml.

Every check runs before any training, and every error names the key path, the bad value and
what is allowed, so a typo in params.yaml costs seconds rather than a failed run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A value in params.yaml that the pipeline cannot use."""


ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid")
OPTIONAL_ACTIVATIONS = ("none", *ACTIVATIONS)
KINDS = ("mlp", "conv")
OPTIMIZERS = ("adam", "nadam")
LOSSES = ("mse", "bce", "half_mse")
PIXELS = ("0,1", "-1,1")
INITS = ("torch", "glorot")
DEVICES = ("auto", "cuda", "mps", "cpu")
TRAIN_PATHS = ("fast", "eager")
N_PIXELS = 784

_COMMON = ("kind", "pixels", "input_noise", "init", "optimizer", "loss", "batch_size", "epochs")
_KIND_KEYS = {
    "mlp": ("encoder", "decoder", "activation", "code_activation", "output_activation", "dropout"),
    "conv": ("channels", "kernel", "pool", "activation", "output_activation"),
}
_OPTIMIZER_KEYS = ("name", "lr", "weight_decay")
_TRAIN_KEYS = ("seed", "device", "path", "limit")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    try:
        params = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return params


class _Checker:
    def __init__(self, source: str):
        self.source = source

    def fail(self, key: str, value: Any, allowed: str) -> None:
        raise ConfigError(f"{self.source}: {key}: {value!r} is not allowed; {allowed}")

    def keys(self, section: Any, key: str, expected: tuple[str, ...]) -> dict:
        if not isinstance(section, dict):
            self.fail(key, section, "expected a mapping")
        for k in expected:
            if k not in section:
                raise ConfigError(f"{self.source}: {key}.{k}: missing key")
        for k in section:
            if k not in expected:
                self.fail(f"{key}.{k}", section[k],
                          f"unknown key; allowed keys: {', '.join(expected)}")
        return section

    def choice(self, value: Any, key: str, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            self.fail(key, value, f"allowed values: {', '.join(allowed)}")

    def positive_int(self, value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(key, value, "must be a positive integer")

    def number(self, value: Any, key: str, lo: float, hi: float, lo_open: bool, hi_open: bool):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            above = value > lo if lo_open else value >= lo
            below = value < hi if hi_open else value <= hi
            ok = above and below
        if not ok:
            left, right = "(" if lo_open else "[", ")" if hi_open else "]"
            self.fail(key, value, f"must be a number in {left}{lo}, {hi}{right}")

    def int_list(self, value: Any, key: str) -> None:
        if not isinstance(value, list) or len(value) < 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            self.fail(key, value, "must be a list of at least two positive integers")


def validate_model(name: str, cfg: Any, source: str = "params.yaml") -> dict:
    """Check one entry of `models:`; return it unchanged."""
    c = _Checker(source)
    key = f"models.{name}"
    if not isinstance(cfg, dict):
        c.fail(key, cfg, "expected a mapping")
    if "kind" not in cfg:
        raise ConfigError(f"{source}: {key}.kind: missing key")
    c.choice(cfg["kind"], f"{key}.kind", KINDS)
    kind = cfg["kind"]
    c.keys(cfg, key, _COMMON + _KIND_KEYS[kind])
    c.choice(cfg["pixels"], f"{key}.pixels", PIXELS)
    c.choice(cfg["init"], f"{key}.init", INITS)
    c.choice(cfg["loss"], f"{key}.loss", LOSSES)
    c.number(cfg["input_noise"], f"{key}.input_noise", 0, 1, False, True)
    c.positive_int(cfg["batch_size"], f"{key}.batch_size")
    c.positive_int(cfg["epochs"], f"{key}.epochs")
    opt = c.keys(cfg["optimizer"], f"{key}.optimizer", _OPTIMIZER_KEYS)
    c.choice(opt["name"], f"{key}.optimizer.name", OPTIMIZERS)
    c.number(opt["lr"], f"{key}.optimizer.lr", 0, float("inf"), True, True)
    c.number(opt["weight_decay"], f"{key}.optimizer.weight_decay", 0, float("inf"), False, True)
    c.choice(cfg["activation"], f"{key}.activation", ACTIVATIONS)
    c.choice(cfg["output_activation"], f"{key}.output_activation", OPTIONAL_ACTIVATIONS)
    if kind == "mlp":
        c.choice(cfg["code_activation"], f"{key}.code_activation", OPTIONAL_ACTIVATIONS)
        c.number(cfg["dropout"], f"{key}.dropout", 0, 1, False, True)
        c.int_list(cfg["encoder"], f"{key}.encoder")
        c.int_list(cfg["decoder"], f"{key}.decoder")
        if cfg["encoder"][0] != N_PIXELS:
            c.fail(f"{key}.encoder", cfg["encoder"], f"must start at {N_PIXELS} (28 x 28 pixels)")
        if cfg["decoder"][-1] != N_PIXELS:
            c.fail(f"{key}.decoder", cfg["decoder"], f"must end at {N_PIXELS} (28 x 28 pixels)")
        if cfg["decoder"][0] != cfg["encoder"][-1]:
            c.fail(f"{key}.decoder", cfg["decoder"],
                   f"must start at the code size {cfg['encoder'][-1]} (the encoder's last size)")
    else:
        c.int_list(cfg["channels"], f"{key}.channels")
        if cfg["channels"][0] != 1:
            c.fail(f"{key}.channels", cfg["channels"], "must start at 1 (one grey channel)")
        c.positive_int(cfg["kernel"], f"{key}.kernel")
        c.positive_int(cfg["pool"], f"{key}.pool")
    if cfg["loss"] == "bce" and (cfg["pixels"] != "0,1" or cfg["output_activation"] != "sigmoid"):
        c.fail(f"{key}.loss", "bce", "bce needs pixels '0,1' and output_activation sigmoid")
    return cfg


def validate_train(section: Any, source: str = "params.yaml") -> dict:
    c = _Checker(source)
    c.keys(section, "train", _TRAIN_KEYS)
    if isinstance(section["seed"], bool) or not isinstance(section["seed"], int):
        c.fail("train.seed", section["seed"], "must be an integer")
    c.choice(section["device"], "train.device", DEVICES)
    c.choice(section["path"], "train.path", TRAIN_PATHS)
    limit = section["limit"]
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        c.fail("train.limit", limit, "must be an integer >= 0 (0 = all training images)")
    return section


def validate_evaluate(section: Any, source: str = "params.yaml") -> dict:
    c = _Checker(source)
    c.keys(section, "evaluate", ("noise_seed",))
    if isinstance(section["noise_seed"], bool) or not isinstance(section["noise_seed"], int):
        c.fail("evaluate.noise_seed", section["noise_seed"], "must be an integer")
    return section


def validate_models(models: Any, source: str = "params.yaml") -> dict:
    if not isinstance(models, dict) or not models:
        raise ConfigError(f"{source}: models: expected a non-empty mapping of name to settings")
    for name, cfg in models.items():
        validate_model(name, cfg, source)
    return models


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optimizer': {'lr': 1}} -> {'optimizer.lr': 1}; lists become strings (for MLflow)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out
