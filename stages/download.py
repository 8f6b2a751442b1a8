"""Stage download: python -m stages.download OUT_DIR

Fetches the four MNIST IDX files into OUT_DIR (decompressed, md5-verified). Mirrors: $MNIST_MIRROR
first (a folder, file:// or http(s):// URL), then params.yaml download.mirrors, in order.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from aebench.config import ConfigError, load_params
from aebench.download import DownloadError, download

log = logging.getLogger("stages.download")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if len(argv) != 1:
        print("usage: python -m stages.download OUT_DIR", file=sys.stderr)
        return 2
    out_dir = argv[0]
    start = time.monotonic()
    try:
        section = load_params()["download"]
        mirrors, timeout = _check(section)
        env = os.environ.get("MNIST_MIRROR", "").strip()
        if env:
            mirrors = [env, *mirrors]
        log.info("download: %s <- %s (timeout %g s)", out_dir, ", ".join(mirrors), timeout)
        paths = download(out_dir, mirrors, timeout=timeout)
    except (ConfigError, DownloadError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    log.info("download: %d files verified in %s (%.1f s)", len(paths), out_dir,
             time.monotonic() - start)
    return 0


def _check(section: object) -> tuple[list[str], float]:
    where = "params.yaml: download"
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping with keys mirrors, timeout")
    mirrors, timeout = section.get("mirrors"), section.get("timeout")
    if not isinstance(mirrors, list) or not all(isinstance(m, str) and m for m in mirrors):
        raise ConfigError(f"{where}.mirrors: {mirrors!r} is not allowed; must be a list of URLs")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"{where}.timeout: {timeout!r} is not allowed; must be seconds > 0")
    return mirrors, float(timeout)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
