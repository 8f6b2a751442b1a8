import copy
from pathlib import Path

import pytest

from aebench.config import ConfigError, load_params, validate_model, validate_models, validate_train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params():
    return load_params(ROOT / "params.yaml")


def test_shipped_params_are_valid(params):
    validate_models(params["models"])
    validate_train(params["train"])


@pytest.mark.parametrize("key, value, expect", [
    (("kind",), "rnn", ["models.deep3.kind", "'rnn'", "mlp, conv"]),
    (("activation",), "gelu", ["models.deep3.activation", "'gelu'", "relu, leaky_relu"]),
    (("optimizer", "name"), "sgd", ["models.deep3.optimizer.name", "'sgd'", "adam, nadam"]),
    (("loss",), "l1", ["models.deep3.loss", "'l1'", "mse, bce, half_mse"]),
    (("pixels",), "0,255", ["models.deep3.pixels", "'0,255'", "0,1, -1,1"]),
    (("optimizer", "lr"), 0, ["models.deep3.optimizer.lr", "0", "(0, inf)"]),
    (("optimizer", "lr"), -1e-3, ["models.deep3.optimizer.lr", "-0.001"]),
    (("batch_size",), 0, ["models.deep3.batch_size", "0", "positive integer"]),
    (("epochs",), -2, ["models.deep3.epochs", "-2", "positive integer"]),
    (("epochs",), 1.5, ["models.deep3.epochs", "1.5"]),
    (("encoder",), [100, 12, 3], ["models.deep3.encoder", "[100, 12, 3]", "784"]),
    (("decoder",), [3, 12, 780], ["models.deep3.decoder", "784"]),
    (("input_noise",), 1.0, ["models.deep3.input_noise", "1.0", "[0, 1)"]),
    (("typo_key",), 1, ["models.deep3.typo_key", "unknown key"]),
])
def test_bad_model_value_names_key_value_and_allowed(params, key, value, expect):
    cfg = copy.deepcopy(params["models"]["deep3"])
    target = cfg
    for k in key[:-1]:
        target = target[k]
    target[key[-1]] = value
    with pytest.raises(ConfigError) as err:
        validate_model("deep3", cfg)
    for text in expect:
        assert text in str(err.value)
    assert str(err.value).startswith("params.yaml: ")


@pytest.mark.parametrize("key", ["loss", "optimizer", "epochs", "kind"])
def test_missing_key_is_named(params, key):
    cfg = copy.deepcopy(params["models"]["under30"])
    del cfg[key]
    with pytest.raises(ConfigError, match=rf"models\.under30\.{key}: missing key"):
        validate_model("under30", cfg)


def test_bce_needs_sigmoid_outputs(params):
    cfg = copy.deepcopy(params["models"]["under30"])
    cfg["loss"] = "bce"
    with pytest.raises(ConfigError, match="bce needs"):
        validate_model("under30", cfg)


@pytest.mark.parametrize("key, value", [("device", "tpu"), ("path", "turbo"), ("limit", -1),
                                        ("seed", "zero")])
def test_bad_train_section(params, key, value):
    section = dict(params["train"], **{key: value})
    with pytest.raises(ConfigError, match=rf"train\.{key}: {value!r}"):
        validate_train(section)
