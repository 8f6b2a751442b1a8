"""`aebench mlflow-server`: MLflow on PostgreSQL, private to its user; a login beyond loopback."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sweep_servers import have_server, mlflow_server, postgres_running, status

from aebench.sweep import server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("host", "login"), [("127.0.0.1", False), ("localhost", False),
                                             ("::1", False), ("0.0.0.0", True),
                                             ("192.168.1.5", True), ("myhost", True)])
def test_a_login_wherever_it_listens_beyond_loopback(host, login):
    assert server.needs_login(host) is login
    assert server.needs_login(host, forced=True)


def test_the_data_stays_outside_git(capsys):
    assert server.main([str(ROOT / "srv"), "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert "lies in the git working copy" in err and len(err.strip().splitlines()) == 1
    assert not (ROOT / "srv").exists()


@pytest.mark.cluster
@pytest.mark.skipif(bool(have_server()), reason=str(have_server()))
def test_a_request_without_login_is_refused():
    """With a login (as beyond loopback): no request without the admin's password gets in;
    PostgreSQL has no TCP port and refuses another user on its socket."""
    with mlflow_server("--auth") as srv:
        search = "/api/2.0/mlflow/experiments/search?max_results=5"
        create = json.dumps({"name": "planted"}).encode()
        password = (srv.folder / "admin-password").read_text().strip()
        assert status(srv.url, search) == 401
        assert status(srv.url, "/api/2.0/mlflow/experiments/create", data=create) == 401
        assert status(srv.url, search, auth=("admin", "wrong")) == 401
        assert status(srv.url, search, auth=("admin", password)) == 200
        for name in ("admin-password", "auth.ini", "flask-key"):
            assert (srv.folder / name).stat().st_mode & 0o077 == 0, name
        assert (srv.folder / "pg").stat().st_mode & 0o077 == 0
        conf = (srv.folder / "pg" / "data" / "postgresql.auto.conf").read_text()
        assert "listen_addresses" not in conf  # set on the command line: ''
        if os.geteuid() == 0:  # another user on the machine, at PostgreSQL's socket
            attack = subprocess.run(
                ["runuser", "-u", "nobody", "--", server.pg_binary("psql"), "-h",
                 str(srv.folder / "pg" / "socket"), "-U", "postgres", "-d", "mlflow", "-c",
                 "select 1"], capture_output=True, text=True)
            assert attack.returncode != 0 and "ermission denied" in attack.stderr, attack
    assert srv.proc.returncode == 0
    assert not postgres_running(srv.folder)


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: PostgreSQL runs as its own user")
def test_a_dir_postgres_cannot_reach_is_refused(tmp_path, capsys):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    assert server.main([str(private / "srv"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("give a DIR it can reach, e.g. /srv/aebench-mlflow") and \
        "cannot reach it" in err and "\n" not in err
    assert not (private / "srv" / "pg").exists()
