"""`aebench mlflow-server [DIR] [--host H] [--port P] [--auth]`: one MLflow tracking server on
PostgreSQL, for a team or a sweep's workers; it runs until Ctrl-C or SIGTERM, then stops its
PostgreSQL too.

DIR (default $XDG_DATA_HOME/aebench/mlflow-server, outside any git working copy) holds
everything: pg/ (PostgreSQL's data, its log and its socket, 0700, owned by the user it runs
as), artifacts/ (served by the MLflow server: clients need no access to DIR) and, with a login,
auth.ini and admin-password (0600). PostgreSQL listens on no TCP port at all: only on a Unix
socket in pg/, and takes only peer-authenticated connections of the user who started this
command. `initdb` and `postgres` refuse to run as root: as root they run as the `postgres`
user (Debian's package creates it), which must be able to reach DIR.

The server listens on 127.0.0.1 unless --host says otherwise. Anywhere else (or with --auth) it
runs MLflow's own login, `mlflow server --app-name basic-auth`: every request needs a user and
password; the admin's password is made once, in DIR/admin-password (never in git).
"""

from __future__ import annotations

import argparse
import getpass
import glob
import ipaddress
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

DB_ROOT_USER = "postgres"  # who runs PostgreSQL when this command runs as root
DATABASES = ("mlflow", "mlflow_auth")
ADMIN = "admin"


class ServerError(RuntimeError):
    """The server cannot start; str() is the one line."""


def default_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "aebench" / "mlflow-server"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def needs_login(host: str, forced: bool = False) -> bool:
    """MLflow's login is on wherever the server listens beyond loopback (or when asked)."""
    return forced or not is_loopback(host)


def pg_binary(name: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0, reverse=True)),
        None)
    if not found:
        raise ServerError(f"{name}: not found; install PostgreSQL (Debian: apt-get install "
                          "postgresql)")
    return found


def db_user() -> str:
    return DB_ROOT_USER if os.geteuid() == 0 else getpass.getuser()


def as_db_user(args: list[str]) -> list[str]:
    return ["runuser", "-u", DB_ROOT_USER, "--", *args] if os.geteuid() == 0 else args


def backend_uri(folder: Path, database: str = "mlflow") -> str:
    """SQLAlchemy's URI of a database over the socket in folder/pg/socket (no password: peer)."""
    return f"postgresql://{db_user()}@/{database}?host={folder / 'pg' / 'socket'}"


def outside_git(folder: Path) -> None:
    probe = folder if folder.exists() else folder.parent
    while not probe.exists():
        probe = probe.parent
    inside = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=probe,
                            capture_output=True, text=True)
    if inside.returncode == 0:
        raise ServerError(f"{folder}: lies in the git working copy {inside.stdout.strip()}; "
                          "the server's data and login stay outside git: give another DIR")


def prepare(folder: Path) -> None:
    """Create DIR and PostgreSQL's cluster in it once (initdb), private to its owner."""
    pg = folder / "pg"
    folder.mkdir(parents=True, exist_ok=True)
    # as root, postgres must traverse DIR (not list it) to reach pg/, which is its own
    folder.chmod(0o711 if os.geteuid() == 0 else 0o700)
    (folder / "artifacts").mkdir(mode=0o700, exist_ok=True)
    if (pg / "data" / "PG_VERSION").is_file():
        return
    try:
        user = pwd.getpwnam(db_user())
    except KeyError:
        raise ServerError(f"no user {db_user()!r} to run PostgreSQL as (root may not); "
                          "install Debian's postgresql, which creates it") from None
    if os.geteuid() == 0 and subprocess.run(as_db_user(["test", "-x", str(folder)])).returncode:
        raise ServerError(f"{folder}: PostgreSQL's user {user.pw_name} cannot reach it (a "
                          "folder above it is private, as /root is); give a DIR it can reach, "
                          "e.g. /srv/aebench-mlflow")
    pg.mkdir(mode=0o700, exist_ok=True)
    (pg / "socket").mkdir(mode=0o700, exist_ok=True)
    for path in (pg, pg / "socket"):
        os.chown(path, user.pw_uid, user.pw_gid)
    proc = subprocess.run(as_db_user([pg_binary("initdb"), "-D", str(pg / "data"), "-U",
                                      user.pw_name, "-E", "UTF8", "--locale=C",
                                      "--auth-local=peer", "--auth-host=reject"]),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["(no output)"]
        raise ServerError(f"initdb in {pg / 'data'} failed: {lines[-1]}")
    # only the socket, only peer-checked users: the one who runs this command, mapped to the
    # database's owner
    me = pwd.getpwuid(os.geteuid()).pw_name
    files = {"pg_hba.conf": "local all all peer map=aebench\n",
             "pg_ident.conf": "".join(f"aebench {who} {user.pw_name}\n"
                                      for who in dict.fromkeys([me, user.pw_name]))}
    for name, text in files.items():
        path = pg / "data" / name
        path.write_text(text)
        os.chown(path, user.pw_uid, user.pw_gid)


def pg_ctl(folder: Path, *args: str) -> subprocess.CompletedProcess:
    pg = folder / "pg"
    return subprocess.run(as_db_user([pg_binary("pg_ctl"), "-D", str(pg / "data"), "-l",
                                      str(pg / "postgres.log"), *args]),
                          capture_output=True, text=True)


def start_postgres(folder: Path) -> None:
    socket_dir = folder / "pg" / "socket"
    proc = pg_ctl(folder, "-w", "-o", f"-c listen_addresses='' -c unix_socket_directories="
                  f"'{socket_dir}' -c unix_socket_permissions=0700", "start")
    if proc.returncode != 0:
        raise ServerError(f"PostgreSQL in {folder / 'pg' / 'data'} did not start; see "
                          f"{folder / 'pg' / 'postgres.log'}")
    import psycopg

    with psycopg.connect(host=str(socket_dir), user=db_user(), dbname="postgres",
                         autocommit=True) as conn:
        for name in DATABASES:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                            (name,)).fetchone() is None:
                conn.execute(f'CREATE DATABASE "{name}"')


