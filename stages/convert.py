"""Stage convert: python -m stages.convert RAW_DIR CSV_DIR

Writes CSV_DIR/mnist_train.csv (60,000 rows) and mnist_test.csv (10,000 rows) from the IDX files
in RAW_DIR: a header, then the label and 784 pixels 0..255 per row. No params.
"""

from __future__ import annotations

import logging
import sys
import time

from aebench.data import convert

log = logging.getLogger("stages.convert")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if len(argv) != 2:
        print("usage: python -m stages.convert RAW_DIR CSV_DIR", file=sys.stderr)
        return 2
    raw_dir, csv_dir = argv
    start = time.monotonic()
    log.info("convert: %s -> %s", raw_dir, csv_dir)
    try:
        paths = convert(raw_dir, csv_dir)
    except (ValueError, OSError) as err:  # malformed IDX, missing file
        print(f"error: {err}", file=sys.stderr)
        return 1
    for path in paths.values():
        log.info("convert: wrote %s (%.1f MB)", path, path.stat().st_size / 1e6)
    log.info("convert: done (%.1f s)", time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
