"""What every task is: labelled examples, correctness spans, prompts, and a scorer.

An `Example` carries a reference answer and the character ranges inside it that decide whether
an answer is right (its correctness spans). `locate()` turns those into a token mask over the
chat-formatted sequence: the tokens the SPD loss is taken on.

Two settings change what a task asks. Procedural tasks take difficulty options and named presets
(`presets`); an example's id names the non-default ones (`arithmetic@easy/test/0/5`), so the id
alone rebuilds the question. `shots` puts k worked examples of the train split before each
question (`chat.few_shot_user`), for models without a chat template; they live in the example's
prompt text, so extraction, self-generation, training and evaluation all see the same prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerBase

from spd_lens.chat import encode_conversation, few_shot_user
from spd_lens.errors import SpdLensError

SPLITS = ("train", "dev", "test")
DEV_FRACTION = 0.2  # of what is not test: the dev split is carved out of train, test never changes
SHOT_POOL = 32  # train examples the demonstrations are drawn from


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
    # code: how the program was sandboxed (`SandboxResult.isolation`)
    isolation: dict | None = field(default=None, compare=False, hash=False)


def _is_span(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def hash_split(key: str, test_fraction: float = 0.2) -> str:
    """A stable train/dev/test assignment from a string: the same question always lands in the same
    split. `test_fraction` of all keys are test; of the rest, `DEV_FRACTION` are dev (by a second
    hash, so the test split is the one a train/test division gives).

    >>> [hash_split(q) for q in ("1 + 1 =", "3 + 9 =", "5 - 3 =")]
    ['test', 'train', 'dev']
    """
    return "test" if _bucket(key) < test_fraction else dev_or_train(key)


def dev_or_train(key: str) -> str:
    """Where a key of a source's train split goes: dev (`DEV_FRACTION` of them) or train."""
    return "dev" if _bucket("dev:" + key) < DEV_FRACTION else "train"


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise SpdLensError(f"unknown split {split!r}: use one of {list(SPLITS)}")
    return split


def check_unique_ids(ids, what: str = "examples") -> None:
    """Refuse a list of examples in which an id repeats: results are keyed by id, so a repeated
    one would silently overwrite (or drop) another example's rows."""
    seen: set[str] = set()
    for example_id in ids:
        if example_id in seen:
            raise SpdLensError(f"the {what} repeat the id {example_id!r}: every example needs its own id "
                               "(results are stored by id); drop the repeat or give it another id")
        seen.add(example_id)


class Task(ABC):
    """A capability to calibrate on and evaluate. Subclasses implement `_examples` and `score`."""

    name: ClassVar[str]
    family: ClassVar[str]  # "code", "math" or "mcqa"
    description: ClassVar[str]
    max_new_tokens: ClassVar[int] = 64  # a generation budget that fits the task's answers
    base_shots: ClassVar[int] = 3  # demonstrations for a model without a chat template (`default_shots`)
    # Difficulty presets of a procedural task: name -> constructor options; `default_preset` is the
    # one whose example ids carry no variant (the task's original settings).
    presets: ClassVar[dict[str, dict]] = {}
    default_preset: ClassVar[str | None] = None
    shots: int = 0  # demonstrations before each question; set by `get_task(name, shots=k)`
    variant: str = ""  # the non-default difficulty in example ids ("" = the default preset)

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
        examples = examples if n is None else examples[:n]
        return [self.with_shots(e) for e in examples] if self.shots else examples

    def with_shots(self, example: Example) -> Example:
        """`example` with `self.shots` demonstrations before its question.

        The demonstrations are train examples (question and reference answer) drawn from the first
        `SHOT_POOL` of the train split (seed 0), by a random generator seeded with the example's id:
        fixed for an example, different between examples (so no one answer letter or number is
        shown to every question), never the example's own question.
        """
        if not self.shots:
            return example
        pool = getattr(self, "_shot_pool", None)
        if pool is None:
            pool = self._examples("train", SHOT_POOL, 0)[:SHOT_POOL]
            self._shot_pool = pool
        candidates = [d for d in pool if d.prompt != example.prompt]
        if len(candidates) < self.shots:
            raise SpdLensError(f"task {self.name!r} has {len(candidates)} train examples to show, fewer than "
                               f"shots={self.shots}; use fewer shots")
        demonstrations = random.Random(example.id).sample(candidates, self.shots)
        prompt = few_shot_user([(d.prompt, d.reference) for d in demonstrations], example.prompt)
        return dataclasses.replace(example, prompt=prompt,
                                   meta={**example.meta, "shots": [d.id for d in demonstrations]})

    @abstractmethod
    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        """At least `n` examples of `split` (when the task has them), in a seed-determined order."""

    def example_by_id(self, example_id: str) -> Example:
        """The example with this id (from either split), with this task's shots; an unknown id is
        an error naming it."""
        return self.with_shots(self._example_by_id(example_id))

    def _example_by_id(self, example_id: str) -> Example:
        index = getattr(self, "_id_index", None)
        if index is None:
            index = {e.id: e for split in SPLITS for e in self._examples(split, None, 0)}
            self._id_index = index
        if example_id not in index:
            raise SpdLensError(f"{example_id!r} is not an example id of task {self.name!r}")
        return index[example_id]

    def _set_difficulty(self, preset: str | None, explicit: dict) -> dict:
        """The difficulty options: the preset's (default: `default_preset`), then the explicit ones
        that are not None. Sets `variant`, the name example ids carry: "" for the default preset,
        another preset's name, or `key=value` pairs that differ from the default preset."""
        preset = self.default_preset if preset is None else preset
        if preset not in self.presets:
            raise SpdLensError(f"task {self.name!r} has no preset {preset!r}: use one of {list(self.presets)}")
        options = {**self.presets[preset], **{k: v for k, v in explicit.items() if v is not None}}
        same = [name for name, values in self.presets.items() if values == options]
        if same:
            self.variant = "" if self.default_preset in same else same[0]
        else:
            default = self.presets[self.default_preset]
            self.variant = ",".join(f"{k}={v}" for k, v in sorted(options.items()) if default.get(k) != v)
        return options

    def _with_variant(self, variant: str) -> Task:
        """This task with the difficulty an example id names (itself when it is the same)."""
        if variant == self.variant:
            return self
        made = self.__dict__.setdefault("_variants", {})
        if variant in made:
            return made[variant]
        if variant in self.presets:
            other = type(self)(preset=variant)
        else:
            try:
                pairs = dict(part.split("=", 1) for part in variant.split(","))
                other = type(self)(**{k: int(v) if v.lstrip("-").isdigit() else v for k, v in pairs.items()})
            except (ValueError, TypeError, SpdLensError):
                raise SpdLensError(f"{variant!r} is not a difficulty of task {self.name!r}: use a preset "
                                   f"{list(self.presets)} or key=value options") from None
        other.shots = self.shots
        made[variant] = other
        return other

    @abstractmethod
    def score(self, example: Example, completion: str) -> Score:
        """Whether `completion` (the assistant's text) answers `example` correctly."""

    def check_ready(self) -> None:
        """Raise `SpdLensError` now if this task cannot score here (code: no sandbox), so that an
        evaluation refuses before it generates anything."""

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


