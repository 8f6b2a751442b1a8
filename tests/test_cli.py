"""aebench.cli.run, run by a tiny stage-like program in a subprocess: errors, signals, parents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from aebench import cli

ROOT = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="/proc and prctl are Linux's")

PROG = '''
"""python prog.py MODE DIR"""
import os, sys, time
from pathlib import Path
from aebench import cli

def main(args):
    out = Path(args.dir)
    try:
        if args.mode == "value":
            raise ValueError("params.yaml: train.epochs: -1, must be > 0")
        if args.mode == "foreign":
            raise RuntimeError("CUDA error: device-side assert triggered\\nsecond line")
        if args.mode == "sleep":
            (out / "ready.tmp").write_text(f"{os.getpid()} {os.getppid()}")
            os.replace(out / "ready.tmp", out / "ready")  # whole, or not there yet
            print("ready", flush=True)
            for _ in range(600):  # short steps like a training loop: CPython runs a handler
                time.sleep(0.1)   # between bytecodes, so one long sleep entered just as the
                                  # signal came would delay it by the whole sleep
    finally:
        (out / "cleaned").write_text(f"{time.time()}")

cli.run(main, "python prog.py MODE DIR", __doc__)
'''


@pytest.fixture
def prog(tmp_path):
    (tmp_path / "prog.py").write_text(PROG)
    yield tmp_path
    ready = tmp_path / "ready"  # a failed test leaves no sleeping program behind
    if ready.exists() and alive(pid := int(ready.read_text().split()[0])):
        os.kill(pid, signal.SIGKILL)


def env(**extra):
    base = {k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", "AEBENCH_DEBUG")}
    return {**base, "PYTHONPATH": str(ROOT), **extra}


def run(prog, *args, **extra):
    return subprocess.run([sys.executable, "prog.py", *args], cwd=prog, env=env(**extra),
                          capture_output=True, text=True, timeout=30)


def alive(pid: int) -> bool:
    """Running, not a zombie (an orphan's zombie waits for init, which may reap slowly)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def wait_for(check, seconds: float) -> float:
    """Seconds until check() is true; fails after `seconds`."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < seconds, f"not within {seconds} s"
        time.sleep(0.05)
    return time.monotonic() - start


def test_parse_names_positionals_once():
    args = cli.parse("python -m stages.train NAME CSV_DIR", ["deep3", "data/csv"])
    assert (args.name, args.csv_dir, args.debug) == ("deep3", "data/csv", False)


def test_cli_starts_fast_without_torch():
    code = "import sys, aebench.cli; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True)
    assert done.stdout == "[]\n"


def test_our_own_runtime_error_gets_no_hint():
    err = type("TrainingError", (RuntimeError,), {"__module__": "aebench.training"})
    assert cli._verdict(err("deep3: loss is nan in epoch 3"), "python -m stages.train NAME") == \
        ("error: deep3: loss is nan in epoch 3", 1)


def test_our_error_is_one_line_exit_1(prog):
    done = run(prog, "value", ".")
    assert done.returncode == 1
    assert done.stderr == "error: params.yaml: train.epochs: -1, must be > 0\n"
    assert (prog / "cleaned").exists()


def test_foreign_error_is_one_line_with_a_hint(prog):
    done = run(prog, "foreign", ".")
    assert done.returncode == 1
    assert done.stderr == ("error: RuntimeError: CUDA error: device-side assert triggered; second "
                           "line (AEBENCH_DEBUG=1 for the traceback)\n")


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_prints_the_traceback(prog, how):
    done = run(prog, "foreign", ".", "--debug") if how == "flag" else \
        run(prog, "foreign", ".", AEBENCH_DEBUG="1")
    assert done.returncode == 1
    assert done.stderr.startswith("Traceback") and 'prog.py", line' in done.stderr


def test_usage_error_exits_2_with_the_usage(prog):
    done = run(prog, "value")
    assert done.returncode == 2
    assert done.stderr.startswith("usage: python prog.py [-h] [--debug] MODE DIR\n")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_runs_finally_and_exits_128_plus_n(prog, sig, code):
    # A shell runs background jobs with SIGINT ignored, and the child would inherit that (and
    # keep it, as cli.run respects an ignored signal): give it the terminal's default.
    child = subprocess.Popen([sys.executable, "prog.py", "sleep", "."], cwd=prog, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert child.stdout.readline() == "ready\n"
    child.send_signal(sig)
    _, err = child.communicate(timeout=10)
    assert (child.returncode, err) == (code, f"interrupted: prog.py ({sig.name})\n")
    assert (prog / "cleaned").exists()


@linux_only
@pytest.mark.parametrize("via_shell", [False, True])
def test_child_stops_when_its_runner_is_killed(prog, via_shell):
    # The runner plays DVC: it starts the stage (itself or through a shell that does not exec
    # it, as dash does) and is then SIGKILLed, so it cannot forward anything.
    cmd = f"{sys.executable} prog.py sleep ."
    argv = ["/bin/sh", "-c", f"{cmd}; exit $?"] if via_shell else cmd.split()
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, time
        subprocess.Popen({argv!r}); time.sleep(60)""")], cwd=prog, env=env(DVC_STAGE="t"))
    wait_for((prog / "ready").exists, 10)
    pid, ppid = map(int, (prog / "ready").read_text().split())
    assert (ppid != runner.pid) == via_shell  # the case under test is the one set up
    runner.kill()
    runner.wait()
    took = wait_for(lambda: not alive(pid), 5)
    assert (prog / "cleaned").exists()
    print(f"stopped {took:.2f} s after its runner died (via shell: {via_shell})")


