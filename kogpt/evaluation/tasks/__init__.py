"""The downstream benchmarks of the KoGPT model cards, one module each: loader, prompt, metrics.

nsmc (sentiment), ynat (news topic), klue-sts (similarity, binary F1), korsts (similarity score).
Each module's docstring documents its file format and its versioned prompt; base.py holds the
Example/Task records and the strict readers.

    task = get_task("ynat"); examples = task.load("ynat-v1.1_dev.tsv"); print(task.prompt(examples[0]))
"""

from __future__ import annotations

from ...errors import UserError
from . import klue_sts, korsts, nsmc, ynat
from .base import Example, Prediction, Task

TASKS: dict[str, Task] = {t.name: t for t in (nsmc.TASK, ynat.TASK, klue_sts.TASK, korsts.TASK)}

__all__ = ["TASKS", "Example", "Prediction", "Task", "get_task"]


def get_task(name: str) -> Task:
    """The task called `name` (nsmc, ynat, klue-sts, korsts)."""
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
