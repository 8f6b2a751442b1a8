"""Committed outputs that are not what dvc.lock records: a file edited by hand and committed
without its lock (a metric, reports/details.json, a figure) is forged, whatever a re-run says.

DVC says which: before anything is re-run, `dvc status` on the clean checkout reports an output
whose bytes do not hash to its dvc.lock md5 as `modified` (DVC's own hashing, `.dir` hashes of
folders included). Of those, the outputs git tracks (`cache: false`) are the committed ones; an
output in DVC's cache comes from the cache by its hash. Once the re-run has written what the
code produces, each forged file is named with its committed and its reproduced value.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

SHOWN = 60  # characters of a line or value shown


def git(root: Path, *args: str) -> bytes:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, check=True).stdout


def tracked(root: Path, path: str) -> bool:
    """Whether git tracks `path` (a file, or any file under a folder) at HEAD."""
    return bool(git(root, "ls-files", "-z", "--", path))


def ignored(root: Path, path: str) -> bool:
    """Whether git ignores `path` (DVC lists its cached outputs in .gitignore)."""
    return subprocess.run(["git", "check-ignore", "-q", "--", path], cwd=root).returncode == 0


def committed_wrong(root: Path, path: str, how: str) -> bool:
    """A committed output that is not what dvc.lock records: changed, or removed from git (an
    output git does not ignore is a committed one, `cache: false`)."""
    return (how == "modified" and tracked(root, path)) or \
        (how == "deleted" and not ignored(root, path))


def forged_outs(root: Path, status: dict) -> dict[str, dict[str, str]]:
    """stage -> {output: how} of its committed outputs that `dvc status --json` (run on the
    clean checkout of HEAD) reports `modified` (bytes that do not hash to dvc.lock's md5) or
    `deleted`."""
    found: dict[str, dict[str, str]] = {}
    for stage, changes in status.items():
        for change in changes:
            outs = change.get("changed outs", {}) if isinstance(change, dict) else {}
            for path, how in sorted(outs.items()):
                if committed_wrong(root, path, how):
                    found.setdefault(stage.split(":")[-1], {})[path] = how
    return found


def compared(root: Path, path: str) -> str:
    """How the committed bytes of `path` and those the re-run left in the working copy differ."""
    new = (root / path).read_bytes() if (root / path).is_file() else None
    return difference(path, committed(root, path), new)


def changed_files(root: Path, out: str) -> list[str]:
    """The files under `out` whose working copy differs from HEAD (changed, added, removed)."""
    listed = git(root, "status", "--porcelain=v1", "-z", "--untracked-files=all", "--", out)
    return sorted(entry[3:] for entry in listed.decode().split("\0") if entry[2:3] == " ")


def committed(root: Path, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def short(value: Any) -> str:
    """A value as JSON writes it (a string quoted), cut at SHOWN characters."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= SHOWN else text[:SHOWN] + "…"


def json_differences(a: Any, b: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(key path, value in a, value in b) of every leaf that differs, in document order."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in [*a, *(k for k in b if k not in a)]
                for d in json_differences(a.get(k, "(absent)"), b.get(k, "(absent)"),
                                          f"{key}.{k}" if key else str(k))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b))
                for d in json_differences(x, y, f"{key}.{i}" if key else str(i))]
    return [] if a == b and type(a) is type(b) else [(key or "(the whole file)", a, b)]


def difference(path: str, old: bytes | None, new: bytes | None) -> str:
    """One phrase: where `path`'s committed bytes `old` and reproduced bytes `new` differ."""
    if old is None or new is None:
        return f"committed {'(absent)' if old is None else 'present'}, reproduced " \
               f"{'(absent)' if new is None else 'present'}"
    try:
        found = json_differences(json.loads(old), json.loads(new))
    except (UnicodeDecodeError, json.JSONDecodeError):
        found = None
    if found:
        key, a, b = found[0]
        more = f" (and {len(found) - 1} more value{'s' * (len(found) > 2)})" \
            if len(found) > 1 else ""
        return f"{key}: committed {short(a)}, reproduced {short(b)}{more}"
    try:
        a_lines, b_lines = old.decode().splitlines(), new.decode().splitlines()
    except UnicodeDecodeError:  # a figure: say which bytes
        return (f"committed md5 {hashlib.md5(old).hexdigest()} ({len(old):,} bytes), "
                f"reproduced md5 {hashlib.md5(new).hexdigest()} ({len(new):,} bytes)")
    n = next((i for i, (x, y) in enumerate(zip(a_lines, b_lines)) if x != y),
             min(len(a_lines), len(b_lines)))
    line = lambda lines: short(lines[n]) if n < len(lines) else "(no such line)"  # noqa: E731
    return f"line {n + 1}: committed {line(a_lines)}, reproduced {line(b_lines)}"


def problems(root: Path, forged: dict[str, dict[str, str]], reproduced: bool) -> list[str]:
    """One line per forged file: its committed and its reproduced value (once the re-run of its
    stage has written it: `reproduced`)."""
    lines = []
    for stage, outs in forged.items():
        for out, how in outs.items():
            what = f"committed, but not what dvc.lock records for `{stage}` (`dvc status`: " \
                   f"{how}): {'edited' if how == 'modified' else 'removed'} without its dvc.lock"
            if not reproduced:
                lines.append(f"{out}: {what}; the re-run stopped before reproducing it")
                continue
            files = changed_files(root, out)
            if not files:  # the re-run makes the committed bytes: dvc.lock is what is stale
                lines.append(f"{out}: {what}; the re-run reproduces the committed files, so "
                             "dvc.lock is out of date: run `dvc repro` and commit dvc.lock")
            lines += [f"{path}: {what}; {compared(root, path)}" for path in files]
    return lines
