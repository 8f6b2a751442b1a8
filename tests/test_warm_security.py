"""aebench.warm attacked: another user, a request for something that is not one of the
project's stages or for another folder, a socket folder that is not private, and commands under
limits that the server does not have.

One toy project (test_warm.py's stages/toy.py, and stages/limits.py below) in a folder that
others may enter (0755, as home folders often are): only the servers' private folder and their
check of the peer's uid keep others out. One server for the module; the limits tests, which
start servers under other limits, come last.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_warm import alive, command, env, key_of, run, servers, toy_root, wait_for

from aebench.warm.place import LOG, connect, open_place

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open") or sys.platform != "linux",
                                reason="the warm server needs Linux (pidfds, /proc)")

AS_ROOT = pytest.mark.skipif(os.getuid() != 0, reason="needs root, to act as another user")

LIMITS_STAGE = '''"""python -m stages.limits OUT: report the limits this stage runs under, and
whether it can write 200 KB (OUT.big)."""
import json, os, resource, sys
from pathlib import Path


def main(out):
    try:
        Path(f"{out}.big").write_bytes(bytes(200_000))
        wrote = "200000 bytes"
    except OSError as e:
        wrote = e.strerror
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    Path(out).write_text(json.dumps({
        "fsize": resource.getrlimit(resource.RLIMIT_FSIZE),
        "as": resource.getrlimit(resource.RLIMIT_AS), "umask": status["Umask"].strip(),
        "mode": oct(os.stat(f"{out}.big").st_mode & 0o777),
        "affinity": sorted(os.sched_getaffinity(0)), "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "cgroup": Path("/proc/self/cgroup").read_text(), "wrote": wrote,
        "warm": "toylib" in sys.modules}))


if __name__ == "__main__":
    main(sys.argv[1])
'''

@pytest.fixture(scope="module")
def project() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="aebench-warm-sec-"))
    try:
        root.chmod(0o755)  # others may enter it: only the private folder keeps them out
        toy_root(root)
        (root / "stages" / "limits.py").write_text(LIMITS_STAGE)
        assert run(root, "--start", warm_on=True).returncode == 0
        yield root
    finally:
        for pid in servers().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root)


def socket_path(root: Path, **extra: str) -> str:
    """The real path of the socket of `root`'s server for this environment."""
    with open_place(str(root)) as place:
        return f"{place.path}/{place.name(key_of(root, **extra))}"


def log_lines(root: Path) -> list[str]:
    with open_place(str(root)) as place:
        log = Path(place.path, LOG)
    return log.read_text().splitlines() if log.exists() else []


def report(root: Path, out: Path, warm_on: bool = True) -> subprocess.CompletedProcess:
    proc = run(root, "stages.toy", "report", str(out), warm_on=warm_on)
    assert proc.returncode == 0, proc.stderr
    return proc


def attack(root: Path, payload: str, fsuid_root: bool = False) -> str:
    """Another user's client, in a forked child that drops to uid 65534: connect to root's
    server and ask for `timeit` running `payload` in /tmp; what happened. `fsuid_root`: drop
    the effective uid only, keeping root's for file access (the folder's check), so that what
    is left to stop it is the server's own check of its peer's uid."""
    path = socket_path(root)
    request = {"module": "timeit", "args": ["-n1", "-r1", payload], "cwd": "/tmp", "env": {}}
    null = os.open(os.devnull, os.O_RDWR)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the attacker: only system calls, then _exit
        try:
            if fsuid_root:
                os.setegid(65534)
                os.seteuid(65534)
                libc = ctypes.CDLL(None, use_errno=True)
                libc.setfsuid(0)
                libc.setfsgid(0)
            else:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            sock.settimeout(30)
            try:
                sock.connect(path)
            except OSError as e:
                result = f"euid {os.geteuid()}: connect: {e.strerror}"
            else:
                try:
                    socket.send_fds(sock, [json.dumps(request).encode()], [null] * 3)
                    reply = sock.recv(8)
                    result = f"euid {os.geteuid()}: " + ("closed" if not reply else "replied")
                except OSError:  # closed with the request unread (ECONNRESET, EPIPE)
                    result = f"euid {os.geteuid()}: closed"
        except BaseException as e:  # noqa: BLE001 (told to the test, which fails on it)
            result = f"error: {e!r}"
        os.write(write, result.encode())
        os._exit(0)
    os.close(write)
    os.close(null)
    with open(read, "rb") as f:
        result = f.read().decode()
    os.waitpid(pid, 0)
    return result


@AS_ROOT
def test_another_user_cannot_reach_the_socket(project, tmp_path):
    pwned = project / "pwned.txt"
    assert attack(project, f"import os; os.system('id > {pwned}')") == \
        "euid 65534: connect: Permission denied"  # the private folder (0700) stops it
    time.sleep(1)  # what a stage would take to start
    assert not pwned.exists()


