"""Evaluation: generate on held-out examples, score with the task's scorer, bootstrap a 95% CI.

Code is scored by executing the tests in `spd_lens.sandbox`; math by exact numeric match; multiple
choice by the option letter. Generations go through the resumable JSONL export, so an
interrupted evaluation continues where it stopped.

Example:
    >>> import random
    >>> lo, hi = bootstrap_ci([True] * 30 + [False] * 70, seed=0)
    >>> lo < 0.3 < hi
    True
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from spd_lens.artifacts import write_json  # noqa: F401  (re-exported for callers)
from spd_lens.errors import SpdLensError
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.tasks import Example, Task, get_task


@dataclass
class EvalResult:
    task: str
    score: float
    ci: tuple[float, float]
    n: int
    results: list[dict]

    def as_dict(self) -> dict:
        return {**asdict(self), "ci": list(self.ci)}


def bootstrap_ci(outcomes: Sequence[bool | float], *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean."""
    if not outcomes:
        raise SpdLensError("no outcomes to compute a confidence interval from")
    values = [float(v) for v in outcomes]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def per_prompt_scores(results: Sequence[dict]) -> dict[str, float]:
    """Each prompt's outcome (`passed`) averaged over the results that answer it (its seeds)."""
    grouped: dict[str, list[float]] = {}
    for r in results:
        grouped.setdefault(r["prompt_id"], []).append(float(r["passed"]))
    return {k: sum(v) / len(v) for k, v in grouped.items()}


def paired_difference(a: Sequence[dict], b: Sequence[dict], *, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Score of `a` minus score of `b` on the prompts both answered, with a bootstrap interval
    that resamples prompts (the pairing removes the questions' own difficulty from the noise).

    `a` and `b` are per-example results (`prompt_id`, `passed`), possibly from several seeds:
    each prompt's outcome is averaged over its seeds first.
    """
    first, second = per_prompt_scores(a), per_prompt_scores(b)
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise SpdLensError("the two result sets share no prompt: compare evaluations of the same questions")
    differences = [first[k] - second[k] for k in shared]
    low, high = bootstrap_ci(differences, resamples=resamples, seed=seed, level=level)
    return {"difference": sum(differences) / len(differences), "ci": [low, high], "n": len(shared)}


def score_records(task: Task, examples_by_id: dict[str, Example], records: list[dict],
                  progress: Callable | None = None) -> EvalResult:
    """Score completion records (`prompt_id` + completion text) against the task's examples."""
    results = []
    for record in progress(records) if progress else records:
        example = examples_by_id.get(record["prompt_id"])
        if example is None:
            raise SpdLensError(f"prompt id {record['prompt_id']!r} is not an example of task {task.name!r}")
        verdict = task.score(example, record["completion"])
        results.append({"prompt_id": record["prompt_id"], "passed": verdict.passed, "status": verdict.status,
                        "completion": record["completion"], "detail": verdict.detail[-300:],
                        **({"sandbox": verdict.isolation} if verdict.isolation is not None else {})})
    if not results:
        raise SpdLensError("no completions to score")
    outcomes = [r["passed"] for r in results]
    return EvalResult(task.name, sum(outcomes) / len(outcomes), bootstrap_ci(outcomes), len(outcomes), results)


def read_completions(path: str | Path) -> list[dict]:
    """`{"prompt_id", "completion"}` records from the generate export or the minimal format."""
    from spd_lens.tasks.records import read_jsonl

    records = []
    for number, record in enumerate(read_jsonl(path), start=1):
        prompt_id = record.get("prompt_id")
        completion = record.get("completion")
        if completion is None and isinstance(record.get("messages"), list):
            turns = [m for m in record["messages"] if isinstance(m, dict) and m.get("role") == "assistant"]
            completion = turns[-1].get("content") if turns else None
        if not isinstance(prompt_id, str) or not isinstance(completion, str):
            raise SpdLensError(f"{path}: record {number} needs a string 'prompt_id' and a 'completion' (or chat "
                               "'messages' with an assistant turn)")
        records.append({"prompt_id": prompt_id, "completion": completion})
    return records


def score_file(task: str | Task, path: str | Path, progress: Callable | None = None) -> EvalResult:
    """Score completions made anywhere (spd-lens generate, vLLM, by hand) against `task`."""
    task = get_task(task)
    task.check_ready()
    records = read_completions(path)
    examples = {pid: task.example_by_id(pid) for pid in dict.fromkeys(r["prompt_id"] for r in records)}
    return score_records(task, examples, records, progress=progress)


def evaluate(model, tokenizer, task: str | Task, *, n: int | None = None, split: str = "test", seed: int = 0,
             config: SamplingConfig | None = None, generations: str | Path, provenance: dict | None = None,
             progress: Callable | None = None) -> EvalResult:
    """Greedy (by default) generation on `split` examples, scored; generations saved to `generations`."""
    task = get_task(task)
    task.check_ready()  # e.g. no code sandbox here: refuse before generating
    examples = task.examples(split, n=n, seed=seed)
    config = config or SamplingConfig(temperature=0.0, max_new_tokens=task.max_new_tokens, seed=seed)
    path = generate_jsonl(model, tokenizer, examples, generations, config, task=task.name,
                          provenance={"split": split, **(provenance or {})}, progress=progress)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    records = [{"prompt_id": r["prompt_id"], "completion": r["messages"][-1]["content"]} for r in records]
    return score_records(task, {e.id: e for e in examples}, records)
