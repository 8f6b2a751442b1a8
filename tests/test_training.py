import copy
from pathlib import Path

import pytest
import torch

from aebench.config import load_params
from aebench.metrics import source_loss
from aebench.models import build_model, to_model_scale
from aebench.training import TrainingError, make_optimizer, pick_device, train

ROOT = Path(__file__).resolve().parents[1]

MODELS = load_params(ROOT / "params.yaml")["models"]
CPU = torch.device("cpu")


def digits(n, seed=0):
    """Blobby fake digits: a random low-rank pattern, so there is something to learn."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.rand(4, 784, generator=g)
    mix = torch.rand(n, 4, generator=g)
    return (mix @ basis / 4 * 255).clamp(0, 255).to(torch.uint8)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_few_steps_lower_the_loss(name):
    cfg = MODELS[name]
    torch.manual_seed(0)
    model = build_model(cfg)
    x = to_model_scale(digits(32), cfg["pixels"])
    opt = make_optimizer(model.parameters(), cfg, fast=True)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return source_loss(model(x), x, cfg["loss"]).item()

    before = eval_loss()
    model.train()
    for _ in range(30):
        opt.zero_grad()
        source_loss(model(x), x, cfg["loss"]).backward()
        opt.step()
    assert eval_loss() < before


def small(name, **changes):
    return dict(copy.deepcopy(MODELS[name]), **changes)


def run(cfg, path, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    history = train(model, cfg, digits(200), digits(50, seed=1), device=CPU, seed=seed,
                    path=path, progress=False)
    return model, history


@pytest.mark.parametrize("path", ["fast", "eager"])
def test_same_seed_gives_identical_weights_on_cpu(path):
    cfg = small("over500", epochs=2, batch_size=64)  # noisy inputs: the noise must be seeded too
    a, ha = run(cfg, path)
    b, hb = run(cfg, path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert ha.epochs == hb.epochs


@pytest.mark.parametrize("name", ["deep32", "conv16", "sigmoid100"])
def test_fast_and_eager_paths_compute_the_same_training(name):
    cfg = small(name, epochs=2, batch_size=64)
    fast, hf = run(cfg, "fast")
    eager, he = run(cfg, "eager")
    for va, vb in zip(fast.state_dict().values(), eager.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-4)
    assert hf.final["test_mse"] == pytest.approx(he.final["test_mse"], rel=1e-3)


def test_history_has_one_record_per_epoch_with_both_scales():
    cfg = small("under30", epochs=3, batch_size=64)
    _, h = run(cfg, "fast")
    assert [r["epoch"] for r in h.epochs] == [1, 2, 3]
    assert set(h.final) == {"epoch", "train_loss", "train_loss_last_batch", "test_mse"}
    assert h.samples == 600 and h.samples_per_second > 0
    assert h.epochs[-1]["test_mse"] < h.epochs[0]["test_mse"]


def test_nan_loss_stops_with_model_and_epoch():
    cfg = small("under30", epochs=3)
    model = build_model(cfg)
    with torch.no_grad():
        model.encoder[0].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="model under30: training loss is nan at epoch 1"):
        train(model, cfg, digits(100), digits(10), device=CPU, seed=0, name="under30",
              progress=False)


def test_device_auto_falls_back_to_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == CPU


def test_nadam_has_keras_defaults():
    opt = make_optimizer(build_model(MODELS["deep32"]).parameters(), MODELS["deep32"], fast=True)
    group = opt.param_groups[0]
    assert (group["lr"], group["eps"], group["momentum_decay"]) == (1e-3, 1e-7, 4e-3)
