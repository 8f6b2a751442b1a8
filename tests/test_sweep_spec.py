"""The sweep's SPEC: configurations, names, and every refusal before anything is submitted."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from aebench.sweep import spec as specs

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_and_configs_give_every_combination_once(tmp_path):
    path = write(tmp_path, """
name: deep3-lr
grid:
  models.deep3.optimizer.lr: [1.0e-3, 3.0e-4]
  models.deep3.epochs: [10, 20]
configs:
  - {models.deep3.epochs: 10, models.deep3.optimizer.lr: 1.0e-3}   # the grid has it already
  - {models.deep3.batch_size: 64}
""")
    configs = specs.configurations(specs.load(path), path)
    assert len(configs) == 5
    names = [c.name for c in configs]
    assert len(set(names)) == 5 and all(n.startswith("deep3-lr-") and len(n) == 17
                                        for n in names)
    first = configs[0]
    assert list(first.overrides) == sorted(first.overrides)
    # the name depends on the overrides only, not on their order in the SPEC
    assert specs.experiment_name("deep3-lr", {"models.deep3.optimizer.lr": 0.001,
                                              "models.deep3.epochs": 10}) == first.name
    assert first.set_args() == ["-S", "models.deep3.epochs=10",
                                "-S", "models.deep3.optimizer.lr=0.001"]
    params = specs.check(configs, ROOT / "params.yaml", path)
    assert params[first.name]["models"]["deep3"]["optimizer"]["lr"] == 0.001
    assert params[first.name]["models"]["shallow128"] == \
        yaml.safe_load((ROOT / "params.yaml").read_text())["models"]["shallow128"]


@pytest.mark.parametrize("value", [3.0e-4, 1.0e-5, 10, "relu", [784, 64, 3], True])
def test_a_value_survives_dvc_set_param(value):
    assert yaml.safe_load(specs.as_yaml(value)) == value


@pytest.mark.parametrize(("text", "words"), [
    ("name: x\ngrid: {models.deep3.optimizer.momentum: [0.9]}\n",
     ["sweep.yaml", "models.deep3.optimizer.momentum", "not a key of", "params.yaml"]),
    ("name: x\ngrid: {models.nosuch.epochs: [1]}\n", ["models.nosuch", "not a key of"]),
    ("name: x\ngrid: {models.deep3.epochs: [0]}\n",
     ["sweep.yaml", "models.deep3.epochs=0", "params.yaml", "models.deep3.epochs", "0"]),
    ("name: x\ngrid: {models.deep3.optimizer.lr: [1e-3]}\n",
     ["models.deep3.optimizer.lr", "'1e-3'", "YAML reads 1e-3 as a string"]),
    ("name: x\ngrid: {train.device: [tpu]}\n", ["train.device", "'tpu'"]),
    ("name: x y\ngrid: {train.seed: [1]}\n", ["sweep.yaml", "name", "'x y'"]),
    ("name: x\n", ["nothing to sweep"]),
    ("name: x\ngrid: {train.seed: []}\n", ["grid.train.seed", "[]"]),
    ("name: x\ngrid: {train.seed: [1]}\nseeds: 3\n", ["seeds", "unknown key"]),
    ("name: x\nconfigs: [{}]\n", ["configs", "{}"]),
    ("- a list\n", ["sweep.yaml"]),
])
def test_refusals_are_one_line_naming_the_file_and_value(tmp_path, text, words):
    path = write(tmp_path, text)
    with pytest.raises(specs.SpecError) as err:
        specs.check(specs.configurations(specs.load(path), path), ROOT / "params.yaml", path)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)


def test_missing_spec_file(tmp_path):
    with pytest.raises(specs.SpecError, match="nope.yaml: file not found"):
        specs.load(tmp_path / "nope.yaml")


def test_driver_refuses_before_submitting(tmp_path, monkeypatch, capsys):
    """A bad SPEC, a dirty HEAD, an unpushed HEAD: exit 2 with one line, Ray never started."""
    import subprocess

    from aebench.sweep import driver

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    remote = tmp_path / "remote.git"
    for args in (["init", "-q", "--bare", str(remote)],):
        subprocess.run(["git", *args], check=True)
    for args in (["init", "-q"], ["config", "user.name", "t"], ["config", "user.email", "t@t"],
                 ["add", "-A"], ["commit", "-qm", "base"], ["remote", "add", "origin",
                                                            str(remote)]):
        subprocess.run(["git", *args], cwd=repo, check=True)
    monkeypatch.chdir(repo)
    monkeypatch.setattr(driver, "connect", lambda address: pytest.fail("Ray was started"))
    good = write(tmp_path, "name: s\ngrid: {train.seed: [1, 2]}\n")

    def refusal(path) -> str:
        assert driver.main([str(path)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert "is not on the git remote origin" in refusal(good)
    subprocess.run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], cwd=repo, check=True)
    (repo / "params.yaml").write_text((repo / "params.yaml").read_text() + "\n# edit\n")
    assert "uncommitted changes (params.yaml)" in refusal(good)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\ngrid: {train.sed: [1]}\n")
    assert "bad.yaml: train.sed: not a key of" in refusal(bad)


def test_a_store_the_other_nodes_cannot_reach_is_refused():
    from aebench.sweep.driver import Cluster, unreachable

    one, two_on_one_host, two_hosts = Cluster(1, 1, 2, False), Cluster(3, 1, 1, False), \
        Cluster(3, 2, 1, False)
    for uri in ("sqlite:////tmp/mlflow.db", "/tmp/mlruns", "file:///tmp/mlruns"):
        assert unreachable(uri, one) is None
        assert "a file on this machine" in unreachable(uri, two_on_one_host)
    for uri in ("http://127.0.0.1:5000", "http://localhost:5000"):
        assert unreachable(uri, two_on_one_host) is None
        assert "loopback" in unreachable(uri, two_hosts)
    assert unreachable("http://10.0.0.5:5000", two_hosts) is None
