"""aebench.files: where temporaries live, what a killed writer leaves, output groups that change
all together or not at all, and write errors that name the output. Faults are real: a process
SIGKILLed mid-write, a signal delivered during the renames, a file-size limit (RLIMIT_FSIZE)."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aebench import cli, files

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    """A DVC repository's root (a `.dvc` folder, as `dvc init` makes it), the cwd."""
    (tmp_path / ".dvc").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def own_folder(repo: Path, pid: int | None = None) -> Path:
    return repo / ".dvc/tmp/aebench" / f"{socket.gethostname()}-{pid or os.getpid()}"


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def child(code: str, cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("AEBENCH_DEBUG", None)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_temporaries_sit_in_dvc_tmp_not_beside_the_output(repo):
    (repo / "data/models").mkdir(parents=True)
    with files.output_group(), files.atomic_dir("data/models/m") as tmp:
        (tmp / "r0.pt").write_text("weights")
        with files.atomic_path("plots/curves/m.csv") as curve:
            curve.write_text("epoch\n1\n")
        assert tmp.parent == own_folder(repo)  # beside no output: .dvc/ is DVC's and git's
        assert listing(repo / "data/models") == []  # nothing there for evaluate to hash
        assert not any((repo / "plots/curves").iterdir())
    assert listing(repo / "data/models") == ["m", "m/r0.pt"]
    assert (repo / "plots/curves/m.csv").read_text() == "epoch\n1\n"
    assert not own_folder(repo).exists()  # removed once empty


def test_outside_a_dvc_repository_temporaries_sit_beside(tmp_path):
    assert not any((p / ".dvc").is_dir() for p in (tmp_path, *tmp_path.parents))
    with files.atomic_path(tmp_path / "out.json") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.json.")
        tmp.write_text("{}")
    assert listing(tmp_path) == ["out.json"]


def test_a_killed_writer_leaves_nothing_in_the_output_folder_and_the_next_removes_it(repo,
                                                                                     capsys):
    writer = child("""
        import time
        from aebench import files
        with files.atomic_dir("data/models/m") as tmp:
            (tmp / "r0.pt").write_text("half")
            print("ready", flush=True)
            time.sleep(60)
        """, repo)
    assert writer.stdout.readline() == "ready\n"
    writer.kill()  # SIGKILL: no cleanup runs
    writer.wait()
    leftover = own_folder(repo, writer.pid)
    assert listing(leftover) and not (repo / "data/models/m").exists()
    assert listing(repo / "data/models") == []
    live = subprocess.Popen(["sleep", "60"])  # a writer that is still at work is left alone
    try:
        (own_folder(repo, live.pid) / ".x.tmp").mkdir(parents=True)
        files.write_text(repo / "data/other.txt", "next run")
        assert not leftover.exists() and own_folder(repo, live.pid).exists()
        assert capsys.readouterr().err == f"removed what 1 killed run(s) left: {leftover}\n"
    finally:
        live.kill()
        live.wait()


def write_three(repo: Path, tag: str, fail: bool = False) -> None:
    with files.output_group():
        files.write_text(repo / "metrics/a.json", tag)
        with files.atomic_dir(repo / "plots/figures") as folder:
            (folder / "x.png").write_text(tag)
        if fail:
            raise RuntimeError("the third output failed")
        files.write_text(repo / "reports/b.json", tag)


def test_an_output_group_changes_every_output_or_none(repo):
    write_three(repo, "old")
    with pytest.raises(RuntimeError, match="the third output failed"):
        write_three(repo, "new", fail=True)
    outputs = ("metrics/a.json", "plots/figures/x.png", "reports/b.json")
    assert [(repo / p).read_text() for p in outputs] == ["old"] * 3
    assert not (repo / ".dvc/tmp/aebench").exists() or listing(repo / ".dvc/tmp/aebench") == []
    write_three(repo, "new")
    assert [(repo / p).read_text() for p in outputs] == ["new"] * 3
    assert listing(repo / "plots/figures") == ["x.png"]


def test_a_signal_during_the_renames_acts_once_all_outputs_are_in_place(repo, monkeypatch):
    write_three(repo, "old")
    real_replace = os.replace

    def replace_then_ctrl_c(src, dst):  # a real SIGINT, arriving after the first rename
        real_replace(src, dst)
        if dst == repo / "metrics/a.json":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace_then_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            write_three(repo, "new")
    finally:
        signal.signal(signal.SIGINT, previous)
    outputs = ("metrics/a.json", "plots/figures/x.png", "reports/b.json")
    assert [(repo / p).read_text() for p in outputs] == ["new"] * 3


def test_deferred_signals_act_when_the_block_ends():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda n, _: seen.append(("handled", n)))
    try:
        with cli.deferred_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("block went on")
        assert seen == ["block went on", ("handled", signal.SIGTERM)]
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # the handler is back
    finally:
        signal.signal(signal.SIGTERM, previous)


def limited(limit_bytes: int):
    """preexec_fn: a file-size limit (`ulimit -f`) for the child only."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def test_file_size_limit_names_the_output_and_what_to_do(repo):
    (repo / "out").mkdir()
    (repo / "out/big.txt").write_text("the last good output")
    writer = child("""
        from aebench import cli, files
        cli.run(lambda args: files.write_text("out/big.txt", "x" * 2_000_000), "prog")
        """, repo, preexec_fn=limited(1_000_000))
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 1
    assert err == ("error: out/big.txt: cannot write this output (File too large); a file-size "
                   "limit (`ulimit -f`) is below its size: raise the limit\n")
    assert (repo / "out/big.txt").read_text() == "the last good output"
    assert listing(repo / ".dvc/tmp/aebench") == []  # its temporary was removed
