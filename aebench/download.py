"""Fetching the four MNIST IDX files from a list of mirrors, verified by md5.

`download` stores the files DECOMPRESSED (plain IDX, as torchvision's MNIST does): their md5 is
then the well-known one whatever mirror served them, so `data/raw` hashes the same in DVC for an
upstream .gz and for a recompressed copy, and `convert` does not rerun on a mirror change.
Standard library only (urllib, gzip, hashlib) plus tqdm for the progress bar: importing
torchvision for its download helpers would cost 4-9 s of torch import on a small machine.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# The four files and the md5 of their decompressed content (shared/data/mnist/README.md).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

_CHUNK = 1 << 16
_TMP_SUFFIX = ".download"  # of the temp folders beside the targets, so stale ones can be found


class DownloadError(RuntimeError):
    """No mirror delivered a file; the message names every mirror tried and why it failed."""


class _MirrorDown(Exception):
    """The mirror as a whole is unusable (unreachable, missing folder): skip it for later files."""


class _FileFailed(Exception):
    """This file failed at this mirror (not found, HTTP error, bad gzip, md5 mismatch)."""


def download(out_dir: str | Path, mirrors: Iterable[str], timeout: float = 10.0,
             files: Mapping[str, str] = MNIST_FILES) -> list[Path]:
    """Fetch every `files` name (NAME.gz at a mirror), decompress, verify by md5, store in out_dir.

    Mirrors are tried in order per file: a local folder, a file:// URL or an http(s):// URL.
    `timeout` is one deadline, in seconds, for a whole attempt at one file from one http(s)
    mirror: connecting, redirects and every read; a mirror that misses it is skipped for the
    remaining files too. `files` maps a name to the md5 of its decompressed content. A file
    already in out_dir with the right md5 is kept. Files appear in out_dir only complete and
    verified (temp + rename); temp folders are removed on any failure and on Ctrl-C.
    Raises DownloadError, naming every mirror tried and why, when a file fails at all of them.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    mirrors = list(dict.fromkeys(m for m in mirrors if m))  # in order, each once
    if not mirrors:
        raise DownloadError("no mirror given (set MNIST_MIRROR or download.mirrors in params.yaml)")
    down: dict[str, str] = {}  # mirror -> why; a dead mirror costs its timeout once, not per file
    paths = []
    for name, md5 in files.items():
        target = out_dir / name
        if _md5(target) == md5:
            log.info("%s: already present, md5 ok", target)
            paths.append(target)
            continue
        failures = []
        for mirror in mirrors:
            if mirror in down:
                failures.append((mirror, f"skipped, failed earlier: {down[mirror]}"))
                continue
            start = time.monotonic()
            try:
                _fetch_one(mirror, name, md5, target, timeout)
            except _MirrorDown as err:
                down[mirror] = str(err)
                failures.append((mirror, str(err)))
            except _FileFailed as err:
                failures.append((mirror, str(err)))
            else:
                log.info("%s: from %s, md5 ok (%.1f s)", name, mirror, time.monotonic() - start)
                paths.append(target)
                break
            log.warning("%s: %s failed: %s; trying the next mirror", name, mirror, failures[-1][1])
        else:
            lines = "\n".join(f"  - {m}: {why}" for m, why in failures)
            raise DownloadError(f"could not download {name} from any of {len(mirrors)} mirrors:"
                                f"\n{lines}")
    return paths


def _fetch_one(mirror: str, name: str, md5: str, target: Path, timeout: float) -> None:
    # Work in a private temp folder beside the target (same filesystem, so os.replace is atomic);
    # it is removed whatever happens, Ctrl-C included, so nothing partial is left in out_dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=target.parent))
    try:
        gz = tmp / f"{name}.gz"
        _get_gz(mirror, f"{name}.gz", gz, timeout)
        raw = tmp / name
        try:
            with gzip.open(gz, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise _FileFailed(f"bad gzip ({type(err).__name__}: {err or 'truncated'})") from None
        got = _md5(raw)
        if got != md5:
            raise _FileFailed(f"md5 mismatch: decompressed content has {got}, expected {md5}")
        os.replace(raw, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _md5(path: Path) -> str | None:
    """The md5 of a file's content, or None when there is no such file."""
    if not path.is_file():
        return None
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_stale_temps(out_dir: Path) -> None:
    # A run killed outright (SIGKILL, power loss) cannot clean up after itself; the next one does.
    for stale in out_dir.glob(f".*{_TMP_SUFFIX}"):
        shutil.rmtree(stale, ignore_errors=True)


def _get_gz(mirror: str, filename: str, dest: Path, timeout: float) -> None:
    """Copy or download mirror/filename to dest; raise _MirrorDown or _FileFailed saying why."""
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https"):
        _http_get(mirror.rstrip("/") + "/" + filename, dest, timeout)
        return
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(mirror).path))
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise _MirrorDown(f"unsupported URL scheme {scheme!r} (use a folder, file:// or http(s)://)")
    else:
        folder = Path(mirror).expanduser()
    if folder.exists() and not folder.is_dir():
        raise _MirrorDown(f"{folder} is a file, not a folder (a mirror is the folder that holds "
                          "the four .gz files)")
    if not folder.is_dir():
        raise _MirrorDown(f"not found: folder {folder} does not exist")
    source = folder / filename
    if not source.is_file():
        raise _FileFailed(f"not found: {source}")
    try:
        shutil.copyfile(source, dest)
    except OSError as err:  # unreadable source; a full disk on our side fails the same way
        raise _FileFailed(f"cannot copy {source}: {err.strerror or err}") from None


