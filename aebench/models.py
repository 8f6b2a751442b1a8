"""What every kind of model shares once built: pixel scales, input noise, checkpoints.

Every model takes and returns flat (N, 784) batches in its own pixel scale, so training,
evaluation and figures treat all kinds alike. The kinds themselves live in `aebench.kinds`.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import torch
from torch import nn

from .constants import replica_file
from .files import atomic_path
from .kinds import ModelConfig, validate_model


# Pixel scales. Data arrives as uint8 0..255; a model sees "0,1" or "-1,1" pixels; every metric
# is computed on [0,1] after mapping a "-1,1" output by (y + 1) / 2, without clamping.
def to_model_scale(x_uint8: torch.Tensor, pixels: str) -> torch.Tensor:
    # One new float tensor, then scaled in place (the same arithmetic as x / 255 * 2 - 1): the
    # training set peaks at one float copy (188 MB), not three, in every worker process.
    x = x_uint8.to(torch.float32, copy=True).div_(255.0)
    return x.mul_(2).sub_(1) if pixels == "-1,1" else x


def to_unit_scale(y: torch.Tensor, pixels: str) -> torch.Tensor:
    return (y + 1) / 2 if pixels == "-1,1" else y


def from_unit_scale(y01: torch.Tensor, pixels: str) -> torch.Tensor:
    return y01 * 2 - 1 if pixels == "-1,1" else y01


def mask_noise(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The seed 002 corruption: Dropout(p) applied to the input, i.e. each pixel is zeroed with
    probability p and the kept ones are scaled by 1 / (1 - p). On "-1,1" pixels a zero is grey."""
    if p <= 0:
        return x
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1 - p)


@torch.no_grad()
def reconstruct(model: nn.Module, x_uint8: torch.Tensor, pixels: str, *, noise: float = 0.0,
                noise_seed: int | None = None, batch_size: int = 2000) -> torch.Tensor:
    """Outputs on [0,1] pixels (unclamped) for uint8 (N, 784) inputs, in eval mode, on the CPU.

    With `noise` > 0 the inputs are first corrupted by mask_noise, seeded by `noise_seed` so every
    evaluation and figure sees the same noisy digits."""
    model.eval()
    gen = torch.Generator().manual_seed(noise_seed) if noise_seed is not None else None
    outs = []
    for chunk in torch.as_tensor(x_uint8).split(batch_size):
        x = mask_noise(to_model_scale(chunk, pixels), noise, gen)
        outs.append(to_unit_scale(model(x), pixels))
    return torch.cat(outs)


_RESTORE = "put the folder back with `dvc checkout {0}` or retrain with `dvc repro train@{1}`"


# Checkpoints: state_dict plus what built it, loadable with weights_only=True. Nothing volatile
# (no run id, time or path), so retraining the same way gives the same bytes and DVC hash.
def save_checkpoint(path: str | Path, model: nn.Module, *, name: str, cfg: ModelConfig,
                    replica: int, seed: int, device: str) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # Into memory first: torch.save names the zip's folder after the file, and a temporary
    # file's random name would make the bytes (and DVC's hash) differ on every run.
    buffer = io.BytesIO()
    torch.save({"name": name, "replica": replica, "seed": seed, "device": device,
                "config": cfg.model_dump(), "state_dict": state}, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def _read_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """(config, state_dict, the other fields); ValueError saying what is wrong with the file."""
    # torch.save writes a zip with a CRC-32 per member, which torch.load does not check: a
    # damaged tensor would load as wrong weights.
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except zipfile.BadZipFile as err:
        raise ValueError(f"not a zip archive: {err}") from err
    if damaged:
        raise ValueError(f"member {damaged} fails its CRC-32 check")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        # torch's text is long, and its advice (weights_only=False) is not for a damaged file
        raise ValueError(f"torch.load: {type(err).__name__}") from err
    if not isinstance(ckpt, dict) or not {"config", "state_dict"} <= set(ckpt):
        raise ValueError("no config and state_dict in it")
    return ckpt.pop("config"), ckpt.pop("state_dict"), ckpt


def load_checkpoint(path: str | Path, name: str, expected: ModelConfig | None = None
                    ) -> tuple[nn.Module, dict]:
    """(model in eval mode, the checkpoint's other fields); fail naming the file if it is not
    what params.yaml says."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights for model {name!r} (run "
                                f"`dvc repro train@{name}`)")
    try:
        cfg, state, ckpt = _read_checkpoint(path)
    except ValueError as err:
        raise ValueError(f"{path}: not a readable aebench checkpoint ({err}); "
                         f"{_RESTORE.format(path.parent, name)}") from err.__cause__
    if expected is not None and cfg != expected.model_dump():
        want = expected.model_dump()
        diff = sorted(k for k in set(cfg) | set(want) if cfg.get(k) != want.get(k))
        raise ValueError(f"{path}: checkpoint config does not match params.yaml models.{name} "
                         f"(differs in: {', '.join(diff)}); rerun `dvc repro train@{name}`")
    model = validate_model(name, cfg, source=path).build()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit models.{name} ({err})") from None
    return model.eval(), ckpt


def load_replicas(models_dir: str | Path, name: str, cfg: ModelConfig, replicas: int
                  ) -> list[tuple[nn.Module, dict]]:
    """Every replica of one model, checked against params.yaml before any is used."""
    folder = Path(models_dir) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: missing; model {name!r} has not been trained "
                                f"(run `dvc repro train@{name}`)")
    loaded = [load_checkpoint(folder / replica_file(r), name, cfg) for r in range(replicas)]
    base = loaded[0][1].get("seed", 0) - loaded[0][1].get("replica", 0)
    for r, (_, ckpt) in enumerate(loaded):  # a renamed or copied file is not that replica
        held = (ckpt.get("name"), ckpt.get("replica"), ckpt.get("seed"))
        if held != (name, r, base + r):
            raise ValueError(f"{folder / replica_file(r)}: holds model {held[0]!r} replica "
                             f"{held[1]} (seed {held[2]}), not {name!r} replica {r} (seed "
                             f"{base + r}): files were renamed or mixed; "
                             f"{_RESTORE.format(folder, name)}")
    return loaded
