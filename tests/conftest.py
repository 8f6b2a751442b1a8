"""Shared test helpers: small MNIST-format IDX files, written by the tests themselves, and one
tiny trained and evaluated project for the stage tests (see "a trained project" below).

    from conftest import write_idx, write_idx_set   # plain functions, usable from any test
    def test_x(mnist_raw, mnist_csv): ...            # fixtures: a raw IDX folder / a CSV folder
    def test_y(project, project_copy): ...           # the session's project / a copy to change
"""

from __future__ import annotations

import os
import signal

# One thread for torch and numpy, in this process and the stages it starts, before either is
# imported: the models are tiny, and two threads on a shared 2-core machine stall each other
# (a 784 x 784 eigendecomposition: 0.08 s on one thread, up to 10 s on two). Training itself
# uses one thread on the CPU whatever this says.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The warm servers the tests start (one per scratch project) exit 10 s after their last stage,
# not after the default 10 min: dozens of them, ~0.9 GB each, would fill a CI machine.
os.environ.setdefault("AEBENCH_WARM_IDLE", "10")
# No usage report from the DVC the tests start: the repositories they `dvc init` lack this
# project's `core.analytics = false`, and each DVC command there left a file in the temporary
# folder and started a process to send it (no network here: the file stayed).
os.environ["DVC_NO_ANALYTICS"] = "1"

import gzip
import hashlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

# A runner started in the background (`make test &` in a script, nohup) hands pytest SIGINT
# ignored, and every process the tests start would inherit that (stages respect it, as they
# should under nohup): the Ctrl-C tests need SIGINT to act. A handler, unlike SIG_IGN, does
# not survive exec, so the stages start with the default.
signal.signal(signal.SIGINT, signal.default_int_handler)
STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@pytest.fixture(autouse=True)
def signal_dispositions() -> Iterator[None]:
    """Each test leaves SIGINT, SIGTERM and SIGHUP as it found them. A stage's `cli.run` called
    in this process installs its handler, which on a signal sets SIGTERM and SIGHUP ignored for
    its cleanup; a later test that sends this process SIGINT would then leave both ignored, and
    an ignored signal survives exec: every DVC, warm server and stage started afterwards by the
    same xdist worker ignored SIGTERM (a trainer outlived `dvc repro`'s SIGTERM)."""
    before = {signum: signal.getsignal(signum) for signum in STOPS}
    yield
    for signum, handler in before.items():
        signal.signal(signum, handler)


IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class ToyAutoencoder(nn.Module):
    """A linear code with BatchNorm (buffers: what a checkpoint must keep and CUDA-graph warm-up
    must restore), for the toy kinds the tests define; `output` is tanh or sigmoid."""

    def __init__(self, code: int, output: str = "tanh"):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(784, code), nn.BatchNorm1d(code))
        self.decoder = nn.Sequential(nn.Linear(code, 784),
                                     nn.Tanh() if output == "tanh" else nn.Sigmoid())
        self.latent_dim = code

    def encode(self, x):
        return self.encoder(x)

    def decode(self, z):
        return self.decoder(z)

    def forward(self, x):
        return self.decode(self.encode(x))


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array: magic 00 00 08 ndim, big-endian dims, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write `array` as IDX to `path`, gzip-compressed when the name ends in .gz."""
    path = Path(path)
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def make_split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [n] cycling 0..9, images uint8 [n, 28, 28] of random pixels 0..255)."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.uint8)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return labels, images


def write_idx_set(folder: str | Path, n_train: int = 30, n_test: int = 20, gz: bool = True,
                  seed: int = 0) -> dict[str, str]:
    """Write the four MNIST files (NAME.gz if gz) into folder.

    Returns {name: md5 of the decompressed content}, the table `aebench.download.download` takes as
    `files=` (the real MNIST md5 values cannot match generated data).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md5s = {}
    for i, (split, n) in enumerate((("train", n_train), ("test", n_test))):
        labels, images = make_split(n, seed + i)
        image_name, label_name = IDX_NAMES[split]
        for name, array in ((image_name, images), (label_name, labels)):
            write_idx(folder / (name + (".gz" if gz else "")), array)
            md5s[name] = hashlib.md5(idx_bytes(array)).hexdigest()
    return md5s


