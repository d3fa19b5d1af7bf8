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
from spd_lens.chat import record_system
from spd_lens.processes import Processes
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
    groups = by_seed(results)
    for scores in (groups[seed] for seed in sorted(groups, key=_seed_order)):
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


def _seed_order(seed) -> tuple:
    """Seeds in one order on every side of a comparison, whatever order the results came in."""
    return (seed is None, str(seed))


def _nested_groups(results: Sequence[dict]) -> dict | None:
    """{seed: {prompt: outcome}} when seeds answered different prompts (training data: each seed
    samples its own prompts, disjoint for procedural tasks, overlapping for a shuffled dataset);
    None when every seed answered the same prompts (evaluations) or there is one seed."""
    groups = by_seed(results)
    if len(groups) < 2:
        return None
    prompt_sets = [set(scores) for scores in groups.values()]
    if all(prompts == prompt_sets[0] for prompts in prompt_sets):
        return None
    return {seed: groups[seed] for seed in sorted(groups, key=_seed_order)}


def _nested_means(groups: Sequence[np.ndarray], resamples: int, seed: int, *, resample_seeds: bool = True) -> np.ndarray:
    """Bootstrap distribution of the mean over seeds of each seed's mean, for prompts nested in
    seeds: each draw picks seeds with replacement (or keeps them), then resamples each picked
    seed's own prompts afresh. Resampling both stages counts the prompts' noise twice, so with
    three seeds and no seed effect the interval is about 1.26x as wide as it should be: it errs
    on the side of "not resolved"."""
    rng = np.random.default_rng(seed)
    n_seeds = len(groups)
    picks = (rng.integers(0, n_seeds, size=(resamples, n_seeds)) if resample_seeds
             else np.tile(np.arange(n_seeds), (resamples, 1)))
    means = np.empty((resamples, n_seeds))
    for index, values in enumerate(groups):
        chosen = picks == index
        if chosen.any():
            n = len(values)
            counts = rng.multinomial(n, np.full(n, 1 / n), size=int(chosen.sum()))
            means[chosen] = counts @ values / n
    return means.mean(axis=1)


def _nested_stats(groups: Sequence[np.ndarray], resamples: int, seed: int, level: float):
    """For values nested in seeds: the interval over seeds then values, the interval over values
    alone, each seed's mean and the seed test's p-value."""
    return (_interval(_nested_means(groups, resamples, seed), level),
            _interval(_nested_means(groups, resamples, seed, resample_seeds=False), level),
            np.array([g.mean() for g in groups]), _nested_seed_p(groups))


def _seed_test(between: float, noise: float, dof: int) -> float:
    """p-value of the seeds' sum of squares `between` against the questions' noise variance."""
    if noise <= 0:
        return 1.0 if between <= 1e-12 else 0.0
    from scipy.stats import chi2  # here, not at import: scipy.stats takes a second to load

    return float(chi2.sf(between / noise, dof))


def _crossed_seed_p(matrix: np.ndarray) -> float:
    """Do the seeds (rows) differ more than question noise explains, when every seed answered the
    same questions (columns)? The seed effect of a two-way analysis of variance (questions as
    blocks), against chi-square with seeds - 1 degrees of freedom."""
    n_seeds, n = matrix.shape
    if n_seeds < 2 or n < 2:
        return 1.0
    seed_means, question_means, grand = matrix.mean(axis=1), matrix.mean(axis=0), matrix.mean()
    residual = matrix - seed_means[:, None] - question_means[None, :] + grand
    noise = float((residual ** 2).sum()) / ((n_seeds - 1) * (n - 1))
    return _seed_test(n * float(((seed_means - grand) ** 2).sum()), noise, n_seeds - 1)


def _nested_seed_p(groups: Sequence[np.ndarray]) -> float:
    """The same question when each seed answered its own questions: a one-way analysis of
    variance of the seed means against the pooled within-seed variance."""
    total = sum(len(g) for g in groups)
    if len(groups) < 2 or total <= len(groups):
        return 1.0
    grand = float(np.concatenate(groups).mean())
    between = sum(len(g) * (float(g.mean()) - grand) ** 2 for g in groups)
    noise = sum(float(((g - g.mean()) ** 2).sum()) for g in groups) / (total - len(groups))
    return _seed_test(between, noise, len(groups) - 1)