@linux_only
def test_outside_dvc_a_stage_outlives_its_runner(prog):
    # nohup, setsid and `&` keep working by hand: only a stage run by DVC watches its parent
    runner = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, 'prog.py', 'sleep', '.']); "
                               "time.sleep(60)"], cwd=prog, env=env())
    wait_for((prog / "ready").exists, 10)
    pid, _ = map(int, (prog / "ready").read_text().split())
    runner.kill()
    runner.wait()
    time.sleep(1.5)  # longer than the watcher's poll
    assert alive(pid)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), 5)


@pytest.mark.e2e
@linux_only
@pytest.mark.parametrize("shell", ["/bin/sh", "/bin/bash"])
def test_stage_stops_when_dvc_repro_is_terminated(prog, shell):
    (prog / "dvc.yaml").write_text("stages:\n  sleep:\n    cmd: python prog.py sleep .\n")
    bin_dir = str(Path(sys.executable).parent)
    run_env = env(SHELL=shell, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=prog, check=True)
    dvc = subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=prog, env=run_env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for((prog / "ready").exists, 20)
    pid, _ = map(int, (prog / "ready").read_text().split())
    dvc.terminate()
    dvc.wait()
    took = wait_for(lambda: not alive(pid), 5)
    assert (prog / "cleaned").exists()
    print(f"stage stopped {took:.2f} s after SIGTERM to dvc repro (SHELL={shell})")


EXIT_PROG = '''
"""python exit_prog.py DIR"""
import atexit, gc, sys
from pathlib import Path
from aebench import cli

# registered before cli.run, so it runs after cli.run's own exit handler (last in, first out)
atexit.register(lambda: Path(sys.argv[1], "frozen").write_text(str(gc.get_freeze_count())))

def main(args):
    atexit.register(lambda: Path(args.dir, "handler").write_text("ran"))
    print("unflushed output")  # a pipe: block-buffered, written only at exit

cli.run(main, "python exit_prog.py DIR", __doc__)
'''


def test_quick_exit_freezes_after_the_handlers_and_loses_no_output(tmp_path):
    (tmp_path / "exit_prog.py").write_text(EXIT_PROG)
    done = subprocess.run([sys.executable, "exit_prog.py", "."], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (0, "unflushed output\n", "")
    assert (tmp_path / "handler").read_text() == "ran"
    assert int((tmp_path / "frozen").read_text()) > 0  # the final collection skips them