# reasoning-gym draws item i of a dataset made with seed g from Random(g + i), so the streams of
# seeds g and g + 2 share all but two items. Procedural seeds are spaced this far apart instead
# (more than any split scans), so that seeds draw independent questions.
SEED_STRIDE = 10_000_000
OLD_SEED_STRIDE = 2  # the spacing of ids with a bare seed, still rebuilt


def generator_seed(seed: int, split: str, stride: int = SEED_STRIDE) -> int:
    """The reasoning-gym seed of a procedural split's stream for `seed` (test and train/dev draw
    different streams; dev shares train's stream, not its questions). Seed 0's streams (0 and 1)
    are the ones every version used, so its examples and ids never changed."""
    return seed * stride + (1 if split == "test" else 0)


def procedural_id(task: Task, split: str, seed: int, index: int) -> str:
    """`name/split/seed/index`, the name followed by `@variant` when the difficulty is not the
    default; a seed other than 0 is written `sN` (its stream spaced by `SEED_STRIDE`). A bare seed
    N >= 1 names the overlapping stream of earlier versions (seed N * 2), still rebuilt by id."""
    return f"{task.name}{'@' + task.variant if task.variant else ''}/{split}/{seed if seed == 0 else f's{seed}'}/{index}"


def parse_procedural_id(task: str, example_id: str) -> tuple[str, str, int, int, int]:
    """(variant, split, seed, index, reasoning-gym generator seed) of a procedural example id."""
    parts = example_id.split("/")
    name, _, variant = parts[0].partition("@")
    try:
        if len(parts) != 4 or name != task or parts[1] not in SPLITS or parts[0].endswith("@"):
            raise ValueError
        spaced = parts[2].startswith("s")
        seed, index = int(parts[2].removeprefix("s")), int(parts[3])
        # One id per example: exactly the digits procedural_id writes ("s0", "01", "+1" are not ids).
        if (seed < 0 or index < 0 or parts[3] != str(index) or
                parts[2] != (f"s{seed}" if spaced else str(seed)) or (spaced and seed == 0)):
            raise ValueError
        stream = generator_seed(seed, parts[1], SEED_STRIDE if spaced else OLD_SEED_STRIDE)
        return variant, parts[1], seed, index, stream
    except ValueError:
        raise SpdLensError(f"{example_id!r} is not an example id of task {task!r} "
                           f"(expected '{task}[@VARIANT]/SPLIT/SEED/INDEX')") from None


def default_shots(task: Task | type[Task], tokenizer: PreTrainedTokenizerBase) -> int:
    """How many demonstrations a model gets by default: none when its tokenizer has a chat template
    (the instruction is enough for a chat model), the task's `base_shots` when it has none (a base
    model given a bare question continues the text instead of answering it)."""
    return 0 if tokenizer.chat_template else task.base_shots
