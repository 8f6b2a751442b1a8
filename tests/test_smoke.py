"""aebench.smoke's own faults: options checked before anything is copied or run, and a failed
run does not point at a summary it never wrote. (The smoke run itself: `make smoke`.)"""

from pathlib import Path

import pytest

from aebench import smoke


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
    assert smoke.outcome(0, Path("s"), 61.2) == "smoke: done in 61 s; see s/reports/summary.md"
    failed = smoke.outcome(1, Path("s"), 3)
    assert failed == ("smoke: FAILED in 3 s (dvc repro exit 1; its error is above); the scratch "
                      "copy is s") and "summary" not in failed
