"""aebench.data, aebench.download and the data stages, on small IDX files (no network)."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import logging
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import idx_bytes, make_split, write_idx, write_idx_set

from aebench import cli
from aebench.data import convert, read_idx, read_mnist_csv
from aebench.download import DownloadError, download
from stages import convert as convert_stage
from stages import download as download_stage

DEAD = "http://127.0.0.1:9/"  # the discard port on loopback: closed, so refused at once


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    labels, images = make_split(12)
    assert np.array_equal(read_idx(write_idx(tmp_path / f"img{suffix}", images)), images)
    got = read_idx(write_idx(tmp_path / f"lab{suffix}", labels))
    assert got.dtype == np.uint8 and got.shape == (12,) and np.array_equal(got, labels)


@pytest.mark.parametrize("content", [b"", b"\x00\x00\x07\x03" + bytes(16), b"\x1f\x8b\x08\x00rest"])
def test_read_idx_wrong_magic(tmp_path, content):
    path = tmp_path / "bad-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="wrong magic number") as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("delta", [-1, +1, -784])
def test_read_idx_dims_do_not_match_bytes(tmp_path, delta):
    good = idx_bytes(make_split(5)[1])
    path = tmp_path / "img-idx3-ubyte"
    path.write_bytes(good[:delta] if delta < 0 else good + bytes(delta))
    with pytest.raises(ValueError, match=r"header says 5 x 28 x 28 = 3920 data bytes") as err:
        read_idx(path)
    assert str(path) in str(err.value) and str(3920 + delta) in str(err.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "img-idx3-ubyte"
    path.write_bytes(idx_bytes(make_split(5)[1])[:9])
    with pytest.raises(ValueError, match="truncated header: 3 dimensions need 16 bytes"):
        read_idx(path)


def test_convert_count_mismatch_names_both_files(tmp_path):
    write_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", make_split(19)[0])  # 20 images, 19 labels
    with pytest.raises(ValueError) as err:
        convert(tmp_path, tmp_path / "csv")
    msg = str(err.value)
    assert "t10k-images-idx3-ubyte has 20 images" in msg
    assert "t10k-labels-idx1-ubyte has 19 labels" in msg
    assert not (tmp_path / "csv").exists() or not any((tmp_path / "csv").iterdir())


def test_convert_rejects_wrong_image_size_and_bad_label(tmp_path):
    write_idx_set(tmp_path, gz=False)
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((30, 27, 28), np.uint8))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte: expected ubyte images N x 28"):
        convert(tmp_path, tmp_path / "csv")
    write_idx_set(tmp_path, gz=False)
    labels = make_split(30)[0]
    labels[7] = 12
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    with pytest.raises(ValueError, match=r"label 12 at index 7 is outside 0\.\.9"):
        convert(tmp_path, tmp_path / "csv")


# --------------------------------------------------------------------------- CSV


def test_convert_round_trip(mnist_raw, tmp_path):
    out = convert(mnist_raw, tmp_path / "csv")
    assert sorted(p.name for p in (tmp_path / "csv").iterdir()) == ["mnist_test.csv",
                                                                     "mnist_train.csv"]
    for split, n, seed in (("train", 30, 0), ("test", 20, 1)):
        labels, images = make_split(n, seed)
        df = pd.read_csv(out[split])  # as the seed notebooks read it
        assert df.shape == (n, 785)
        assert list(df.columns[:3]) == ["label", "1x1", "1x2"] and df.columns[-1] == "28x28"
        assert np.array_equal(df.iloc[:, 1:].to_numpy(), images.reshape(n, 784))
        assert np.array_equal(df.iloc[:, 0].to_numpy(), labels)
        got_labels, got_pixels = read_mnist_csv(out[split])
        assert got_labels.dtype == np.uint8 and got_pixels.dtype == np.uint8
        assert got_pixels.shape == (n, 784) and got_pixels.flags["C_CONTIGUOUS"]
        assert np.array_equal(got_labels, labels)
        assert np.array_equal(got_pixels, images.reshape(n, 784))


@pytest.mark.parametrize("limit", [0, 1, 7, 30])
def test_read_mnist_csv_limit(mnist_csv, limit):
    labels, pixels = read_mnist_csv(mnist_csv / "mnist_train.csv", limit=limit)
    want_labels, want_images = make_split(30)
    n = limit
    assert labels.shape == (n,) and pixels.shape == (n, 784)
    assert np.array_equal(pixels, want_images[:n].reshape(n, 784))
    assert np.array_equal(labels, want_labels[:n])


@pytest.mark.parametrize("blank_lines", ["", "\n\n"])
def test_read_mnist_csv_limit_above_the_rows(mnist_csv, blank_lines):
    path = mnist_csv / "mnist_train.csv"
    with open(path, "a") as f:
        f.write(blank_lines)  # skipped, so not rows
    with pytest.raises(ValueError) as err:
        read_mnist_csv(path, limit=31)
    assert str(err.value) == (f"{path}: limit 31 is more than the 30 rows in the file"
                              " (use at most 30)")
    labels, pixels = read_mnist_csv(path, limit=31, short_ok=True)  # all there are
    assert labels.shape == (30,) and np.array_equal(pixels, make_split(30)[1].reshape(30, 784))


@pytest.mark.parametrize("ending", ["\n", "", "\r\n\n\n"])
def test_read_mnist_csv_header_and_no_rows(mnist_csv, ending):
    path = mnist_csv / "mnist_train.csv"
    path.write_text(path.read_text().splitlines()[0] + ending)
    for limit in (None, 5):
        with pytest.raises(ValueError) as err:
            read_mnist_csv(path, limit)
        assert str(err.value) == f"{path}: no data rows after the header"


def _edit(path: Path, line: int, edit) -> None:
    lines = path.read_text().splitlines()
    cells = lines[line - 1].split(",")
    lines[line - 1] = ",".join(edit(cells))
    path.write_text("\n".join(lines) + "\n")


def _set(j, value):
    def edit(cells):
        cells[j] = value
        return cells
    return edit


@pytest.mark.parametrize(("line", "edit", "expected"), [
    (5, lambda c: c[:-1], "784 columns, expected 785"),
    (9, lambda c: [*c, "0"], "786 columns, expected 785"),
    (7, _set(10, "x"), "pixel 10 (column 11) is 'x', not an integer"),
    (7, _set(10, ""), "pixel 10 (column 11) is '', not an integer"),
    (8, _set(3, "1.5"), "pixel 3 (column 4) is '1.5', not an integer"),
    (3, _set(784, "256"), "pixel 784 (column 785) is 256, outside 0..255"),
    (21, _set(1, "-1"), "pixel 1 (column 2) is -1, outside 0..255"),
    (4, _set(0, "10"), r"label (column 1) is 10, outside 0..9"),
    (31, _set(0, "a"), "label (column 1) is 'a', not an integer"),
])
def test_read_mnist_csv_errors_name_file_and_line(mnist_csv, line, edit, expected):
    path = mnist_csv / "mnist_train.csv"
    _edit(path, line, edit)
    with pytest.raises(ValueError) as err:
        read_mnist_csv(path)
    assert str(err.value) == f"{path}: line {line}: {expected}" or (
        str(err.value).startswith(f"{path}: line {line}: ") and expected in str(err.value))
    # A bad row after the first `limit` rows does not matter; one within them does.
    assert read_mnist_csv(path, limit=line - 2)[1].shape == (line - 2, 784)
    with pytest.raises(ValueError, match=f"line {line}: "):
        read_mnist_csv(path, limit=line - 1)


def test_read_mnist_csv_header_checks(tmp_path, mnist_csv):
    text = (mnist_csv / "mnist_test.csv").read_text().splitlines()
    no_header = tmp_path / "no_header.csv"
    no_header.write_text("\n".join(text[1:]) + "\n")
    with pytest.raises(ValueError, match="line 1: expected a header line"):
        read_mnist_csv(no_header)
    short = tmp_path / "short.csv"
    short.write_text("label,a,b\n1,2,3\n")
    with pytest.raises(ValueError, match=r"short.csv: line 1 \(header\): 3 columns, expected 785"):
        read_mnist_csv(short)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv: empty file"):
        read_mnist_csv(empty)


# --------------------------------------------------------------------------- download


@pytest.fixture
def good(tmp_path) -> tuple[Path, dict[str, str]]:
    """A good local mirror: the four NAME.gz files, and their md5 table."""
    return tmp_path / "good", write_idx_set(tmp_path / "good")


def _assert_complete(out: Path, md5s: dict[str, str]) -> None:
    # Exactly the verified, decompressed files: no .gz, no temp folder or file left behind.
    assert sorted(os.listdir(out)) == sorted(md5s)
    for name, md5 in md5s.items():
        assert hashlib.md5((out / name).read_bytes()).hexdigest() == md5


def test_download_from_local_folder_and_file_url(tmp_path, good):
    folder, md5s = good
    paths = download(tmp_path / "a", [str(folder)], files=md5s)
    assert [p.name for p in paths] == list(md5s)
    _assert_complete(tmp_path / "a", md5s)
    download(tmp_path / "b", [folder.as_uri()], files=md5s)
    _assert_complete(tmp_path / "b", md5s)


def test_download_keeps_a_verified_file(tmp_path, good, caplog):
    folder, md5s = good
    download(tmp_path / "out", [str(folder)], files=md5s)
    caplog.set_level(logging.INFO)
    download(tmp_path / "out", [str(tmp_path / "nowhere")], files=md5s)  # no mirror needed
    assert "already present, md5 ok" in caplog.text


def test_download_falls_back_past_corrupt_and_missing(tmp_path, good, caplog):
    folder, md5s = good
    names = list(md5s)
    bad = tmp_path / "bad"
    bad.mkdir()
    # truncated gzip, valid gzip with the wrong content, not gzip at all; the 4th is missing
    (bad / f"{names[0]}.gz").write_bytes((folder / f"{names[0]}.gz").read_bytes()[:-20])
    (bad / f"{names[1]}.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + bytes(8)))
    (bad / f"{names[2]}.gz").write_bytes(b"plain text")
    caplog.set_level(logging.INFO)
    download(tmp_path / "out", [str(bad), str(folder)], files=md5s)
    _assert_complete(tmp_path / "out", md5s)
    log = caplog.text
    assert f"{names[0]}: {bad} failed: bad gzip" in log
    assert f"{names[1]}: {bad} failed: md5 mismatch" in log
    assert f"{names[2]}: {bad} failed: bad gzip (BadGzipFile" in log
    assert f"{names[3]}: {bad} failed: not found: {bad / names[3]}.gz" in log


def test_download_skips_dead_http_mirror(tmp_path, good, caplog):
    folder, md5s = good
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    download(tmp_path / "out", [DEAD, str(folder)], timeout=2, files=md5s)
    assert time.monotonic() - start < 5
    _assert_complete(tmp_path / "out", md5s)
    # tried once for the first file, then skipped for the others
    assert caplog.text.count(f"{DEAD} failed: unreachable") == 1


def test_download_all_mirrors_fail_one_message(tmp_path, good):
    folder, md5s = good
    names = list(md5s)
    wrong = tmp_path / "wrong"
    write_idx_set(wrong, seed=7)  # valid gzip IDX, other content: md5 mismatch
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / f"{names[0]}.gz").write_bytes((folder / f"{names[0]}.gz").read_bytes()[:100])
    mirrors = [str(wrong), DEAD, str(tmp_path / "missing"), truncated.as_uri(),
               str(tmp_path / "empty")]
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as err:
        download(out, mirrors, timeout=2, files=md5s)
    msg = str(err.value)
    assert msg.startswith(f"could not download {names[0]} from any of 5 mirrors:")
    assert f"- {wrong}: md5 mismatch: decompressed content has " in msg
    assert f"- {DEAD}: unreachable (" in msg and "refused" in msg
    missing = tmp_path / "missing"
    assert f"- {missing}: not found: folder {missing} does not exist" in msg
    assert f"- {truncated.as_uri()}: bad gzip" in msg
    assert f"- {tmp_path / 'empty'}: not found: {tmp_path / 'empty' / names[0]}.gz" in msg
    assert os.listdir(out) == []  # nothing partial


def test_download_failure_after_some_files_leaves_only_verified_ones(tmp_path, good):
    folder, md5s = good
    names = list(md5s)
    (folder / f"{names[2]}.gz").unlink()
    with pytest.raises(DownloadError, match=f"could not download {names[2]} from any of 1"):
        download(tmp_path / "out", [str(folder)], files=md5s)
    _assert_complete(tmp_path / "out", {n: md5s[n] for n in names[:2]})


@pytest.fixture
def http_mirror(good):
    """The good mirror served over HTTP on loopback."""
    folder, md5s = good

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", folder, md5s
    server.shutdown()
    server.server_close()


def test_download_over_http_with_404_fallback(tmp_path, http_mirror):
    url, folder, md5s = http_mirror
    names = list(md5s)
    download(tmp_path / "a", [url], files=md5s)
    _assert_complete(tmp_path / "a", md5s)
    (folder / f"{names[0]}.gz").unlink()
    with pytest.raises(DownloadError) as err:
        download(tmp_path / "b", [url + "nope/", url], files=md5s)
    assert f"- {url}nope/: HTTP 404" in str(err.value) and f"- {url}: HTTP 404" in str(err.value)


def test_download_http_timeout(tmp_path, good):
    folder, md5s = good
    # Accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/"
        start = time.monotonic()
        download(tmp_path / "out", [url, str(folder)], timeout=0.5, files=md5s)
        assert time.monotonic() - start < 3
        with pytest.raises(DownloadError, match=r"- http://127.0.0.1:\d+/: timeout after 0.5 s"):
            download(tmp_path / "out2", [url], timeout=0.5, files=md5s)
    _assert_complete(tmp_path / "out", md5s)


@pytest.fixture
def bad_http():
    """A loopback HTTP server that misbehaves by path: /drip/ sends the headers, then one byte
    every 20 ms of a 1 MB body (alive, never done); /slowhead/ drips its status line; /short/
    announces 1 MB, sends 10 bytes and closes. Each response ends by itself within 5 s.
    Yields (url, paths requested, seconds from request to the client hanging up)."""
    requests: list[str] = []
    hung_up: list[float] = []
    stop = threading.Event()

    class Bad(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            begin = time.monotonic()
            end = begin + 5
            try:
                if self.path.startswith("/slowhead/"):
                    for byte in b"HTTP/1.1 200 OK\r\n" * 1000:
                        if stop.is_set() or time.monotonic() > end:
                            return
                        self.wfile.write(bytes([byte]))
                        time.sleep(0.02)
                self.send_response(200)
                self.send_header("Content-Length", "1000000")
                self.end_headers()
                if self.path.startswith("/short/"):
                    self.wfile.write(bytes(10))
                    return
                while not stop.is_set() and time.monotonic() < end:
                    self.wfile.write(b"\x1f")
                    time.sleep(0.02)
            except OSError:  # the client hung up
                hung_up.append(time.monotonic() - begin)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bad)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", requests, hung_up
    stop.set()
    server.shutdown()
    server.server_close()


def _hang_up(bad_http) -> float:
    # The server notices at its next write or two (every 20 ms): wait a little for it.
    for _ in range(50):
        if bad_http[2]:
            return bad_http[2][0]
        time.sleep(0.02)
    raise AssertionError("the client never hung up")


@pytest.mark.parametrize(("path", "received"), [("drip/", r"[1-9][\d,]* of 1,000,000 bytes"),
                                                ("slowhead/", "0 bytes")])
def test_download_abandons_a_dripping_mirror_at_the_deadline(tmp_path, good, bad_http, caplog,
                                                             path, received):
    # Bytes keep coming, so no single read ever times out: only the overall deadline ends it.
    folder, md5s = good
    url = bad_http[0] + path
    caplog.set_level(logging.INFO)
    start = time.monotonic()
    download(tmp_path / "out", [url, str(folder)], timeout=1, files=md5s)
    elapsed = time.monotonic() - start
    assert 1 <= elapsed < 2.5, elapsed  # one attempt, then skipped for the other three files
    assert re.search(rf"{re.escape(url)} failed: timeout after 1 s \({received} received\)",
                     caplog.text), caplog.text
    assert len(bad_http[1]) == 1
    assert _hang_up(bad_http) < 1.5  # the connection was cut, not left to drip on
    _assert_complete(tmp_path / "out", md5s)


def test_download_cut_short_tries_the_next_mirror(tmp_path, good, bad_http, caplog):
    folder, md5s = good
    url = bad_http[0] + "short/"
    caplog.set_level(logging.INFO)
    download(tmp_path / "out", [url, str(folder)], timeout=5, files=md5s)
    assert f"{url} failed: transfer cut short: 10 of 1,000,000 bytes" in caplog.text
    assert len(bad_http[1]) == 4  # a file failure, not a dead mirror: tried for every file
    _assert_complete(tmp_path / "out", md5s)


def test_download_ctrl_c_leaves_no_temp_files(tmp_path, good, bad_http):
    _, md5s = good
    out = tmp_path / "out"
    # Python's own Ctrl-C handler, even where the test runs with SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    # Ctrl-C, as the terminal sends it: SIGINT to the main thread, mid-transfer.
    ctrl_c = threading.Timer(0.5, signal.pthread_kill, (threading.main_thread().ident,
                                                        signal.SIGINT))
    ctrl_c.start()
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            download(out, [bad_http[0] + "drip/"], timeout=30, files=md5s)
    finally:
        ctrl_c.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 3
    assert os.listdir(out) == []
    # The transfer stopped too: the server saw the client hang up right after the Ctrl-C.
    assert 0.4 < _hang_up(bad_http) < 1.5


def test_download_removes_temp_folders_of_a_killed_run(tmp_path, good):
    folder, md5s = good
    stale = tmp_path / "out" / ".train-images-idx3-ubyte.x1y2z3.download"
    stale.mkdir(parents=True)
    (stale / "train-images-idx3-ubyte.gz").write_bytes(b"partial")
    download(tmp_path / "out", [str(folder)], files=md5s)
    _assert_complete(tmp_path / "out", md5s)


# --------------------------------------------------------------------------- stages


def run_stage(stage, argv: list[str]) -> int:
    """A stage run as `python -m` runs it (aebench.cli), in this process; its exit code."""
    with pytest.raises(SystemExit) as exit_:
        cli.run(stage.main, stage.USAGE, argv=argv)
    return exit_.value.code


def test_download_stage_reports_every_mirror(tmp_path, monkeypatch, capsys):
    write_idx_set(tmp_path / "mirror")  # generated data: md5 cannot match the real MNIST
    (tmp_path / "params.yaml").write_text(f"download:\n  mirrors: ['{DEAD}']\n  timeout: 2\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_MIRROR", str(tmp_path / "mirror"))
    assert run_stage(download_stage, ["raw"]) == 1
    err = capsys.readouterr().err
    assert "error: could not download train-images-idx3-ubyte from any of 2 mirrors:" in err
    assert f"- {tmp_path / 'mirror'}: md5 mismatch" in err and f"- {DEAD}: unreachable" in err
    assert "Traceback" not in err and os.listdir("raw") == []


def test_download_stage_bad_params(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("download:\n  mirrors: []\n  timeout: 0\n")
    monkeypatch.chdir(tmp_path)
    assert run_stage(download_stage, ["raw"]) == 1
    assert "error: params.yaml: download.timeout: 0 is not allowed" in capsys.readouterr().err


def test_convert_stage(mnist_raw, tmp_path, capsys):
    assert run_stage(convert_stage, [str(mnist_raw), str(tmp_path / "csv")]) == 0
    assert (tmp_path / "csv" / "mnist_test.csv").is_file()
    write_idx(mnist_raw / "train-labels-idx1-ubyte", make_split(29)[0])
    assert run_stage(convert_stage, [str(mnist_raw), str(tmp_path / "csv2")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "has 30 images but" in err and "Traceback" not in err


def test_convert_stage_without_its_raw_folder_creates_nothing(tmp_path, capsys):
    assert run_stage(convert_stage, [str(tmp_path / "nosuchraw"), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == (f"error: {tmp_path / 'nosuchraw'}: no such folder (it "
                                       "holds the IDX files that `dvc repro download` fetches)\n")
    assert not (tmp_path / "out").exists()


def test_download_mirror_that_is_a_file_says_so(tmp_path, good):
    _, md5s = good
    mirror = tmp_path / "mnist.tar"
    mirror.write_bytes(b"an archive, not the folder of .gz files")
    with pytest.raises(DownloadError) as err:
        download(tmp_path / "out", [str(mirror)], files=md5s)
    assert f"- {mirror}: {mirror} is a file, not a folder (a mirror is the folder that holds " \
           "the four .gz files)" in str(err.value)
