"""The autoencoder kinds, their pixel scales, and checkpoints.

Every model takes and returns flat (N, 784) batches in its own pixel scale, so training,
evaluation and figures treat all kinds alike. A new model of an existing kind is an entry in
params.yaml; a new kind is one small class here plus its keys in config.py.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import ConfigError
from .files import atomic_path

LEAKY_SLOPE = 0.3  # Keras's LeakyReLU default (seed 003), not torch's 0.01


def make_activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "none": nn.Identity,
    }[name]()


class MLPAutoencoder(nn.Module):
    """Fully connected: `activation` (then dropout) after each hidden layer, own code and output."""

    def __init__(self, *, encoder, decoder, activation, code_activation, output_activation,
                 dropout=0.0):
        super().__init__()
        self.encoder = self._stack(encoder, activation, code_activation, dropout)
        self.decoder = self._stack(decoder, activation, output_activation, dropout)
        self.latent_dim = encoder[-1]

    @staticmethod
    def _stack(sizes, hidden, last, dropout):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(make_activation(hidden))
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            else:
                layers.append(make_activation(last))
        return nn.Sequential(*layers)

    def encode(self, x):
        return self.encoder(x)

    def forward(self, x):
        return self.decoder(self.encoder(x))


class ConvAutoencoder(nn.Module):
    """Convolutions, `activation`, max-pool; mirrored by transposed convolutions."""

    def __init__(self, *, channels, kernel, pool, activation, output_activation):
        super().__init__()
        enc: list[nn.Module] = [nn.Conv2d(a, b, kernel) for a, b in zip(channels, channels[1:])]
        enc += [make_activation(activation), nn.MaxPool2d(pool)]
        rev = channels[::-1]
        dec: list[nn.Module] = [nn.ConvTranspose2d(a, b, kernel) for a, b in zip(rev, rev[1:-1])]
        dec += [nn.ConvTranspose2d(rev[-2], rev[-1], pool, stride=pool),
                make_activation(output_activation)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        with torch.no_grad():
            code = self.encoder(torch.zeros(1, 1, 28, 28))
            out = self.decoder(code)
        if out.shape[-2:] != (28, 28):
            raise ConfigError(f"conv channels={channels} kernel={kernel} pool={pool} gives "
                              f"{tuple(out.shape[-2:])} outputs, not 28 x 28")
        self.code_shape = tuple(code.shape[1:])
        self.latent_dim = int(code.numel())

    def encode(self, x):
        return self.encoder(x.view(-1, 1, 28, 28)).flatten(1)

    def forward(self, x):
        return self.decoder(self.encoder(x.view(-1, 1, 28, 28))).flatten(1)


def _glorot(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


def build_model(cfg: dict) -> nn.Module:
    """The model one validated `models.<name>` entry describes (random initial weights)."""
    if cfg["kind"] == "mlp":
        model = MLPAutoencoder(
            encoder=cfg["encoder"], decoder=cfg["decoder"], activation=cfg["activation"],
            code_activation=cfg["code_activation"], output_activation=cfg["output_activation"],
            dropout=cfg["dropout"])
    else:
        model = ConvAutoencoder(
            channels=cfg["channels"], kernel=cfg["kernel"], pool=cfg["pool"],
            activation=cfg["activation"], output_activation=cfg["output_activation"])
    if cfg["init"] == "glorot":
        _glorot(model)
    return model


# Pixel scales. Data arrives as uint8 0..255; a model sees "0,1" or "-1,1" pixels; every metric
# is computed on [0,1] after mapping a "-1,1" output by (y + 1) / 2, without clamping.
def to_model_scale(x_uint8: torch.Tensor, pixels: str) -> torch.Tensor:
    x = x_uint8.float() / 255.0
    return x * 2 - 1 if pixels == "-1,1" else x


def to_unit_scale(y: torch.Tensor, pixels: str) -> torch.Tensor:
    return (y + 1) / 2 if pixels == "-1,1" else y


# Checkpoints: state_dict plus the config that built it, loadable with weights_only=True.
def save_checkpoint(path: str | Path, model: nn.Module, name: str, cfg: dict) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({"name": name, "config": cfg, "state_dict": state}, tmp)


def load_checkpoint(path: str | Path, name: str, expected_cfg: dict | None = None) -> nn.Module:
    """Rebuild a model from its checkpoint; fail naming the file if it is not what params say."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no weights for model {name!r} (has train@{name} run?)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        cfg, state = ckpt["config"], ckpt["state_dict"]
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"{path}: not a valid aebench checkpoint ({err})") from None
    if expected_cfg is not None and cfg != expected_cfg:
        diff = sorted(k for k in set(cfg) | set(expected_cfg) if cfg.get(k) != expected_cfg.get(k))
        raise ValueError(f"{path}: checkpoint config does not match params.yaml models.{name} "
                         f"(differs in: {', '.join(diff)}); rerun `dvc repro train@{name}`")
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not fit models.{name} ({err})") from None
    return model.eval()


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