@pytest.fixture
def mnist_raw(tmp_path: Path) -> Path:
    """A folder with the four decompressed IDX files (30 train, 20 test images), as `download`
    leaves data/raw."""
    write_idx_set(tmp_path / "raw", gz=False)
    return tmp_path / "raw"


@pytest.fixture
def mnist_csv(mnist_raw: Path) -> Path:
    """A folder with mnist_train.csv (30 rows) and mnist_test.csv (20 rows), as `convert` writes."""
    from aebench.data import convert

    convert(mnist_raw, mnist_raw.parent / "csv")
    return mnist_raw.parent / "csv"


# --------------------------------------------------------------------------- a trained project
#
# Stage subprocesses (3-5 s of imports each) and MLflow sqlite stores (2-7 s each) are what make
# stage tests slow, so the stage tests share ONE project, built once per session by calling the
# stages' main() in-process: two tiny models (an mlp and a denoising conv) with two replicas
# each, trained, then evaluated, with one MLflow store (in memory: see store_folder). Tests that
# change files work on a copy (`project_copy`); the store stays shared.
#
#     from conftest import run_stage, dvc_args          # plain functions
#     def test_x(project): ...                           # the session's project (read only)
#     def test_y(project_copy): ...                      # a copy of it, the cwd; MLflow set
#     def test_z(mlflow_client): ...                     # a client of the session's store

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_TEST = 60, 40
TRAIN_LIMIT = 50  # below N_TRAIN: the train stage must honour train.limit
TINY_COMMON = {"init": "torch", "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
               "batch_size": 16, "epochs": 2}
TINY_MODELS = {
    # deep3: the name figures.image_7777 draws; [-1,1] pixels, so test_loss is its own metric
    "deep3": {"kind": "mlp", "encoder": [784, 16, 3], "decoder": [3, 16, 784],
              "activation": "relu", "code_activation": "none", "output_activation": "tanh",
              "dropout": 0.0, "pixels": "-1,1", "input_noise": 0.0, "loss": "mse",
              **TINY_COMMON},
    # a code of 8 x 12 x 12 = 1152 >= 784 (PCA exact), trained on masked inputs; mse on [0,1]
    # pixels is the common metric itself, so its headline has no test_loss
    "convnoisy": {"kind": "conv", "channels": [1, 2, 8], "kernel": 3, "pool": 2,
                  "activation": "relu", "output_activation": "sigmoid", "pixels": "0,1",
                  "input_noise": 0.5, "loss": "mse", **TINY_COMMON},
}
TINY_PARAMS = {
    "train": {"seed": 0, "replicas": 2, "device": "cpu", "path": "fast", "limit": TRAIN_LIMIT,
              "workers": 2},  # two worker processes whatever the cores: the path under test
    "evaluate": {"noise_seed": 1234},
    "models": TINY_MODELS,
}
STALE_MODEL = "old"  # a model removed from params.yaml whose weights folder is still there


def dvc_args(stage: str, key: str | None = None) -> list[str]:
    """The arguments dvc.yaml gives `stages.<stage>` (train, score: for model `key`), so tests
    run the stages on exactly the paths the pipeline uses."""
    import yaml

    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]
    cmd = spec["do"]["cmd"] if "do" in spec else spec["cmd"]
    if key is not None:
        cmd = cmd.replace("${key}", key)
    words = cmd.split()
    assert words[:4] == ["python", "-m", "aebench.warm", f"stages.{stage}"], cmd
    return words[4:]


def run_stage(stage: str, *argv: str | Path, key: str | None = None) -> None:
    """`python -m stages.<stage> ARGS` in-process (no interpreter start): main() with the
    arguments parsed by the stage's own USAGE; the dvc.yaml arguments when none are given."""
    import importlib

    from aebench import cli

    module = importlib.import_module(f"stages.{stage}")
    args = [str(a) for a in argv] or dvc_args(stage, key)
    module.main(cli.parse(module.USAGE, args))


def write_pca_curve(path: str | Path) -> None:
    """A made-up PCA curve (k = 0..784, falling to exactly 0): the pca stage needs more than 784
    training images to be quick, and nothing here tests PCA itself."""
    from aebench.files import write_csv_rows

    write_csv_rows(path, [{"components": k, "test_mse": 0.06 * (1 - k / 784) ** 3}
                          for k in range(785)])


