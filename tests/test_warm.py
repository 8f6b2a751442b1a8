"""aebench.warm: a stage forked from a warm server behaves as `python -m stages.X` would.

A toy project (its own stages/toy.py) is served by one server for the module; each test runs
the same command cold (AEBENCH_WARM=0) and warm and compares what a caller sees: output, exit
code, signals, and the processes left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO

from aebench.warm.place import connect, open_place

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or sys.platform != "linux",
                                reason="the warm server needs Linux (pidfds, /proc)")

MARKER = f"AEBENCH_TEST_WARM={os.getpid()}"  # in the environment of the servers started here
TOY = '''"""python -m stages.toy MODE OUT: report what the stage sees, sleep, fail or die."""
import json, os, signal, sys, time
from pathlib import Path
from aebench import cli

USAGE = "python -m stages.toy MODE OUT"


def main(args):
    out = Path(args.out)
    if args.mode == "report":
        print("to stdout")
        out.write_text(json.dumps({
            "argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "pid": os.getpid(),
            "env": os.environ.get("DVC_TOY"), "warm": "toylib" in sys.modules,
            "mlflow": "mlflow" in sys.modules}))
    elif args.mode == "sleep":
        out.write_text(str(os.getpid()))
        try:
            time.sleep(120)
        finally:
            Path(f"{out}.cleaned").write_text("yes")
    elif args.mode == "fail":
        raise ValueError("toy: a bad value")
    elif args.mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif args.mode == "cuda":
        import torch
        out.write_text(str(torch.zeros(1, device="cuda").device))


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
'''

# A stage whose imports set a default in the environment, as aebench.kinds sets oneDNN's ISA cap
# (torch comes with it: only the test that needs it writes this stage).
IMPORTS = '''import json, os, sys
from pathlib import Path
from aebench import kinds  # noqa: F401 - sets ONEDNN_MAX_CPU_ISA unless the caller has

if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps([os.environ.get("ONEDNN_MAX_CPU_ISA"), os.getppid()]))
'''


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Iterator[Path]:
    root = toy_root(tmp_path_factory.mktemp("toy"))
    assert run(root, "--start", warm_on=True).returncode == 0
    yield root
    for pid in servers().values():  # they would wait AEBENCH_WARM_IDLE for the next stage
        os.kill(pid, signal.SIGTERM)


def env(warm_on: bool, **extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()  # pytest changes PYTEST_CURRENT_TEST per test
           if k not in ("AEBENCH_DEBUG", "DVC_STAGE", "PYTEST_CURRENT_TEST")}
    out.update({"PYTHONPATH": str(REPO), "AEBENCH_TEST_WARM": MARKER.split("=")[1],
                "AEBENCH_WARM": "1" if warm_on else "0", "AEBENCH_WARM_IDLE": "60", **extra})
    return out


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "aebench.warm", *args]


def run(root: Path, *args: str, warm_on: bool, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=root, env=env(warm_on, **extra),
                          capture_output=True, text=True, timeout=120)


def both(root: Path, *args: str, **extra: str) -> dict[bool, subprocess.CompletedProcess]:
    return {on: run(root, *args, warm_on=on, **extra) for on in (False, True)}


def key_of(root: Path, **extra: str) -> str:
    """The server key a warm command in `root` computes (its `stages` is root's)."""
    code = "import os; from aebench import warm; print(warm.fingerprint(os.getcwd()))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env(True, **extra),
                          capture_output=True, text=True, check=True).stdout.strip()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_for(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s"
        time.sleep(0.05)


def servers() -> dict[str, int]:
    """{key: pid} of the servers this module started (they carry its MARKER)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            words = (proc / "cmdline").read_bytes().split(b"\0")
            ours = MARKER.encode() in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ours and b"aebench.warm" in words and b"--serve" in words:
            found[words[words.index(b"--serve") + 1].decode()] = int(proc.name)
    return found


def test_a_warm_stage_sees_what_python_m_would_show_it(toy, tmp_path):
    seen = {}
    for on in (False, True):
        proc = run(toy, "stages.toy", "report", str(tmp_path / "r.json"), warm_on=on,
                   DVC_TOY="x")
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "to stdout\n", ""), proc.stderr
        seen[on] = json.loads((tmp_path / "r.json").read_text())
    # toylib, which another stage imports, came with the fork
    assert seen[True].pop("warm") and not seen[False].pop("warm")
    assert seen[True].pop("pid") != seen[False].pop("pid")
    assert seen[True] == seen[False] == {
        "argv": [str(toy / "stages" / "toy.py"), "report", str(tmp_path / "r.json")],
        "cwd": str(toy), "name": "__main__", "env": "x",
        # no stage here imports aebench.tracking: the server imported no MLflow either
        "mlflow": False}


def test_errors_and_exit_codes_are_the_same(toy, tmp_path):
    for args, code, last in ((["fail", "x"], 1, "error: toy: a bad value"),
                             (["report"], 2, "the following arguments are required: OUT"),
                             (["die", "x"], -signal.SIGKILL, None)):
        for proc in both(toy, "stages.toy", *args).values():
            assert proc.returncode == code, proc.stderr
            if last:
                assert proc.stderr.strip().splitlines()[-1].endswith(last)


@pytest.mark.parametrize("warm_on", [False, True])
def test_ctrl_c_reaches_the_stage_and_its_cleanup_runs(toy, tmp_path, warm_on):
    out = tmp_path / "pid"
    proc = subprocess.Popen(command("stages.toy", "sleep", str(out)), cwd=toy, env=env(warm_on),
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(out.exists, 30)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the command's process group
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.strip()) == (130, "interrupted: stages.toy (SIGINT)")
    assert (tmp_path / "pid.cleaned").exists()
    assert (int(out.read_text()) != proc.pid) == warm_on


def test_a_killed_command_stops_its_warm_stage(toy, tmp_path):
    out = tmp_path / "pid"
    proc = subprocess.Popen(command("stages.toy", "sleep", str(out)), cwd=toy, env=env(True))
    wait_for(out.exists, 30)
    stage = int(out.read_text())
    assert stage != proc.pid  # it runs in the server's fork
    proc.kill()
    proc.wait()
    wait_for(lambda: not alive(stage), 10)
    assert (tmp_path / "pid.cleaned").exists()  # SIGTERM, handled as a stage's `finally` is


def test_a_stage_whose_server_is_killed_still_ends_as_it_should(tmp_path):
    root = toy_root(tmp_path / "killed")
    assert run(root, "--start", warm_on=True).returncode == 0
    server = servers()[key_of(root)]
    out = tmp_path / "pid"
    proc = subprocess.Popen(command("stages.toy", "sleep", str(out)), cwd=root, env=env(True),
                            stderr=subprocess.PIPE, text=True)
    wait_for(out.exists, 30)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: not alive(server), 10)
    proc.send_signal(signal.SIGINT)  # forwarded to the stage, which tells its code itself
    _, err = proc.communicate(timeout=30)
    assert (proc.returncode, err.strip()) == (130, "interrupted: stages.toy (SIGINT)")
    assert (tmp_path / "pid.cleaned").exists()


@pytest.mark.parametrize("keep_time", [False, True])
def test_an_edit_is_never_served_by_the_old_imports(toy, tmp_path, keep_time):
    """Nor one of the same size whose time is put back (`cp -p`, `rsync -a`, `tar`)."""
    key = key_of(toy)
    stage = toy / "stages" / "toy.py"
    before = stage.stat()
    stage.write_text(TOY.replace('print("to stdout")', 'print("to STDOUT")'))
    if keep_time:
        os.utime(stage, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert (stage.stat().st_size, stage.stat().st_mtime_ns) == \
            (before.st_size, before.st_mtime_ns)
    try:
        assert key_of(toy) != key
        proc = run(toy, "stages.toy", "report", str(tmp_path / "r.json"), warm_on=True)
        assert proc.stdout == "to STDOUT\n"
    finally:
        stage.write_text(TOY)


@pytest.mark.parametrize("warm_on", [False, True])
def test_a_stage_run_from_a_subfolder_says_run_from_the_project_root(toy, warm_on):
    (toy / "sub").mkdir(exist_ok=True)
    proc = run(toy / "sub", "stages.toy", "report", "x", warm_on=warm_on)
    assert (proc.returncode, proc.stderr) == (
        1, f"error: stages.toy: no stages/toy.py in {toy / 'sub'}: run from the project root "
           "(the folder with dvc.yaml)\n")


def test_what_a_stages_imports_set_in_the_environment_a_warm_stage_has_too(tmp_path):
    """The server imported aebench.kinds before the fork, and the forked stage takes its
    command's environment: the default the import set (oneDNN's AVX2 cap: the same bytes on any
    node) must survive that, and a value the command sets must win, as in a cold stage."""
    root = toy_root(tmp_path / "imports")
    (root / "stages" / "imports.py").write_text(IMPORTS)
    out = tmp_path / "seen.json"
    for extra, cap in (({}, "AVX2"), ({"ONEDNN_MAX_CPU_ISA": "ALL"}, "ALL")):
        assert run(root, "--start", warm_on=True, **extra).returncode == 0  # its own server
        for on in (False, True):
            proc = run(root, "stages.imports", str(out), warm_on=on, **extra)
            assert proc.returncode == 0, proc.stderr
            seen, parent = json.loads(out.read_text())
            assert (seen, parent in servers().values()) == (cap, on)


def toy_root(root: Path) -> Path:
    """A project: stages/toy.py; stages/other.py, which imports the project's toylib.py, so
    that a stage forked from a server has toylib and a cold one does not (the toy stages import
    no torch: a server of this project starts in a fraction of a second of CPU); and .dvc/
    (where the servers' private folder goes)."""
    (root / "stages").mkdir(parents=True)
    (root / ".dvc").mkdir()
    (root / "stages" / "__init__.py").write_text("")
    (root / "stages" / "toy.py").write_text(TOY)
    (root / "stages" / "other.py").write_text("import toylib  # noqa: F401\n")
    (root / "toylib.py").write_text("")
    return root


def listens(root: Path, key: str) -> bool:
    """Whether a server of `root` for `key` accepts connections."""
    with open_place(str(root)) as place:
        sock = connect(place, place.name(key))
    return sock is not None and sock.close() is None


def test_the_server_exits_when_idle_and_a_command_starts_one_when_none_runs(tmp_path):
    root = toy_root(tmp_path / "idle")
    out = tmp_path / "r.json"
    first = run(root, "stages.toy", "report", str(out), warm_on=True, AEBENCH_WARM_IDLE="2")
    assert first.returncode == 0 and not json.loads(out.read_text())["warm"]  # cold, and...
    key = key_of(root, AEBENCH_WARM_IDLE="2")
    wait_for(lambda: key in servers(), 60)  # ...it started the server for the next ones
    wait_for(lambda: key not in servers(), 60)  # 2 s after its imports, none having come


def test_a_command_that_comes_while_the_server_imports_waits_for_it_instead_of_running_cold(
        tmp_path):
    root = toy_root(tmp_path / "importing")
    (root / "stages" / "slow.py").write_text("import time\ntime.sleep(4)\n")  # preload's
    starter = subprocess.Popen(command("--start"), cwd=root, env=env(True))
    key = key_of(root)
    wait_for(lambda: key in servers(), 30)  # bound and listening; importing for 4 s more
    out = tmp_path / "r.json"
    assert run(root, "stages.toy", "report", str(out), warm_on=True).returncode == 0
    assert json.loads(out.read_text())["warm"]
    assert starter.wait(timeout=60) == 0


def test_a_long_cold_stage_keeps_its_server_up_for_the_next_stage(tmp_path):
    root = toy_root(tmp_path / "long")
    out = tmp_path / "pid"
    cold = subprocess.Popen(command("stages.toy", "sleep", str(out)), cwd=root,
                            env=env(True, AEBENCH_WARM_IDLE="1"))
    wait_for(out.exists, 30)
    assert int(out.read_text()) == cold.pid  # no server yet: it runs in its command
    key = key_of(root, AEBENCH_WARM_IDLE="1")
    wait_for(lambda: listens(root, key), 60)  # it listens
    time.sleep(3)  # three times its idle time
    cold.send_signal(signal.SIGINT)
    assert cold.wait(timeout=30) == 130
    proc = run(root, "stages.toy", "report", str(tmp_path / "r.json"), warm_on=True,
               AEBENCH_WARM_IDLE="1")
    assert proc.returncode == 0 and json.loads((tmp_path / "r.json").read_text())["warm"]


def test_a_server_exits_on_stop_or_once_its_code_or_folder_is_gone_long_before_its_idle_time(
        tmp_path):
    idle = {"AEBENCH_WARM_IDLE": "600"}  # the default
    stopped, edited, removed = (toy_root(tmp_path / n) for n in ("stopped", "edited", "removed"))
    keys = {}
    for root in (stopped, edited, removed):
        assert run(root, "--start", warm_on=True, **idle).returncode == 0
        keys[root] = key_of(root, **idle)
        assert keys[root] in servers()
    proc = run(stopped, "--stop", warm_on=True, **idle)
    assert proc.stderr == ("aebench.warm: 1 server(s) of this folder exit once their stages "
                           "have ended\n")
    stage = edited / "stages" / "toy.py"
    stage.write_text(stage.read_text() + "# edited\n")
    shutil.rmtree(removed)
    for root in (stopped, edited, removed):  # a check every CHECK_S = 5 s
        wait_for(lambda root=root: keys[root] not in servers(), 30)
    again = run(stopped, "--stop", warm_on=True, **idle)
    assert (again.returncode, again.stderr) == (0, "aebench.warm: no server runs for this "
                                                   "folder\n")


def test_a_folder_keeps_one_idle_server_and_stop_ends_every_one(tmp_path):
    """Another environment's server replaces the folder's idle one once it has imported, and
    `--stop` from any environment ends the folder's servers, whatever theirs."""
    root = toy_root(tmp_path / "one")
    first, second = {"AEBENCH_TEST_ENV": "1"}, {"AEBENCH_TEST_ENV": "2"}
    assert run(root, "--start", warm_on=True, **first).returncode == 0
    old = servers()[key_of(root, **first)]
    assert run(root, "--start", warm_on=True, **second).returncode == 0
    new = servers()[key_of(root, **second)]
    wait_for(lambda: not alive(old), 30)
    proc = run(root, "--stop", warm_on=True, AEBENCH_TEST_ENV="3")  # none of its own
    assert proc.stderr == ("aebench.warm: 1 server(s) of this folder exit once their stages "
                           "have ended\n")
    wait_for(lambda: not alive(new), 30)
    with open_place(str(root)) as place:
        assert place.names() == []  # each removed its socket


def test_a_bad_idle_time_is_named():
    proc = subprocess.run(command("stages.toy", "report", "x"), env=env(True,
                          AEBENCH_WARM_IDLE="soon"), capture_output=True, text=True)
    assert (proc.returncode, proc.stderr.strip()) == \
        (1, "error: AEBENCH_WARM_IDLE='soon' is not a number of seconds")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_warm_stage_can_use_the_gpu(toy, tmp_path):
    # The server never initializes CUDA, so its forks can
    assert run(toy, "--start", warm_on=True).returncode == 0  # an edit test replaced it
    for proc in both(toy, "stages.toy", "cuda", str(tmp_path / "d")).values():
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / "d").read_text() == "cuda:0"
