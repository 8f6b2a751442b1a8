"""The Markdown report of `aebench review`: the verdict, the metrics summary BASE -> HEAD (of
the re-run outputs: a committed number that was not reproduced is never shown), the params
diff, and the stages re-run."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rerun:
    stages: dict[str, str] = field(default_factory=dict)    # stage -> why it was re-run
    seconds: dict[str, float] = field(default_factory=dict)
    differ: dict[str, list[str]] = field(default_factory=dict)  # stage -> outs not as committed
    stale: dict[str, list[str]] = field(default_factory=dict)   # stage -> deps/params not either
    forged: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {committed
    #                                      output that does not match dvc.lock: modified/deleted}
    problems: list[str] = field(default_factory=list)       # why it is not reproduced
    note: str = ""                                           # how it was reproduced
    error: str = ""                                          # why the re-run stopped


def outputs_cell(rerun: Rerun, stage: str) -> str:
    if rerun.error:
        cell = "not checked"
    elif stage in rerun.differ:
        cell = ", ".join(rerun.differ[stage]) + " differ"
    else:
        cell = "byte-identical"
    if stage in rerun.forged:
        cell += f"; committed {', '.join(rerun.forged[stage])} not as dvc.lock records"
    return cell


def verdict(rerun: Rerun | None) -> list[str]:
    if rerun is None:
        return ["**Not verified** (`--no-verify`): the committed results were compared only."]
    if rerun.error:
        return [f"**Error**: {rerun.error}", *([""] if rerun.problems else []),
                *[f"- {p}" for p in rerun.problems]]
    if rerun.problems:
        return ["**Not reproduced**: the committed results are not what the code produces:",
                "", *[f"- {p}" for p in rerun.problems]]
    if not rerun.stages:
        return ["**Reproduced**: no stage differs from BASE and none is out of date."]
    return [f"**Reproduced**: {rerun.note}."]


def metrics_heading(rerun: Rerun | None) -> str:
    if rerun is None:
        return "## Metrics: BASE → HEAD, as committed (not reproduced: `--no-verify`)"
    return "## Metrics: BASE → HEAD, as re-run here"


def report(base: str, base_sha: str, head_sha: str, compared: str, params: str,
           rerun: Rerun | None, pulled: str) -> str:
    lines = [f"# aebench review: HEAD `{head_sha[:7]}` against BASE `{base_sha[:7]}` ({base})", ""]
    lines += verdict(rerun)
    lines += ["", metrics_heading(rerun), "", compared.rstrip(), "", "## Params", "",
              params.strip() or "No params changed.", ""]
    if rerun is not None:
        lines += ["## Stages re-run", ""]
        if rerun.stages:
            lines += ["| stage | why | seconds | outputs |", "|---|---|---|---|"]
            for s, why in rerun.stages.items():
                secs = f"{rerun.seconds[s]:.1f}" if s in rerun.seconds else "—"
                lines.append(f"| {s} | {why} | {secs} | {outputs_cell(rerun, s)} |")
        else:
            lines.append("None.")
        lines += ["", f"DVC remote: {pulled}", ""]
    return "\n".join(lines)
