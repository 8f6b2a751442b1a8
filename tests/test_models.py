"""What every built model shares: shapes, output ranges, latent sizes, pixel scales, input noise,
checkpoints."""

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aebench import kinds
from aebench.config import ConfigError, load_params
from aebench.constants import replica_file
from aebench.models import (
    load_checkpoint,
    load_replicas,
    mask_noise,
    reconstruct,
    save_checkpoint,
    to_model_scale,
    to_unit_scale,
)

ROOT = Path(__file__).resolve().parents[1]

PARAMS = load_params(ROOT / "params.yaml")
CFGS = kinds.read_models(PARAMS)
RANGES = {"tanh": (-1, 1), "sigmoid": (0, 1), "relu": (0, float("inf"))}


@pytest.mark.parametrize("name", list(CFGS))
def test_forward_keeps_shape_and_source_output_range(name):
    cfg = CFGS[name]
    torch.manual_seed(0)
    model = cfg.make().eval()
    x = to_model_scale(torch.randint(0, 256, (5, 784), dtype=torch.uint8), cfg.pixels)
    y = model(x)
    assert y.shape == (5, 784)
    lo, hi = RANGES[cfg.output_activation]
    assert y.min() >= lo and y.max() <= hi
    assert model.encode(x).shape == (5, model.latent_dim)
    assert torch.equal(model.decode(model.encode(x)), y)


def test_latent_sizes_follow_the_sources():
    sizes = {name: cfg.build().latent_dim for name, cfg in CFGS.items()}
    assert sizes == {"deep3": 3, "shallow128": 128, "under30": 30, "over500": 500,
                     "conv16": 16 * 12 * 12, "deep32": 32, "sigmoid100": 100}


def test_deep32_has_keras_layers_and_make_applies_glorot():
    cfg = CFGS["deep32"]
    model = cfg.make()
    layers = [type(m).__name__ for m in model.encoder]
    assert layers[:3] == ["Linear", "LeakyReLU", "Dropout"]
    assert layers[-2:] == ["Linear", "LeakyReLU"]
    assert model.encoder[1].negative_slope == 0.3
    assert torch.all(model.encoder[0].bias == 0)  # Glorot init zeroes biases, as Keras does
    assert not torch.all(cfg.build().encoder[0].bias == 0)  # build() alone keeps torch's init


def test_same_seed_builds_the_same_weights():
    def weights(seed):
        torch.manual_seed(seed)
        return CFGS["deep32"].make().state_dict()

    a, b, c = weights(0), weights(0), weights(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["encoder.0.weight"], c["encoder.0.weight"])


@pytest.mark.parametrize("change, expect", [
    ({"channels": [1, 4, 8, 16]}, "channels [1, 4, 8, 16], kernel 3, pool 2 give 30 x 30"),
    ({"pool": 3}, "pool 3 give 30 x 30"),
    ({"channels": [3, 16]}, "channels [3, 16] must be positive and start at 1"),
    # a code with no pixels: said as such, with the key to change and the values that work
    ({"kernel": 30}, "kernel 30 leaves no code: 2 convolution(s) take 29 pixels each off the "
                     "image's 28-pixel side; set kernel to 1..14 (with pool 2)"),
    ({"pool": 100}, "pool 100 leaves no code: it is larger than the 24 x 24 maps the "
                    "convolutions leave (code side 0); set pool to 2 (with kernel 3)"),
    ({"pool": 24}, "kernel 3, pool 24 give 72 x 72 outputs from 28 x 28 images, not 28 x 28; "
                   "set pool to 2 (with kernel 3)"),
])
def test_conv_geometry_that_does_not_return_28x28_is_refused_naming_the_model(change, expect):
    entry = dict(copy.deepcopy(PARAMS["models"]["conv16"]), **change)
    with pytest.raises(ConfigError) as err:
        kinds.validate_model("conv16", entry)
    assert str(err.value).startswith("params.yaml: models.conv16: ")
    assert expect in str(err.value)


def test_the_values_a_geometry_error_suggests_are_exactly_those_that_work():
    entry = copy.deepcopy(PARAMS["models"]["conv16"])
    works = [k for k in range(1, 31) if _valid(dict(entry, kernel=k))]
    assert works == list(range(1, 15))  # "set kernel to 1..14 (with pool 2)"


def _valid(entry) -> bool:
    try:
        kinds.validate_model("conv16", entry)
    except ConfigError:
        return False
    return True


def test_pixel_scales_round_trip():
    x = torch.tensor([[0, 255, 51]], dtype=torch.uint8)
    assert torch.allclose(to_model_scale(x, "-1,1"), torch.tensor([[-1.0, 1.0, -0.6]]))
    assert torch.allclose(to_model_scale(x, "0,1"), x / 255)
    assert torch.allclose(to_unit_scale(to_model_scale(x, "-1,1"), "-1,1"), x / 255)
    assert to_unit_scale(torch.tensor([1.2]), "-1,1").item() == pytest.approx(1.1)  # no clamping


@pytest.mark.parametrize("pixels", ["0,1", "-1,1"])
def test_model_scale_is_the_plain_formula_bit_for_bit_and_leaves_its_input(pixels):
    x = torch.arange(256, dtype=torch.uint8).repeat(40)  # every value, in vectorised chunks
    plain = x.float() / 255.0
    plain = plain * 2 - 1 if pixels == "-1,1" else plain
    assert torch.equal(to_model_scale(x, pixels), plain)  # the committed weights depend on it
    floats = plain.clone()
    to_model_scale(floats, "-1,1")  # scaled in place, but a copy: the caller's is untouched
    assert torch.equal(floats, plain)


