"""MNIST data: read the IDX files, convert them to CSV, read the CSV back.

Plain functions with explicit arguments; the stages in `stages/` only wire params and paths.
Fetching the files is aebench/download.py, so a change there retrains nothing.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from aebench.constants import CSV_NAMES, N_PIXELS, SIDE
from aebench.files import atomic_path, output_group

log = logging.getLogger(__name__)

N_COLUMNS = 1 + N_PIXELS  # label, then 784 pixels

SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
CSV_HEADER = ["label"] + [f"{r}x{c}" for r in range(1, SIDE + 1) for c in range(1, SIDE + 1)]


# --------------------------------------------------------------------------- IDX and convert

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (plain, or gzip if the name ends in .gz) into a numpy array.

    Raises ValueError naming the file for a wrong magic number or a header whose dimensions do
    not match the number of data bytes.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: wrong magic number {data[:4].hex() or '(empty file)'}; an IDX"
                         " file starts with 00 00, a type code (08 = ubyte) and the number of"
                         " dimensions")
    dtype = np.dtype(_IDX_TYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated header: {ndim} dimensions need {header} bytes,"
                         f" the file has {len(data)}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        shape = " x ".join(map(str, dims))
        raise ValueError(f"{path}: header says {shape} = {expected} data bytes, the file has"
                         f" {len(data) - header}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def load_split(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels uint8 [N], images uint8 [N, 28, 28]) of split 'train' or 'test', checked."""
    image_name, label_name = SPLITS[split]
    image_path, label_path = Path(raw_dir) / image_name, Path(raw_dir) / label_name
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(f"{image_path}: expected ubyte images N x {SIDE} x {SIDE}, got"
                         f" {images.dtype} {' x '.join(map(str, images.shape))}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{label_path}: expected 1-d ubyte labels, got {labels.dtype}"
                         f" {' x '.join(map(str, labels.shape))}")
    if len(images) != len(labels):
        raise ValueError(f"{image_path} has {len(images)} images but {label_path} has"
                         f" {len(labels)} labels")
    if labels.size and labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{label_path}: label {labels[bad]} at index {bad} is outside 0..9")
    return labels, images


def convert(raw_dir: str | Path, csv_dir: str | Path) -> dict[str, Path]:
    """Write csv_dir/mnist_train.csv and mnist_test.csv from the four IDX files in raw_dir.

    Header `label,1x1,1x2,...,28x28`, then one row per image: the label and 784 pixels 0..255,
    row-major. Each file is written to a temp name and renamed, so it is complete or absent.
    """
    csv_dir = Path(csv_dir)
    if not Path(raw_dir).is_dir():
        raise FileNotFoundError(f"{raw_dir}: no such folder (it holds the IDX files that `dvc "
                                "repro download` fetches)")
    # Read and check both splits before writing anything (csv_dir is not even created).
    splits = {split: load_split(raw_dir, split) for split in SPLITS}
    with output_group():
        return {split: write_mnist_csv(csv_dir / CSV_NAMES[split], labels, images)
                for split, (labels, images) in splits.items()}


def write_mnist_csv(path: str | Path, labels: np.ndarray, images: np.ndarray) -> Path:
    """Write labels [N] and images [N, 28, 28] or [N, 784] (uint8) as an MNIST CSV, atomically."""
    path = Path(path)
    pixels = np.ascontiguousarray(images, dtype=np.uint8).reshape(len(images), N_PIXELS)
    # pyarrow's C++ CSV writer: ~5x faster than DataFrame.to_csv for 785 integer columns.
    # Columns of the transposed copy are contiguous, so building the table copies little.
    columns = [pa.array(np.asarray(labels, dtype=np.uint8))]
    columns += [pa.array(col) for col in np.ascontiguousarray(pixels.T)]
    table = pa.table(columns, names=CSV_HEADER)
    options = pacsv.WriteOptions(quoting_style="none", quoting_header="none")
    with atomic_path(path) as tmp:
        pacsv.write_csv(table, tmp, options)
    return path


# --------------------------------------------------------------------------- CSV reading