@AS_ROOT
def test_another_user_past_the_folder_is_refused_nothing_runs_and_the_user_is_told_once(
        project, tmp_path):
    """The server's own check: a peer whose uid is not its own (as it was at connect)."""
    pwned = project / "pwned.txt"
    logged = len(log_lines(project))
    result = attack(project, f"import os; os.system('id > {pwned}')", fsuid_root=True)
    assert result == "euid 65534: closed"  # nothing ran
    time.sleep(1)  # what a stage would take to start
    assert not pwned.exists()
    new = log_lines(project)[logged:]
    assert len(new) == 1 and "refused a connection from pid" in new[0] and "uid 65534" in new[0]
    told = report(project, tmp_path / "r.json").stderr  # the next stage tells it, once
    assert told.startswith("aebench.warm: the warm server refused a connection from pid ")
    assert told.endswith(f"uid 65534: not this server's user (0); nothing ran (logged in "
                         f"{Path(socket_path(project)).parent}/{LOG})\n")
    assert len(told.splitlines()) == 1
    assert report(project, tmp_path / "r.json").stderr == ""


def test_its_own_user_gets_only_the_projects_stages_in_the_projects_folder(project, tmp_path):
    pwned = tmp_path / "pwned.txt"
    payload = ["-n1", "-r1", f"import os; os.system('id > {pwned}')"]
    requests = {
        "module 'timeit': not one of this project's stages (stages/NAME.py)":
            {"module": "timeit", "args": payload, "cwd": str(project)},
        "module 'stages.nope': not one of this project's stages (stages/NAME.py)":
            {"module": "stages.nope", "args": [], "cwd": str(project)},
        "module 'stages.toy.x': not one of this project's stages (stages/NAME.py)":
            {"module": "stages.toy.x", "args": [], "cwd": str(project)},
        "'stages.toy' in '/tmp': not the folder this server serves":
            {"module": "stages.toy", "args": ["report", str(pwned)], "cwd": "/tmp"},
        "stages.toy: malformed arguments, environment or streams":
            {"module": "stages.toy", "args": ["report", str(pwned), 1], "cwd": str(project)},
    }
    logged = len(log_lines(project))
    with open_place(str(project)) as place, open(os.devnull, "w") as null:
        name = place.name(key_of(project))
        for request in requests.values():
            sock = connect(place, name)
            with sock:
                socket.send_fds(sock, [json.dumps({**request, "env": {}}).encode()],
                                [null.fileno()] * 3)
                assert sock.recv(8) == b""  # closed, nothing ran
    time.sleep(1)
    assert not pwned.exists()
    new = log_lines(project)[logged:]
    assert [line.split(": refused ", 1)[1] for line in new] == list(requests)
    told = report(project, tmp_path / "r.json").stderr.splitlines()
    assert [line.split(" refused ", 1)[1].split("; nothing ran")[0] for line in told] == \
        list(requests)
    assert report(project, tmp_path / "r.json").stderr == ""


@pytest.mark.parametrize("change", ["mode", "owner"])
def test_a_socket_folder_that_is_not_private_is_not_used(project, tmp_path, change):
    with open_place(str(project)) as place:
        folder = Path(place.path)
    if change == "owner" and os.getuid() != 0:
        pytest.skip("needs root, to give the folder to another user")
    if change == "mode":
        folder.chmod(0o750)
        why = f"{folder} has mode 0750, not 0700: other users could reach its sockets"
    else:
        os.chown(folder, 65534, 65534)
        why = f"{folder} belongs to uid 65534, not to this user (uid 0)"
    try:
        proc = run(project, "stages.toy", "report", str(tmp_path / "r.json"), warm_on=True)
    finally:
        folder.chmod(0o700)
        os.chown(folder, os.getuid(), os.getgid())
    assert (proc.returncode, proc.stderr) == (
        0, f"aebench.warm: not using {why}; stages.toy runs cold\n")
    assert not json.loads((tmp_path / "r.json").read_text())["warm"]


def test_xdg_runtime_dir_is_used_only_if_it_is_this_users_and_private(
        project, tmp_path, monkeypatch):
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    with open_place(str(project)) as place:
        assert place.path == f"{runtime}/aebench-warm-{os.getuid()}"
        assert (os.stat(place.path).st_mode & 0o777, os.stat(place.path).st_uid) == \
            (0o700, os.getuid())
    runtime.chmod(0o755)  # not private: the project's .dvc/tmp instead
    with open_place(str(project)) as place:
        assert place.path == f"{project}/.dvc/tmp/aebench-warm-{os.getuid()}"
    if os.getuid() == 0:  # another user's (`su` and `sudo` keep XDG_RUNTIME_DIR)
        runtime.chmod(0o700)
        os.chown(runtime, 65534, 65534)
        with open_place(str(project)) as place:
            assert place.path == f"{project}/.dvc/tmp/aebench-warm-{os.getuid()}"


