"""dvc.yaml's code deps are exactly what each stage's script imports.

A module a stage imports but does not list lets a change to it go unnoticed by `dvc repro`; a
module listed but not imported reruns the stage (retrains every model) for nothing. The imports
are read with `ast`, transitively through aebench; a package (aebench/kinds) is one folder dep.
"""

import ast
import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("aebench", "stages")  # the code DVC tracks; anything else is a library
# Imported by stages, deliberately not deps: they shape no output (argument parsing and error
# lines; MLflow records), so changing them must not rerun the pipeline.
EXCEPTIONS = {"aebench/cli.py", "aebench/tracking"}
REPORTING = {"aebench/metrics.py", "aebench/metric_files.py", "aebench/figures.py",
             "aebench/parallel.py", "aebench/drawing.py", "aebench/mosaics.py", "aebench/charts.py",
             "aebench/report.py", "aebench/stats.py", "aebench/changes.py", "aebench/compare.py",
             "aebench/revisions.py",
             "aebench/review.py", "aebench/review_report.py", "aebench/reproduction.py",
             "aebench/forged.py", "aebench/yaml_bounds.py", "aebench/tracking"}


def load_stages() -> dict[str, dict]:
    """Each stage of dvc.yaml by name; a foreach stage by its `do` template."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


STAGES = load_stages()


def dep_of(module: str) -> str | None:
    """The dvc dep that holds `module` (aebench.kinds.base -> aebench/kinds; aebench.config ->
    aebench/config.py), or None for a module outside PACKAGES, a package's own __init__ (see
    test_package_inits_hold_no_code), or a name that is not a module."""
    parts = module.split(".")
    if parts[0] not in PACKAGES or len(parts) == 1:
        return None
    path = ROOT / parts[0] / parts[1]
    if path.is_dir():
        return f"{parts[0]}/{parts[1]}"
    if path.with_suffix(".py").is_file():
        return f"{parts[0]}/{parts[1]}.py"
    return None


def files_of(dep: str) -> list[Path]:
    path = ROOT / dep
    return sorted(path.rglob("*.py")) if path.is_dir() else [path]


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it (a function-level import counts too), with
    relative imports resolved; for `from m import n`, both m and m.n (n may be a module)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def code_deps_needed(script: str) -> set[str]:
    """The script and every aebench/stages file or folder it reaches through imports, not
    through an EXCEPTION (what MLflow records imports shapes no output either: tracking
    builds a logged model with aebench/kinds to load it back)."""
    needed, todo = {script}, [script]
    while todo:
        for path in files_of(todo.pop()):
            for module in imported_modules(path):
                dep = dep_of(module)
                if dep and dep not in needed:
                    needed.add(dep)
                    if dep not in EXCEPTIONS:
                        todo.append(dep)
    return needed


def script_of(stage: dict) -> str:
    match = re.search(r"python -m aebench\.warm stages\.(\w+)", stage["cmd"])
    assert match, f"dvc.yaml: cmd {stage['cmd']!r} does not run a stages/ module"
    return f"stages/{match.group(1)}.py"


def code_deps_listed(stage: dict) -> set[str]:
    deps = [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]
    return {d.rstrip("/") for d in deps if d.split("/")[0] in PACKAGES}


def problems(name: str, stage: dict) -> list[str]:
    needed = code_deps_needed(script_of(stage)) - EXCEPTIONS
    listed = code_deps_listed(stage)
    out = []
    if needed - listed:
        out.append(f"dvc.yaml: stages.{name}.deps: missing {sorted(needed - listed)} (imported)")
    if listed - needed:
        out.append(f"dvc.yaml: stages.{name}.deps: {sorted(listed - needed)} not imported")
    return out


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_exactly_the_imports(name):
    found = problems(name, STAGES[name])
    assert not found, "\n".join(found)


def test_the_check_catches_a_missing_and_a_needless_dep():
    stage = copy.deepcopy(STAGES["train"])
    stage["deps"].remove("aebench/losses.py")  # imported only through aebench/kinds
    stage["deps"].append("aebench/metrics.py")
    assert problems("train", stage) == [
        "dvc.yaml: stages.train.deps: missing ['aebench/losses.py'] (imported)",
        "dvc.yaml: stages.train.deps: ['aebench/metrics.py'] not imported",
    ]


def test_the_exceptions_are_still_imported_somewhere():
    imported = set().union(*(code_deps_needed(script_of(s)) for s in STAGES.values()))
    assert EXCEPTIONS <= imported  # else the exception is stale: drop it from EXCEPTIONS


def test_package_inits_hold_no_code():
    # Importing aebench.x runs aebench/__init__.py, yet no stage lists it: fine while it is
    # empty (or a docstring).
    for package in PACKAGES:
        body = ast.parse((ROOT / package / "__init__.py").read_text()).body
        code = [n for n in body if not (isinstance(n, ast.Expr)
                                        and isinstance(n.value, ast.Constant))]
        assert code == [], f"{package}/__init__.py has code: list it in dvc.yaml's deps"


def test_training_does_not_depend_on_evaluation_or_reporting_code():
    train = [n for n, s in STAGES.items() if script_of(s) == "stages/train.py"]
    assert train == ["train"]
    assert not code_deps_listed(STAGES["train"]) & REPORTING


def test_pca_reads_no_params():
    assert "params" not in STAGES["pca"]


def test_training_params_are_every_train_key_but_workers():
    # workers changes how fast replicas train, never their bytes (tests/test_workers.py), so
    # changing it must not make every train stage stale; every other key shapes the weights.
    from aebench.config import Train

    listed = {p for p in STAGES["train"]["params"] if p.startswith("train")}
    assert listed == {f"train.{key}" for key in Train.model_fields if key != "workers"}


def test_the_warm_server_warms_up_what_the_stages_use():
    """aebench.warm's preload warms torch's compiler up only where a stage imports
    aebench.training, and MLflow only where one imports aebench.tracking: the pipeline's stages
    import both, so that their server does both."""
    found = set().union(*(imported_modules(p) for p in (ROOT / "stages").glob("*.py")))
    assert {"aebench.training", "aebench.tracking"} <= found
