"""A capability from your own data: labelled examples plus a scorer, usable wherever a task goes.

`Capability` is a `Task`, so extraction, gradient caches, head attribution, correctness losses,
sampling, evaluation and `spd-lens run` take it as they take a shipped task. Make one from

- a Python list of `Example`s: `spd_lens.capability(examples, scorer=..., name=...)`;
- a JSONL file: `Capability.from_jsonl("my.jsonl")` (in a config `[task] examples = "my.jsonl"`,
  on the command line `--examples my.jsonl`); one record a line:

  `{"id": "cap/0", "prompt": "Capital of France?", "answer": "Paris", "span": "Paris"}`

  `prompt` and `answer` are required. The correctness span (the tokens the SPD loss and the
  default scorer look at) is given by `spans` (character offsets into `answer`:
  `[[0, 5]]`), or by `span` (a string, or a list of strings, found in `answer`; its last
  occurrence, so an answer that reasons first and states the result at the end is marked at
  the result), or left out (the whole answer, less surrounding whitespace). Optional: `id`
  (default `NAME/LINE`), `system` (the system prompt: text; `""` for none; absent for the
  template's default), `shots` (worked examples put before the question: a list of
  `[prompt, answer]` pairs or `{"prompt", "answer"}` objects), `split` (`train`, `dev` or
  `test`), `target` (anything your scorer reads) and `meta` (an object kept with the example).

Splits: given (every record's `split`, a mapping `{"train": FILE, "test": FILE}`, or a
directory holding `train.jsonl`/`test.jsonl`), else carved by a hash of each prompt as for
other local files (`tasks.base.hash_split`: 20% test, 16% dev, 64% train), so one question
never lands in two splits. A split given without dev has dev carved out of train.

Scoring: by default `span_match` (below); `scorer="package.module:function"` (or, in Python, any
callable) takes `(example, completion)` and returns a `Score` or a bool.

Example:
    >>> import spd_lens
    >>> from spd_lens.tasks import Example
    >>> cap = spd_lens.capability([Example(f"sum/{i}", f"What is {i} + 1?", str(i + 1), ((0, len(str(i + 1))),))
    ...                            for i in range(30)], name="plus-one")
    >>> len(cap.all_examples()), sorted({cap.split_of(e) for e in cap.all_examples()})
    (30, ['dev', 'test', 'train'])
    >>> cap.score(cap.all_examples()[4], "Let me see: 4 + 1 = 5.\\nThe answer is 5.").passed
    True
"""

from __future__ import annotations

import importlib
import os
import random
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from spd_lens.chat import few_shot_user
from spd_lens.errors import SpdLensError
from spd_lens.tasks.base import SPLITS, Example, Score, Task, check_unique_ids, dev_or_train, hash_split
from spd_lens.tasks.records import numbered_records

FIELDS = ("id", "prompt", "answer", "spans", "span", "system", "shots", "split", "target", "meta")
Scorer = Callable[[Example, str], "Score | bool"]

# Where a completion states its answer: the text after the last of these is its final answer.
_MARKERS = (r"answer is:?", r"answer:", r"final answer:?", r"####")
_BOXED = re.compile(r"\\boxed\{")


