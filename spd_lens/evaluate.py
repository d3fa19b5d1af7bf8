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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

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


def by_seed(results: Sequence[dict]) -> dict:
    """{seed: {prompt_id: mean outcome}}; results without a `seed` key form one group (None)."""
    grouped: dict = {}
    for r in results:
        grouped.setdefault(r.get("seed"), []).append(r)
    return {seed: per_prompt_scores(rs) for seed, rs in grouped.items()}


def _outcome_matrix(results: Sequence[dict], prompts: list[str]) -> np.ndarray:
    """Seeds x prompts outcomes (a prompt a seed did not answer takes that seed's own mean)."""
    rows = []
    for scores in by_seed(results).values():
        mean = sum(scores.values()) / len(scores)
        rows.append([scores.get(p, mean) for p in prompts])
    return np.array(rows, dtype=np.float64)


def _hierarchical_means(matrices: Sequence[np.ndarray], signs: Sequence[float], resamples: int,
                        seed: int) -> np.ndarray:
    """Bootstrap distribution of sum(sign * mean): each matrix's seeds resampled on their own,
    the prompts (columns, shared by all matrices) resampled once per draw."""
    rng = np.random.default_rng(seed)
    n_prompts = matrices[0].shape[1]
    prompt_counts = rng.multinomial(n_prompts, np.full(n_prompts, 1 / n_prompts), size=resamples) / n_prompts
    total = np.zeros(resamples)
    for matrix, sign in zip(matrices, signs):
        n_seeds = matrix.shape[0]
        seed_counts = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=resamples) / n_seeds
        total += sign * np.einsum("rs,sq,rq->r", seed_counts, matrix, prompt_counts)
    return total


def _interval(draws: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    return [float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))]


