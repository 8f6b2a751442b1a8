"""What `aebench compare` reads at one revision (a commit, branch, tag, experiment name, or the
workspace), through DVC: every metrics file that dvc.yaml names, and every replica's values
with its seed from the JSON output of the stage that writes those metrics (evaluate's
reports/details.json: committed, cache: false, so a plain clone has it at every commit).

Every value is checked; a bad one is one line naming the revision, the file, the model and the
key (BadInput).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, ValidationError

from . import yaml_bounds
from .metric_files import first_error, problem

WORKSPACE = "workspace"


class BadInput(ValueError):
    """A revision, file or value that cannot be compared; str() is the whole one-line story."""


class Replica(BaseModel):
    model_config = ConfigDict(strict=True)
    seed: StrictInt
    mse: FiniteFloat = Field(ge=0)
    test_loss: FiniteFloat | None = None


class Details(BaseModel):
    model_config = ConfigDict(strict=True)
    loss: str | None = None
    replicas: list[Replica] = Field(min_length=1)


@dataclass(frozen=True)
class Side:
    typed: str                          # as typed: HEAD, main, a tag, an experiment, workspace
    commit: str | None                  # the commit id; None for the workspace
    models: dict[str, dict]             # model -> its metrics entry (checked)
    files: dict[str, str]               # model -> the metrics file it came from
    replicas: dict[str, Details]        # model -> its replicas, where the details file has them
    details: str | None                 # that file's path, None when dvc.yaml names none

    @property
    def label(self) -> str:
        return WORKSPACE if self.commit is None else f"{self.commit[:7]} ({self.typed})"


def load(typed: str, repo: str | None = None) -> Side:
    """The revision `typed` of the DVC repository at `repo` (default: found from here). Raises
    BadInput, or DVC's errors for a bad revision or a repository that is not one."""
    from dvc.repo import Repo  # imported here: it takes a second, and --help should not
    from dvc.scm import resolve_rev

    # Repo.find_root fails with a clear "not inside of a DVC repository"; dvc.api.metrics_show
    # would try to clone the path instead.
    with Repo(Repo.find_root(repo)) as dvc_repo:
        root = Path(dvc_repo.root_dir)
        commit = None if typed == WORKSPACE else resolve_rev(dvc_repo.scm, typed)
        try:  # an alias bomb in a YAML file would take DVC gigabytes: refused first
            yaml_bounds.check_workspace(root)
            if commit:
                yaml_bounds.check_revision(root, commit)
        except yaml_bounds.TooLarge as err:
            raise BadInput(str(err)) from None
        # DVC always reads the workspace too, and fails on a broken workspace file even when
        # both sides are commits: ask for errors per file and keep this revision's only.
        shown = dvc_repo.metrics.show(revs=[commit] if commit else None, on_error="return",
                                      hide_workspace=False)
    label = WORKSPACE if commit is None else f"{commit[:7]} ({typed})"
    # keyed by the revision asked for; the workspace alone comes as "" (or "workspace")
    result = shown.get(commit) if commit else next(iter(shown.values()), None)
    result = result or {"data": {}}
    if "error" in result:
        raise BadInput(f"{label}: {result['error']}")
    models, files = {}, {}
    missing = [p for p, f in result["data"].items()
               if isinstance(f.get("error"), FileNotFoundError)]
    if missing:
        raise BadInput(missing_message(root, commit, label, missing))
    for path, file in result["data"].items():
        if "error" in file:
            err = file["error"]
            raise BadInput(f"{label}: {path}: {err.__cause__ or err}")
        for model, entry in entries(path, file["data"]):
            bad = problem(entry)
            if bad:
                raise BadInput(f"{label}: {path}: model {model}: {bad}")
            models[model], files[model] = entry, path
    if not models and result["data"]:
        raise BadInput(f"{label}: no model metrics in {', '.join(result['data'])}: none has "
                       "an entry of mse mean ± std over n seeds (a revision from before them)")
    if not models:
        raise BadInput(f"{label}: no model metrics in the metrics files of dvc.yaml")
    details = details_path(read_text(root, "dvc.yaml", commit))
    replicas = read_replicas(root, details, commit, label) if details else {}
    # params.yaml's order, which the details file keeps (the metrics folder lists by name)
    order = [m for m in replicas if m in models] + [m for m in models if m not in replicas]
    return Side(typed, commit, {m: models[m] for m in order}, files, replicas, details)


