"""kind: mlp — fully connected encoder and decoder (seeds 000, 001, 002, 003, 004)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from ..constants import N_PIXELS
from .base import Activation, ModelConfig, OptionalActivation, make_activation


class MLPAutoencoder(nn.Module):
    """Linear layers; `activation` (then dropout) after each hidden one, own code and output."""

    def __init__(self, *, encoder: list[int], decoder: list[int], activation: str,
                 code_activation: str, output_activation: str, dropout: float = 0.0):
        super().__init__()
        self.encoder = _stack(encoder, activation, code_activation, dropout)
        self.decoder = _stack(decoder, activation, output_activation, dropout)
        self.latent_dim = encoder[-1]

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        return self.decoder(self.encoder(x))


def _stack(sizes, hidden, last, dropout) -> nn.Sequential:
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


class MLPConfig(ModelConfig):
    kind: Literal["mlp"]
    encoder: list[int] = Field(min_length=2)
    decoder: list[int] = Field(min_length=2)
    activation: Activation
    code_activation: OptionalActivation
    output_activation: OptionalActivation
    dropout: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _sizes_connect(self):
        if min(self.encoder + self.decoder) < 1:
            raise ValueError(f"encoder {self.encoder} / decoder {self.decoder}: sizes must be "
                             "positive")
        if self.encoder[0] != N_PIXELS:
            raise ValueError(f"encoder {self.encoder} must start at {N_PIXELS} (28 x 28 pixels)")
        if self.decoder[-1] != N_PIXELS:
            raise ValueError(f"decoder {self.decoder} must end at {N_PIXELS} (28 x 28 pixels)")
        if self.decoder[0] != self.encoder[-1]:
            raise ValueError(f"decoder {self.decoder} must start at the code size "
                             f"{self.encoder[-1]} (the encoder's last size)")
        return self

    def build(self) -> MLPAutoencoder:
        return MLPAutoencoder(encoder=self.encoder, decoder=self.decoder,
                              activation=self.activation, code_activation=self.code_activation,
                              output_activation=self.output_activation, dropout=self.dropout)