def seeded_ci(results: Sequence[dict], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Score and a hierarchical bootstrap interval over seeds, then questions.

    `results` are per-question results (`prompt_id`, `passed`, optional `seed`). Each draw
    resamples the seeds with replacement and the questions with replacement, so the interval
    widens when seeds disagree; with one seed it is the usual question bootstrap. Also returns
    `ci_questions` (the interval resampling questions alone, seeds averaged) and `seed_spread`
    (largest minus smallest seed score), flagged as `seed_spread_exceeds_ci` when the seeds differ
    by more than `ci_questions` is wide: seed noise then dominates, and more seeds, not more
    questions, are what narrows the result.
    """
    if not results:
        raise SpdLensError("no outcomes to compute a confidence interval from")
    prompts = sorted({r["prompt_id"] for r in results})
    matrix = _outcome_matrix(results, prompts)
    ci = _interval(_hierarchical_means([matrix], [1.0], resamples, seed), level)
    questions = _interval(_hierarchical_means([matrix.mean(axis=0, keepdims=True)], [1.0], resamples, seed), level)
    seed_scores = matrix.mean(axis=1)
    spread = float(seed_scores.max() - seed_scores.min())
    return {"score": float(matrix.mean()), "ci": ci, "ci_questions": questions, "n": len(prompts),
            "n_seeds": int(matrix.shape[0]), "seed_spread": spread,
            "seed_spread_exceeds_ci": bool(matrix.shape[0] > 1 and spread > questions[1] - questions[0])}


def paired_difference(a: Sequence[dict], b: Sequence[dict], *, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Score of `a` minus score of `b` on the prompts both answered, with a hierarchical
    bootstrap interval: each side's seeds are resampled on their own, the shared prompts once
    per draw (the pairing removes the questions' own difficulty from the noise).

    `a` and `b` are per-example results (`prompt_id`, `passed`, and `seed` where a method has
    several). `seed_spread` is the spread of the per-seed differences (seeds paired by name when
    both sides have them, else each seed of one side against the other side's mean); the
    comparison is flagged (`seed_spread_exceeds_ci`) when that spread is wider than
    `ci_questions`, the interval that resampling questions alone gives (see `seeded_ci`).
    """
    first, second = per_prompt_scores(a), per_prompt_scores(b)
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise SpdLensError("the two result sets share no prompt: compare evaluations of the same questions")
    left, right = _outcome_matrix(a, shared), _outcome_matrix(b, shared)
    ci = _interval(_hierarchical_means([left, right], [1.0, -1.0], resamples, seed), level)
    questions = _interval(_hierarchical_means([left.mean(axis=0, keepdims=True), right.mean(axis=0, keepdims=True)],
                                              [1.0, -1.0], resamples, seed), level)
    seeds_a, seeds_b = list(by_seed(a)), list(by_seed(b))
    if len(seeds_a) > 1 and seeds_a == seeds_b:
        per_seed = (left - right).mean(axis=1)
    elif len(seeds_a) > 1 or len(seeds_b) > 1:
        per_seed = np.concatenate([left.mean(axis=1) - right.mean(), left.mean() - right.mean(axis=1)])
    else:
        per_seed = np.array([left.mean() - right.mean()])
    spread = float(per_seed.max() - per_seed.min())
    return {"difference": float(left.mean() - right.mean()), "ci": ci, "ci_questions": questions, "n": len(shared),
            "seed_spread": spread, "seed_spread_exceeds_ci": bool(spread > questions[1] - questions[0])}


def score_records(task: Task, examples_by_id: dict[str, Example], records: list[dict],
                  progress: Callable | None = None) -> EvalResult:
    """Score completion records (`prompt_id` + completion text) against the task's examples."""
    results = []
    for record in progress(records) if progress else records:
        example = examples_by_id.get(record["prompt_id"])
        if example is None:
            raise SpdLensError(f"prompt id {record['prompt_id']!r} is not an example of task {task.name!r}")
        verdict = task.score(example, record["completion"])
        result = {"prompt_id": record["prompt_id"], "passed": verdict.passed, "status": verdict.status,
                  "completion": record["completion"], "detail": verdict.detail[-300:]}
        if "finish_reason" in record:
            result["finish_reason"] = record["finish_reason"]
        results.append(result)
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
        record_out = {"prompt_id": prompt_id, "completion": completion}
        if record.get("finish_reason") in ("stop", "length"):
            record_out["finish_reason"] = record["finish_reason"]
        records.append(record_out)
    return records


def score_file(task: str | Task, path: str | Path, progress: Callable | None = None) -> EvalResult:
    """Score completions made anywhere (spd-lens generate, vLLM, by hand) against `task`."""
    task = get_task(task)
    records = read_completions(path)
    examples = {pid: task.example_by_id(pid) for pid in dict.fromkeys(r["prompt_id"] for r in records)}
    return score_records(task, examples, records, progress=progress)


def evaluate(model, tokenizer, task: str | Task, *, n: int | None = None, split: str = "test", seed: int = 0,
             config: SamplingConfig | None = None, generations: str | Path, provenance: dict | None = None,
             progress: Callable | None = None) -> EvalResult:
    """Greedy (by default) generation on `split` examples, scored; generations saved to `generations`."""
    task = get_task(task)
    examples = task.examples(split, n=n, seed=seed)
    config = config or SamplingConfig(temperature=0.0, max_new_tokens=task.max_new_tokens, seed=seed)
    path = generate_jsonl(model, tokenizer, examples, generations, config, task=task.name,
                          provenance={"split": split, **(provenance or {})}, progress=progress)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    records = [{"prompt_id": r["prompt_id"], "completion": r["messages"][-1]["content"],
                "finish_reason": r.get("finish_reason", "stop")} for r in records]
    return score_records(task, {e.id: e for e in examples}, records)


def training_data_quality(task: str | Task, path: str | Path, examples: Sequence[Example] | None = None,
                          progress: Callable | None = None) -> dict:
    """How good a self-generated training file is, measured and never used to filter.

    The share of completions the task's scorer marks correct (against each prompt's reference),
    the share cut off at the token budget (`finish_reason` "length"), their mean length in
    tokens, and the count of each finish reason. SPD's mechanism predicts that projected
    sampling yields correct completions more often than plain (psr) or random-subspace sampling.
    """
    from spd_lens.tasks.records import read_jsonl

    task = get_task(task)
    raw = list(read_jsonl(path))
    if not raw:
        raise SpdLensError(f"{path} holds no generations to measure")
    known = {e.id: e for e in examples} if examples is not None else {}
    examples_by_id = {pid: known.get(pid) or task.example_by_id(pid) for pid in dict.fromkeys(r["prompt_id"] for r in raw)}
    records = [{"prompt_id": r["prompt_id"], "completion": r["messages"][-1]["content"],
                "finish_reason": r.get("finish_reason", "unknown")} for r in raw]
    scored = score_records(task, examples_by_id, records, progress=progress)
    reasons = Counter(r["finish_reason"] for r in records)
    tokens = [r["completion_tokens"] for r in raw if isinstance(r.get("completion_tokens"), int)]
    return {"n": len(records), "correct": scored.score, "cut_off": reasons.get("length", 0) / len(records),
            "mean_tokens": sum(tokens) / len(tokens) if tokens else None,
            "finish_reasons": dict(sorted(reasons.items()))}
