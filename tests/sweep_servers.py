"""Helpers of the sweep's tests: an `aebench mlflow-server` of the test's own, stopped by its
pid (its PostgreSQL with it), in a folder PostgreSQL's user can reach."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READY_LIMIT_S = 600  # a limit, not a timing: a loaded 2-core machine took 2 min once


def have_server() -> str | None:
    """Why the server cannot run here, or None."""
    from aebench.sweep.server import ServerError, pg_binary

    try:
        pg_binary("initdb")
    except ServerError as err:
        return str(err)
    for module in ("psycopg", "flask_wtf"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (pip install -e '.[sweep]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    folder: Path
    proc: subprocess.Popen
    log: Path


def status(url: str, path: str, auth: tuple[str, str] | None = None,
           data: bytes | None = None) -> int:
    request = urllib.request.Request(url + path, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth:
        import base64

        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def private_temp(prefix: str) -> Path:
    """A temporary folder that PostgreSQL's own user can traverse (root's /tmp/pytest-of-root
    is 0700)."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    base.chmod(0o711)
    return base


def start_server(folder: Path, port: int, *args: str) -> Server:
    """`aebench mlflow-server folder --port port`, ready; its log beside the folder."""
    log = folder.parent / f"{folder.name}.log"
    with open(log, "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "aebench", "mlflow-server",
                                 str(folder), "--port", str(port), "--workers", "1", *args],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", folder, proc, log)
    try:
        wait_ready(server)
    except BaseException:
        stop(server)
        raise
    return server


@contextmanager
def mlflow_server(*args: str) -> Iterator[Server]:
    """`aebench mlflow-server` on a free port of 127.0.0.1; SIGTERM to its pid at the end."""
    base = private_temp("aebench-test-server-")
    server = None
    try:
        server = start_server(base / "srv", free_port(), *args)
        yield server
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(base, ignore_errors=True)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + READY_LIMIT_S
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"mlflow-server exited {server.proc.returncode}: "
                        f"{server.log.read_text()[-2000:]}")
        try:
            if status(server.url, "/health") == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"mlflow-server not ready in {READY_LIMIT_S} s: {server.log.read_text()[-2000:]}")


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


def postgres_running(folder: Path) -> bool:
    pid = folder / "pg" / "data" / "postmaster.pid"
    if not pid.is_file():
        return False
    try:
        os.kill(int(pid.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True
