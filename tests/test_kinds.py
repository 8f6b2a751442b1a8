"""Adding a model kind is one file: a config class with `build()`, registered. Here the file is
this test: a toy kind goes through the functions the stages call (validate, train, save, load,
evaluate) with nothing else changed."""

from typing import Literal

import pytest
import torch
from conftest import ToyAutoencoder
from pydantic import Field

from aebench import kinds, metrics, models, training
from aebench.config import ConfigError
from aebench.constants import replica_file
from aebench.kinds import ModelConfig
from aebench.losses import source_loss

CPU = torch.device("cpu")


class ToyConfig(ModelConfig):
    kind: Literal["toy"]
    code: int = Field(ge=1)

    def build(self) -> ToyAutoencoder:
        return ToyAutoencoder(self.code)


class SparseToyConfig(ToyConfig):
    """A kind whose objective is more than the source loss: an L1 penalty on the code."""

    kind: Literal["toy_sparse"]
    penalty: float = Field(ge=0)

    def training_loss(self, model, inputs, targets):
        code = model.encode(inputs)
        return (source_loss(model.decode(code), targets, self.loss)
                + self.penalty * code.abs().mean())


ENTRY = {"kind": "toy", "code": 8, "pixels": "-1,1", "input_noise": 0.25, "init": "glorot",
         "optimizer": {"name": "adam", "lr": 1.0e-2, "weight_decay": 0.0}, "loss": "mse",
         "batch_size": 32, "epochs": 3}


@pytest.fixture
def toy_kinds():
    """ToyConfig and SparseToyConfig registered for one test; the registry restored after."""
    saved = dict(kinds.KINDS)
    kinds.register(ToyConfig)
    kinds.register(SparseToyConfig)
    yield
    kinds.KINDS.clear()
    for cls in saved.values():
        kinds.register(cls)  # re-registering also drops the validator built with the toys


def images(n, seed=0):
    """Blobby fake digits (a random low-rank pattern, so there is something to learn) and
    labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 4, generator=g) @ torch.rand(4, 784, generator=g) / 4 * 255)
    return torch.arange(n) % 10, x.clamp(0, 255).to(torch.uint8)


def test_a_registered_kind_is_validated_like_the_others(toy_kinds):
    cfg = kinds.validate_model("tiny", ENTRY)
    assert isinstance(cfg, ToyConfig) and cfg.code == 8
    with pytest.raises(ConfigError, match=r"^params\.yaml: models\.tiny\.code: 0 is not allowed"):
        kinds.validate_model("tiny", {**ENTRY, "code": 0})
    with pytest.raises(ConfigError, match=r"models\.tiny\.penalty: 1 is not allowed; unknown"):
        kinds.validate_model("tiny", {**ENTRY, "penalty": 1})
    with pytest.raises(ConfigError, match=r"models\.tiny\.kind: 'vae' .*: mlp, conv, toy, toy_sp"):
        kinds.validate_model("tiny", {**ENTRY, "kind": "vae"})
    both = kinds.read_models({"models": {"tiny": ENTRY, "sparse": {**ENTRY, "kind": "toy_sparse",
                                                                    "penalty": 0.5}}})
    assert [type(c) for c in both.values()] == [ToyConfig, SparseToyConfig]


def test_the_registry_is_left_as_it_was():
    # Passes in any order: after the fixture, the toy kinds are gone again.
    assert list(kinds.KINDS) == ["mlp", "conv"]
    with pytest.raises(ConfigError, match=r"'toy' is not allowed; allowed values: mlp, conv$"):
        kinds.validate_model("tiny", ENTRY)


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_a_new_kind_trains_saves_loads_and_evaluates_through_the_stage_functions(
        toy_kinds, tmp_path, path):
    cfg = kinds.read_model({"models": {"tiny": ENTRY}}, "tiny")
    _, train_x = images(128)
    labels, test_x = images(40, seed=1)
    trained_models = []
    for r in range(2):  # two replicas, as the train and evaluate stages handle them
        model, history = training.train_replica(cfg, train_x, test_x, device=CPU, seed=r,
                                                path=path, name=f"tiny-r{r}", progress=False)
        assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
        assert history.final["test_mse"] < history.epochs[0]["test_mse"]
        models.save_checkpoint(tmp_path / "tiny" / replica_file(r), model, name="tiny", cfg=cfg,
                               replica=r, seed=r, device="cpu")
        trained_models.append(model)

    loaded = models.load_replicas(tmp_path, "tiny", cfg, 2)
    scores = []
    for (net, info), trained in zip(loaded, trained_models, strict=True):
        assert isinstance(net, ToyAutoencoder) and not net.training
        state = net.state_dict()
        assert trained.state_dict()["encoder.1.running_var"].ne(1).any()  # BN stats were learnt
        for k, v in trained.state_dict().items():
            assert torch.equal(state[k], v), k  # parameters and BatchNorm buffers
        result = metrics.evaluate_model(net, cfg, metrics.TestSet.of_images(test_x, labels),
                                        noise_seed=5)
        with torch.no_grad():  # the [0,1] MSE by hand: (tanh output + 1) / 2 against pixels / 255
            expected = ((net(test_x / 127.5 - 1) + 1) / 2 - test_x / 255).double().pow(2).mean()
        assert result["mse"] == pytest.approx(float(expected), rel=1e-5)
        assert result["sse_per_image"] == pytest.approx(784 * result["mse"])
        assert {"test_loss", "denoise_mse", "noisy_input_mse", "psnr"} <= set(result)
        assert set(result["mse_per_digit"]) == {str(d) for d in range(10)}
        scores.append({"seed": info["seed"], **result})

    head = metrics.headline(scores, cfg)
    assert set(head) == {"mse", "sse_per_image", "test_loss", "n"} and head["n"] == 2
    mses = [s["mse"] for s in scores]
    assert head["mse"]["mean"] == pytest.approx(sum(mses) / 2)
    assert head["mse"]["std"] == pytest.approx(abs(mses[0] - mses[1]) / 2 ** 0.5)


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_a_kind_that_overrides_training_loss_is_trained_on_it(toy_kinds, path):
    # Enough steps (10 epochs of 4 batches) for BatchNorm's running statistics to follow.
    entry = {**ENTRY, "input_noise": 0.0, "epochs": 10,
             "optimizer": {"name": "adam", "lr": 3.0e-2, "weight_decay": 0.0}}
    plain = kinds.validate_model("plain", entry)
    sparse = kinds.validate_model("sparse", {**entry, "kind": "toy_sparse", "penalty": 1.0})
    _, train_x = images(128)
    _, test_x = images(20, seed=1)
    runs = {cfg.kind: training.train_replica(cfg, train_x, test_x, device=CPU, seed=0, path=path,
                                             progress=False) for cfg in (plain, sparse)}
    (plain_model, plain_h), (sparse_model, sparse_h) = runs["toy"], runs["toy_sparse"]
    # Same seed, same layers: the same starting weights, so the first epoch's loss differs only
    # by the penalty the kind adds.
    assert sparse_h.epochs[0]["train_loss"] > plain_h.epochs[0]["train_loss"] + 0.1
    x = models.to_model_scale(test_x, "-1,1")
    with torch.no_grad():
        assert float(sparse.training_loss(sparse_model, x, x)) > float(
            source_loss(sparse_model(x), x, "mse"))
        # The penalty is minimised, not only reported: the trained code is much smaller (0.05
        # against 0.47 when this was written).
        assert (sparse_model.encode(x).abs().mean()
                < 0.3 * plain_model.encode(x).abs().mean())