# --------------------------------------------------------------------------- HTTP, one deadline
#
# A socket timeout bounds each read, not the whole transfer: a server that drips a byte a second
# would hold a download forever. So the transfer runs in a worker thread and this thread waits
# for it until the deadline; then it shuts the worker's sockets down, which ends any read at once.
# A worker stuck in a DNS lookup (no timeout there) is abandoned: it is a daemon thread and can
# no longer write anything, because its temp folder is gone.


class _Attempt:
    """One HTTP download: its deadline, its sockets (so they can be cut), bytes received."""

    def __init__(self, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        self.received = 0
        self.total: int | None = None  # Content-Length, when the server sends it
        self.cut = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    def remaining(self) -> float:
        return max(self.deadline - time.monotonic(), 0.001)  # 0 would make a socket non-blocking

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.cut:  # connected after the deadline
                _shut(sock)

    def cut_off(self) -> None:
        with self._lock:
            self.cut = True
            for sock in self._sockets:
                _shut(sock)


def _shut(sock: socket.socket) -> None:
    # socket.socket's own shutdown, also for an SSL socket: it wakes a read blocked in another
    # thread (it returns EOF), where close() would not; the SSL layer is not touched mid-read.
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed by the worker
        pass


def _opener(attempt: _Attempt) -> urllib.request.OpenerDirector:
    """urllib's usual opener (proxies, redirects), whose connections report to `attempt`."""

    class Bounded:
        def connect(self):  # every connection, redirects too: time left, then register
            self.timeout = attempt.remaining()
            super().connect()
            attempt.add(self.sock)

    class HTTP(Bounded, http.client.HTTPConnection):
        pass

    class HTTPS(Bounded, http.client.HTTPSConnection):
        pass

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(HTTP, req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(HTTPS, req)

    return urllib.request.build_opener(HTTPHandler, HTTPSHandler)


def _transfer(url: str, dest: Path, attempt: _Attempt) -> None:
    """Worker: GET url into dest with a progress bar. Raises what urllib or the socket raise."""
    from tqdm import tqdm

    with _opener(attempt).open(url, timeout=attempt.remaining()) as response:
        length = response.headers.get("Content-Length")
        attempt.total = int(length) if length and length.isdigit() else None
        with open(dest, "wb") as out, tqdm(total=attempt.total, unit="B", unit_scale=True,
                                           unit_divisor=1024, desc=dest.name) as bar:
            # read1: at most one read from the socket per call, so a cut socket ends the loop
            while chunk := response.read1(_CHUNK):
                out.write(chunk)
                attempt.received += len(chunk)
                bar.update(len(chunk))


def _http_get(url: str, dest: Path, timeout: float) -> None:
    attempt = _Attempt(timeout)
    errors: list[BaseException] = []
    done = threading.Event()  # not Thread.join: a join cut by Ctrl-C marks a live thread stopped

    def work() -> None:
        try:
            _transfer(url, dest, attempt)
        except BaseException as err:  # reported by the waiting thread, not printed by threading
            errors.append(err)
        finally:
            done.set()

    threading.Thread(target=work, name=f"download {url}", daemon=True).start()
    try:
        done.wait(attempt.remaining())
    finally:  # the deadline, or Ctrl-C here: stop the worker before the temp folder is removed
        if not done.is_set():
            attempt.cut_off()
            done.wait(1.0)
    if attempt.cut or (errors and _is_timeout(errors[0])):
        got = (f"{attempt.received:,} of {attempt.total:,} bytes" if attempt.total is not None
               else f"{attempt.received:,} bytes")
        raise _MirrorDown(f"timeout after {timeout:g} s ({got} received)")
    if errors:
        _raise_failure(url, errors[0])
    if attempt.total is not None and attempt.received != attempt.total:
        raise _FileFailed(f"transfer cut short: {attempt.received:,} of {attempt.total:,} bytes")


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, TimeoutError) or (
        isinstance(err, urllib.error.URLError) and isinstance(err.reason, TimeoutError))


def _raise_failure(url: str, err: BaseException) -> None:
    if isinstance(err, urllib.error.HTTPError):
        raise _FileFailed(f"HTTP {err.code} {err.reason} for {url}") from None
    if isinstance(err, urllib.error.URLError):
        raise _MirrorDown(f"unreachable ({err.reason})") from None
    if isinstance(err, (OSError, http.client.HTTPException)):  # reset or cut short mid-body
        raise _FileFailed(f"transfer failed ({type(err).__name__}: {err})") from None
    raise err  # a bug, not a mirror's fault: let it show
