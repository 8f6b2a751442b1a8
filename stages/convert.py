"""Stage convert: the IDX files in RAW_DIR as CSV_DIR/mnist_train.csv (60,000 rows) and
mnist_test.csv (10,000 rows): a header, then the label and 784 pixels 0..255 per row. No params.
"""

import sys

from aebench import cli
from aebench.data import convert

USAGE = "python -m stages.convert RAW_DIR CSV_DIR"


def main(args) -> None:
    for path in convert(args.raw_dir, args.csv_dir).values():
        print(f"convert: wrote {path} ({path.stat().st_size / 1e6:.1f} MB)", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, USAGE, __doc__)
