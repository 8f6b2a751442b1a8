"""aebench.parallel: a stage's pieces of work in forked workers; errors, interrupts, leftovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO

from aebench import parallel

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="workers are forked")


def test_every_piece_runs_once_in_the_workers_sharing_what_the_stage_holds(tmp_path):
    held = {"words": ["zero", "one", "two", "three", "four", "five"]}  # never pickled

    def piece(i: int) -> None:
        (tmp_path / f"{i}.txt").write_text(f"{held['words'][i]} {os.getpid()}")

    parallel.each(piece, range(6), workers=3)
    done = {p.stem: p.read_text().split() for p in tmp_path.iterdir()}
    assert {int(k): v[0] for k, v in done.items()} == dict(enumerate(held["words"]))
    assert str(os.getpid()) not in {v[1] for v in done.values()}  # all in workers


def test_the_results_come_back_in_piece_order():
    assert parallel.each(lambda i: {"square": i * i, "pid": os.getpid()}, range(9),
                         workers=2)[3]["square"] == 9
    assert [r["square"] for r in parallel.each(
        lambda i: {"square": i * i}, range(9), workers=4)] == [i * i for i in range(9)]


def test_a_worker_that_dies_outright_is_an_error_not_a_short_result():
    with pytest.raises(RuntimeError, match=r"of 2 pieces of work were lost: a worker process"):
        parallel.each(lambda i: os.kill(os.getpid(), signal.SIGKILL) if i else i, range(2),
                      workers=2)


def test_one_worker_runs_the_pieces_here_in_order():
    seen = []
    parallel.each(seen.append, "abc", workers=1)
    assert seen == ["a", "b", "c"]


class Odd(ValueError):
    pass


def test_a_workers_error_is_raised_as_it_was_raised_first_by_piece_order(tmp_path):
    def piece(i: int) -> None:
        if i in (3, 5):
            raise Odd(f"piece {i}: a bad value")
        (tmp_path / str(i)).touch()

    with pytest.raises(Odd, match=r"^piece 3: a bad value$") as caught:
        parallel.each(piece, range(40), workers=2)
    assert isinstance(caught.value.__cause__, parallel.WorkerTraceback)
    assert "raise Odd" in str(caught.value.__cause__)  # the worker's own traceback
    assert len(list(tmp_path.iterdir())) < 40  # the others took no further piece


STAGE = """
import sys, time
from pathlib import Path
from aebench import cli, parallel

def piece(i):
    Path(sys.argv[1], str(i)).write_text("started")
    try:
        time.sleep(60)
    finally:
        Path(sys.argv[1], str(i)).write_text("cleaned up")

cli.run(lambda args: parallel.each(piece, range(2), workers=2), "toy OUT")
"""


def test_an_interrupted_stage_stops_its_workers_through_their_cleanup(tmp_path):
    stage = subprocess.Popen([sys.executable, "-c", STAGE, str(tmp_path)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)},
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.iterdir())) < 2:
        assert time.monotonic() < deadline, "the workers never started"
        time.sleep(0.05)
    stage.send_signal(signal.SIGINT)  # to the stage alone, as its warm command forwards it
    _, err = stage.communicate(timeout=30)
    assert (stage.returncode, err.splitlines()[-1]) == (130, "interrupted: toy (SIGINT)")
    assert {p.read_text() for p in Path(tmp_path).iterdir()} == {"cleaned up"}
