"""Math tasks: the correctness span is the final numeric answer.

`arithmetic` and `gsm-symbolic` are procedural (reasoning-gym, offline); `gsm8k` and `svamp` come
from the hub or a local JSONL in their public formats. Procedural questions are assigned to train
or test by a hash of the question text, so the two splits never share a question whatever the
seeds. `arithmetic` takes difficulty options (number of terms and digits, operators) and presets:
`get_task("arithmetic", preset="easy")`.
"""

from __future__ import annotations

import random
import re

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import Example, Score, Task, generator_seed, hash_split, parse_procedural_id, procedural_id
from spd_lens.tasks.records import load_split, require_fields

ANSWER_PREFIX = "The answer is "
_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


def answer_reference(reasoning: str, answer: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """`reasoning` followed by "The answer is N."; the span is N."""
    head = (reasoning.rstrip() + "\n" if reasoning.strip() else "") + ANSWER_PREFIX
    return head + answer + ".", ((len(head), len(head) + len(answer)),)


_OPERATOR = r"[-+*/×x÷^]"
_MARKERS = (r"answer is:?", r"answer:", r"####", r"\\boxed\{")
# What may stand before the number that ends an answer sentence when there is no marker.
_ANSWER_VERB = r"(?:=|\bis|\bequals|\bwas|:)"


def _final_sentence(text: str) -> str:
    """The last non-empty sentence or line (a period inside a number does not end a sentence)."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+|\n+", text.strip()) if p.strip()]
    return parts[-1] if parts else ""


def _after_marker(segment: str) -> str | None:
    """The number an answer marker commits to, read from the text that follows it.

    "The answer is 72 apples" gives 72; "The answer is 59 + 13 = 72" gives the result of the
    equation, 72, not its first operand; "The answer is 59 + 13." commits to no number.
    """
    sentence = re.split(r"(?<=[.!?])\s+|\n", segment.strip(), maxsplit=1)[0]
    first = re.match(rf"\s*\$?\s*({_NUMBER})", sentence)
    if not first:
        return None
    rest = sentence[first.end():]
    if "=" in rest:
        result = re.match(rf"\s*\$?\s*({_NUMBER})", rest[rest.rindex("=") + 1:])
        return result.group(1) if result else None
    if re.match(rf"\s*{_OPERATOR}\s*\$?\d", rest):
        return None  # an expression with no result
    return first.group(1)


def extract_number(completion: str) -> str | None:
    """The final answer of a completion, or None when it commits to none.

    1. After the last answer marker ("answer is", "answer:", "####", \\boxed{...}): the number it
       introduces, or the result of the equation it introduces.
    2. Else, a completion that is only a number ("72", "$72.") gives that number.
    3. Else, the number ending the final sentence when an answer verb ("=", "is", "equals",
       "was", ":") stands right before it and nothing numeric follows ("59 + 13 = 72.",
       "The sum is 72 apples."). Rambling that merely ends on some number commits to nothing.
    """
    text = completion.replace("**", "")
    markers = [m for pattern in _MARKERS for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    if markers:
        last = max(markers, key=lambda m: m.start())
        return _after_marker(text[last.end():])
    alone = re.fullmatch(rf"\s*\$?\s*({_NUMBER})\s*\.?\s*", text)
    if alone:
        return alone.group(1)
    sentence = _final_sentence(text)
    ending = re.search(rf"{_ANSWER_VERB}\s*\$?\s*({_NUMBER})(?=[^\d=]*$)", sentence, flags=re.IGNORECASE)
    return ending.group(1) if ending else None


def numbers_equal(a: str, b: str) -> bool:
    try:
        return abs(float(a.replace(",", "")) - float(b.replace(",", ""))) < 1e-6
    except ValueError:
        return False


class MathTask(Task):
    family = "math"

    def score(self, example: Example, completion: str) -> Score:
        found = extract_number(completion)
        if found is None:
            return Score(False, "failed", "no number in the completion")
        ok = numbers_equal(found, str(example.target))
        return Score(ok, "passed" if ok else "failed", f"answer {found}, expected {example.target}")


MAX_STREAM = 2_000_000  # generated items a procedural split may scan for its questions


class ReasoningGymMath(MathTask):
    """A reasoning-gym generator; questions are hashed into splits and deduplicated."""

    dataset: str
    dataset_options: dict = {}
    instruction: str = ""

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        import reasoning_gym

        if n is None:
            raise SpdLensError(f"task {self.name!r} is procedural: pass n, the number of examples to generate")
        # Each split draws from its own generator seed and keeps only the questions hashed into it.
        # Item i of a generator does not depend on its size, so when a filter (operators, the
        # split's hash share) leaves too few, the stream is extended, never redrawn: the first
        # examples, and every id, stay what a smaller request gave.
        stream = generator_seed(seed, split)
        examples, seen, start, size, found_before = [], set(), 0, 20 * n + 200, 0
        while len(examples) < n:
            data = reasoning_gym.create_dataset(self.dataset, size=size, seed=stream, **self.dataset_options)
            for index in range(start, size):
                item = data[index]
                question = item["question"]
                if question in seen or hash_split(question) != split or not self._keep(item):
                    continue
                seen.add(question)
                examples.append(self._example(item, procedural_id(self, split, seed, index)))
                if len(examples) == n:
                    break
            if len(examples) < n and (size >= MAX_STREAM or (start and len(seen) == found_before)):
                break  # the cap, or an extension of 4x found no new question: the split is taken as exhausted
            found_before, start, size = len(seen), size, min(size * 4, MAX_STREAM)
        return examples

    def _keep(self, item: dict) -> bool:
        """Whether a generated item belongs to this task (a filter the generator has no option for)."""
        return True

    def example_by_id(self, example_id: str) -> Example:
        """Rebuild a procedural example from its id (`name[@variant]/split/seed/index`)."""
        import reasoning_gym

        variant, split, seed, index, stream = parse_procedural_id(self.name, example_id)
        task = self._with_variant(variant)
        data = reasoning_gym.create_dataset(task.dataset, size=index + 1, seed=stream, **task.dataset_options)
        return task.with_shots(task._example(data[index], example_id))

    def _example(self, item: dict, example_id: str) -> Example:
        answer = str(item["answer"]).strip()
        reference, spans = self._reference(item, answer)
        prompt = item["question"] + (" " + self.instruction if self.instruction else "")
        return Example(id=example_id, prompt=prompt, reference=reference, spans=spans, target=answer)

    def _reference(self, item: dict, answer: str):
        return answer, ((0, len(answer)),)


class Arithmetic(ReasoningGymMath):
    """Sums and differences (reasoning-gym chain_sum). Options: `min_terms`/`max_terms` (terms per
    question), `min_digits`/`max_digits` (each question draws one digit count for all its terms; a
    1-digit term is 0-9, a 2-digit term 10-99), `operators` ("+-", or "+" / "-" alone). A preset
    sets them all; explicit options override it."""

    name = "arithmetic"
    description = "sums and differences (reasoning-gym chain_sum); presets easy, hard (default: 2 terms of 1-2 digits), offline"
    dataset = "chain_sum"
    presets = {
        "easy": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": "+-"},
        "hard": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": "+-"},
    }
    default_preset = "hard"
    instruction = "Answer with just the number."
    max_new_tokens = 40

    def __init__(self, preset: str | None = None, *, min_terms: int | None = None, max_terms: int | None = None,
                 min_digits: int | None = None, max_digits: int | None = None, operators: str | None = None):
        from reasoning_gym.arithmetic.chain_sum import ChainSumConfig

        options = self._set_difficulty(preset, {"min_terms": min_terms, "max_terms": max_terms,
                                                "min_digits": min_digits, "max_digits": max_digits,
                                                "operators": operators})
        self.operators = options.pop("operators")
        try:
            if not self.operators or set(self.operators) - set("+-"):
                raise AssertionError(f"operators must be '+-', '+' or '-', got {self.operators!r}")
            ChainSumConfig(**options).validate()
        except (AssertionError, TypeError) as err:
            raise SpdLensError(f"arithmetic options {options} are not valid: {err}") from None
        self.dataset_options = options

    def _keep(self, item: dict) -> bool:
        return all(op in self.operators for op in re.findall(r" ([+-]) ", item["metadata"]["expression"]))


class GsmSymbolic(ReasoningGymMath):
    name = "gsm-symbolic"
    description = "GSM8K-derived word problems with fresh numbers (reasoning-gym gsm_symbolic), offline"
    dataset = "gsm_symbolic"
    instruction = "Think step by step, then end with 'The answer is N.'"
    max_new_tokens = 256

    def _reference(self, item: dict, answer: str):
        reasoning = item["metadata"].get("answer_cot", "")
        reasoning = re.sub(r"\n?####.*$", "", reasoning.strip())
        return answer_reference(reasoning, answer)


class Gsm8k(MathTask):
    name = "gsm8k"
    description = "GSM8K grade-school word problems (hub 'openai/gsm8k' or local JSONL: question, answer '... #### N')"
    instruction = GsmSymbolic.instruction
    max_new_tokens = 256

    def __init__(self, path: str | None = None):
        self.path = path

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        records = load_split(
            self.name, split, path=self.path, hub=("openai/gsm8k", "main", {"train": "train", "test": "test"}),
            record_key=lambda r: str(r.get("question")),
        )
        examples = []
        for index, record in enumerate(records):
            require_fields(self.name, record, ("question", "answer"))
            reasoning, _, answer = str(record["answer"]).rpartition("####")
            answer = answer.strip().replace(",", "")
            reasoning = re.sub(r"<<[^>]*>>", "", reasoning)  # calculator annotations
            reference, spans = answer_reference(reasoning, answer)
            prompt = f"{record['question']} {self.instruction}"
            examples.append(Example(f"gsm8k/{split}/{index}", prompt, reference, spans, target=answer))
        random.Random(seed).shuffle(examples)
        return examples


class Svamp(MathTask):
    name = "svamp"
    description = "SVAMP arithmetic word problems (hub 'ChilleD/SVAMP' or local JSONL: Body, Question, Answer)"
    instruction = GsmSymbolic.instruction
    max_new_tokens = 128

    def __init__(self, path: str | None = None):
        self.path = path

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        records = load_split(
            self.name, split, path=self.path, hub=("ChilleD/SVAMP", None, {"train": "train", "test": "test"}),
            record_key=lambda r: str(r.get("ID", r.get("Question"))),
        )
        examples = []
        for index, record in enumerate(records):
            require_fields(self.name, record, ("Question", "Answer"))
            question = record.get("question_concat") or f"{record.get('Body', '')} {record['Question']}".strip()
            answer = _format_number(record["Answer"])
            equation = str(record.get("Equation", "")).strip()
            reference, spans = answer_reference(f"{equation} = {answer}" if equation else "", answer)
            examples.append(Example(f"svamp/{split}/{record.get('ID', index)}", f"{question} {self.instruction}",
                                    reference, spans, target=answer))
        random.Random(seed).shuffle(examples)
        return examples


def _format_number(value) -> str:
    number = float(value)
    return str(int(number)) if number.is_integer() else str(number)
