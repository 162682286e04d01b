"""Experiment trackers (`report_to`, as in transformers and TRL) through accelerate's tracker API:
every metric of metrics.jsonl at each step, and a table of sample completions every
`log_completions_steps`. "none" logs to metrics.jsonl only; "all" is every tracker installed.

    >>> tracker_names(["none"])
    []
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType

TRACKERS = tuple(str(t) for t in LoggerType if t != LoggerType.ALL)
COMPLETION_COLUMNS = ["step", "prompt", "completion", "reward"]


def check_report_to(report_to: Sequence[str]) -> None:
    """Each entry names a tracker accelerate knows, or "none" / "all" alone."""
    unknown = [name for name in report_to if name not in ("none", "all", *TRACKERS)]
    if unknown:
        raise ValueError(f"report_to={list(report_to)}: {unknown} not among 'none', 'all', {list(TRACKERS)}.")
    if len(report_to) > 1 and ({"none", "all"} & set(report_to)):
        raise ValueError(
            f"report_to={list(report_to)}: 'none' and 'all' stand alone, e.g. --report_to tensorboard wandb."
        )


def tracker_names(report_to: Sequence[str]) -> list[str]:
    """The trackers to start: [] for "none", the installed ones for "all". A named tracker that is
    not installed is an error that says what to install."""
    check_report_to(report_to)
    available = [str(t) for t in get_available_trackers()]
    if list(report_to) == ["none"]:
        return []
    if list(report_to) == ["all"]:
        return available
    missing = [name for name in report_to if name not in available]
    if missing:
        raise ValueError(f"report_to={list(report_to)}: {missing} not installed here; pip install {' '.join(missing)}.")
    return list(report_to)


def hyperparameters(config: dict) -> dict[str, int | float | str | bool]:
    """A config as trackers' hyperparameter tables take it: lists joined, None as "None"."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class RunTrackers:
    """Starts the accelerator's trackers on first use and logs to them (on the main process).

    Trackers with a table type (wandb, clearml) get the completions as a table; the others (e.g.
    TensorBoard) as a markdown text.
    """

    def __init__(self, accelerator: Accelerator, run_name: str, config: dict):
        self.accelerator, self.run_name, self.config = accelerator, run_name, config
        self.started = False

    @property
    def enabled(self) -> bool:
        return bool(self.accelerator.log_with)

    def start(self) -> None:
        if self.enabled and not self.started:
            self.accelerator.init_trackers(self.run_name, config=hyperparameters(self.config))
            self.started = True

    def log_metrics(self, stats: dict, step: int) -> None:
        if not self.enabled:
            return
        self.start()
        numbers = {k: v for k, v in stats.items() if isinstance(v, (int, float)) and k != "step" and math.isfinite(v)}
        self.accelerator.log(numbers, step=step)

    def log_completions(
        self, prompts: Sequence[str], completions: Sequence[str], rewards: Sequence[float], step: int
    ) -> None:
        if not self.enabled or not self.accelerator.is_main_process:
            return
        self.start()
        rows = [[step, p, c, float(r)] for p, c, r in zip(prompts, completions, rewards)]
        for tracker in self.accelerator.trackers:
            if hasattr(tracker, "log_table"):
                tracker.log_table("completions", columns=COMPLETION_COLUMNS, data=rows, step=step)
            else:
                tracker.log({"completions": completions_markdown(rows)}, step=step)

    def finish(self) -> None:
        """Flush and close every tracker; a later log starts them again."""
        if self.started:
            for tracker in self.accelerator.trackers:
                tracker.finish()
            self.accelerator.trackers = []
            self.started = False


def markdown_cell(text) -> str:
    """`text` as one cell of a markdown table: pipes escaped, on one line."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def completions_markdown(rows: list[list]) -> str:
    lines = ["| " + " | ".join(COMPLETION_COLUMNS) + " |", "|---|---|---|---:|"]
    lines += [f"| {step} | {markdown_cell(p)} | {markdown_cell(c)} | {r:.3f} |" for step, p, c, r in rows]
    return "\n".join(lines)
