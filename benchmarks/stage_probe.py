"""Run one stage command with timers around its phases (for benchmarks/stage_overhead.py).

    STAGE_PROBE_OUT=parts.json python benchmarks/stage_probe.py stages.train under30 data/csv ...

Runs from the project root like `python -m stages.X ARGS`: the stage module is imported (its
imports timed), then `cli.run(main, ...)` as its `__main__` block would. Named aebench functions
are wrapped with timers; time is charged to the innermost category only (self time), so the
parts add up to the time in the process; the same in CPU seconds (less sensitive to a busy
machine). `import` statements charge `import`, except inside
`first_use` (the first optimizer: its lazy import of torch._dynamo is that cost). Functions a
tree does not have are skipped, so one probe times any version of the stages. Stdlib only, so
that the probe adds nothing to the stage's imports.
"""

from __future__ import annotations

import atexit
import builtins
import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time

START = time.monotonic()  # CLOCK_MONOTONIC: comparable with the parent's clock on Linux
CPU_START = time.process_time()  # the interpreter's start-up, in CPU seconds

# category -> functions "module:attribute"; a context manager is timed in enter and exit only
CATEGORIES = {
    "store": ["aebench.tracking:open_store"],
    "first_use": ["aebench.training:make_optimizer"],  # the first call only
    "compute": ["aebench.training:train_replica", "aebench.metrics:evaluate_model",
                "aebench.pca:fit_pca", "aebench.pca:mse_by_components",
                "aebench.figures:draw_all", "aebench.figures:overlay_rows",
                "aebench.report:summary", "aebench.report:figure_links"],
    "mlflow": ["aebench.tracking:training_run", "aebench.tracking:replica_run",
               "aebench.tracking:log_epochs", "aebench.tracking:log_replica_model",
               "aebench.tracking:evaluation_run", "aebench.tracking:log_evaluation",
               "aebench.tracking:eval_dataset", "aebench.tracking:log_artifacts",
               "aebench.tracking:sha256_file", "aebench.tracking:log_results",
               "aebench.tracking:log_training_curve", "aebench.tracking:register_training",
               "aebench.tracking:attach_report"],
    "read": ["aebench.config:load_params", "aebench.kinds:read_model", "aebench.kinds:read_models",
             "aebench.data:read_mnist_csv", "aebench.models:load_replicas",
             "aebench.files:read_json", "aebench.files:read_columns",
             "aebench.metric_files:read"],
    "write": ["aebench.models:save_checkpoint", "aebench.files:atomic_dir",
              "aebench.files:output_group",
              "aebench.files:write_csv_rows", "aebench.files:write_json",
              "aebench.files:write_text", "aebench.files:check_writable"],
}
ABSORBS_IMPORTS = {"first_use"}
OURS = {"aebench", "stages"}
MAIN_THREAD = threading.get_ident()
ONCE = {"aebench.training:make_optimizer"}

totals: dict[str, float] = {}
imports: dict[str, float] = {}  # "torch (in other)" -> seconds in import statements
stack = ["other"]
cpu: dict[str, float] = {}  # the same, in CPU seconds of this process (all its threads)
last = [START, CPU_START]


def charge() -> None:
    """Wall and CPU time since the last change go to the category on top of the stack."""
    now, cpu_now = time.monotonic(), time.process_time()
    totals[stack[-1]] = totals.get(stack[-1], 0.0) + now - last[0]
    cpu[stack[-1]] = cpu.get(stack[-1], 0.0) + cpu_now - last[1]
    last[:] = [now, cpu_now]


def push(category: str) -> None:
    charge()
    stack.append(category)


def pop() -> None:
    charge()
    stack.pop()


