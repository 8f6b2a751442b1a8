"""Training: one loop, two paths.

`eager` is the plain loop every tutorial writes: gather a batch, step, read the loss back.
`fast` keeps the data on the device in the model's pixel scale, shuffles there, accumulates the
loss there (no host sync inside an epoch), uses the foreach optimizer, and on CUDA captures the
whole training step (noise, forward, backward, optimizer) as one CUDA graph that each batch
replays. The models are tiny, so time goes to Python and kernel launches, not arithmetic.
On the CPU both paths draw the same shuffles from the same seed and compute the same step; on
CUDA the fast path shuffles (and draws noise and dropout) with the device's generator.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .constants import N_PIXELS
from .kinds import ModelConfig
from .models import mask_noise, to_model_scale, to_unit_scale


class TrainingError(RuntimeError):
    """Training cannot go on (a NaN, infinite or exploding loss)."""


# An epoch's mean loss this many times the untrained model's (its first batch) is a run that
# diverged (lr 1e6 can keep the loss finite but huge); no source's curve comes near it.
EXPLODED = 1e3


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return kind == "cpu"


def pick_device(name: str = "auto") -> torch.device:
    """`auto`: CUDA, then MPS, then the CPU. A device asked for by name must exist; the error
    says so before any data is read."""
    if name == "auto":
        return torch.device(next(k for k in ("cuda", "mps", "cpu") if _available(k)))
    if not _available(name):
        raise ValueError(f"params.yaml: train.device: {name!r} is not available on this machine"
                         " (torch sees no such device); use auto or cpu")
    return torch.device(name)


def batch_warning(name: str, batch_size: int, n_train: int, limit: int) -> str | None:
    """The warning line for a batch larger than the training set (every epoch one smaller
    batch), naming both keys; None when the batch fits."""
    if batch_size <= n_train:
        return None
    source = f"train.limit {limit}" if limit else "the training CSV"
    return (f"warning: params.yaml: models.{name}.batch_size {batch_size} is larger than the "
            f"{n_train} training images ({source}): every epoch is one batch of {n_train}")


def make_optimizer(params, cfg: ModelConfig, *, fast: bool, capturable: bool = False):
    opt = cfg.optimizer
    kw = {"lr": opt.lr, "weight_decay": opt.weight_decay, "foreach": fast}
    if capturable:
        kw["capturable"] = True
    if opt.name == "adam":
        return torch.optim.Adam(params, **kw)
    # Keras's Nadam (seed 003): beta_1 0.9, beta_2 0.999, epsilon 1e-7, schedule decay 0.004.
    return torch.optim.NAdam(params, betas=(0.9, 0.999), eps=1e-7, momentum_decay=4e-3, **kw)


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    path: str = "eager"
    samples: int = 0  # training images seen, over all epochs

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def final(self) -> dict:
        return self.epochs[-1]


@torch.no_grad()
def test_mse(model: nn.Module, test_x: torch.Tensor, pixels: str, batch_size: int = 5000):
    """Mean squared error on [0,1] pixels of the clean test set, as a 0-d tensor (no sync)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=test_x.device, dtype=torch.float64)
    for x in test_x.split(batch_size):
        target = to_unit_scale(x, pixels)
        total += (to_unit_scale(model(x), pixels) - target).double().pow(2).sum()
    model.train(was_training)
    return total / test_x.numel()


def _step_fn(model, optimizer, cfg: ModelConfig):
    def step(x):
        optimizer.zero_grad(set_to_none=False)
        loss = cfg.training_loss(model, mask_noise(x, cfg.input_noise), x)
        loss.backward()
        optimizer.step()
        return loss

    return step


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """A function that puts the model's parameters AND buffers (a BatchNorm's running
    statistics) back to their values now, and the optimizer's state to its fresh values, in
    place: a CUDA graph holds their addresses. Fresh Adam/NAdam state is all zeros except
    NAdam's running momentum product, which starts at one."""
    saved = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]

    @torch.no_grad()
    def restore() -> None:
        for tensor, value in saved:
            tensor.copy_(value)
        for state in optimizer.state.values():
            for key, value in state.items():
                if torch.is_tensor(value):
                    value.fill_(1.0 if key == "mu_product" else 0.0)

    return restore


class _GraphedStep:
    """The training step for full batches, captured once as a CUDA graph and replayed.

    Capture needs warm-up steps on a side stream. They would change the weights, buffers and
    optimizer state, so afterwards `snapshot`'s restore puts them back."""

    def __init__(self, step, model, optimizer, batch_size, device):
        self.x = torch.zeros(batch_size, N_PIXELS, device=device)
        restore = snapshot(model, optimizer)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(self.x)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = step(self.x)
        restore()

    def __call__(self, x):
        self.x.copy_(x)
        self.graph.replay()
        return self.loss


def train(model: nn.Module, cfg: ModelConfig, train_x: torch.Tensor, test_x: torch.Tensor, *,
          device: torch.device, seed: int, path: str = "fast", name: str = "model",
          progress: bool = True, on_epoch: Callable[[dict], None] | None = None) -> History:
    """Train `model` as `cfg` (one validated models.<name> entry) says; return its history.

    `train_x` and `test_x` are uint8 (N, 784) tensors. Each epoch records the training loss in
    the source's own scale (mean over the epoch's batches, and the last batch as seed 002
    printed it) and the test MSE on [0,1] pixels; `on_epoch` gets each record as it is made
    (a worker process reports its progress with it)."""
    pixels, bs = cfg.pixels, cfg.batch_size
    fast = path == "fast"
    graphed = fast and device.type == "cuda"
    if device.type == "cpu":
        # Weights and Adam moments drift into subnormal floats after a few epochs; x86 CPUs
        # handle those in microcode, and deep3's epochs went from 1.2 s to 8-21 s. Flushing them
        # to zero changes nothing at float32 precision that matters. (It stays on for the rest
        # of the process.)
        torch.set_flush_denormal(True)
        # One thread: the same bits on any number of cores (a matmul split over threads sums in
        # another order), and no spinning threads fighting when stages run side by side
        # (`dvc queue start -j N`). These models are too small to gain from more.
        torch.set_num_threads(1)
    model.to(device).train()
    # The fast path converts once and keeps everything on the device; eager moves each batch.
    data = to_model_scale(train_x.to(device), pixels) if fast else to_model_scale(train_x, pixels)
    test = to_model_scale(test_x.to(device), pixels)
    optimizer = make_optimizer(model.parameters(), cfg, fast=fast, capturable=graphed)
    step = _step_fn(model, optimizer, cfg)
    n = data.shape[0]
    n_full = n // bs
    full_step = step
    if graphed and n_full > 0:
        try:
            full_step = _GraphedStep(step, model, optimizer, bs, device)
        except Exception as err:  # noqa: BLE001 - fall back rather than fail the run
            warnings.warn(f"{name}: CUDA graph capture failed ({err}); using the plain fast path",
                          stacklevel=2)
            graphed = False
    gen = torch.Generator(device=data.device if fast else "cpu").manual_seed(seed)
    history = History(path="fast+cudagraph" if graphed else path)
    bar = tqdm(range(1, cfg.epochs + 1), desc=f"train {name}", unit="epoch",
               disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    first = None
    for epoch in bar:
        perm = torch.randperm(n, device=gen.device, generator=gen)
        if fast:
            total = torch.zeros((), device=device)
            for i in range(0, n, bs):
                idx = perm[i:i + bs]
                loss = (full_step if len(idx) == bs else step)(data[idx])
                total += loss.detach()
                if first is None:  # the untrained model's loss (a graph reuses its output)
                    first = loss.detach().clone()
            mean_loss, last_loss = (total / math.ceil(n / bs)).item(), loss.item()
        else:
            losses = []
            for i in range(0, n, bs):
                loss = step(data[perm[i:i + bs]].to(device))
                losses.append(loss.item())
            mean_loss, last_loss = sum(losses) / len(losses), losses[-1]
            first = losses[0] if first is None else first
        if not (math.isfinite(mean_loss) and math.isfinite(last_loss)):
            raise TrainingError(f"model {name}: training loss is {mean_loss} at epoch {epoch}; "
                                "stopping (no weights written; a smaller optimizer.lr?)")
        first_loss = float(first)
        if mean_loss > EXPLODED * first_loss:
            raise TrainingError(f"model {name}: training loss {mean_loss:.4g} at epoch {epoch} is "
                                f"over {EXPLODED:g} x the untrained model's {first_loss:.4g}; "
                                "stopping, the run diverged (no weights written; a smaller "
                                "optimizer.lr?)")
        record = {"epoch": epoch, "train_loss": mean_loss, "train_loss_last_batch": last_loss,
                  "test_mse": test_mse(model, test, pixels).item()}
        history.epochs.append(record)
        if on_epoch is not None:
            on_epoch(record)
        bar.set_postfix(loss=f"{mean_loss:.4g}", test_mse=f"{record['test_mse']:.4g}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    history.seconds = time.perf_counter() - start
    history.samples = n * cfg.epochs
    return history


def train_replica(cfg: ModelConfig, train_x: torch.Tensor, test_x: torch.Tensor, *,
                  device: torch.device, seed: int, path: str = "fast", name: str = "model",
                  progress: bool = True, on_epoch: Callable[[dict], None] | None = None
                  ) -> tuple[nn.Module, History]:
    """A fresh model of `cfg` built and trained from `seed` (weights, shuffles, dropout and
    noise all follow from it); returned on the CPU in eval mode, with its history."""
    torch.manual_seed(seed)
    model = cfg.make()
    history = train(model, cfg, train_x, test_x, device=device, seed=seed, path=path, name=name,
                    progress=progress, on_epoch=on_epoch)
    return model.cpu().eval(), history


def curve_rows(histories: list[History]) -> list[dict]:
    """Per epoch, the mean and standard deviation (ddof 1; 0 for one replica) over replicas of
    the test MSE and the training loss: the rows of plots/curves/<name>.csv."""
    rows = []
    for records in zip(*(h.epochs for h in histories), strict=True):
        row: dict = {"epoch": records[0]["epoch"]}
        for key in ("test_mse", "train_loss"):
            values = np.array([r[key] for r in records], dtype=np.float64)
            row[key] = float(values.mean())
            row[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        rows.append(row)
    return rows