def stop_postgres(folder: Path) -> None:
    pg_ctl(folder, "-m", "fast", "-w", "stop")


def secret(path: Path) -> str:
    """A random secret kept in `path` (0600), made the first time."""
    if not path.is_file():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    return path.read_text().strip()


def auth_env(folder: Path) -> dict[str, str]:
    """The environment of MLflow's basic-auth app: DIR/auth.ini (its settings, 0600), the
    admin's password (DIR/admin-password) and Flask's key for CSRF tokens (DIR/flask-key),
    each made once."""
    ini = folder / "auth.ini"
    text = ("[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {backend_uri(folder, 'mlflow_auth')}\n"
            f"admin_username = {ADMIN}\n"
            f"admin_password = {secret(folder / 'admin-password')}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    fd = os.open(ini, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return {"MLFLOW_AUTH_CONFIG_PATH": str(ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secret(folder / "flask-key")}


def mlflow_command(folder: Path, host: str, port: int, auth: bool, workers: int = 2) -> list[str]:
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow) if mlflow.exists() else "mlflow", "server",
           "--backend-store-uri", backend_uri(folder), "--serve-artifacts",
           "--artifacts-destination", str(folder / "artifacts"),
           "--host", host, "--port", str(port), "--workers", str(workers)]
    return cmd + (["--app-name", "basic-auth"] if auth else [])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aebench mlflow-server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", nargs="?", type=Path, default=default_dir(),
                   help="the server's data and login (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs a login)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2,
                   help="web server processes (default 2; MLflow's own default is 4)")
    p.add_argument("--auth", action="store_true",
                   help="require a login on 127.0.0.1 too (always on elsewhere)")
    return p


def stop_group(child: subprocess.Popen) -> None:
    """SIGTERM to the MLflow server's process group, SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, None)):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            break
        try:
            child.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    folder = args.dir.resolve()
    auth = needs_login(args.host, args.auth)
    child = None
    started = False
    signal.signal(signal.SIGTERM, _terminate)
    try:
        outside_git(folder)
        prepare(folder)
        start_postgres(folder)
        started = True
        # MLflow's job runner (eight processes for GenAI scorers) has nothing to do here
        env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
        if auth:
            env.update(auth_env(folder))
        # its own process group: MLflow runs its web server in processes of its own, all stopped
        # together below
        command = mlflow_command(folder, args.host, args.port, auth, args.workers)
        child = subprocess.Popen(command, env=env, start_new_session=True)
        login = f"; login: {ADMIN} / the password in {folder / 'admin-password'}" if auth else ""
        print(f"aebench mlflow-server: http://{args.host}:{args.port} (runs in PostgreSQL, "
              f"artifacts in {folder / 'artifacts'}{login}); Ctrl-C stops it", file=sys.stderr,
              flush=True)
        code = child.wait()
        return 0 if code == 0 else 1
    except ServerError as err:
        print(f"aebench mlflow-server: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if child is not None:
            stop_group(child)
        if started:
            stop_postgres(folder)


if __name__ == "__main__":
    sys.exit(main())
