"""BIG-Bench Hard (BBH): 27 reasoning subtasks with short exact answers.

Source: the hub dataset `lukaemon/bbh`, the copy evaluation harnesses read (one config per
subtask, each a single `test` split of up to 250 questions), or local JSONL records with `input`
and `target` (and optionally `subtask`). BBH publishes no training split, so its questions are
divided 80/20 into train and test by a hash of subtask and question; a directory with
train.jsonl / test.jsonl, or one file per split, is used as given.

Scoring follows lm-evaluation-harness's generative BBH tasks (`bbh_cot_fewshot`,
`bbh_cot_zeroshot`): the answer is the text after the first "the answer is" up to the end of its
line, without the final character (the period), and it must equal the target exactly. spd_lens
normalises a little more, since a zero-shot small model formats loosely: surrounding whitespace,
markdown emphasis and a final period are removed, and a multiple-choice target such as "(B)" is
also matched by "B" or by "(B)" followed by the option's text. The correctness span is the target
answer in the reference "So the answer is TARGET."

Example:
    >>> task = BigBenchHard()
    >>> example = Example("bbh/navigate/0", "Q", "So the answer is No.", ((17, 19),), target="No")
    >>> task.score(example, "Step 1 ... So the answer is No.").passed
    True
    >>> extract_answer("... so the answer is (B) Oct 5.")
    '(B) Oct 5'
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import Example, Score, Task, dev_or_train, hash_split
from spd_lens.tasks.records import LocalSource, has_own_dev, hub_rows, read_jsonl, require_fields, split_file

HUB_DATASET = "lukaemon/bbh"
SUBTASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)
ANSWER_PREFIX = "So the answer is "
INSTRUCTION = f'Think step by step, then end with "{ANSWER_PREFIX}<answer>."'
_MARKER = re.compile(r"[Tt]he answer is ")
_OPTION = re.compile(r"^\(([A-R])\)$")


def extract_answer(completion: str) -> str | None:
    """The text after the first "the answer is" to the end of its line, without a final period
    and surrounding emphasis; None when the completion has no such phrase."""
    match = _MARKER.search(completion.replace("**", ""))
    if match is None:
        return None
    line = completion.replace("**", "")[match.end():].split("\n", 1)[0].strip()
    return line[:-1].strip() if line.endswith(".") else line


def answers_match(answer: str, target: str) -> bool:
    """Exact match, where an option target "(B)" also takes "B" and "(B) option text"."""
    answer, target = answer.strip().strip("*`").strip(), target.strip()
    if answer == target:
        return True
    option = _OPTION.match(target)
    if option is None:
        return False
    letter = option.group(1)
    return answer == letter or answer.startswith(f"({letter}) ")


class BigBenchHard(Task):
    name = "bbh"
    family = "bbh"
    description = ("BIG-Bench Hard, 27 subtasks (hub 'lukaemon/bbh', or local JSONL: input, target[, subtask]); "
                   "exact match after 'So the answer is'")
    max_new_tokens = 256

    def __init__(self, path: LocalSource | None = None, subtasks: list[str] | None = None):
        unknown = sorted(set(subtasks or ()) - set(SUBTASKS))
        if unknown or subtasks == []:
            raise SpdLensError(f"unknown BBH subtask(s) {unknown or '(none given)'}: use some of {list(SUBTASKS)}")
        self.path = path
        self.subtasks = tuple(subtasks) if subtasks else SUBTASKS
        self._hub_rows: list[dict] | None = None

    def _records(self, split: str) -> list[dict]:
        if split == "dev" and self.path is not None and not has_own_dev(self.path):
            return [r for r in self._records("train") if dev_or_train(f"{r.get('subtask', '')}/{r.get('input')}") == "dev"]
        if self.path is not None:
            local = split_file(self.name, split, self.path)
            if local is not None:
                rows = read_jsonl(local)
                if split == "train" and not has_own_dev(self.path):  # dev is carved out of it
                    return [r for r in rows if dev_or_train(f"{r.get('subtask', '')}/{r.get('input')}") == "train"]
                return rows
            rows = read_jsonl(Path(self.path).expanduser())
        else:
            if self._hub_rows is None:  # 27 downloads: once per task object
                self._hub_rows = [{**row, "subtask": subtask} for subtask in self.subtasks
                                  for row in hub_rows(self.name, HUB_DATASET, subtask, "test")]
            rows = self._hub_rows
        return [r for r in rows if hash_split(f"{r.get('subtask', '')}/{r.get('input')}") == split]

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        examples, counters = [], {}
        for record in self._records(split):
            require_fields(self.name, record, ("input", "target"))
            subtask = str(record.get("subtask") or "all")
            if subtask != "all" and subtask not in self.subtasks:
                continue
            index = counters[subtask] = counters.get(subtask, -1) + 1
            target = str(record["target"]).strip()
            if not target:
                raise SpdLensError(f"task 'bbh': record {index} of subtask {subtask!r} has an empty target")
            reference = f"{ANSWER_PREFIX}{target}."
            start = len(ANSWER_PREFIX)
            examples.append(Example(f"bbh/{split}/{subtask}/{index}", f"{str(record['input']).strip()}\n\n{INSTRUCTION}",
                                    reference, ((start, start + len(target)),), target=target,
                                    meta={"subtask": subtask}))
        random.Random(seed).shuffle(examples)
        return examples

    def score(self, example: Example, completion: str) -> Score:
        answer = extract_answer(completion)
        if answer is None:
            return Score(False, "failed", "no 'the answer is' in the completion")
        ok = answers_match(answer, str(example.target))
        return Score(ok, "passed" if ok else "failed", f"answer {answer!r}, expected {example.target!r}")
