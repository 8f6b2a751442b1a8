"""`make smoke` (aebench.smoke): options checked before anything is copied or run, a failed run
points at no summary, the scratch copy starts from no result, and its MLflow runs say which
project commit they tried and that they are smoke runs; a second run in the same folder is
refused, DVC's commit hint is not passed on, and the end says what to do next. (The smoke run
itself: `make smoke`.)"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from aebench import smoke, tracking

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("option, value, why", [
    ("--limit", "-5", "-5 is not allowed; use 0..1000000000"),
    ("--epochs", "0", "0 is not allowed; use 1..100000"),
    ("--replicas", "1000", "1000 is not allowed; use 1..100"),
    ("--epochs", "two", "'two' is not an integer"),
])
def test_a_bad_option_is_a_usage_error_before_any_work(tmp_path, capsys, option, value, why):
    with pytest.raises(SystemExit) as exit_:
        smoke.main([str(tmp_path / "scratch"), option, value])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"python -m aebench.smoke: error: argument {option}: {why}"
    assert not (tmp_path / "scratch").exists()


def test_a_failed_run_names_no_summary():
    assert smoke.outcome(0, Path("s"), 61.2).startswith(
        "smoke: done in 61 s; see s/reports/summary.md\nnext:\n")
    failed = smoke.outcome(1, Path("s"), 3)
    assert failed == ("smoke: FAILED in 3 s (dvc repro exit 1; its error is above); the scratch "
                      "copy is s") and "summary" not in failed


def test_the_copy_leaves_out_every_output_of_the_pipeline(tmp_path):
    smoke.copy_repo(tmp_path)
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    outputs = [out["path"] for stage in lock.values() for out in stage.get("outs", [])]
    assert "plots/test_mse_by_epoch.csv" in outputs and "plots/curves/deep3.csv" in outputs
    assert [path for path in outputs if (tmp_path / path).exists()] == []
    assert not (tmp_path / "dvc.lock").exists()
    for kept in ("dvc.yaml", "params.yaml", "aebench/smoke.py", "stages/train.py",
                 ".dvc/plots/log_y.json"):
        assert (tmp_path / kept).is_file(), kept


def test_result_paths_follow_dvc_yaml(tmp_path):
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make": {"foreach": ["a"], "do": {"cmd": "x", "outs": ["out/${key}.csv",
                                                                {"models/${key}": {}}]}},
        "sum": {"cmd": "y", "metrics": [{"metrics/": {"cache": False}}], "plots": ["p.csv"]}}}))
    results = smoke.result_paths(tmp_path)
    assert results == ["dvc.lock", "out/*.csv", "models/*", "metrics", "p.csv"]
    assert [n for n in ("out/a.csv", "models/a/r0.pt", "metrics/a.json", "p.csv", "dvc.lock",
                        "out.csv", "metricsx.json", "p.csv.bak") if smoke.is_result(n, results)] \
        == ["out/a.csv", "models/a/r0.pt", "metrics/a.json", "p.csv", "dvc.lock"]


def test_smoke_runs_carry_the_projects_commit_and_a_smoke_tag(monkeypatch):
    env = smoke.smoke_env(Path("/tmp/scratch"), "limit=3000 epochs=1 replicas=1")
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////tmp/scratch/mlflow.db"
    assert env["AEBENCH_GIT_COMMIT"] == tracking.git_commit(REPO)
    assert env["AEBENCH_SMOKE"].startswith("limit=3000 epochs=1 replicas=1")
    assert env["PYTHONUNBUFFERED"] == "1"  # repro passes the stages' lines on through a pipe
    # what every run of the copy's stages gets as tags
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("AEBENCH_GIT_COMMIT", env["AEBENCH_GIT_COMMIT"])
    monkeypatch.setenv("AEBENCH_SMOKE", env["AEBENCH_SMOKE"])
    assert tracking.common_tags() == {"git_commit": tracking.git_commit(REPO),
                                      "mlflow.source.git.commit": tracking.git_commit(REPO),
                                      "smoke": env["AEBENCH_SMOKE"]}
    assert tracking.git_commit(REPO) != "unknown"


def test_a_run_ends_with_what_to_do_next_and_what_it_leaves_running(monkeypatch):
    monkeypatch.delenv("AEBENCH_WARM_IDLE", raising=False)
    monkeypatch.delenv("AEBENCH_WARM", raising=False)
    lines = smoke.outcome(0, Path(".smoke"), 40).splitlines()
    assert lines[1] == "next:"
    assert lines[2].startswith("  make ui      the MLflow UI on this run's store, "
                               "http://127.0.0.1:5000 ")
    assert lines[3].startswith("  figures      .smoke/plots/figures/ ")
    assert "cd .smoke && dvc plots show" in lines[4] and "make plots" in lines[4]
    assert lines[5].startswith("The stages' warm server for .smoke stays up 10 min after its "
                               "last stage")
    assert lines[5].endswith("to end it now: cd .smoke && python -m aebench.warm --stop")
    assert "stays up 2 min" in smoke.next_steps(Path(".smoke"), idle_s=120)
    monkeypatch.setenv("AEBENCH_WARM_IDLE", "90")  # as the warm server reads it
    assert "stays up 1.5 min" in smoke.next_steps(Path(".smoke"))
    monkeypatch.setenv("AEBENCH_WARM", "0")
    assert smoke.next_steps(Path(".smoke")).endswith("No warm server stays up (AEBENCH_WARM=0).")


def test_a_second_run_in_the_same_folder_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    (scratch / "params.yaml").write_text("the first run's copy\n")
    with smoke.one_run(scratch):  # the first run, under way
        with pytest.raises(SystemExit) as exit_:
            smoke.main([str(scratch)])
        assert exit_.value.code == (f"error: another `make smoke` (pid {os.getpid()}) is "
                                    f"running in {scratch}; wait for it to end")
        assert (scratch / "params.yaml").read_text() == "the first run's copy\n"  # untouched
        with smoke.one_run(tmp_path / "other"):  # another folder: its own lock
            pass
    with smoke.one_run(scratch):  # the first has ended: free again
        pass
    folder = tmp_path / "run" / f"aebench-{os.getuid()}"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_lock_folder_must_be_this_users_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / f"aebench-{os.getuid()}").mkdir(mode=0o777)
    os.chmod(tmp_path / f"aebench-{os.getuid()}", 0o777)  # open to others: another user's
    with pytest.raises(SystemExit) as exit_, smoke.one_run(tmp_path / "scratch"):
        pass
    assert "not a folder of this user's alone" in str(exit_.value.code)
    assert "drwxrwxrwx" in str(exit_.value.code)


def test_download_and_convert_run_cold_first_and_dvcs_hints_are_not_passed_on(tmp_path, capfd):
    """Two `dvc repro`s: convert (and download) cold while the warm server imports, then the
    rest; the second's "didn't change" lines of those two and DVC's push hint are not shown,
    and a failed first step is the run's exit code, with no second."""
    bin_, calls = tmp_path / "bin", tmp_path / "calls"
    bin_.mkdir()
    (bin_ / "dvc").write_text(f"""#!/bin/sh
echo "$* AEBENCH_WARM=$AEBENCH_WARM" >> {calls}
echo "Stage 'download' didn't change, skipping"
echo "Running stage 'a':"
echo "Use \\`dvc push\\` to send your updates to remote storage."
exit $EXIT
""")
    (bin_ / "dvc").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "AEBENCH_WARM"}
    env.update(PATH=f"{bin_}{os.pathsep}{os.environ['PATH']}", EXIT="0")
    assert smoke.repro(tmp_path, env) == 0
    assert calls.read_text().splitlines() == ["repro convert AEBENCH_WARM=0", "repro AEBENCH_WARM="]
    assert capfd.readouterr().out == ("Stage 'download' didn't change, skipping\n"
                                      "Running stage 'a':\nRunning stage 'a':\n")
    calls.unlink()
    assert smoke.repro(tmp_path, {**env, "EXIT": "3"}) == 3
    assert calls.read_text().splitlines() == ["repro convert AEBENCH_WARM=0"]
    assert smoke.SCRATCH_DVC_CONFIG == "[core]\n    autostage = true\n"
