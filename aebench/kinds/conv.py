"""kind: conv — the convolutional autoencoder of seed 002."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..constants import SIDE
from .base import Activation, ModelConfig, OptionalActivation, make_activation


class ConvAutoencoder(nn.Module):
    """Convolutions, `activation`, max-pool; mirrored by transposed convolutions. Takes and
    returns flat (N, 784) batches like every kind; the code is flattened too."""

    def __init__(self, *, channels: list[int], kernel: int, pool: int, activation: str,
                 output_activation: str):
        super().__init__()
        enc: list[nn.Module] = [nn.Conv2d(a, b, kernel) for a, b in zip(channels, channels[1:])]
        enc += [make_activation(activation), nn.MaxPool2d(pool)]
        rev = channels[::-1]
        dec: list[nn.Module] = [nn.ConvTranspose2d(a, b, kernel) for a, b in zip(rev, rev[1:-1])]
        dec += [nn.ConvTranspose2d(rev[-2], rev[-1], pool, stride=pool),
                make_activation(output_activation)]
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)
        side = code_side(channels, kernel, pool)
        self.code_shape = (channels[-1], side, side)
        self.latent_dim = channels[-1] * side * side

    def encode(self, x):
        return self.encoder(x.view(-1, 1, SIDE, SIDE)).flatten(1)

    def decode(self, z):
        return self.decoder(z.view(-1, *self.code_shape)).flatten(1)

    def forward(self, x):
        return self.decode(self.encode(x))



def code_side(channels: list[int], kernel: int, pool: int) -> int:
    """Side of the code's feature maps: each unpadded convolution takes kernel - 1, then pool."""
    return (SIDE - (len(channels) - 1) * (kernel - 1)) // pool


def output_side(channels: list[int], kernel: int, pool: int) -> int:
    """Side of the decoder's output, or 0 when the code has no pixels left: the decoder adds
    back kernel - 1 per transposed convolution, then unpools by `pool`."""
    side = code_side(channels, kernel, pool)
    return (side + (len(channels) - 2) * (kernel - 1)) * pool if side >= 1 else 0


def _listed(values: list[int]) -> str:
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


class ConvConfig(ModelConfig):
    kind: Literal["conv"]
    channels: list[int] = Field(min_length=2)
    kernel: int = Field(ge=1)
    pool: int = Field(ge=1)
    activation: Activation
    output_activation: OptionalActivation

    @model_validator(mode="after")
    def _geometry_returns_28x28(self):
        channels, kernel, pool = self.channels, self.kernel, self.pool
        if channels[0] != 1 or min(channels) < 1:
            raise ValueError(f"channels {channels} must be positive and start at 1 (one "
                             "grey channel)")
        kernels = [k for k in range(1, SIDE + 1) if output_side(channels, k, pool) == SIDE]
        pools = [p for p in range(1, SIDE + 1) if output_side(channels, kernel, p) == SIDE]
        if (out := output_side(channels, kernel, pool)) == SIDE:
            return self
        convs, left = len(channels) - 1, SIDE - (len(channels) - 1) * (kernel - 1)
        if left < 1:
            why = (f"kernel {kernel} leaves no code: {convs} convolution(s) take {kernel - 1} "
                   f"pixels each off the image's {SIDE}-pixel side")
        elif left < pool:
            why = (f"pool {pool} leaves no code: it is larger than the {left} x {left} maps the "
                   "convolutions leave (code side 0)")
        else:
            why = (f"channels {channels}, kernel {kernel}, pool {pool} give {out} x {out} "
                   f"outputs from {SIDE} x {SIDE} images, not {SIDE} x {SIDE}")
        fixes = [f"kernel to {_listed(kernels)} (with pool {pool})" if kernels else "",
                 f"pool to {_listed(pools)} (with kernel {kernel})" if pools else ""]
        fix = " or ".join(f for f in fixes if f) or "fewer channels"
        raise ValueError(f"{why}; set {fix}")

    def build(self) -> ConvAutoencoder:
        return ConvAutoencoder(channels=self.channels, kernel=self.kernel, pool=self.pool,
                               activation=self.activation,
                               output_activation=self.output_activation)