def metrics_paths(dvc_yaml: str | None) -> list[str]:
    """The metrics files and folders a dvc.yaml names (its stages' `metrics:` and top-level)."""
    data = yaml.safe_load(dvc_yaml or "") or {}
    named = [*data.get("metrics", [])] + [m for stage in data.get("stages", {}).values()
                                          for m in stage.get("metrics", [])]
    return [next(iter(m)) if isinstance(m, dict) else str(m) for m in named]


def missing_message(root: Path, commit: str | None, label: str, missing: list[str]) -> str:
    """The metrics files of a revision's dvc.yaml that are not there. Where that revision is
    from another layout (metrics/pca.json and metrics/models.json, before one file per model),
    the line names what today's dvc.yaml reads and the revision lacks, then its own names."""
    from dvc.api import DVCFileSystem

    today = metrics_paths(read_text(root, "dvc.yaml", None))
    if commit is None or sorted(today) == sorted(missing):
        return f"{label}: {missing[0]}: no such file"
    fs = DVCFileSystem(str(root), rev=commit)
    absent = [p for p in today if not fs.exists(p)]
    own = f"its own dvc.yaml (an older layout) names {', '.join(missing)}, not there either"
    if absent:
        return (f"{label}: no metrics at this revision: today's dvc.yaml reads them from "
                f"{', '.join(absent)}, which this revision does not have; {own}")
    return f"{label}: {missing[0]}: no such file ({own}; today's layout reads {', '.join(today)})"


def entries(path: str, data: Any) -> list[tuple[str, Any]]:
    """(model, entry) pairs of one metrics file: `metrics/<model>.json` holds one model; a file
    of several (metrics/models.json before that layout) holds model -> entry, and PCA's old
    file (entries without n) holds none."""
    if isinstance(data, dict) and data and "n" not in data and "mse" not in data \
            and all(isinstance(v, dict) for v in data.values()):
        return [(m, e) for m, e in data.items() if "n" in e]
    return [(PurePosixPath(path).stem, data)]


def read_text(root: Path, path: str, commit: str | None) -> str | None:
    """A file at a commit (through DVC, which also reads git-tracked files) or in the
    workspace; None when it is not there."""
    import dvc.api
    from dvc.exceptions import PathMissingError

    try:
        if commit is None:
            return (root / path).read_text()
        return dvc.api.read(path, repo=str(root), rev=commit, mode="r")
    except (FileNotFoundError, PathMissingError):  # DVC: neither an output nor in git there
        return None


def details_path(dvc_yaml: str | None) -> str | None:
    """The JSON out of the stage that writes the metrics (evaluate's per-replica details)."""
    stages = (yaml.safe_load(dvc_yaml or "") or {}).get("stages", {})
    for stage in stages.values():
        if stage.get("metrics"):
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]
            found = [o for o in outs if str(o).endswith(".json")]
            if len(found) == 1:
                return found[0]
    return None


def read_replicas(root: Path, path: str, commit: str | None, label: str) -> dict[str, Details]:
    """model -> Details from the details file; {} when it is not at this revision."""
    text = read_text(root, path, commit)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(f"{label}: {path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise BadInput(f"{label}: {path}: expected an object of models, got {type(data).__name__}")
    out = {}
    for model, entry in data.items():
        try:
            out[model] = Details.model_validate(entry)
        except ValidationError as err:
            raise BadInput(f"{label}: {path}: model {model}: {first_error(err)}") from None
    return out
