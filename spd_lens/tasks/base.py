"""What every task is: labelled examples, correctness spans, prompts, and a scorer.

An `Example` carries a reference answer and the character ranges inside it that decide whether
an answer is right (its correctness spans). `locate()` turns those into a token mask over the
chat-formatted sequence: the tokens the SPD loss is taken on.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from spd_lens.chat import encode_conversation
from spd_lens.errors import SpdLensError

SPLITS = ("train", "test")


@dataclass(frozen=True)
class Example:
    """One labelled prompt. `spans` are `(start, end)` character ranges inside `reference`.

    Spans given as lists (`[[0, 2]]`, as JSON gives them) are stored as tuples, so an example
    stays hashable. `system`: the chat turn before the prompt (None: the template's default
    system prompt, "" leaves it out, text: that system prompt; see `spd_lens.chat`).

    Example:
        >>> e = Example("mine/0", "What is 12 + 7?", "19", [[0, 2]])
        >>> e.spans, e.span_texts(), hash(e) == hash(Example("mine/0", "What is 12 + 7?", "19", ((0, 2),)))
        (((0, 2),), ['19'], True)
    """

    id: str
    prompt: str
    reference: str
    spans: tuple[tuple[int, int], ...]
    target: Any = None  # what the scorer compares against (a number, a letter, test code, ...)
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    system: str | None = None

    def __post_init__(self):
        spans = [self.spans] if _is_span(self.spans) else self.spans
        try:
            normalised = tuple((int(a), int(b)) for a, b in spans)
        except (TypeError, ValueError) as err:
            raise SpdLensError(f"example {self.id!r}: spans must be (start, end) pairs of character offsets "
                               f"into the reference, e.g. ((0, 2),), got {self.spans!r}") from err
        object.__setattr__(self, "spans", normalised)

    def span_texts(self) -> list[str]:
        return [self.reference[a:b] for a, b in self.spans]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of prompt + reference answer, with the masks the losses need."""

    example_id: str
    input_ids: list[int]
    correctness_mask: list[bool]  # tokens inside a correctness span
    answer_mask: list[bool]  # every token of the reference answer (and its end-of-turn marker)
    prompt_length: int  # tokens before the answer starts


@dataclass(frozen=True)
class Score:
    """The verdict on one completion. `status` is passed, failed, timeout or error."""

    passed: bool
    status: str
    detail: str = ""


def _is_span(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def hash_split(key: str, test_fraction: float = 0.2) -> str:
    """A stable train/test assignment from a string: the same question always lands in the same split."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if bucket < test_fraction else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise SpdLensError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


class Task(ABC):
    """A capability to calibrate on and evaluate. Subclasses implement `_examples` and `score`."""

    name: ClassVar[str]
    family: ClassVar[str]  # "code", "math" or "mcqa"
    description: ClassVar[str]
    max_new_tokens: ClassVar[int] = 64  # a generation budget that fits the task's answers

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` labelled examples of `split` (all when None), chosen reproducibly by `seed`.

        Train and test never share an example: see each task's `_examples` for how.
        """
        check_split(split)
        if n is not None and n < 1:
            raise SpdLensError(f"n must be a positive number of examples, got {n}")
        examples = self._examples(split, n, seed)
        if n is not None and len(examples) < n:
            raise SpdLensError(
                f"task {self.name!r} has only {len(examples)} {split} examples, but n={n} were asked for"
            )
        return examples if n is None else examples[:n]

    @abstractmethod
    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        """At least `n` examples of `split` (when the task has them), in a seed-determined order."""

    def example_by_id(self, example_id: str) -> Example:
        """The example with this id (from either split); an unknown id is an error naming it."""
        index = getattr(self, "_id_index", None)
        if index is None:
            index = {e.id: e for split in SPLITS for e in self._examples(split, None, 0)}
            self._id_index = index
        if example_id not in index:
            raise SpdLensError(f"{example_id!r} is not an example id of task {self.name!r}")
        return index[example_id]

    @abstractmethod
    def score(self, example: Example, completion: str) -> Score:
        """Whether `completion` (the assistant's text) answers `example` correctly."""

    def answer(self, example: Example, completion: str) -> str | None:
        """The answer a completion commits to, where the task has a small answer set (multiple
        choice: the letter); None otherwise. Run metrics count these to expose answer biases."""
        return None

    def outcome(self, status: str, detail: str) -> str | None:
        """The kind of a scored result, where failures differ in kind (code: the exception the
        tests raised); None otherwise. Run metrics count these to show how a method fails."""
        return None

    def locate(self, tokenizer: PreTrainedTokenizerBase, example: Example) -> EncodedExample:
        """Tokenise prompt + reference and mark the correctness-defining tokens."""
        return locate_spans(tokenizer, example)


def locate_spans(tokenizer: PreTrainedTokenizerBase, example: Example) -> EncodedExample:
    """Map the example's character spans onto the tokens of the chat-formatted sequence.

    A token belongs to a span when its characters overlap it (a leading space merged into a
    number token still counts). An example whose spans cover no token is an error, never an
    empty mask.
    """
    bad = [(a, b) for a, b in example.spans if not 0 <= a < b <= len(example.reference)]
    if bad or not example.spans:
        raise SpdLensError(
            f"example {example.id!r}: correctness spans {bad or 'none'} do not lie inside its reference answer "
            f"of {len(example.reference)} characters; each span must be (start, end) with 0 <= start < end <= length"
        )
    encoded = encode_conversation(tokenizer, example.prompt, example.reference, system=example.system)
    start = encoded.conversation.answer_start
    absolute = [(start + a, start + b) for a, b in example.spans]
    correctness = [any(s < span_end and e > span_start for span_start, span_end in absolute) for s, e in encoded.offsets]
    answer = encoded.answer_mask
    if not any(correctness):
        raise SpdLensError(
            f"example {example.id!r}: its correctness span(s) {example.span_texts()!r} cover no token of "
            "the tokenised sequence; check the example's reference answer and spans"
        )
    prompt_length = next(i for i, is_answer in enumerate(answer) if is_answer)
    return EncodedExample(
        example_id=example.id,
        input_ids=encoded.input_ids,
        correctness_mask=correctness,
        answer_mask=answer,
        prompt_length=prompt_length,
    )
