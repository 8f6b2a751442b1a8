"""params.yaml validation: every error is one line naming the file, the key path, the bad value and
what is allowed."""

import copy
import re
from pathlib import Path

import pytest
import yaml

from aebench import config, kinds
from aebench.config import ConfigError, load_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml")


def test_shipped_params_are_valid(params):
    cfgs = kinds.read_models(params)
    assert list(cfgs) == list(params["models"])
    assert {c.kind for c in cfgs.values()} == {"mlp", "conv"}
    config.section(params, "download", config.Download)
    config.section(params, "train", config.Train)
    config.section(params, "evaluate", config.Evaluate)


def changed(params, name, key, value):
    """A deep copy of models.NAME with the value at `key` (a path of keys) replaced."""
    cfg = copy.deepcopy(params["models"][name])
    target = cfg
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    return cfg


@pytest.mark.parametrize("key, value, expect", [
    (("kind",), "rnn", ["models.deep3.kind: 'rnn'", "mlp, conv"]),
    (("activation",), "gelu", ["models.deep3.activation: 'gelu'", "relu, leaky_relu"]),
    (("optimizer", "name"), "sgd", ["models.deep3.optimizer.name: 'sgd'", "adam or nadam"]),
    (("loss",), "l1", ["models.deep3.loss: 'l1'", "mse, bce or half_mse"]),
    (("pixels",), "0,255", ["models.deep3.pixels: '0,255'", "0,1 or -1,1"]),
    (("optimizer", "lr"), 0, ["models.deep3.optimizer.lr: 0 ", "greater than 0"]),
    (("optimizer", "lr"), -1e-3, ["models.deep3.optimizer.lr: -0.001 ", "greater than 0"]),
    (("batch_size",), 0, ["models.deep3.batch_size: 0 ", "greater than or equal to 1"]),
    (("epochs",), -2, ["models.deep3.epochs: -2 ", "greater than or equal to 1"]),
    (("epochs",), 1.5, ["models.deep3.epochs: 1.5 ", "valid integer"]),
    (("replicas",), 0, ["models.deep3.replicas: 0 ", "greater than or equal to 1"]),
    # Checks across keys name the entry and, in the message, the key and its value.
    (("encoder",), [100, 12, 3], ["models.deep3: encoder [100, 12, 3]", "784"]),
    (("decoder",), [3, 12, 780], ["models.deep3: decoder [3, 12, 780]", "784"]),
    (("decoder",), [4, 12, 784], ["models.deep3: decoder [4, 12, 784]", "code size 3"]),
    (("input_noise",), 1.0, ["models.deep3.input_noise: 1.0 ", "less than 1"]),
    # bounds: values that would otherwise fail hours later, or overflow a C integer
    (("epochs",), 10**20, ["models.deep3.epochs: 100000000000000000000 ", "less than or equal "
                                                                        "to 100000"]),
    (("replicas",), 101, ["models.deep3.replicas: 101 ", "less than or equal to 100"]),
    (("optimizer", "lr"), float("inf"), ["models.deep3.optimizer.lr: inf ", "less than or "
                                                                           "equal to 1e+30"]),
    (("optimizer", "lr"), 1e300, ["models.deep3.optimizer.lr: 1e+300 ", "less than or equal to "
                                                                       "1e+30"]),
    (("optimizer", "weight_decay"), 1e31, ["models.deep3.optimizer.weight_decay: 1e+31 ",
                                           "less than or equal to 1e+30"]),
    (("typo_key",), 1, ["models.deep3.typo_key: 1 ", "unknown key"]),
])
def test_bad_model_value_names_key_value_and_allowed(params, key, value, expect):
    with pytest.raises(ConfigError) as err:
        kinds.validate_model("deep3", changed(params, "deep3", key, value))
    message = str(err.value)
    assert message.startswith("params.yaml: ")
    assert "\n" not in message
    for text in expect:
        assert text in message


def test_a_key_of_another_kind_is_unknown(params):
    with pytest.raises(ConfigError, match=r"models\.conv16\.encoder: \[1\] is not allowed; unkn"):
        kinds.validate_model("conv16", changed(params, "conv16", ("encoder",), [1]))


def test_exponent_without_dot_is_a_string_in_yaml_and_the_error_says_how_to_write_it(params):
    # YAML 1.1 (PyYAML) reads 1e-3 as text; only 1.0e-3 is a float.
    entry = yaml.safe_load("{name: adam, lr: 1e-3, weight_decay: 1.0e-5}")
    assert entry["lr"] == "1e-3" and entry["weight_decay"] == 1e-5
    with pytest.raises(ConfigError) as err:
        kinds.validate_model("deep3", changed(params, "deep3", ("optimizer",), entry))
    message = str(err.value)
    assert "models.deep3.optimizer.lr: '1e-3' is not allowed" in message
    assert "1.0e-3" in message


