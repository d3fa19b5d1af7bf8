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

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import Example, Score, Task, hash_split, parse_procedural_id, procedural_id
from spd_lens.tasks.records import load_split, require_fields

INSTRUCTION = "Answer with the letter of the correct option."


def format_question(question: str, options: list[str], labels: list[str] | None = None) -> str:
    labels = labels or list(string.ascii_uppercase[: len(options)])
    lines = "\n".join(f"{label}. {option}" for label, option in zip(labels, options))
    return f"{question.strip()}\n\n{lines}\n\n{INSTRUCTION}"


def extract_letter(completion: str, labels: list[str]) -> str | None:
    """The chosen option: after "answer is", else the first standalone option letter."""
    alternatives = "|".join(re.escape(label) for label in labels)
    for pattern in (rf"answer is:?\s*\(?({alternatives})\b", rf"(?<![A-Za-z])({alternatives})(?![A-Za-z])"):
        match = re.search(pattern, completion, flags=re.IGNORECASE if pattern.startswith("answer") else 0)
        if match:
            return match.group(1).upper()
    return None


class MultipleChoiceTask(Task):
    family = "mcqa"
    max_new_tokens = 16

    def answer(self, example: Example, completion: str) -> str | None:
        return extract_letter(completion, example.meta["labels"])

    def score(self, example: Example, completion: str) -> Score:
        chosen = self.answer(example, completion)
        ok = chosen == example.target
        return Score(ok, "passed" if ok else "failed", f"chose {chosen}, expected {example.target}")


def mc_example(example_id: str, question: str, options: list[str], answer_index: int,
               labels: list[str] | None = None) -> Example:
    labels = labels or list(string.ascii_uppercase[: len(options)])
    letter = labels[answer_index]
    return Example(example_id, format_question(question, options, labels), letter, ((0, len(letter)),),
                   target=letter, meta={"labels": labels, "options": options})


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
        data = reasoning_gym.create_dataset("family_relationships", size=size, seed=seed * 2 + (split == "test"),
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

    def _example(self, item: dict, split: str, seed: int, index: int) -> Example:
        from reasoning_gym.graphs.family_relationships import Relationship

        words = [r.value for r in Relationship]
        question = re.sub(r"\s*(Respond only|Answer) with .*$", "", item["question"].strip())
        rng = random.Random(f"{seed}/{index}")
        answer = str(item["answer"])
        options = [answer, *rng.sample([w for w in words if w != answer], self.num_options - 1)]
        rng.shuffle(options)
        example = mc_example(procedural_id(self, split, seed, index), question, options, options.index(answer))
        example.meta["question"] = question
        return example

    def example_by_id(self, example_id: str) -> Example:
        import reasoning_gym

        variant, split, seed, index = parse_procedural_id(self.name, example_id)
        task = self._with_variant(variant)
        data = reasoning_gym.create_dataset("family_relationships", size=index + 1, seed=seed * 2 + (split == "test"),
                                            **task.dataset_options)
        return task.with_shots(task._example(data[index], split, seed, index))


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
            self.name, split, path=self.path, hub=("allenai/ai2_arc", self.subset, {"train": "train", "test": "test"}),
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
