"""Stage download: fetch the four MNIST IDX files into OUT_DIR, decompressed and md5-verified.

Reads params.yaml section `download`. Mirrors: $MNIST_MIRROR first (a folder, file:// or
http(s):// URL), then download.mirrors, in order; download.timeout is the deadline of one file
at one mirror.
"""

import logging
import os
import sys

from aebench import cli, config
from aebench.download import download

USAGE = "python -m stages.download OUT_DIR"


def main(args) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    section = config.section(config.load_params(), "download", config.Download)
    env = os.environ.get("MNIST_MIRROR", "").strip()
    mirrors = [env, *section.mirrors] if env else list(section.mirrors)
    paths = download(args.out_dir, mirrors, timeout=section.timeout)
    print(f"download: {len(paths)} files verified in {args.out_dir}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