def final_answer(completion: str) -> str:
    """The part of a completion that states its answer.

    1. After the last `\\boxed{`: the braces' content.
    2. Else after the last answer marker ("answer is", "answer:", "final answer:", "####"): the
       rest of that line.
    3. Else the last non-empty line.

    >>> final_answer("Paris is big.\\nThe answer is: Paris\\nThanks!")
    'Paris'
    >>> final_answer("I think so.\\nParis.")
    'Paris.'
    >>> final_answer("so \\\\boxed{12} it is")
    '12'
    """
    text = completion.replace("**", "")
    boxed = list(_BOXED.finditer(text))
    if boxed:
        start, depth = boxed[-1].end(), 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
        return text[start:].strip()
    markers = [m for pattern in _MARKERS for m in re.finditer(pattern, text, flags=re.IGNORECASE)]
    if markers:
        rest = text[max(markers, key=lambda m: m.end()).end():].lstrip()
        return rest.split("\n", 1)[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise(text: str) -> str:
    """Lower case, accents and punctuation dropped (a decimal point between digits is kept),
    the articles a/an/the dropped, a thousands comma dropped, whitespace collapsed.

    >>> normalise("  The Eiffel-Tower, 1,000.5 m!")
    'eiffel tower 1000.5 m'
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000 -> 1000
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x01", text)  # a decimal point stays
    text = "".join(" " if c in string.punctuation else c for c in text).replace("\x01", ".")
    words = [w for w in text.split() if w not in ("a", "an", "the")]
    return " ".join(words)


def span_match(example: Example, completion: str) -> Score:
    """The default scorer: every correctness span's text, normalised (`normalise`), occurs as whole
    words in the completion's normalised final answer (`final_answer`).

    >>> e = Example("cap/0", "Capital of France?", "The capital is Paris.", [[15, 20]])
    >>> span_match(e, "It is Paris.").passed, span_match(e, "Lyon, not Parisian").passed
    (True, False)
    """
    final = final_answer(completion)
    said = f" {normalise(final)} "
    wanted = [normalise(text) for text in example.span_texts()]
    missing = [w for w in wanted if not w or f" {w} " not in said]
    passed = not missing
    return Score(passed, "passed" if passed else "failed",
                 f"final answer {final!r}, expected {' / '.join(example.span_texts())!r}")


def load_scorer(spec: str | Scorer | None) -> Scorer:
    """A scorer from `"package.module:function"` (imported from the current directory or the Python
    path), a callable, or None (`span_match`)."""
    if spec is None:
        return span_match
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise SpdLensError(f"scorer {spec!r}: give it as 'package.module:function' (a function taking "
                           "(example, completion) and returning a Score or a bool)")
    module_name, attribute = spec.split(":")
    try:
        # As `python -m` would: the current directory first, so a scorer beside your data imports.
        added = os.getcwd() not in sys.path
        if added:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        finally:
            if added:
                sys.path.remove(os.getcwd())
    except ImportError as err:
        raise SpdLensError(f"scorer {spec!r}: cannot import module {module_name!r} ({err}); put it on the "
                           "Python path (e.g. PYTHONPATH=. or pip install your package)") from err
    function = module
    for part in attribute.split("."):
        function = getattr(function, part, None)
    if not callable(function):
        raise SpdLensError(f"scorer {spec!r}: module {module_name!r} has no function {attribute!r}")
    return function


def _as_score(result, scorer_name: str) -> Score:
    if isinstance(result, Score):
        return result
    if isinstance(result, bool) or (hasattr(result, "__bool__") and type(result).__name__ == "bool_"):
        passed = bool(result)
        return Score(passed, "passed" if passed else "failed")
    raise SpdLensError(f"scorer {scorer_name} returned {type(result).__name__} {result!r}: return a "
                       "spd_lens.tasks.Score or a bool")


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else source


def _spans_from_record(record: dict, answer: str, where: str) -> tuple[tuple[int, int], ...]:
    if "spans" in record and "span" in record:
        raise SpdLensError(f"{where}: give the correctness span once: 'spans' (character offsets into the answer) "
                           "or 'span' (the text to find in it), not both")
    if "span" in record:
        texts = record["span"] if isinstance(record["span"], list) else [record["span"]]
        spans = []
        for text in texts:
            if not isinstance(text, str) or not text:
                raise SpdLensError(f"{where}: 'span' must be a non-empty string (or a list of them) found in the "
                                   f"answer, got {text!r}")
            start = answer.rfind(text)
            if start < 0:
                raise SpdLensError(f"{where}: the span {text!r} does not occur in the answer {answer!r}; give text "
                                   "that the answer contains exactly (case and spacing included), or 'spans' as "
                                   "character offsets")
            spans.append((start, start + len(text)))
        return tuple(spans)
    if "spans" in record:
        raw = record["spans"]
        if isinstance(raw, list) and len(raw) == 2 and all(isinstance(v, int) for v in raw):
            raw = [raw]
        if (not isinstance(raw, list) or not raw
                or not all(isinstance(s, list) and len(s) == 2 and all(isinstance(v, int) and not isinstance(v, bool)
                                                                        for v in s) for s in raw)):
            raise SpdLensError(f"{where}: 'spans' must be a list of [start, end] character offsets into the answer, "
                               f"e.g. [[0, 5]], got {raw!r}")
        return tuple((a, b) for a, b in raw)
    stripped = answer.strip()
    start = answer.find(stripped)
    return ((start, start + len(stripped)),)


def _check_spans(example: Example, where: str) -> None:
    if not example.spans:
        raise SpdLensError(f"{where}: example {example.id!r} has no correctness span: give spans (character offsets "
                           "into its answer) or the span text")
    for a, b in example.spans:
        if not 0 <= a < b <= len(example.reference):
            raise SpdLensError(f"{where}: example {example.id!r} has the span ({a}, {b}), outside its answer of "
                               f"{len(example.reference)} characters {example.reference!r}: each span is (start, end) "
                               f"with 0 <= start < end <= {len(example.reference)}")


def _shots_prompt(shots, prompt: str, where: str) -> str:
    if not isinstance(shots, list):
        raise SpdLensError(f"{where}: 'shots' must be a list of [prompt, answer] pairs or {{\"prompt\", \"answer\"}} "
                           f"objects, got {shots!r}")
    pairs = []
    for shot in shots:
        if isinstance(shot, dict) and isinstance(shot.get("prompt"), str) and isinstance(shot.get("answer"), str):
            pairs.append((shot["prompt"], shot["answer"]))
        elif isinstance(shot, list) and len(shot) == 2 and all(isinstance(s, str) for s in shot):
            pairs.append((shot[0], shot[1]))
        else:
            raise SpdLensError(f"{where}: the shot {shot!r} is not a [prompt, answer] pair of strings or a "
                               "{\"prompt\": ..., \"answer\": ...} object")
    return few_shot_user(pairs, prompt) if pairs else prompt


def example_from_record(record: dict, *, default_id: str, where: str) -> tuple[Example, str | None]:
    """(Example, its given split or None) from one JSONL record (see the module docstring); errors
    name `where` (file and line) and the fix."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        raise SpdLensError(f"{where}: unknown field(s) {unknown}; a record takes {list(FIELDS)} (put anything else "
                           "under \"meta\")")
    for key in ("prompt", "answer"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise SpdLensError(f"{where}: the record needs a non-empty string {key!r} (it has {sorted(record)})")
    example_id = record.get("id", default_id)
    if not isinstance(example_id, (str, int)) or isinstance(example_id, bool) or str(example_id) == "":
        raise SpdLensError(f"{where}: 'id' must be a non-empty string, got {example_id!r}")
    system = record.get("system")
    if system is not None and not isinstance(system, str):
        raise SpdLensError(f"{where}: 'system' must be text (\"\" for no system turn), got {system!r}")
    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise SpdLensError(f"{where}: 'split' is {split!r}; use one of {list(SPLITS)} (or leave it out everywhere "
                           "to split by hash)")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise SpdLensError(f"{where}: 'meta' must be an object, got {meta!r}")
    answer = record["answer"]
    prompt = _shots_prompt(record["shots"], record["prompt"], where) if "shots" in record else record["prompt"]
    spans = _spans_from_record(record, answer, where)
    example = Example(str(example_id), prompt, answer, spans, target=record.get("target"),
                      meta={**meta, "question": record["prompt"]} if "shots" in record else dict(meta), system=system)
    _check_spans(example, where)
    return example, split


def read_examples(path: str | Path, *, name: str) -> list[tuple[Example, str | None, int]]:
    """(example, given split, line number) for every record of a JSONL file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SpdLensError(f"{str(path)!r} is not a file: pass the path of a JSONL file of examples "
                           "(one {\"prompt\", \"answer\", ...} object a line)")
    out = []
    for line, record in numbered_records(path):
        example, split = example_from_record(record, default_id=f"{name}/{line}", where=_where(str(path), line))
        out.append((example, split, line))
    if not out:
        raise SpdLensError(f"{path} holds no examples")
    return out


class Capability(Task):
    """Your own labelled examples and a scorer, as a `Task` (see the module docstring).

    `examples`: a list of `Example`s (split by hash of each prompt) or a mapping
    `{split: [Example, ...]}` (the splits given). `scorer`: `"module:function"`, a callable
    `(example, completion) -> Score | bool`, or None (`span_match`). `max_new_tokens`: the
    generation budget for evaluation and sampling.

    Example:
        >>> cap = Capability({"train": [Example("fr", "Capital of France?", "Paris", [[0, 5]])],
        ...                   "test": [Example("de", "Capital of Germany?", "Berlin", [[0, 6]])]}, name="capitals")
        >>> [e.id for e in cap.examples("test")], cap.score(cap.example_by_id("de"), "Berlin.").passed
        (['de'], True)
    """

    name = "examples"
    family = "custom"
    description = "your own examples (a list of Example or a JSONL of {id, prompt, answer, span(s)}) and a scorer"
    max_new_tokens = 64
    base_shots = 0  # your prompts are used as written; give shots=k to show k train examples first

    def __init__(self, examples: Sequence[Example] | Mapping[str, Sequence[Example]] | None = None, *,
                 path: str | Path | Mapping[str, str | Path] | None = None, scorer: str | Scorer | None = None,
                 name: str | None = None, max_new_tokens: int | None = None):
        if (examples is None) == (path is None):
            raise SpdLensError("a capability takes either examples (a list of Example) or path (a JSONL file of "
                               "examples), exactly one of them")
        if name is not None and (not isinstance(name, str) or not re.fullmatch(r"[\w.-]+", name)):
            raise SpdLensError(f"capability name {name!r}: use letters, digits, '.', '_' or '-'")
        self.source = str(path) if path is not None and not isinstance(path, Mapping) else (
            {k: str(v) for k, v in path.items()} if path is not None else None)
        self.name = name or (_stem(path) if path is not None else "custom")
        if max_new_tokens is not None:
            if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
                raise SpdLensError(f"max_new_tokens must be a positive number of tokens, got {max_new_tokens!r}")
            self.max_new_tokens = max_new_tokens
        self.scorer_spec = scorer if isinstance(scorer, str) or scorer is None else _callable_name(scorer)
        self._scorer = load_scorer(scorer)
        located = self._read(path) if path is not None else self._given(examples)
        check_unique_ids([e.id for e, _, _ in located], what=f"examples of capability {self.name!r}")
        given = [s for _, s, _ in located if s is not None]
        if given and len(given) != len(located):
            line = next(where for _, s, where in located if s is None)
            raise SpdLensError(f"{line}: this example has no split while others give one: give every example a "
                               "'split' (train, dev, test), or none (then they are split by hash)")
        self._splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
        if given:
            has_dev = any(s == "dev" for s in given)
            for example, split, _ in located:
                if split == "train" and not has_dev:
                    split = dev_or_train(example.meta.get("question", example.prompt))
                self._splits[split].append(example)
        else:
            for example, _, _ in located:
                self._splits[hash_split(example.meta.get("question", example.prompt))].append(example)
        self._all = [e for e, _, _ in located]

    @staticmethod
    def _read(path) -> list[tuple[Example, str | None, str]]:
        if isinstance(path, Mapping) or Path(path).expanduser().is_dir():
            files = ({s: Path(f).expanduser() for s, f in path.items()} if isinstance(path, Mapping) else
                     {s: Path(path).expanduser() / f"{s}.jsonl" for s in SPLITS
                      if (Path(path).expanduser() / f"{s}.jsonl").is_file()})
            bad = sorted(set(files) - set(SPLITS))
            if bad or not files:
                raise SpdLensError(f"examples {path!r}: a table of files takes the keys {list(SPLITS)} (a directory: "
                                   "train.jsonl, dev.jsonl, test.jsonl), e.g. {train = \"mine-train.jsonl\", "
                                   "test = \"mine-test.jsonl\"}")
            located = []
            for split, file in files.items():
                for example, own, line in read_examples(file, name=_stem(file)):
                    if own is not None and own != split:
                        raise SpdLensError(f"{file}, line {line}: the record says split {own!r} but the file is the "
                                           f"{split!r} split; drop the record's 'split' field or move it")
                    located.append((example, split, f"{file}, line {line}"))
            return located
        return [(e, s, f"{path}, line {line}") for e, s, line in read_examples(path, name=_stem(path))]

    @staticmethod
    def _given(examples) -> list[tuple[Example, str | None, str]]:
        if isinstance(examples, Example):
            examples = [examples]
        groups = examples.items() if isinstance(examples, Mapping) else [(None, examples)]
        located = []
        for split, items in groups:
            if split is not None and split not in SPLITS:
                raise SpdLensError(f"examples given for split {split!r}: use the keys {list(SPLITS)}")
            if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
                raise SpdLensError(f"examples must be a list of spd_lens.Example, got {type(items).__name__}")
            for i, example in enumerate(items):
                where = f"examples[{i}]" if split is None else f"examples[{split!r}][{i}]"
                if not isinstance(example, Example):
                    raise SpdLensError(f"{where} is a {type(example).__name__}, not an spd_lens.Example "
                                       "(Example(id, prompt, answer, spans))")
                _check_spans(example, where)
                located.append((example, split, where))
        if not located:
            raise SpdLensError("no examples given: a capability needs at least one Example")
        return located

    @classmethod
    def from_jsonl(cls, path: str | Path | Mapping[str, str | Path], *, scorer: str | Scorer | None = None,
                   name: str | None = None, max_new_tokens: int | None = None) -> Capability:
        """A capability from a JSONL file (a mapping `{split: FILE}`, or a directory of `SPLIT.jsonl`)."""
        return cls(path=path, scorer=scorer, name=name, max_new_tokens=max_new_tokens)

    def all_examples(self) -> list[Example]:
        """Every example in the order given, whatever its split (with this capability's shots)."""
        return [self.with_shots(e) for e in self._all] if self.shots else list(self._all)

    def split_of(self, example: Example | str) -> str:
        """The split an example (or example id) belongs to."""
        example_id = example if isinstance(example, str) else example.id
        return next(s for s, items in self._splits.items() if any(e.id == example_id for e in items))

    def split_sizes(self) -> dict[str, int]:
        return {s: len(items) for s, items in self._splits.items()}

    def examples(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[Example]:
        """`n` examples of `split` (all when None) in an order shuffled by `seed`; see `Task.examples`."""
        if split in self._splits and not self._splits[split]:
            raise SpdLensError(f"capability {self.name!r} has no {split} examples (its splits hold "
                               f"{self.split_sizes()}): add examples, give each a 'split', or use another split")
        return super().examples(split, n, seed)

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        examples = list(self._splits[split])
        random.Random(seed).shuffle(examples)
        return examples

    def _example_by_id(self, example_id: str) -> Example:
        index = self.__dict__.setdefault("_id_index", {e.id: e for e in self._all})
        if example_id not in index:
            raise SpdLensError(f"{example_id!r} is not an example id of capability {self.name!r}")
        return index[example_id]

    def score(self, example: Example, completion: str) -> Score:
        return _as_score(self._scorer(example, completion), self.scorer_spec or "span_match")

    def __len__(self) -> int:
        return len(self._all)

    def __repr__(self) -> str:
        return (f"Capability(name={self.name!r}, examples={len(self._all)}, splits={self.split_sizes()}, "
                f"scorer={self.scorer_spec or 'span_match'!r})")


def is_examples_path(name) -> bool:
    """Whether a task "name" is the path of your own examples: a `.jsonl` name, or an existing file
    or directory (a shipped task's name is never one)."""
    if not isinstance(name, (str, Path)):
        return False
    return str(name).endswith(".jsonl") or Path(name).expanduser().exists()


def _stem(path) -> str:
    if isinstance(path, Mapping):
        path = next(iter(path.values()))
    stem = Path(path).expanduser().name.removesuffix(".jsonl") or "custom"
    return re.sub(r"[^\w.-]", "-", stem)


def _callable_name(function) -> str:
    return f"{getattr(function, '__module__', '?')}:{getattr(function, '__qualname__', repr(function))}"


def capability(examples: Sequence[Example] | Mapping[str, Sequence[Example]] | str | Path, *,
               scorer: str | Scorer | None = None, name: str | None = None, max_new_tokens: int | None = None,
               shots: int = 0) -> Capability:
    """A capability from your own examples: a list of `Example`s, a mapping `{split: [Example]}`,
    or the path of a JSONL file (see `spd_lens.tasks.custom`). It is a `Task`: pass it to
    `extract_subspace`, `cache_gradients`, `head_attribution`, `correctness_loss`, `evaluate`,
    `generate_jsonl` and the rest.

    Example:
        >>> import spd_lens
        >>> from spd_lens.tasks import Example
        >>> cap = spd_lens.capability([Example("fr/0", "Capital of France?", "Paris", [[0, 5]])], name="capitals")
        >>> cap.name, cap.score(cap.all_examples()[0], "The capital is Paris.").passed
        ('capitals', True)
    """
    if isinstance(examples, (str, Path)):
        made = Capability(path=examples, scorer=scorer, name=name, max_new_tokens=max_new_tokens)
    else:
        made = Capability(examples, scorer=scorer, name=name, max_new_tokens=max_new_tokens)
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 0:
        raise SpdLensError(f"shots must be a number of demonstrations >= 0, got {shots!r}")
    made.shots = shots
    return made


__all__ = ["Capability", "capability", "final_answer", "is_examples_path", "load_scorer", "normalise", "span_match"]

