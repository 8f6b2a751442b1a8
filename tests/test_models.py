from pathlib import Path

import pytest
import torch

from aebench.config import ConfigError, load_params
from aebench.models import (
    ConvAutoencoder,
    build_model,
    load_checkpoint,
    mask_noise,
    reconstruct,
    save_checkpoint,
    to_model_scale,
    to_unit_scale,
)

ROOT = Path(__file__).resolve().parents[1]

PARAMS = load_params(ROOT / "params.yaml")
MODELS = PARAMS["models"]
RANGES = {"tanh": (-1, 1), "sigmoid": (0, 1), "relu": (0, float("inf"))}


@pytest.mark.parametrize("name", list(MODELS))
def test_forward_keeps_shape_and_source_output_range(name):
    cfg = MODELS[name]
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    x = to_model_scale(torch.randint(0, 256, (5, 784), dtype=torch.uint8), cfg["pixels"])
    y = model(x)
    assert y.shape == (5, 784)
    lo, hi = RANGES[cfg["output_activation"]]
    assert y.min() >= lo and y.max() <= hi
    assert model.encode(x).shape == (5, model.latent_dim)


def test_latent_sizes_follow_the_sources():
    sizes = {name: build_model(cfg).latent_dim for name, cfg in MODELS.items()}
    assert sizes == {"deep3": 3, "shallow128": 128, "under30": 30, "over500": 500,
                     "conv16": 16 * 12 * 12, "deep32": 32, "sigmoid100": 100}


def test_deep32_has_keras_layers():
    model = build_model(MODELS["deep32"])
    kinds = [type(m).__name__ for m in model.encoder]
    assert kinds[:3] == ["Linear", "LeakyReLU", "Dropout"] and kinds[-2:] == ["Linear", "LeakyReLU"]
    assert model.encoder[1].negative_slope == 0.3
    assert torch.all(model.encoder[0].bias == 0)  # Glorot init zeroes biases, as Keras does


def test_conv_geometry_that_does_not_return_28x28_is_refused():
    with pytest.raises(ConfigError, match="not 28 x 28"):
        ConvAutoencoder(channels=[1, 4, 8, 16], kernel=3, pool=2, activation="relu",
                        output_activation="tanh")


def test_pixel_scales_round_trip():
    x = torch.tensor([[0, 255, 51]], dtype=torch.uint8)
    assert torch.allclose(to_model_scale(x, "-1,1"), torch.tensor([[-1.0, 1.0, -0.6]]))
    assert torch.allclose(to_unit_scale(to_model_scale(x, "-1,1"), "-1,1"), x / 255)
    assert to_unit_scale(torch.tensor([1.2]), "-1,1").item() == pytest.approx(1.1)  # no clamping


def test_mask_noise_drops_about_p_and_rescales_the_rest():
    x = torch.ones(100_000)
    y = mask_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert mask_noise(x, 0.0) is x


def test_reconstruct_is_seeded_and_on_unit_scale():
    torch.manual_seed(0)
    model = build_model(MODELS["over500"])
    x = torch.randint(0, 256, (7, 784), dtype=torch.uint8)
    a = reconstruct(model, x, "-1,1", noise=0.5, noise_seed=3)
    b = reconstruct(model, x, "-1,1", noise=0.5, noise_seed=3)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = MODELS["under30"]
    model = build_model(cfg)
    path = tmp_path / "m" / "weights.pt"
    save_checkpoint(path, model, "under30", cfg)
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == cfg and raw["name"] == "under30"
    loaded = load_checkpoint(path, "under30", cfg)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"weights\.pt: checkpoint config does not match.*epochs"):
        load_checkpoint(path, "under30", dict(cfg, epochs=3))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"weights\.pt: not a valid aebench checkpoint"):
        load_checkpoint(path, "under30", cfg)
    with pytest.raises(FileNotFoundError, match="'nope'"):
        load_checkpoint(tmp_path / "nope" / "weights.pt", "nope")
    assert [p.name for p in path.parent.iterdir()] == ["weights.pt"]  # no temporary files left
