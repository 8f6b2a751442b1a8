"""Fetching the four MNIST IDX files from a list of mirrors, verified by md5.

`download` stores the files DECOMPRESSED (plain IDX, as torchvision's MNIST does): their md5 is
then the well-known one whatever mirror served them, so `data/raw` hashes the same in DVC for an
upstream .gz and for a recompressed copy, and `convert` does not rerun on a mirror change.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

log = logging.getLogger(__name__)

# The four files and the md5 of their decompressed content (shared/data/mnist/README.md).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

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
    `files` maps a name to the md5 of its decompressed content. A file already in out_dir with
    the right md5 is kept. Files appear in out_dir only complete and verified (temp + rename).
    Raises DownloadError, naming every mirror tried and why, when a file fails at all of them.
    """
    # torchvision is imported here, not at module level: importing it (and torch) takes 4-9 s
    # on a small machine, which convert and read_mnist_csv callers should not pay.
    from torchvision.datasets.utils import check_integrity

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mirrors = list(dict.fromkeys(m for m in mirrors if m))  # in order, each once
    if not mirrors:
        raise DownloadError("no mirror given (set MNIST_MIRROR or download.mirrors in params.yaml)")
    down: dict[str, str] = {}  # mirror -> why; a dead mirror costs its timeout once, not per file
    paths = []
    for name, md5 in files.items():
        target = out_dir / name
        if check_integrity(target, md5):
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
    from torchvision.datasets.utils import _decompress, calculate_md5  # lazy: see download()

    # Work in a private temp folder beside the target (same filesystem, so os.replace is atomic);
    # it is removed whatever happens, so nothing partial is ever left in out_dir.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        gz = tmp / f"{name}.gz"
        _get_gz(mirror, f"{name}.gz", gz, timeout)
        raw = tmp / name
        try:
            _decompress(str(gz), str(raw))
        except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
            raise _FileFailed(f"bad gzip ({type(err).__name__}: {err or 'truncated'})") from None
        got = calculate_md5(raw)
        if got != md5:
            raise _FileFailed(f"md5 mismatch: decompressed content has {got}, expected {md5}")
        os.replace(raw, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _get_gz(mirror: str, filename: str, dest: Path, timeout: float) -> None:
    """Copy or download mirror/filename to dest; raise _MirrorDown or _FileFailed saying why."""
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https"):
        from torchvision.datasets.utils import _urlretrieve  # lazy: see download()

        url = mirror.rstrip("/") + "/" + filename
        try:
            with _socket_timeout(timeout):
                # torchvision's fetcher: urllib (follows redirects) with a tqdm progress bar
                _urlretrieve(url, dest)
        except urllib.error.HTTPError as err:
            raise _FileFailed(f"HTTP {err.code} {err.reason} for {url}") from None
        except TimeoutError:  # socket.timeout is an alias since Python 3.10
            raise _MirrorDown(f"timeout after {timeout:g} s") from None
        except urllib.error.URLError as err:
            reason = err.reason
            if isinstance(reason, TimeoutError):
                raise _MirrorDown(f"timeout after {timeout:g} s") from None
            raise _MirrorDown(f"unreachable ({reason})") from None
        except (OSError, http.client.HTTPException) as err:  # reset or cut short mid-body
            raise _FileFailed(f"transfer failed ({type(err).__name__}: {err})") from None
        return
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(mirror).path))
    elif scheme and len(scheme) > 1:  # one letter is a Windows drive, not a scheme
        raise _MirrorDown(f"unsupported URL scheme {scheme!r} (use a folder, file:// or http(s)://)")
    else:
        folder = Path(mirror).expanduser()
    if not folder.is_dir():
        raise _MirrorDown(f"not found: folder {folder} does not exist")
    source = folder / filename
    if not source.is_file():
        raise _FileFailed(f"not found: {source}")
    try:
        shutil.copyfile(source, dest)
    except OSError as err:  # unreadable source; a full disk on our side fails the same way
        raise _FileFailed(f"cannot copy {source}: {err.strerror or err}") from None


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torchvision's _urlretrieve takes no timeout; the socket default bounds connect and each read.
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


