"""Refuse a YAML alias bomb before DVC reads it.

A few lines of anchors and aliases (`a: &a [x, x]`, `b: &b [*a, *a]`, ... nine levels deep)
describe a document of billions of nodes. DVC parses params.yaml, dvc.yaml and dvc.lock before
any of this project's code runs and then walks what it parsed: `dvc status` and `dvc repro`
grow to gigabytes on such a file. Here the file is only composed (PyYAML's composer keeps one
node per anchor, so this costs what the text costs) and its size after alias expansion is
counted on that node graph, each anchored subtree once (memo), without building it.

`aebench review` and `aebench compare` check every revision they read; `make repro` runs
`python -m aebench.yaml_bounds` (the working copy) before `dvc repro`. A bare `dvc repro` or
`dvc status` cannot be guarded: DVC has no hook that runs before it parses (docs/faults.md).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path, PurePosixPath

import yaml

MAX_NODES = 1_000_000  # the committed dvc.lock is ~6,000 nodes, params.yaml ~300
SUFFIXES = (".yaml", ".yml", ".dvc")  # dvc.yaml (any folder), params files, .dvc files
NAMES = ("dvc.lock",)


class TooLarge(ValueError):
    """A YAML file DVC would read that expands past MAX_NODES, or one that cannot be composed;
    str() is one line naming the file."""


def expanded_nodes(text: str, limit: int = MAX_NODES) -> int:
    """How many nodes `text` has once every alias is replaced by what it names; counting stops
    at the first total above `limit` (which is then returned). Raises yaml.YAMLError for text
    that is not YAML, and ValueError for an alias that contains itself (infinite)."""
    sizes: dict[int, int] = {}
    total = 0
    for root in yaml.compose_all(text, Loader=yaml.SafeLoader):
        if root is not None:
            total += _size(root, sizes, limit)
            if total > limit:
                break
    return total


def _size(root: yaml.Node, sizes: dict[int, int], limit: int) -> int:
    """Nodes in the expansion of `root` (capped just above `limit`), without recursion: a
    nesting deep enough to matter must not overflow Python's stack here."""
    stack, open_ = [(root, False)], set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if key in sizes:
            continue
        kids = _children(node)
        if done:
            open_.discard(key)
            sizes[key] = min(1 + sum(sizes[id(k)] for k in kids), limit + 1)
            continue
        if key in open_:
            raise ValueError("an alias that contains itself (infinite when expanded)")
        open_.add(key)
        stack.append((node, True))
        for kid in kids:
            if id(kid) in open_:
                raise ValueError("an alias that contains itself (infinite when expanded)")
            stack.append((kid, False))
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_text(text: str, name: str, limit: int = MAX_NODES) -> None:
    """Raise TooLarge naming `name` if `text` expands past `limit` nodes or is not YAML."""
    try:
        n = expanded_nodes(text, limit)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" (line {where.line + 1})" if where else ""
        raise TooLarge(f"{name}: not valid YAML{line}: "
                       f"{getattr(err, 'problem', None) or err}".replace("\n", " ")) from None
    except (ValueError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise TooLarge(f"{name}: refused before DVC reads it: {why}") from None
    if n > limit:
        raise TooLarge(f"{name}: refused before DVC reads it: its anchors and aliases expand "
                       f"to more than {limit:,} YAML nodes (an alias bomb: DVC would take "
                       "gigabytes of memory)")


def is_dvc_yaml(path: str) -> bool:
    """Whether DVC may read `path` as YAML: dvc.yaml files, params files, dvc.lock, .dvc."""
    p = PurePosixPath(path)
    return p.name in NAMES or p.suffix in SUFFIXES


def check_revision(root: Path, rev: str) -> None:
    """Check every git-tracked YAML file at commit `rev` of the git repository `root`."""
    listed = subprocess.run(["git", "ls-tree", "-r", "-z", "--name-only", rev], cwd=root,
                            capture_output=True, check=True).stdout.decode()
    for path in filter(is_dvc_yaml, filter(None, listed.split("\0"))):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
        if shown.returncode == 0:  # a submodule or the like: nothing DVC reads as a file
            check_text(shown.stdout.decode(errors="replace"), f"{rev}:{path}")


def check_workspace(root: Path) -> None:
    """Check every YAML file of the working copy that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=root, capture_output=True)
    paths = listed.stdout.decode().split("\0") if listed.returncode == 0 else \
        ["params.yaml", "dvc.yaml", "dvc.lock"]  # not a git repository: DVC's own files
    for path in filter(is_dvc_yaml, filter(None, paths)):
        try:
            text = (root / path).read_bytes().decode(errors="replace")
        except OSError:  # listed by git but deleted, or a folder: DVC reads nothing there
            continue
        check_text(text, path)


def main() -> int:
    """`python -m aebench.yaml_bounds`: check the working copy here before `dvc repro`."""
    try:
        check_workspace(Path.cwd())
    except TooLarge as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