def read_mnist_csv(path: str | Path, limit: int | None = None, *,
                   short_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read an MNIST CSV (header line, then `label,p1..p784` per row) written by `convert`.

    Returns (labels uint8 [N], pixels uint8 [N, 784]); `limit` keeps the first N rows only.
    Raises ValueError naming the file and the 1-based line (header = line 1) of the first bad
    row: wrong number of columns, a non-numeric cell, a pixel outside 0..255, a label outside 0..9;
    also for a file with no data rows, and for a `limit` above the number of rows unless
    `short_ok` (then all the rows there are).
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"read_mnist_csv: limit must be >= 0 or None, got {limit}")
    _check_header(path)
    try:
        labels, pixels = _read_fast(path, limit)
    except ValueError as err:  # pa.ArrowInvalid is a ValueError too
        # The fast parser's messages carry no reliable line number (it parses blocks in
        # parallel), so scan slowly once to name the exact line; if the scan finds nothing,
        # fall back to the parser's own message.
        _scan_for_error(path, limit)
        raise ValueError(f"{path}: {err}" if str(path) not in str(err) else str(err)) from None
    if labels.size and labels.max() > 9:
        _scan_for_error(path, limit)
        raise ValueError(f"{path}: label {labels.max()} outside 0..9")
    if limit is not None and len(labels) < limit and not short_ok:  # asked for more than there is
        raise ValueError(f"{path}: limit {limit} is more than the {len(labels)} rows in the file"
                         f" (use at most {len(labels)})")
    return labels, pixels


def _check_header(path: Path) -> None:
    with open(path, newline="") as f:
        header = f.readline()
        has_rows = any(line.strip() for line in f)  # stops at the first data row
    if not header.strip():
        raise ValueError(f"{path}: empty file, expected a header line")
    names = next(csv.reader([header]))
    if len(names) != N_COLUMNS:
        raise ValueError(f"{path}: line 1 (header): {len(names)} columns, expected {N_COLUMNS}"
                         " (label, then 784 pixels)")
    if all(_is_int(n) for n in names):
        raise ValueError(f"{path}: line 1: expected a header line (label,1x1,...), got numbers")
    if not has_rows:
        raise ValueError(f"{path}: no data rows after the header")


def _read_fast(path: Path, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    # Our own column names (the header's may repeat or be anything); uint8 makes the parser
    # itself reject -1, 256, 1.5, '' and text, so a clean parse needs no range check on pixels.
    cols = [f"c{i}" for i in range(N_COLUMNS)]
    read = pacsv.ReadOptions(column_names=cols, skip_rows=1)
    types = pacsv.ConvertOptions(column_types={c: pa.uint8() for c in cols}, null_values=[],
                                 strings_can_be_null=False)
    if limit is None:
        table = pacsv.read_csv(path, read_options=read, convert_options=types)
    else:
        table = _read_first_rows(path, limit, read, types)

    # Stacking the columns and transposing once is ~5x faster than filling [:, j] column by
    # column (contiguous writes); .T.copy() gives the C-contiguous [N, 784] callers expect.
    pixels = np.stack([table.column(j).to_numpy() for j in range(1, N_COLUMNS)]).T.copy()
    labels = np.ascontiguousarray(table.column(0).to_numpy(), dtype=np.uint8)
    return labels, pixels


def _read_first_rows(path: Path, limit: int, read: pacsv.ReadOptions,
                     types: pacsv.ConvertOptions) -> pa.Table:
    # Hand the parser only the header and the first `limit` non-blank lines, so that a small
    # `limit` reads a small part of the file and a bad row after them is not our concern.
    with open(path, "rb") as f:
        lines = (line for line in f if line.strip())
        head = b"".join(itertools.islice(lines, limit + 1))
    return pacsv.read_csv(io.BytesIO(head), read_options=read, convert_options=types)


def _is_int(cell: str) -> bool:
    try:
        int(cell)
    except ValueError:
        return False
    return True


def _scan_for_error(path: Path, limit: int | None) -> None:
    """Slow line-by-line check; raises ValueError at the first bad line, else returns."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader, None)  # header, checked by the fast path
        rows = 0
        for row in reader:
            line = reader.line_num
            if not row:  # blank lines are skipped by both parsers
                continue
            if limit is not None and rows >= limit:
                return
            rows += 1
            if len(row) != N_COLUMNS:
                raise ValueError(f"{path}: line {line}: {len(row)} columns, expected {N_COLUMNS}"
                                 " (label, then 784 pixels)")
            for j, cell in enumerate(row):
                what = "label" if j == 0 else f"pixel {j}"
                try:
                    value = int(cell)
                except ValueError:
                    raise ValueError(f"{path}: line {line}: {what} (column {j + 1}) is {cell!r},"
                                     " not an integer") from None
                hi = 9 if j == 0 else 255
                if not 0 <= value <= hi:
                    raise ValueError(f"{path}: line {line}: {what} (column {j + 1}) is {value},"
                                     f" outside 0..{hi}")
