"""What a process hands down to a child it forks or starts, besides its environment: a stage
forked from the warm server runs under these, so a server serves only commands whose own are
the same (a cold stage would run under the command's).

Compared: every RLIMIT_* (`ulimit -f`, `-v`, `-n`, ...), the umask, CPU affinity (`taskset`),
nice and scheduling policy (`nice`, `chrt`), the cgroups (`systemd-run`, a batch scheduler's or
a container's limits), the OOM score adjustment, the credentials (uid, gid, supplementary
groups, capabilities, no_new_privs, seccomp), the memory nodes, the namespaces and the root
folder. Not compared (no portable way to read them, or the stage sets its own): the I/O
priority (`ionice`), the timer slack, signal dispositions and mask, the session's autogroup.
Reading all of it is ~20 system calls.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

# from /proc/self/status: what fork and exec hand down (Cpus_allowed_list is the affinity)
STATUS_KEYS = ("Umask", "Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd",
               "CapAmb", "NoNewPrivs", "Seccomp", "Cpus_allowed_list", "Mems_allowed_list")


def read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:  # not there on this kernel, or not readable in this container
        return None


def inherited() -> dict:
    """This process's limits and the rest a child inherits (see the module's docstring)."""
    lines = (read("/proc/self/status") or "").splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    namespaces = {}
    for ns in sorted(os.listdir("/proc/self/ns")) if os.path.isdir("/proc/self/ns") else []:
        try:
            namespaces[ns] = os.readlink(f"/proc/self/ns/{ns}")
        except OSError:
            namespaces[ns] = None
    root = os.stat("/")
    return {
        "rlimits": {name: resource.getrlimit(getattr(resource, name))
                    for name in sorted(dir(resource)) if name.startswith("RLIMIT_")},
        "status": {key: " ".join(status[key].split()) for key in STATUS_KEYS if key in status},
        "umask": None if "Umask" in status else umask(),
        "affinity": sorted(os.sched_getaffinity(0)),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "scheduler": [os.sched_getscheduler(0), os.sched_getparam(0).sched_priority],
        "cgroup": read("/proc/self/cgroup"),
        "oom_score_adj": read("/proc/self/oom_score_adj"),
        "namespaces": namespaces,
        "root": [root.st_dev, root.st_ino],
    }


def umask() -> int:
    """The umask, where /proc/self/status does not show it (kernels before 4.7); setting it
    back at once, in a process with one thread, as the command and a starting server are."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask
