"""Multiple-choice tasks: the correctness span is the option letter.

`family-mc` works offline: reasoning-gym's family-relationship puzzles (Apache-2.0, exact ground
truth) turned into multiple-choice questions (four options by default) whose distractors are other
kinship words. It asks for reasoning over a short text rather than arithmetic, so it tests a
capability other than the math tasks. Its difficulty options are the number of options and the
family size, with presets: `get_task("family-mc", preset="easy")`. `mmlu` and `arc` come from
the hub or a local JSONL in their public formats.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import Example, Score, Task, generator_seed, hash_split, parse_procedural_id, procedural_id
from spd_lens.tasks.records import load_split, require_fields

INSTRUCTION = "Answer with the letter of the correct option."


def format_question(question: str, options: list[str], labels: list[str] | None = None) -> str:
    labels = labels or list(string.ascii_uppercase[: len(options)])
    lines = "\n".join(f"{label}. {option}" for label, option in zip(labels, options))
    return f"{question.strip()}\n\n{lines}\n\n{INSTRUCTION}"


# A label stands alone (no letter or digit before it; "(", "[" or "*" may open it) and is closed:
# followed by ")", "]", ":", "*" or a "." ("D.FATHER" is D; "A.M." and "1.5" hold no label), or by
# nothing but whitespace up to the end of the text. "A nephew is ..." is the article, not option A;
# "a" is never a label.
_OPEN = r"(?<![A-Za-z0-9])[(\[*]*"
_CLOSE = r"(?=[)\]:*]|\.(?![0-9]|[A-Za-z]\.)|\s*$)"
# An explicit statement of the choice, where a comma closes the label too: "answer is C",
# "Answer: (C)", "the correct choice is C, son", "correct option is **C**" ...
# "Option D." alone only names an option.
_STATED = (r"(?i:\banswer\b(?:\s+(?:is|would\s+be|will\s+be))?|\b(?:option|choice)\b(?=\s*:|\s+(?:is|would|will)\b)"
           r"(?:\s+(?:is|would\s+be|will\s+be))?)\s*:?\s*(?:(?i:option|letter|choice)\s+)?" + _OPEN + "({labels})"
           + r"(?=[)\]:*,]|\.(?![0-9]|[A-Za-z]\.)|\s*$)")
# ... or the other way round: "A is the only correct answer", "(B) would be the answer".
_STATED_AFTER = (_OPEN + "({labels})"
                 + r"[)\]*]*\s+(?i:is|would\s+be)\s+((?:[\w-]+\s+){{0,3}}?)(?i:answer|option|choice)\b")
_NEGATION = re.compile(r"(?i)\b(?:not|no|never|wrong|incorrect)\b")


def extract_letter(completion: str, labels: list[str]) -> str | None:
    """The option label a completion commits to, or None.

    A label counts only as a label: matched case-sensitively, standing alone and closed (followed
    by ".", ")", "]", ":" or "*", or ending the text), so neither "The answer is a nephew." nor
    the article in "A nephew is the son of ..." reads as option A. The first explicit statement
    ("The answer is C", "Answer: (C)", "the correct choice is C, son", "A is the only correct
    answer") wins; otherwise the first closed label. A completion that starts by reading the
    options back as a list ("A. wife\nB. father\n...") and states no choice commits to none.

    Example:
        >>> extract_letter("A nephew is the son of one's sibling. So C.", ["A", "B", "C", "D"])
        'C'
        >>> extract_letter("The answer is a nephew.", ["A", "B", "C", "D"]) is None
        True
    """
    alternatives = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    statements = list(re.finditer(_STATED.format(labels=alternatives), completion))
    statements += [m for m in re.finditer(_STATED_AFTER.format(labels=alternatives), completion)
                   if not _NEGATION.search(m.group(2))]
    if statements:
        return min(statements, key=lambda m: m.start()).group(1)
    # A short option line and, under it, another label: the list read back ("A. aunt\nB. son").
    listed = re.match(rf"\s*({alternatives})[.)](?:[ \t]+[^\s]+){{1,5}}[ \t]*\n[ \t]*({alternatives})[.)][ \t]+\S",
                      completion)
    if listed and listed.group(1) != listed.group(2):
        return None
    first = re.search(rf"{_OPEN}({alternatives}){_CLOSE}", completion)
    return first.group(1) if first else None


class MultipleChoiceTask(Task):
    family = "mcqa"
    max_new_tokens = 16

    def answer(self, example: Example, completion: str) -> str | None:
        return extract_letter(completion, example.meta["labels"])

    def example_by_id(self, example_id: str) -> Example:
        """The example with this id, a rotated one (`<id>@rot<shift>`, `rotate_options`) included."""
        base, mark, shift = example_id.rpartition(ROTATION_MARK)
        if mark and shift.isdigit():
            return rotate_options(self._unrotated_by_id(base), int(shift))
        return self._unrotated_by_id(example_id)

    def _unrotated_by_id(self, example_id: str) -> Example:
        return Task.example_by_id(self, example_id)

    def score(self, example: Example, completion: str) -> Score:
        chosen = self.answer(example, completion)
        ok = chosen == example.target
        return Score(ok, "passed" if ok else "failed", f"chose {chosen}, expected {example.target}")


def mc_example(example_id: str, question: str, options: list[str], answer_index: int,
               labels: list[str] | None = None) -> Example:
    labels = labels or list(string.ascii_uppercase[: len(options)])
    letter = labels[answer_index]
    return Example(example_id, format_question(question, options, labels), letter, ((0, len(letter)),),
                   target=letter, meta={"labels": labels, "options": options, "question": question.strip()})


ROTATION_MARK = "@rot"


def rotate_options(example: Example, shift: int) -> Example:
    """The same question with its options moved `shift` places up, cyclically, under the same labels.

    The answer keeps its text and moves to another label; the id becomes `<id>@rot<shift>` (shift
    0 gives the example itself). Asking every rotation puts each option under every label once,
    which separates a preference for a label from knowing the answer.

    Example:
        >>> example = mc_example("q", "Who?", ["ann", "bob", "cy"], answer_index=1)
        >>> rotated = rotate_options(example, 1)
        >>> rotated.id, rotated.meta["options"], rotated.target
        ('q@rot1', ['bob', 'cy', 'ann'], 'A')
    """
    missing = [key for key in ("labels", "options", "question") if key not in example.meta]
    if missing or example.target not in example.meta.get("labels", []):
        raise SpdLensError(f"example {example.id!r} is not a multiple-choice example (its meta lacks "
                           f"{missing or ['its target among the labels']}): build it with mc_example()")
    labels, options = example.meta["labels"], example.meta["options"]
    shift %= len(options)
    if shift == 0:
        return example
    rotated = options[shift:] + options[:shift]
    answer_index = (labels.index(example.target) - shift) % len(options)
    moved = mc_example(f"{example.id}{ROTATION_MARK}{shift}", example.meta["question"], rotated, answer_index, labels)
    return replace(moved, meta={**example.meta, **moved.meta, "rotation": shift, "source_id": example.id})


def option_rotations(example: Example) -> list[Example]:
    """Every cyclic rotation of the example's options (as many as it has options), unrotated first."""
    return [rotate_options(example, shift) for shift in range(len(example.meta.get("options", [None])))]


class FamilyMC(MultipleChoiceTask):
    """Kinship puzzles. Options: `num_options` (2-6 answer options), `min_family_size` /
    `max_family_size` (people in the story, 3-12: 3 is grandparents and a son, 4 adds his wife,
    more add children, a second pair of grandparents, an uncle and an aunt). A preset sets them
    all; explicit options override it."""

    name = "family-mc"
    description = "kinship puzzles as multiple choice (reasoning-gym family_relationships); presets easy, hard (default: 4 options, 4-8 people), offline"
    presets = {
        "easy": {"num_options": 3, "min_family_size": 4, "max_family_size": 8},
        "hard": {"num_options": 4, "min_family_size": 4, "max_family_size": 8},
    }
    default_preset = "hard"

    def __init__(self, preset: str | None = None, *, num_options: int | None = None,
                 min_family_size: int | None = None, max_family_size: int | None = None):
        options = self._set_difficulty(preset, {"num_options": num_options, "min_family_size": min_family_size,
                                                "max_family_size": max_family_size})
        self.num_options = options.pop("num_options")
        if not (isinstance(self.num_options, int) and 2 <= self.num_options <= 6) or not (
                3 <= options["min_family_size"] <= options["max_family_size"] <= 12):
            raise SpdLensError(f"family-mc options num_options={self.num_options}, {options} are not valid: "
                               "num_options must be 2-6 and 3 <= min_family_size <= max_family_size <= 12")
        self.dataset_options = options

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        import reasoning_gym

        if n is None:
            raise SpdLensError(f"task {self.name!r} is procedural: pass n, the number of examples to generate")
        size = 20 * n + 200
        data = reasoning_gym.create_dataset("family_relationships", size=size, seed=generator_seed(seed, split),
                                            **self.dataset_options)
        examples, seen = [], set()
        for index in range(size):
            example = self._example(data[index], split, seed, index)
            question = example.meta["question"]
            if question in seen or hash_split(question) != split:
                continue
            seen.add(question)
            examples.append(example)
            if len(examples) == n:
                break
        return examples

    def _example(self, item: dict, split: str, seed: int, index: int, example_id: str | None = None) -> Example:
        from reasoning_gym.graphs.family_relationships import Relationship

        words = [r.value for r in Relationship]
        question = re.sub(r"\s*(Respond only|Answer) with .*$", "", item["question"].strip())
        rng = random.Random(f"{seed}/{index}")
        answer = str(item["answer"])
        options = [answer, *rng.sample([w for w in words if w != answer], self.num_options - 1)]
        rng.shuffle(options)
        example = mc_example(example_id or procedural_id(self, split, seed, index), question, options,
                             options.index(answer))
        example.meta["question"] = question
        return example

    def _unrotated_by_id(self, example_id: str) -> Example:
        import reasoning_gym

        variant, split, seed, index, stream = parse_procedural_id(self.name, example_id)
        task = self._with_variant(variant)
        data = reasoning_gym.create_dataset("family_relationships", size=index + 1, seed=stream, **task.dataset_options)
        return task.with_shots(task._example(data[index], split, seed, index, example_id))


class Mmlu(MultipleChoiceTask):
    name = "mmlu"
    description = "MMLU (hub 'cais/mmlu' all, or local JSONL: question, choices[4], answer index or letter)"

    def __init__(self, path: str | None = None):
        self.path = path

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        # MMLU's own "auxiliary_train" is not multiple-subject; its dev+validation serve as train.
        records = load_split(
            self.name, split, path=self.path, hub=("cais/mmlu", "all", {"train": "validation", "test": "test"}),
            record_key=lambda r: str(r.get("question")),
        )
        examples = []
        for index, record in enumerate(records):
            require_fields(self.name, record, ("question", "choices", "answer"))
            answer = record["answer"]
            answer_index = "ABCD".index(answer) if isinstance(answer, str) else int(answer)
            examples.append(mc_example(f"mmlu/{split}/{index}", record["question"], list(record["choices"]), answer_index))
        random.Random(seed).shuffle(examples)
        return examples


class Arc(MultipleChoiceTask):
    name = "arc"
    description = "ARC-Challenge (hub 'allenai/ai2_arc', or local JSONL: question, choices{text,label}, answerKey)"

    def __init__(self, path: str | None = None, subset: str = "ARC-Challenge"):
        self.path = path
        self.subset = subset

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        records = load_split(
            self.name, split, path=self.path,
            hub=("allenai/ai2_arc", self.subset, {"train": "train", "dev": "validation", "test": "test"}),
            record_key=lambda r: str(r.get("id", r.get("question"))),
        )
        examples = []
        for index, record in enumerate(records):
            require_fields(self.name, record, ("question", "choices", "answerKey"))
            labels = [str(label) for label in record["choices"]["label"]]
            examples.append(mc_example(f"arc/{split}/{record.get('id', index)}", record["question"],
                                       list(record["choices"]["text"]), labels.index(str(record["answerKey"])), labels))
        random.Random(seed).shuffle(examples)
        return examples