# ---- limits: a warm stage runs under its command's limits, never its server's ----

def cgroup_folder() -> Path | None:
    """A new cgroup (v2) to move a command into, or None where this machine allows none."""
    for base in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (base / "cgroup.procs").exists():
            folder = base / f"aebench-test-{os.getpid()}"
            try:
                folder.mkdir(exist_ok=True)
            except OSError:
                return None
            moved = subprocess.run(["sh", "-c", f"echo $$ > {folder}/cgroup.procs"],
                                   capture_output=True)  # allowed to move a process there?
            if moved.returncode == 0:
                return folder
            folder.rmdir()
            return None
    return None


@pytest.fixture(scope="module")
def cgroup() -> Iterator[Path | None]:
    folder = cgroup_folder()
    yield folder
    if folder is not None:
        pids = [int(p) for p in (folder / "cgroup.procs").read_text().split()]
        for pid in pids:  # what the tests started in it (a server, a stage)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(pid) for pid in pids), 30)
        folder.rmdir()


NICE = os.getpriority(os.PRIO_PROCESS, 0)
CPU = min(os.sched_getaffinity(0))
# name: (shell prefix before `exec python -m aebench.warm stages.limits OUT`, what the stage
# must then see)
LIMITS = {
    "ulimit -f": ("ulimit -f 100; exec",
                  lambda r: r["fsize"][0] == 102400 and r["wrote"] == "File too large"),
    "ulimit -v": ("ulimit -v 268435456; exec", lambda r: r["as"][0] == 268435456 * 1024),
    "umask": ("umask 077; exec", lambda r: (r["umask"], r["mode"]) == ("0077", "0o600")),
    "taskset": (f"exec taskset -c {CPU}", lambda r: r["affinity"] == [CPU]),
    "nice": ("exec nice -n 5", lambda r: r["nice"] == min(NICE + 5, 19)),
    "cgroup": ("echo $$ > {cgroup}/cgroup.procs; exec",
               lambda r: r["cgroup"].endswith(f"::/aebench-test-{os.getpid()}\n")),
}


def limited(root: Path, prefix: str, out: Path, warm_on: bool, *args: str) -> dict | None:
    """Run stages.limits (or `args`) under `prefix` in a shell; its report (None for args)."""
    cmd = " ".join(command(*(args or ("stages.limits", str(out)))))
    proc = subprocess.run(["bash", "-c", f"{prefix} {cmd}"], cwd=root, env=env(warm_on),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return None if args else json.loads(out.read_text())


def prefix_of(name: str, cgroup: Path | None) -> str:
    if name == "taskset" and (len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset")):
        pytest.skip("one CPU (no other affinity to give a command), or no taskset")
    if name == "cgroup" and cgroup is None:
        pytest.skip("no cgroup v2 here that a test may create (cgroup delegation not allowed)")
    return LIMITS[name][0].format(cgroup=cgroup)


@pytest.mark.parametrize("name", list(LIMITS))
def test_a_command_under_other_limits_than_its_servers_runs_under_its_own(
        project, tmp_path, cgroup, name):
    """The server (started under the test's limits) is ready; a command under `name` is not
    served by it: its stage runs under the command's limits, as a cold one does."""
    prefix, holds = prefix_of(name, cgroup), LIMITS[name][1]
    assert run(project, "--start", warm_on=True).returncode == 0
    main_key = key_of(project)
    cold = limited(project, prefix, tmp_path / "cold.json", warm_on=False)
    warm = limited(project, prefix, tmp_path / "warm.json", warm_on=True)
    for key, pid in servers().items():  # the one it started for its limits, still importing
        if key != main_key:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert holds(cold), cold
    assert not cold.pop("warm") and not warm.pop("warm")
    assert warm == cold


def test_a_server_started_under_limits_forks_stages_under_exactly_them(
        project, tmp_path, cgroup):
    """All six at once, with a server started under them (it replaces the module's)."""
    names = [n for n in LIMITS if not (n == "cgroup" and cgroup is None) and not (
        n == "taskset" and (len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset")))]
    shell = [LIMITS[n][0].format(cgroup=cgroup).removesuffix("exec").rstrip("; ")
             for n in names if LIMITS[n][0].endswith("exec")]
    wrappers = [LIMITS[n][0].removeprefix("exec ") for n in names
                if not LIMITS[n][0].endswith("exec")]
    prefix = "; ".join(shell) + "; exec " + " ".join(wrappers)
    limited(project, prefix, tmp_path / "x", True, "--start")
    warm = limited(project, prefix, tmp_path / "warm.json", warm_on=True)
    cold = limited(project, prefix, tmp_path / "cold.json", warm_on=False)
    assert warm.pop("warm") and not cold.pop("warm")
    assert warm == cold
    for name in names:
        assert LIMITS[name][1](cold), (name, cold)
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] != 102400  # the test's own: untouched
