"""Task registry: `get_task(name)` and `task_names()`.

Example:
    >>> from spd_lens.tasks import get_task
    >>> task = get_task("arithmetic")
    >>> example = task.examples("train", n=1, seed=0)[0]
    >>> example.reference == example.span_texts()[0]
    True
    >>> easy = get_task("arithmetic", preset="easy", shots=3)   # difficulty preset, 3 demonstrations
    >>> easy.examples("test", n=1)[0].id
    'arithmetic@easy/test/0/1'
"""

from __future__ import annotations

import inspect

from spd_lens.errors import SpdLensError
from spd_lens.tasks.bbh import BigBenchHard
from spd_lens.tasks.base import EncodedExample, Example, Score, Task, default_shots, hash_split, locate_spans
from spd_lens.tasks.code import HumanEval, Mbpp
from spd_lens.tasks.custom import Capability, capability, is_examples_path
from spd_lens.tasks.math import Arithmetic, Gsm8k, GsmSymbolic, Svamp
from spd_lens.tasks.mcqa import Arc, FamilyMC, Mmlu

TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (HumanEval, Mbpp, Arithmetic, GsmSymbolic, Gsm8k, Svamp, FamilyMC, Mmlu, Arc, BigBenchHard,
                              Capability)
}


def task_names() -> list[str]:
    """The names `get_task` knows.

    Example:
        >>> {"arithmetic", "humaneval", "family-mc"} <= set(task_names())
        True
    """
    return list(TASKS)


def get_task(name: str | Task, *, shots: int = 0, **options) -> Task:
    """A task by name, or your own capability by the path of its JSONL file (`scorer=`, `name=`,
    `max_new_tokens=`; see `spd_lens.tasks.custom`); options (e.g. `path=` for a local JSONL,
    `preset=` for a procedural task's difficulty) go to its constructor. `shots` demonstrations from the train split go before every
    question (see `Task.with_shots`; `default_shots(task, tokenizer)` is the usual choice)."""
    if isinstance(name, Task):
        return name
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise SpdLensError(f"shots must be a number of demonstrations >= 0, got {shots!r}")
    if name not in TASKS and is_examples_path(name):
        if "path" in options:
            raise SpdLensError(f"task {name!r} is a file of your own examples: give it once (drop --data / path=)")
        unknown = set(options) - {"scorer", "name", "max_new_tokens"}
        if unknown:
            raise SpdLensError(f"your own examples ({name!r}) take no option(s) {sorted(unknown)}; they accept "
                               "scorer, name, max_new_tokens and shots")
        return capability(name, **options, shots=shots)
    if name not in TASKS:
        raise SpdLensError(f"unknown task {name!r}: use one of {task_names()}, or the path of a JSONL file of your "
                           "own examples (see spd_lens.tasks.custom)")
    cls = TASKS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    unknown = set(options) - accepted
    if unknown:
        raise SpdLensError(f"task {name!r} takes no option(s) {sorted(unknown)}; it accepts "
                           f"{sorted(accepted | {'shots'})}")
    task = cls(**options)
    task.shots = shots
    return task


__all__ = ["Capability", "EncodedExample", "Example", "Score", "Task", "TASKS", "capability", "default_shots", "get_task", "hash_split",
           "locate_spans", "task_names"]
