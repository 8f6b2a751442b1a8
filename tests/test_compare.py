"""`aebench compare` on made-up metrics files in a temporary git + DVC repository."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess

import pytest

from aebench import compare

DVC_YAML = """stages:
  evaluate:
    cmd: echo
    metrics:
      - metrics/models.json:
          cache: false
  pca:
    cmd: echo
    metrics:
      - metrics/pca.json:
          cache: false
"""


def entry(n, **metrics):
    return {k: {"mean": m, "std": s} for k, (m, s) in metrics.items()} | {"n": n}


# A (committed, tag v1) and B (the workspace): one model per verdict.
MODELS_A = {
    "deep3": entry(3, mse=(0.0314, 0.0012), test_loss=(0.1256, 0.004)),  # better
    "shallow128": entry(3, mse=(0.0064, 0.0001)),                           # worse
    "under30": entry(3, mse=(0.0143, 0.0010)),                              # within noise
    "conv16": entry(3, mse=(0.0080, 0.0002)),                               # one run (B: n = 1)
    "fixed": entry(2, mse=(0.0100, 0.0)),                                   # zero std, same
    "gone": entry(3, mse=(0.0200, 0.0010)),                                 # removed
}
MODELS_B = {
    "deep3": entry(3, mse=(0.0250, 0.0010), test_loss=(0.1000, 0.004)),
    "shallow128": entry(3, mse=(0.0080, 0.0001)),
    "under30": entry(3, mse=(0.0145, 0.0010)),
    "conv16": entry(1, mse=(0.0070, 0.0)),
    "fixed": entry(2, mse=(0.0100, 0.0)),
    "new": entry(3, mse=(0.0150, 0.0010)),                                  # added
}
for models in (MODELS_A, MODELS_B):
    for e in models.values():
        e["sse_per_image"] = {k: 784 * v for k, v in e["mse"].items()}
PCA = {"pca3": {"mse": 0.05, "sse_per_image": 39.2}}


def write(root, name, data):
    (root / "metrics" / name).write_text(json.dumps(data))


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


def run(repo, *args):
    """main's exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = compare.main(["compare", *args, "--repo", str(repo)])
    return rc, out.getvalue(), err.getvalue()


def verdicts(markdown):
    """{(model, metric): verdict} from the table."""
    rows = [line.split("|")[1:-1] for line in markdown.splitlines() if line.startswith("| ")]
    return {(r[0].strip(), r[1].strip()): r[-1].strip() for r in rows[1:]}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """Commit `empty` has no models.json; v1 holds MODELS_A; the workspace holds MODELS_B."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("repo")
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    Repo.init(str(root)).close()
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "metrics").mkdir()
    write(root, "pca.json", PCA)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "no models")
    git(root, "tag", "empty")
    write(root, "models.json", MODELS_A)
    git(root, "add", "-A")
    git(root, "commit", "-qm", "A")
    git(root, "tag", "v1")
    write(root, "models.json", MODELS_B)
    write(root, "pca.json", {"pca3": {"mse": 0.04, "sse_per_image": 31.4}})
    return root


@pytest.fixture(scope="module")
def default_run(repo, tmp_path_factory):
    """HEAD vs workspace (the defaults), with --output and --fail-on-worse."""
    output = tmp_path_factory.mktemp("out") / "compare.md"
    return (*run(repo, "--output", str(output), "--fail-on-worse"), output)


def test_each_verdict(default_run):
    rc, out, err, _ = default_run
    v = verdicts(out)
    assert v[("deep3", "mse")] == "better"
    assert v[("deep3", "test_loss")] == "better"
    assert v[("shallow128", "mse")] == "worse"
    assert v[("under30", "mse")] == "within noise"
    assert v[("conv16", "mse")] == "one run"
    assert v[("fixed", "mse")] == "within noise"
    assert v[("gone", "mse")] == "removed"
    assert v[("new", "mse")] == "added"
    assert ("shallow128", "test_loss") not in v  # test_loss equals mse on both sides: no row
    assert err == ""


def test_table_cells(default_run):
    out = default_run[1]
    assert "| model | metric | A: HEAD | B: workspace | change | p | verdict |" in out
    deep3 = next(line for line in out.splitlines() if line.startswith("| deep3 | mse |"))
    assert "0.0314 ± 0.0012 (3)" in deep3 and "0.025 ± 0.001 (3)" in deep3
    assert "-0.0064 (-20.4%)" in deep3
    conv16 = next(line for line in out.splitlines() if line.startswith("| conv16 | mse |"))
    assert "| — | one run |" in conv16  # no p-value with one run
    assert "with n = 2 seeds a change must exceed" in out  # the smallest n with a verdict
    assert "PCA baselines" in out and "changed: pca3" in out


def test_output_file_and_fail_on_worse(default_run):
    rc, out, _, output = default_run
    assert output.read_text() == out
    assert rc == 1  # shallow128 got worse


def test_exit_zero_without_flag_and_explicit_revs(repo):
    rc, out, _ = run(repo, "v1", "workspace")
    assert rc == 0
    assert verdicts(out)[("shallow128", "mse")] == "worse"


def test_same_revision_is_within_noise(repo):
    rc, out, _ = run(repo, "v1", "HEAD", "--fail-on-worse")
    assert rc == 0
    assert set(verdicts(out).values()) == {"within noise"}
    assert "unchanged." in out


def test_bad_revision(repo):
    rc, out, err = run(repo, "no-such-rev")
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and "no-such-rev" in err


def test_not_a_dvc_repository(tmp_path):
    rc, _, err = run(tmp_path)
    assert rc == 2 and "not inside of a DVC repository" in err


def test_missing_metrics_file(repo):
    rc, _, err = run(repo, "empty")
    assert rc == 2
    assert err == "aebench compare: empty: metrics/models.json: no such file\n"


def test_corrupt_workspace_file(repo):
    """Named in the error when the workspace is compared; no matter when two commits are."""
    path = repo / "metrics" / "pca.json"
    saved = path.read_text()
    try:
        path.write_text("{bad")
        rc, _, err = run(repo)
        assert rc == 2 and err.startswith("aebench compare: workspace: metrics/pca.json: Expecting")
        rc, out, _ = run(repo, "v1", "HEAD")
        assert rc == 0 and "| deep3 | mse |" in out
    finally:
        path.write_text(saved)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((1.0, 0.1, 3), (0.5, 0.1, 3), "better"),
        ((1.0, 0.1, 3), (1.5, 0.1, 3), "worse"),
        ((1.0, 0.1, 3), (1.05, 0.1, 3), "within noise"),
        ((1.0, 0.0, 3), (1.0, 0.0, 3), "within noise"),
        ((1.0, 0.0, 3), (0.9, 0.0, 3), "better"),  # zero spread on both sides: deterministic
        ((1.0, 0.1, 1), (0.5, 0.1, 3), "one run"),
    ],
)
def test_verdict(a, b, expected):
    p, word = compare.verdict(a, b)
    assert word == expected
    assert (p is None) == (expected == "one run")


@pytest.mark.parametrize("alpha", [0.05, 0.01])
def test_detectable_is_the_t_quantile_times_sqrt_2_over_n(alpha):
    from scipy import stats

    for n in range(2, 40):
        want = stats.t.ppf(1 - alpha / 2, 2 * n - 2) * (2 / n) ** 0.5
        assert compare.detectable(n, alpha) == pytest.approx(want, rel=1e-12)