def test_mask_noise_drops_about_p_and_rescales_the_rest():
    x = torch.ones(100_000)
    y = mask_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) == {0.0, 2.0}
    assert (y == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)
    assert mask_noise(x, 0.0) is x


def test_reconstruct_is_seeded_and_on_unit_scale():
    torch.manual_seed(0)
    model = CFGS["over500"].make()
    x = torch.randint(0, 256, (7, 784), dtype=torch.uint8)
    a = reconstruct(model, x, "-1,1", noise=0.5, noise_seed=3)
    b = reconstruct(model, x, "-1,1", noise=0.5, noise_seed=3)
    c = reconstruct(model, x, "-1,1", noise=0.5, noise_seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (7, 784) and a.min() >= 0 and a.max() <= 1


def test_checkpoint_round_trip_and_errors(tmp_path):
    cfg = CFGS["under30"]
    torch.manual_seed(0)
    model = cfg.make()
    path = tmp_path / "m" / "weights.pt"
    save_checkpoint(path, model, name="under30", cfg=cfg, replica=1, seed=7, device="cpu")
    raw = torch.load(path, weights_only=True)
    assert raw["config"] == cfg.model_dump() and raw["name"] == "under30"
    loaded, info = load_checkpoint(path, "under30", cfg)
    assert info == {"name": "under30", "replica": 1, "seed": 7, "device": "cpu"}
    assert not loaded.training
    state = loaded.state_dict()
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # Nothing volatile in the file: the same model saved again gives the same bytes (DVC hash).
    again = tmp_path / "again" / "other-name.pt"
    save_checkpoint(again, model, name="under30", cfg=cfg, replica=1, seed=7, device="cpu")
    assert again.read_bytes() == path.read_bytes()
    other = cfg.model_copy(update={"epochs": 3})
    with pytest.raises(ValueError, match=r"weights\.pt: checkpoint config does not match params"
                                         r"\.yaml models\.under30 \(differs in: epochs\)"):
        load_checkpoint(path, "under30", other)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"weights\.pt: not a readable aebench checkpoint"):
        load_checkpoint(path, "under30", cfg)
    with pytest.raises(FileNotFoundError, match=r"'nope'.*dvc repro train@nope"):
        load_checkpoint(tmp_path / "nope" / "weights.pt", "nope")
    assert [p.name for p in path.parent.iterdir()] == ["weights.pt"]  # no temporary files left


def test_load_replicas_reads_every_replica_and_names_a_model_never_trained(tmp_path):
    cfg = CFGS["under30"]
    for r in range(2):
        torch.manual_seed(r)
        save_checkpoint(tmp_path / "under30" / replica_file(r), cfg.make(), name="under30",
                        cfg=cfg, replica=r, seed=r, device="cpu")
    loaded = load_replicas(tmp_path, "under30", cfg, 2)
    assert [info["replica"] for _, info in loaded] == [0, 1]
    with pytest.raises(FileNotFoundError, match=r"r2\.pt: no weights for model 'under30'"):
        load_replicas(tmp_path, "under30", cfg, 3)
    with pytest.raises(FileNotFoundError, match=r"deep3: missing; model 'deep3' has not been"):
        load_replicas(tmp_path, "deep3", CFGS["deep3"], 1)



# A fresh process builds conv16 and runs one batch; oneDNN (ONEDNN_VERBOSE=1) names the ISA it
# dispatches to. An optional argument is set as ONEDNN_MAX_CPU_ISA after the imports.
ONEDNN_RUN = """
import os, sys, torch
from aebench import kinds
from aebench.config import load_params
if len(sys.argv) > 2:
    os.environ["ONEDNN_MAX_CPU_ISA"] = sys.argv[2]
print("cap", os.environ.get("ONEDNN_MAX_CPU_ISA"), flush=True)
with torch.no_grad():
    kinds.read_model(load_params(sys.argv[1]), "conv16").make()(torch.zeros(8, 784))
"""


def onednn_isa(*args: str, **env: str) -> tuple[str, str | None]:
    """(the cap left in the process's environment, the ISA oneDNN says it uses, None if it
    printed none: torch without oneDNN)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ONEDNN_", "DNNL_"))}
    proc = subprocess.run([sys.executable, "-c", ONEDNN_RUN, str(ROOT / "params.yaml"), *args],
                          env={**base, "ONEDNN_VERBOSE": "1", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=True)
    lines = proc.stdout.splitlines()
    cap = next(line.split()[1] for line in lines if line.startswith("cap "))
    isa = [line.rsplit(",isa:", 1)[1] for line in lines if ",isa:" in line]
    return cap, isa[0] if isa else None


AT_MOST_AVX2 = {"Intel SSE4.1", "Intel AVX", "Intel AVX2"}


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="ONEDNN_MAX_CPU_ISA's values are x86-64's")
def test_convolutions_use_at_most_avx2_unless_the_user_says_otherwise():
    """The same bytes on AVX2 and AVX-512 nodes (conv16 differed in the 8th digit): aebench caps
    oneDNN at AVX2 by default; a user's ONEDNN_MAX_CPU_ISA wins (SSE41 here; ALL for native
    kernels: any value the user sets is left alone). oneDNN reads the variable at its first
    primitive, after aebench's imports: a value set then rules."""
    cap, isa = onednn_isa()
    if isa is None:
        pytest.skip("this torch's oneDNN prints no verbose lines (built without it?)")
    assert cap == "AVX2" and isa in AT_MOST_AVX2
    assert onednn_isa(ONEDNN_MAX_CPU_ISA="SSE41") == ("SSE41", "Intel SSE4.1")
    assert onednn_isa("SSE41") == ("SSE41", "Intel SSE4.1")  # set after import: in time