@contextmanager
def store_folder() -> Iterator[Path]:
    """A temporary folder for an MLflow sqlite store, in memory (/dev/shm) where there is one:
    creating a store runs some 300 statements, each synced to disk (7 s on this machine's disk,
    1.7 s in memory), and every later run and metric is a synced write too."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="aebench-test-mlflow-", dir=where) as folder:
        yield Path(folder)


@pytest.fixture(scope="session")
def memory_path_factory() -> Iterator[Callable[[str], Path]]:
    """memory_path_factory(name): a new folder in memory (/dev/shm where there is one, as
    store_folder), removed at the end of the session, for the `dvc repro` flows: every MLflow
    write, and DVC's state, is a synced sqlite write, which a busy shared disk makes slow
    (with train.workers 1 besides, tests/test_e2e_pipeline.py took 113 s instead of 182 s,
    tests/test_review.py 80 s instead of 96 s, back to back on a shared 2-core machine)."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="aebench-test-", dir=where,
                                     ignore_cleanup_errors=True) as top:
        yield lambda name: Path(tempfile.mkdtemp(prefix=f"{name}-", dir=top))


@dataclass(frozen=True)
class Project:
    root: Path          # params.yaml, data/, plots/, metrics/, reports/ as the pipeline has them
    tracking_uri: str   # the one MLflow store of the session (outside root)

    def copy(self, dest: Path) -> Path:
        shutil.copytree(self.root, dest)
        return dest


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Iterator[Project]:
    """The project trained and evaluated, its MLflow store in memory (gone after the session)."""
    with store_folder() as store:
        yield build_project(tmp_path_factory.mktemp("project"), f"sqlite:///{store}/mlflow.db")


def build_project(root: Path, uri: str) -> Project:
    """Into `root`: train (2 models x 2 replicas, 2 epochs, 50 of 60 images), score and
    evaluate, by the stages' main() with the arguments of dvc.yaml; MLflow runs go to `uri`."""
    import yaml

    from aebench.data import write_mnist_csv

    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    (root / ".dvc").mkdir()  # a DVC repository's root, as `dvc init` marks it: temporaries go in
    for i, (split, n) in enumerate((("train", N_TRAIN), ("test", N_TEST))):
        labels, images = make_split(n, seed=i)
        write_mnist_csv(root / "data" / "csv" / f"mnist_{split}.csv", labels, images)
    write_pca_curve(root / "plots" / "pca_curve.csv")
    # As the warm server does before it forks a stage: the first optimizer of a process imports
    # torch's compiler (1 s of CPU), which the train stage's forked workers then each need not.
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        for name in TINY_MODELS:
            run_stage("train", key=name)
        # A model trained once and since removed from params.yaml: nothing may read it.
        shutil.copytree(root / "data/models/deep3", root / "data/models" / STALE_MODEL)
        shutil.copy(root / "plots/curves/deep3.csv", root / f"plots/curves/{STALE_MODEL}.csv")
        for name in TINY_MODELS:
            run_stage("score", key=name)
        shutil.copy(root / "data/scores/deep3.json", root / f"data/scores/{STALE_MODEL}.json")
        run_stage("evaluate")
    return Project(root, uri)


@pytest.fixture
def mlflow_client(project: Project, monkeypatch):
    """A client of the session's store, which is also MLflow's current store during the test
    (aebench.tracking's functions use that one)."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
    mlflow.set_tracking_uri(project.tracking_uri)  # the stages set it the same way (open_store)
    return mlflow.MlflowClient(project.tracking_uri)


@pytest.fixture
def project_copy(project: Project, tmp_path: Path, monkeypatch) -> Path:
    """A copy of the session's project to change at will: the cwd, with MLflow on the shared
    store."""
    root = project.copy(tmp_path / "project")
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", project.tracking_uri)
    return root


# The module whose one flow is the suite's longest fixture (test_e2e_pipeline.py, about 1.5
# minutes of one worker) starts first, while the other workers go through the rest; xdist's own
# order (most tests first) would start it last. The Makefile's `--no-loadscope-reorder` keeps
# this order.
FIRST = ("test_e2e_pipeline.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the rest as collected
