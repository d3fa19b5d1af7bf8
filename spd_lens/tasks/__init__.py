"""Task registry: `get_task(name)` and `task_names()`.

Example:
    >>> from spd_lens.tasks import get_task
    >>> task = get_task("arithmetic")
    >>> example = task.examples("train", n=1, seed=0)[0]
    >>> example.reference == example.span_texts()[0]
    True
"""

from __future__ import annotations

import inspect

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import EncodedExample, Example, Score, Task, hash_split, locate_spans
from spd_lens.tasks.code import HumanEval, Mbpp
from spd_lens.tasks.math import Arithmetic, Gsm8k, GsmSymbolic, Svamp
from spd_lens.tasks.mcqa import Arc, FamilyMC, Mmlu

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (HumanEval, Mbpp, Arithmetic, GsmSymbolic, Gsm8k, Svamp, FamilyMC, Mmlu, Arc)
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str | Task, **options) -> Task:
    """A task by name; options (e.g. `path=` for a local JSONL) go to its constructor."""
    if isinstance(name, Task):
        return name
    if name not in TASKS:
        raise SpdLensError(f"unknown task {name!r}: use one of {task_names()}")
    cls = TASKS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = set(options) - accepted
    if unknown:
        raise SpdLensError(f"task {name!r} takes no option(s) {sorted(unknown)}; it accepts {sorted(accepted) or 'none'}")
    return cls(**options)


__all__ = ["EncodedExample", "Example", "Score", "Task", "TASKS", "get_task", "hash_split", "locate_spans", "task_names"]
