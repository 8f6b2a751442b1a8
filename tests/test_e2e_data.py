"""End to end: `dvc repro convert` in a fresh copy of the repository, from the real local mirror."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aebench.data import read_mnist_csv

REPO = Path(__file__).resolve().parents[1]
BESIDE = REPO.parent / "shared" / "data" / "mnist"  # where this workplace keeps a mirror


def mirror() -> Path:
    """The local MNIST mirror: $MNIST_MIRROR (as the download stage and the README read it,
    a folder or file:// URL), else the folder beside the checkout."""
    env = os.environ.get("MNIST_MIRROR", "").strip()
    return Path(env.removeprefix("file://")) if env else BESIDE


def test_the_mirror_is_mnist_mirror_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path))
    assert mirror() == tmp_path
    monkeypatch.setenv("MNIST_MIRROR", f"file://{tmp_path}")
    assert mirror() == tmp_path
    monkeypatch.delenv("MNIST_MIRROR")
    assert mirror() == BESIDE


def _label_counts(readme: Path, split: str) -> list[int]:
    # "Label counts, as a second check: train 5923 6742 ...; test 980 1135 ... (digits 0 to 9)."
    match = re.search(rf"\b{split}((?:\s+\d+){{10}})", readme.read_text())
    assert match, f"no {split} label counts in {readme}"
    return [int(n) for n in match.group(1).split()]


def _copy_repo(dest: Path) -> None:
    # What a fresh clone would hold, plus work not yet committed (untracked, not ignored).
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        if (REPO / name).is_file():  # a tracked file may be deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)


def _dvc(cwd: Path, *args: str) -> str:
    bindir = Path(sys.executable).parent
    # Each stage in its own process (AEBENCH_WARM=0): download and convert need neither torch
    # nor MLflow, which a warm server would import (7 s of CPU) and keep for 10 minutes; warm
    # and cold stages give the same bytes (test_e2e_pipeline.py)
    env = {**os.environ, "MNIST_MIRROR": str(mirror()), "AEBENCH_WARM": "0",
           "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` = this venv
    proc = subprocess.run([str(bindir / "dvc"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{output}"
    return output


@pytest.mark.e2e
def test_dvc_repro_convert_from_local_mirror(tmp_path):
    if not (mirror() / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no local MNIST mirror at {mirror()} (set MNIST_MIRROR)")
    if not (Path(sys.executable).parent / "dvc").is_file():
        pytest.skip("dvc is not installed next to this Python")
    repo = tmp_path / "repo"
    _copy_repo(repo)

    output = _dvc(repo, "repro", "convert")
    assert "Running stage 'download'" in output and "Running stage 'convert'" in output

    readme = mirror() / "README.md"  # this workplace's mirror states its label counts
    for split, n in (("train", 60000), ("test", 10000)):
        path = repo / "data" / "csv" / f"mnist_{split}.csv"
        with open(path) as f:
            assert len(f.readline().split(",")) == 785
        labels, pixels = read_mnist_csv(path)
        assert labels.shape == (n,) and pixels.shape == (n, 784)
        if readme.is_file():  # (the files' md5 sums, checked by the download, come first)
            assert np.bincount(labels, minlength=10).tolist() == _label_counts(readme, split)
    assert sorted(os.listdir(repo / "data" / "raw")) == sorted(
        ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
         "t10k-labels-idx1-ubyte"])

    again = _dvc(repo, "repro", "convert")
    assert "Running stage" not in again, again
    assert re.search(r"didn't change|is cached|up to date", again), again
