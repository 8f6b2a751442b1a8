"""`aebench SUBCOMMAND ...` (also `python -m aebench ...`, which runs this checkout's code):
the reviewer's tools. The stages have their own entry point (aebench/cli.py)."""

from __future__ import annotations

import sys

SUBCOMMANDS = {
    "compare": "is each model's change between two revisions larger than seed noise?",
    "review": "the pull-request check: re-run what changed, check the committed results",
    "sweep": "configurations x seeds as DVC experiments on a Ray cluster, against the base",
    "mlflow-server": "one MLflow tracking server on PostgreSQL, for a team or a sweep",
}
USAGE = "usage: aebench {" + ",".join(SUBCOMMANDS) + "} [-h] ...\n\nsubcommands:\n" + "".join(
    f"  {name:<14} {text}\n" for name, text in SUBCOMMANDS.items()) + \
    "\n`aebench SUBCOMMAND --help` for its options, verdicts and exit codes.\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "compare":
        from .compare import main as run
    elif command == "review":
        from .review import main as run
    elif command == "sweep":
        from .sweep.driver import main as run
    elif command == "mlflow-server":
        from .sweep.server import main as run
    else:
        print(f"aebench: unknown subcommand {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
