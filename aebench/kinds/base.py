"""What every model kind shares: the common keys of a `models:` entry, and small layer helpers.

A kind subclasses `ModelConfig` with `kind: Literal["<name>"]`, its own keys, and `build()`;
`aebench.kinds.register` makes params.yaml accept it.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import MAX_EPOCHS, MAX_REPLICAS, Section
from ..losses import source_loss

# The same bytes on any x86-64 worker: oneDNN (torch's CPU convolutions) picks its kernels by the
# CPU's widest instructions, and AVX-512 kernels add in another order than AVX2 ones: conv16's
# epoch-1 test MSE was 0.00866236 on an AVX-512 machine against 0.00866235 on AVX2 (the MLPs
# matched without a cap); capped at AVX2 the AVX-512 machine gave the AVX2 bytes.
# oneDNN reads the variable at its first primitive, so setting it at import, before any model of
# the process is built, is in time (tests/test_models.py checks it). Every process that builds a
# model imports this module, MLflow's loading of a logged model included. Native kernels, for
# speed on AVX-512 and results that depend on the node: ONEDNN_MAX_CPU_ISA=ALL (the user's value
# wins); docs/reproducibility.md. The warm server hands this on to the stages it forks.
os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")

Activation = Literal["relu", "leaky_relu", "tanh", "sigmoid"]
OptionalActivation = Literal["none", "relu", "leaky_relu", "tanh", "sigmoid"]
LEAKY_SLOPE = 0.3  # Keras's LeakyReLU default (seed 003), not torch's 0.01


# torch turns lr and weight_decay into float32 scalars, scaled first (Adam's first step is
# lr / (1 - beta1) = 10 lr): far below float32's 3.4e38, or a step fails with an overflow.
MAX_RATE = 1e30


class Optimizer(Section):
    name: Literal["adam", "nadam"]
    lr: float = Field(gt=0, le=MAX_RATE)
    weight_decay: float = Field(ge=0, le=MAX_RATE)


class ModelConfig(Section):
    """The keys every kind has. `pixels` is the scale the model sees and outputs; `input_noise`
    the p of a dropout mask on the input (kept pixels scaled by 1/(1-p)), target clean."""

    kind: str
    pixels: Literal["0,1", "-1,1"]
    input_noise: float = Field(ge=0, lt=1)
    init: Literal["torch", "glorot"]
    optimizer: Optimizer
    loss: Literal["mse", "bce", "half_mse"]
    batch_size: int = Field(ge=1)
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    replicas: int | None = Field(default=None, ge=1, le=MAX_REPLICAS)  # None: train.replicas

    @model_validator(mode="after")
    def _bce_needs_probabilities(self):
        if self.loss == "bce" and (self.pixels != "0,1"
                                   or getattr(self, "output_activation", "sigmoid") != "sigmoid"):
            raise ValueError("loss 'bce' needs pixels '0,1' and output_activation sigmoid")
        return self

    def build(self) -> nn.Module:
        """The kind's nn.Module, with `encode`, `decode` and `latent_dim`."""
        raise NotImplementedError

    def make(self) -> nn.Module:
        """build() with this entry's initialisation (random weights from torch's global RNG)."""
        model = self.build()
        if self.init == "glorot":
            glorot(model)
        return model

    def training_loss(self, model: nn.Module, inputs: torch.Tensor,
                      targets: torch.Tensor) -> torch.Tensor:
        """What training minimises; a kind with more to its objective overrides this."""
        return source_loss(model(inputs), targets, self.loss)


def make_activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(LEAKY_SLOPE),
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "none": nn.Identity,
    }[name]()


def glorot(module: nn.Module) -> None:
    """Keras's Dense/Conv default: Glorot-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
