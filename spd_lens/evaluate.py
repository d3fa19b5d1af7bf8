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
                        "completion": record["completion"], "detail": verdict.detail[-300:]})
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
    records = [{"prompt_id": r["prompt_id"], "completion": r["messages"][-1]["content"]} for r in records]
    return score_records(task, {e.id: e for e in examples}, records)


def choice_rates(chosen: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """The share of answers that chose each label (and `none`, when some chose none), in label order."""
    if not chosen:
        raise SpdLensError("no answers to count")
    rates = {label: sum(c == label for c in chosen) / len(chosen) for label in labels}
    unread = sum(c is None or c not in labels for c in chosen)
    return {**rates, "none": unread / len(chosen)} if unread else rates


def summarise_choices(rows: Sequence[dict], examples: dict[str, Example]) -> dict:
    """Accuracy, interval, per-label choice rates and per-question results of scored choices.

    `rows` hold `prompt_id`, `chosen` and `passed`, for the questions as asked and (optionally)
    their option rotations (`spd_lens.tasks.mcqa.rotate_options`). The headline figures use the
    questions as asked; `debiased` (present when rotations were asked) averages every rotation:
    `accuracy` is the mean over questions of the share of rotations answered right (the interval
    resamples questions), `consistent` the share of questions right under every rotation, and
    `choice_rates` counts all rotations, where a model without a preference for a label picks
    each about equally often. Each `results` list holds one entry per question (`prompt_id`,
    `passed`), ready for `paired_difference`.
    """
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        meta = examples[row["prompt_id"]].meta
        by_source.setdefault(meta.get("source_id", row["prompt_id"]), []).append(
            {**row, "rotation": meta.get("rotation", 0)})
    labels = list(dict.fromkeys(label for row in rows for label in examples[row["prompt_id"]].meta["labels"]))
    asked = [r for group in by_source.values() for r in group if r["rotation"] == 0]
    outcomes = [r["passed"] for r in asked]
    summary = {
        "accuracy": sum(outcomes) / len(outcomes), "ci": list(bootstrap_ci(outcomes)), "n": len(outcomes),
        "choice_rates": choice_rates([r["chosen"] for r in asked], labels),
        "results": [{"prompt_id": r["prompt_id"], "passed": r["passed"], "chosen": r["chosen"],
                     "target": examples[r["prompt_id"]].target} for r in asked],
    }
    if any(r["rotation"] for group in by_source.values() for r in group):
        shares = {source: sum(r["passed"] for r in group) / len(group) for source, group in by_source.items()}
        summary["debiased"] = {
            "accuracy": sum(shares.values()) / len(shares), "ci": list(bootstrap_ci(list(shares.values()))),
            "consistent": sum(all(r["passed"] for r in group) for group in by_source.values()) / len(by_source),
            "rotations": sum(len(group) for group in by_source.values()),
            "choice_rates": choice_rates([r["chosen"] for group in by_source.values() for r in group], labels),
            "results": [{"prompt_id": source, "passed": shares[source],
                         "consistent": all(r["passed"] for r in group),
                         "chosen": [r["chosen"] for r in sorted(group, key=lambda r: r["rotation"])]}
                        for source, group in by_source.items()],
        }
    return summary


def option_average(rows: Sequence[dict], examples: dict[str, Example]) -> dict:
    """Log-likelihood choice with the label preference averaged out.

    Under all rotations every option is read once under every label, so the mean of an option's
    log-probability over its labels carries no preference for a label; the choice is the option
    with the highest mean (`chosen` is its label in the question as asked). `rows` are
    `loglik_choices` rows for every rotation of each question.
    """
    per_option: dict[str, list[list[float]]] = {}
    for row in rows:
        example = examples[row["prompt_id"]]
        labels, shift = example.meta["labels"], example.meta.get("rotation", 0)
        sums = per_option.setdefault(example.meta.get("source_id", example.id), [[] for _ in labels])
        for position, label in enumerate(labels):
            # The option under this label is the unrotated option `shift` places further on.
            sums[(position + shift) % len(labels)].append(row["logprobs"][label])
    results = []
    for source, values in per_option.items():
        original = examples[source]
        means = [sum(v) / len(v) for v in values]
        chosen = original.meta["labels"][means.index(max(means))]
        results.append({"prompt_id": source, "passed": chosen == original.target, "chosen": chosen,
                        "target": original.target})
    outcomes = [r["passed"] for r in results]
    return {"accuracy": sum(outcomes) / len(outcomes), "ci": list(bootstrap_ci(outcomes)), "results": results}


def evaluate_mc(model, tokenizer, task: str | Task, *, n: int | None = None, split: str = "test", seed: int = 0,
                config: SamplingConfig | None = None, generations: str | Path | None = None, rotations: bool = True,
                loglik: bool = True, batch_size: int = 8, provenance: dict | None = None,
                progress: Callable | None = None) -> dict:
    """A multiple-choice evaluation read three ways: generated letter, label log-likelihood, rotations.

    Generative (when `generations` is a path): sampling as in `evaluate` (greedy by default),
    scored by the task's letter reader. Log-likelihood (when `loglik`): the most probable label
    at the answer position (`spd_lens.mc_loglik`). With `rotations`, every question is also asked
    with its options cyclically rotated (ids `<id>@rot<k>`), and each reading gains a `debiased`
    part (see `summarise_choices`); log-likelihood also gains `option_average`, the choice with
    the label preference averaged out. The rotated questions follow the unrotated ones in the
    generations file (all questions' first rotation, then the second, ...).

    Returns `{"task", "split", "seed", "n", "rotations", "generative", "loglik"}`; a reading not
    asked for is None.

    Example:
        >>> from spd_lens import load_hf
        >>> model, tok = load_hf("tiny")
        >>> result = evaluate_mc(model, tok, "family-mc", n=4)
        >>> result["loglik"]["debiased"]["choice_rates"].keys() == {"A", "B", "C", "D"}
        True
    """
    from spd_lens.mc_loglik import loglik_choices
    from spd_lens.tasks.mcqa import option_rotations

    task = get_task(task)
    if task.family != "mcqa":
        raise SpdLensError(f"task {task.name!r} is not multiple choice ({task.family}): evaluate_mc reads option "
                           "letters; use evaluate() for it")
    if generations is None and not loglik:
        raise SpdLensError("nothing to evaluate: give generations=PATH for generative accuracy, loglik=True, or both")
    examples = task.examples(split, n=n, seed=seed)
    asked = list(examples)
    if rotations:
        # Unrotated questions first, then each rotation in turn (all questions' rot1, then rot2, ...).
        rotated = [option_rotations(e)[1:] for e in examples]
        asked += [r[k] for k in range(max(map(len, rotated), default=0)) for r in rotated if k < len(r)]
    by_id = {e.id: e for e in asked}
    result = {"task": task.name, "split": split, "seed": seed, "n": len(examples),
              "rotations": rotations, "generative": None, "loglik": None}
    if generations is not None:
        config = config or SamplingConfig(temperature=0.0, max_new_tokens=task.max_new_tokens, seed=seed)
        path = generate_jsonl(model, tokenizer, asked, generations, config, task=task.name,
                              provenance={"split": split, "rotations": rotations, **(provenance or {})},
                              progress=progress)
        rows = []
        for record in read_completions(path):
            example = by_id[record["prompt_id"]]
            rows.append({"prompt_id": example.id, "chosen": task.answer(example, record["completion"]),
                         "passed": task.score(example, record["completion"]).passed})
        result["generative"] = {**summarise_choices(rows, by_id), "generations": str(path)}
    if loglik:
        rows = loglik_choices(model, tokenizer, asked, batch_size=batch_size, progress=progress)
        summary = summarise_choices(rows, by_id)
        by_prompt = {r["prompt_id"]: r for r in rows}
        for entry in summary["results"]:
            entry.update(logprobs=by_prompt[entry["prompt_id"]]["logprobs"],
                         label_mass=by_prompt[entry["prompt_id"]]["label_mass"])
        if rotations:
            summary["debiased"]["option_average"] = option_average(rows, by_id)
        result["loglik"] = summary
    return result
