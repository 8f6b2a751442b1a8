"""evaluate's DVC metrics: one folder holding one JSON file per model, `<folder>/<model>.json`.

Every file has the same keys, so `dvc metrics show` prints one row per model: `mse`,
`sse_per_image` and `test_loss` as {mean, std} over the replicas (test_loss left out where the
source's loss is the mse itself), `n`, and `pca_mse` (PCA's test MSE at the model's latent
size; left out at k >= 784, where PCA is exact). The folder is replaced whole, so a model
removed from params.yaml loses its file and a reader never sees half of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, StrictInt, ValidationError

from .constants import N_PIXELS
from .files import atomic_dir, read_json, write_json

SUFFIX = ".json"


def entry(headline: dict[str, Any], pca: dict[str, float]) -> dict[str, Any]:
    """The file of one model: metrics.headline()'s dict, plus PCA's mse at its latent size
    (`pca` as pca.pca_at gives it) where PCA is not exact."""
    return {**headline, **({"pca_mse": pca["mse"]} if pca["k"] < N_PIXELS else {})}


def write(folder: str | Path, headline: dict[str, dict], pca: dict[str, dict]) -> None:
    """Replace `folder`, atomically, by one file per model of `headline` (name ->
    metrics.headline()), each with PCA's mse at the model's size (name -> pca.pca_at())."""
    with atomic_dir(folder) as tmp:
        for name, head in headline.items():
            write_json(tmp / f"{name}{SUFFIX}", entry(head, pca[name]))


def read(folder: str | Path, names) -> dict[str, dict[str, Any]]:
    """{name: its file} for `names`, in that order; a missing file is one line naming it."""
    return {name: read_json(Path(folder) / f"{name}{SUFFIX}") for name in names}


# What a valid file holds, for readers of files that may have been edited (aebench compare).
class Stat(BaseModel):
    model_config = ConfigDict(strict=True)
    mean: FiniteFloat
    std: FiniteFloat = Field(ge=0)


class Entry(BaseModel):
    """One model's file: finite numbers, std >= 0, n a positive integer (other keys are
    ignored, so an older reader still reads a newer file)."""
    model_config = ConfigDict(strict=True)
    mse: Stat
    sse_per_image: Stat
    test_loss: Stat | None = None
    n: StrictInt = Field(gt=0)
    pca_mse: FiniteFloat | None = Field(default=None, ge=0)


def problem(data: Any) -> str | None:
    """None for a valid file, else one phrase naming the first bad key and its value."""
    try:
        Entry.model_validate(data)
    except ValidationError as err:
        return first_error(err)
    return None


def first_error(err: ValidationError) -> str:
    """`key.sub: what is wrong (got VALUE)` of pydantic's first complaint."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the file)"
    got = "" if first["type"] == "missing" else f" (got {first.get('input')!r})"
    return f"{where}: {first['msg'].lower()}{got}"