@pytest.mark.parametrize("name", ["a/b", "deep 3", "deep.3", "3deep", ""])
def test_model_name_that_cannot_be_a_folder_or_stage_is_refused(params, name):
    with pytest.raises(ConfigError) as err:
        kinds.validate_models({name: params["models"]["deep3"]})
    assert f"params.yaml: models: {name!r} is not allowed as a model name" in str(err.value)


def test_model_names_that_differ_only_in_case_are_refused(params):
    """deep3 and Deep3 are one folder on macOS and Windows: every stage that reads `models:`
    refuses them, the one-model stages (train@NAME) included, whichever of the two they train."""
    models = {**params["models"], "Deep3": params["models"]["deep3"]}
    clash = ("params.yaml: models: 'deep3' and 'Deep3' differ only in case: on a "
             "case-insensitive file system (macOS, Windows) they are one folder; rename one")
    for read in (lambda: kinds.read_models({"models": models}),
                 lambda: kinds.read_model({"models": models}, "deep3"),
                 lambda: kinds.read_model({"models": models}, "Deep3")):
        with pytest.raises(ConfigError) as err:
            read()
        assert str(err.value) == clash
    # A stage for another model is not stopped by a clash that is not its own.
    assert kinds.read_model({"models": models}, "conv16").kind == "conv"
    kinds.read_models({"models": {**params["models"], "deep3b": params["models"]["deep3"]}})


@pytest.mark.parametrize("key", ["loss", "optimizer", "epochs", "kind"])
def test_missing_key_is_named(params, key):
    cfg = copy.deepcopy(params["models"]["under30"])
    del cfg[key]
    with pytest.raises(ConfigError, match=rf"^params\.yaml: models\.under30\.{key}: missing key$"):
        kinds.validate_model("under30", cfg)


def test_bce_needs_sigmoid_outputs(params):
    with pytest.raises(ConfigError, match=r"models\.under30: loss 'bce' needs"):
        kinds.validate_model("under30", changed(params, "under30", ("loss",), "bce"))


def test_reading_one_model_names_the_missing_one_and_those_there_are(params):
    assert kinds.read_model(params, "conv16").kind == "conv"
    with pytest.raises(ConfigError, match=r"models\.nope: missing; models in params\.yaml: "
                                          r"deep3, shallow128"):
        kinds.read_model(params, "nope")
    with pytest.raises(ConfigError, match="models: expected a non-empty mapping"):
        kinds.read_models({"models": {}})


def test_the_source_file_is_named(params, tmp_path):
    path = tmp_path / "other.yaml"
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: models.deep3.loss: 'l1'")):
        kinds.validate_model("deep3", changed(params, "deep3", ("loss",), "l1"), path)


@pytest.mark.parametrize("key, value, expect", [
    ("device", "tpu", "allowed values: auto, cuda, mps or cpu"),
    ("path", "turbo", "allowed values: fast or eager"),
    ("limit", -1, "greater than or equal to 0"),
    ("replicas", 0, "greater than or equal to 1"),
    ("workers", -1, "greater than or equal to 0"),
    ("workers", "auto", "valid integer"),
    ("workers", 101, "less than or equal to 100"),
    ("replicas", 1000, "less than or equal to 100"),
    ("seed", "zero", "valid integer"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**32, "less than or equal to 4294967295"),
    ("limit", 10**20, "less than or equal to 1000000000"),
    ("typo", 1, "unknown key"),
])
def test_bad_train_section(params, key, value, expect):
    section = {"train": dict(params["train"], **{key: value})}
    with pytest.raises(ConfigError) as err:
        config.section(section, "train", config.Train)
    assert str(err.value).startswith(f"params.yaml: train.{key}: {value!r} is not allowed; ")
    assert expect in str(err.value)


def test_missing_section_and_key_are_named(params):
    with pytest.raises(ConfigError, match=r"^params\.yaml: download: missing section$"):
        config.section({k: v for k, v in params.items() if k != "download"}, "download",
                        config.Download)
    train = {k: v for k, v in params["train"].items() if k != "seed"}
    with pytest.raises(ConfigError, match=r"^params\.yaml: train\.seed: missing key$"):
        config.section({"train": train}, "train", config.Train)


def test_unreadable_params_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml: expected a mapping"):
        load_params(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_params(tmp_path / "bad.yaml")


def test_a_bound_changes_nothing_a_checkpoint_stores(params):
    # model_dump() is saved in every checkpoint: validation may refuse more, never add a field
    for name, entry in params["models"].items():
        dumped = kinds.validate_model(name, entry).model_dump()
        assert dumped == {**entry, "replicas": entry.get("replicas")}


def test_duplicate_key_is_named_with_both_lines(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  seed: 0\n  replicas: 3\n  seed: 1\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: line 4: duplicate key 'seed' (also on line 2); keep one"


def test_a_binary_params_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"train:\n  seed: \xff\xfe\x00\x01\n")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: not a UTF-8 text file (byte 0xff at offset 15)"