def timed(category: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        push(category)
        try:
            return fn(*args, **kwargs)
        finally:
            pop()
    return wrapper


class TimedContext:
    def __init__(self, category: str, cm):
        self.category, self.cm = category, cm

    def __enter__(self):
        return timed(self.category, self.cm.__enter__)()

    def __exit__(self, *exc):
        return timed(self.category, self.cm.__exit__)(*exc)


def wrap(category: str, fn, once: bool):
    is_cm = inspect.isgeneratorfunction(getattr(fn, "__wrapped__", None))
    calls = [0]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        calls[0] += 1
        if once and calls[0] > 1:
            return fn(*args, **kwargs)
        if is_cm:
            return TimedContext(category, fn(*args, **kwargs))
        return timed(category, fn)(*args, **kwargs)
    return wrapper


def install_timers() -> None:
    """Wrap the named functions where the stage's modules look them up (module attributes)."""
    for category, names in CATEGORIES.items():
        for name in names:
            module_name, attr = name.split(":")
            module = sys.modules.get(module_name)
            if module is not None and callable(getattr(module, attr, None)):
                setattr(module, attr, wrap(category, getattr(module, attr), name in ONCE))


def install() -> None:
    """Time every import statement (and importlib.import_module), charged to the first package
    outside this project that it reaches (the `aebench` module importing torch: `torch`)."""
    plain_import, plain_import_module = builtins.__import__, importlib.import_module
    owners: list[list] = []  # [key, started] of the imports under way; self time per key

    def charged(fn, root_package):
        def wrapper(name, *args, **kwargs):
            top = stack[-1]
            if top in ABSORBS_IMPORTS or threading.get_ident() != MAIN_THREAD or (
                    top == "import" and not owners):
                return fn(name, *args, **kwargs)  # other threads' imports are not timed
            root = root_package(name, *args, **kwargs)
            if top == "import" and (owners[-1][0].split()[0] not in OURS or root in OURS):
                return fn(name, *args, **kwargs)  # part of the import under way
            where = owners[-1][0].split("(in ")[1][:-1] if owners else top
            now = time.monotonic()
            if owners:
                imports[owners[-1][0]] = imports.get(owners[-1][0], 0.0) + now - owners[-1][1]
            owners.append([f"{root} (in {where})", now])
            if top != "import":
                push("import")
            try:
                return fn(name, *args, **kwargs)
            finally:
                key, started = owners.pop()
                now = time.monotonic()
                imports[key] = imports.get(key, 0.0) + now - started
                if owners:
                    owners[-1][1] = now
                if top != "import":
                    pop()
        return wrapper

    builtins.__import__ = charged(plain_import, statement_root)
    importlib.import_module = charged(plain_import_module, import_module_root)


def statement_root(name: str, globals=None, locals=None, fromlist=(), level=0) -> str:
    """The top-level package an import statement names (its __import__ call's arguments)."""
    if level:
        name = (globals or {}).get("__package__") or ""
    return name.split(".")[0] or "?"


def import_module_root(name: str, package: str | None = None) -> str:
    return (package or "" if name.startswith(".") else name).split(".")[0] or "?"


def at_exit(out: str) -> None:
    """Registered first, so it runs last: after the threads are joined and every other atexit
    handler ran; what follows is the interpreter's teardown."""
    with open(out) as f:
        record = json.load(f)
    record["handlers_done"], record["cpu_handlers_done"] = time.monotonic(), time.process_time()
    with open(out, "w") as f:
        json.dump(record, f)


def main() -> None:
    stage, argv = sys.argv[1], sys.argv[2:]
    sys.path[0] = os.getcwd()  # as `python -m` has it: the project root first
    out = os.environ["STAGE_PROBE_OUT"]
    atexit.register(at_exit, out)
    install()
    module = importlib.import_module(stage)
    cli = importlib.import_module("aebench.cli")
    install_timers()
    sys.argv = [stage.replace(".", "/") + ".py", *argv]
    code = 0
    try:
        cli.run(module.main, module.USAGE, module.__doc__, argv)
    except SystemExit as done:
        code = done.code
        raise
    finally:
        pop()  # "other", the bottom of the stack
        with open(out, "w") as f:
            json.dump({"start": START, "end": time.monotonic(), "code": code,
                       "parts": totals, "imports": imports, "cpu_start": CPU_START,
                       "cpu_end": time.process_time(), "cpu": cpu}, f)


if __name__ == "__main__":
    main()
