"""python -m aebench.warm MODULE [ARGS...] | --start | --stop (see aebench/warm/__init__.py)."""

from __future__ import annotations

import importlib.util
import os
import runpy
import sys
from pathlib import Path

from . import available, is_stage, stage_folder
from .client import exit_as, run_warm, start, stop
from .server import become, run_forked, serve


def check_stage(module: str) -> None:
    """A `stages.X` that this folder cannot import: one line, not ModuleNotFoundError."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError:  # no `stages` package here
        found = False
    if not found:
        sys.exit(f"error: {module}: no {module.replace('.', '/')}.py in {os.getcwd()}: run from "
                 "the project root (the folder with dvc.yaml)")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--serve"]:
        if (served := serve(argv[1], *map(int, argv[2:3]))) is not None:  # in the forked child only
            conn = become(*served)  # sets sys.argv
            run_forked(sys.argv[0], conn)
        return
    if argv == ["--start"]:
        sys.exit(0 if available() and start(os.getcwd()) else "aebench.warm: no server started")
    if argv == ["--stop"]:
        stopped = stop(os.getcwd())
        print("aebench.warm: " + (f"{stopped} server(s) of this folder exit once their stages "
                                  "have ended" if stopped else "no server runs for this folder"),
              file=sys.stderr)
        return
    if not argv or argv[0].startswith("-"):
        sys.exit("usage: python -m aebench.warm MODULE [ARGS...] | --start | --stop")
    module, args = argv[0], argv[1:]
    on = available()
    if module.startswith("stages."):
        check_stage(module)
    # warm: only this folder's own stages (the server runs nothing else)
    cwd = os.getcwd()
    if (on and is_stage(cwd, module) and stage_folder() == Path(cwd, "stages")
            and (code := run_warm(module, args)) is not None):
        exit_as(code)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