SEED_TEST_LEVEL = 0.05  # seeds are said to differ when the test's p-value is below this


def seeds_differ(stats: dict) -> bool:
    """Whether a score's or a difference's seeds differ more than its questions explain: then more
    seeds, not more questions, would narrow it. Records from before the test carry the older
    rule's flag (the seeds' range wider than the question-only interval), which is read instead."""
    return bool(stats.get("seeds_differ", stats.get("seed_spread_exceeds_ci", False)))


def _interval(draws: np.ndarray, level: float) -> list[float]:
    tail = (1 - level) / 2
    return [float(np.quantile(draws, tail)), float(np.quantile(draws, 1 - tail))]


def seeded_ci(results: Sequence[dict], *, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Score and a hierarchical bootstrap interval over seeds, then questions.

    `results` are per-question results (`prompt_id`, `passed`, optional `seed`). Each draw
    resamples the seeds with replacement and the questions with replacement, so the interval
    widens when seeds disagree; with one seed it is the usual question bootstrap. Seeds that
    answered the same questions (evaluations) share each draw's questions; seeds that answered
    their own questions (training data) have them resampled within each seed. Also returns
    `ci_questions` (the interval resampling questions alone, seeds averaged), `seed_spread`
    (largest minus smallest seed score) and `seed_p`, the p-value of an analysis of variance
    asking whether the seeds differ more than question noise explains (questions as blocks when
    the seeds share them); `seeds_differ` when it is below `SEED_TEST_LEVEL`: seed noise then
    matters, and more seeds, not more questions, are what narrows the result.
    """
    if not results:
        raise SpdLensError("no outcomes to compute a confidence interval from")
    prompts = sorted({r["prompt_id"] for r in results})
    nested = _nested_groups(results)
    if nested is not None:  # each seed its own prompts: they are resampled within their seed
        groups = [np.array(list(scores.values())) for scores in nested.values()]
        ci, questions, seed_scores, p = _nested_stats(groups, resamples, seed, level)
    else:  # seeds answered the same prompts (crossed): prompts resampled once per draw
        matrix = _outcome_matrix(results, prompts)
        ci = _interval(_hierarchical_means([matrix], [1.0], resamples, seed), level)
        questions = _interval(_hierarchical_means([matrix.mean(axis=0, keepdims=True)], [1.0], resamples, seed), level)
        seed_scores = matrix.mean(axis=1)
        p = _crossed_seed_p(matrix)
    return {"score": float(seed_scores.mean()), "ci": ci, "ci_questions": questions, "n": len(prompts),
            "n_seeds": len(seed_scores), "seed_spread": float(seed_scores.max() - seed_scores.min()),
            "seed_p": p, "seeds_differ": p < SEED_TEST_LEVEL}


def paired_difference(a: Sequence[dict], b: Sequence[dict], *, resamples: int = 2000, seed: int = 0,
                      level: float = 0.95) -> dict:
    """Score of `a` minus score of `b` on the prompts both answered, with a hierarchical
    bootstrap interval: each side's seeds are resampled on their own, the shared prompts once
    per draw (the pairing removes the questions' own difficulty from the noise). When each seed
    answered its own prompts on both sides (training data), a seed's prompts are the pairing:
    seeds are resampled together, then each seed's prompt-by-prompt differences.

    `a` and `b` are per-example results (`prompt_id`, `passed`, and `seed` where a method has
    several). `seed_spread` is the spread of the per-seed differences (seeds paired by name when
    both sides have them, else each seed of one side against the other side's mean); `seed_p`
    and `seeds_differ` test whether the per-seed differences differ more than question noise
    explains (with unpaired seeds: each seeded side on its own, Bonferroni; see `seeded_ci`).
    """
    first, second = per_prompt_scores(a), per_prompt_scores(b)
    shared = sorted(first.keys() & second.keys())
    if not shared:
        raise SpdLensError("the two result sets share no prompt: compare evaluations of the same questions")
    nested = _nested_pairs(a, b, set(shared))
    if nested is not None:
        return _nested_difference(nested, len(shared), resamples, seed, level)
    left, right = _outcome_matrix(a, shared), _outcome_matrix(b, shared)
    ci = _interval(_hierarchical_means([left, right], [1.0, -1.0], resamples, seed), level)
    questions = _interval(_hierarchical_means([left.mean(axis=0, keepdims=True), right.mean(axis=0, keepdims=True)],
                                              [1.0, -1.0], resamples, seed), level)
    seeds_a, seeds_b = sorted(by_seed(a), key=_seed_order), sorted(by_seed(b), key=_seed_order)
    if len(seeds_a) > 1 and seeds_a == seeds_b:
        per_seed = (left - right).mean(axis=1)
        p = _crossed_seed_p(left - right)  # seeds paired by name: do the differences differ by seed?
    elif len(seeds_a) > 1 or len(seeds_b) > 1:
        per_seed = np.concatenate([left.mean(axis=1) - right.mean(), left.mean() - right.mean(axis=1)])
        # Each seeded side tested on its own, Bonferroni over the sides tested.
        tests = [_crossed_seed_p(side) for side in (left, right) if side.shape[0] > 1]
        p = min(1.0, len(tests) * min(tests))
    else:
        per_seed, p = np.array([left.mean() - right.mean()]), 1.0
    return {"difference": float(left.mean() - right.mean()), "ci": ci, "ci_questions": questions, "n": len(shared),
            "seed_spread": float(per_seed.max() - per_seed.min()), "seed_p": p, "seeds_differ": p < SEED_TEST_LEVEL}


def _nested_pairs(a: Sequence[dict], b: Sequence[dict], shared: set[str]) -> list[np.ndarray] | None:
    """Per seed, the per-prompt differences a - b when both sides ran the same seeds and the seeds
    answered different prompts (training data: every method samples a seed's prompts, and seeds
    sample different ones); None for any other design."""
    left, right = _nested_groups(a), _nested_groups(b)
    if left is None or right is None or left.keys() != right.keys():
        return None
    pairs = []
    for seed, mine in left.items():
        theirs = right[seed]
        prompts = sorted(mine.keys() & theirs.keys() & shared)
        if not prompts:
            return None
        pairs.append(np.array([mine[p] - theirs[p] for p in prompts]))
    return pairs


def _nested_difference(pairs: list[np.ndarray], n: int, resamples: int, seed: int, level: float) -> dict:
    """paired_difference for prompts nested in seeds: seeds are resampled together on both sides
    (a seed's prompts are the pairing), then each seed's prompts."""
    ci, questions, per_seed, p = _nested_stats(pairs, resamples, seed, level)
    return {"difference": float(per_seed.mean()), "ci": ci, "ci_questions": questions, "n": n,
            "seed_spread": float(per_seed.max() - per_seed.min()), "seed_p": p, "seeds_differ": p < SEED_TEST_LEVEL}


CUT_OFF = ("score", "wrong")  # `[eval] cut_off`: how an answer cut off at the token budget is scored


def score_records(task: Task, examples_by_id: dict[str, Example], records: list[dict],
                  progress: Callable | None = None, processes: Processes | None = None,
                  cut_off: str = "score") -> EvalResult:
    """Score completion records (`prompt_id` + completion text) against the task's examples.

    A record whose `finish_reason` is "length" stopped at the token budget: with `cut_off =
    "score"` it is scored as written, with "wrong" it fails (status "cut_off", the scorer's own
    verdict kept as `scored_as`), so that a truncated text cannot pass on whatever its last
    sentence happens to say.

    With `processes` (every process of a launch calls this with the same records) each process
    scores every world-th record, so the sandbox work of code tasks is divided, and every process
    returns the whole result in the records' order."""
    if not records:
        raise SpdLensError("no completions to score")
    if cut_off not in CUT_OFF:
        raise SpdLensError(f"cut_off = {cut_off!r}: use 'score' (a cut-off answer scored as written) or 'wrong'")
    unknown = [r["prompt_id"] for r in records if r["prompt_id"] not in examples_by_id]
    if unknown:
        raise SpdLensError(f"prompt id {unknown[0]!r} is not an example of task {task.name!r}")
    check_record_systems(examples_by_id, records)
    parallel = processes is not None and processes.parallel
    mine = processes.shard(len(records)) if parallel else range(len(records))
    scored = {i: _score_record(task, examples_by_id[records[i]["prompt_id"]], records[i], cut_off)
              for i in (progress(mine) if progress else mine)}
    if parallel:
        scored = {i: result for part in processes.gather(scored) for i, result in part.items()}
    results = [scored[i] for i in range(len(records))]
    outcomes = [r["passed"] for r in results]
    return EvalResult(task.name, sum(outcomes) / len(outcomes), bootstrap_ci(outcomes), len(outcomes), results)


def check_record_systems(examples_by_id: dict[str, Example], records: Sequence[dict]) -> None:
    """Refuse completions sampled under another system prompt than their example carries (a record's
    `system`, where known: see `read_completions`), naming both: they answer another prompt."""
    for record in records:
        if "system" not in record:
            continue
        example = examples_by_id[record["prompt_id"]]
        if record["system"] != example.system:
            raise SpdLensError(
                f"the completion of {example.id!r} was sampled under the system prompt {record['system']!r}, but the "
                f"example carries {example.system!r} (None: the template's default, '': none): score completions "
                "generated from the examples themselves (spd-lens generate / generate_jsonl with the same examples)")


def _score_record(task: Task, example: Example, record: dict, cut_off: str = "score") -> dict:
    verdict = task.score(example, record["completion"])
    result = {"prompt_id": record["prompt_id"], "passed": verdict.passed, "status": verdict.status,
              "completion": record["completion"], "detail": verdict.detail[-300:]}
    if "finish_reason" in record:
        result["finish_reason"] = record["finish_reason"]
        if cut_off == "wrong" and record["finish_reason"] == "length":
            result.update(passed=False, status="cut_off", scored_as=verdict.passed)
    if verdict.isolation is not None:
        result["sandbox"] = verdict.isolation
    return result


def read_completions(path: str | Path) -> list[dict]:
    """`{"prompt_id", "completion"}` records from the generate export or the minimal format."""
    from spd_lens.tasks.records import read_jsonl
    from spd_lens.train import finish_reason

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
        if "system" in record or "settings" in record:  # made by generate_jsonl: the system turn is known
            record_out["system"] = record_system(record)
        if finish_reason(record) in ("stop", "length"):  # the project's, vLLM's or OpenAI's (choices[0])
            record_out["finish_reason"] = finish_reason(record)
        records.append(record_out)
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
             progress: Callable | None = None, processes: Processes | None = None,
             cut_off: str = "score", engine=None) -> EvalResult:
    """Greedy (by default) generation on `split` examples, scored; generations saved to `generations`.
    Each result keeps its `finish_reason`; `cut_off` is `[eval] cut_off` (see `score_records`).

    Under a multi-process launch (`processes`, default `Processes.current()`; every process calls
    this) each process generates and scores a shard; every process returns the whole result.
    `engine` (`spd_lens.engines`, default the HF decoder on `model`) generates the answers."""
    processes = processes or Processes.current()
    if not isinstance(task, (str, Task)):  # a list of your own Examples: all of them (or n) are `split`,
        from spd_lens.tasks import Capability  # scored by span_match (a Capability brings its own scorer)

        task = Capability({split: list(task)})
    task = get_task(task)
    task.check_ready()  # e.g. no code sandbox here: refuse before generating
    examples = task.examples(split, n=n, seed=seed)
    config = config or SamplingConfig(temperature=0.0, max_new_tokens=task.max_new_tokens, seed=seed)
    path = generate_jsonl(model, tokenizer, examples, generations, config, task=task.name,
                          provenance={"split": split, **(provenance or {})}, progress=progress, processes=processes,
                          engine=engine)
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    records = [{"prompt_id": r["prompt_id"], "completion": r["messages"][-1]["content"],
                "finish_reason": r.get("finish_reason", "stop"), "system": record_system(r)} for r in records]
    return score_records(task, {e.id: e for e in examples}, records, processes=processes, cut_off=cut_off)


def training_data_quality(task: str | Task, path: str | Path, examples: Sequence[Example] | None = None,
                          progress: Callable | None = None) -> dict:
    """How good a self-generated training file is, measured and never used to filter.

    The share of completions the task's scorer marks correct (against each prompt's reference),
    the share cut off at the token budget (`finish_reason` "length"), their mean length in
    tokens, and the count of each finish reason; `outcomes` holds each completion's verdict
    (`prompt_id`, `passed`), for comparisons paired over prompts. SPD's mechanism predicts that
    projected sampling yields correct completions more often than plain (psr) or random-subspace
    sampling.
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
            "finish_reasons": dict(sorted(reasons.items())),
            "outcomes": [{"prompt_id": r["prompt_id"], "passed": r["passed"]} for r in scored.results]}


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
