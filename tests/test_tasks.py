import json

import pytest

from spd_lens import SpdLensError, get_task, task_names
from spd_lens.tasks import Example, locate_spans
from spd_lens.tasks.code import extract_code, statement_spans
from spd_lens.tasks.math import extract_number

OFFLINE_TASKS = ["humaneval", "arithmetic", "gsm-symbolic", "family-mc"]


def _located_text(tokenizer, task, example):
    encoded = task.locate(tokenizer, example)
    assert len(encoded.input_ids) == len(encoded.correctness_mask) == len(encoded.answer_mask)
    # Correctness tokens are answer tokens, after the prompt.
    assert all(a for c, a in zip(encoded.correctness_mask, encoded.answer_mask) if c)
    assert not any(encoded.correctness_mask[: encoded.prompt_length])
    chosen = [i for i, keep in zip(encoded.input_ids, encoded.correctness_mask) if keep]
    return tokenizer.decode(chosen)


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_located_span_tokens_decode_to_the_answer(tiny_tokenizer, name):
    task = get_task(name)
    for example in task.examples("train", n=3, seed=0):
        decoded = _located_text(tiny_tokenizer, task, example)
        # The byte tokenizer has one token per byte, so the spans decode exactly (concatenated).
        assert decoded == "".join(example.span_texts())
        if task.family != "code":
            assert decoded == str(example.target)


@pytest.mark.slow
@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_located_span_tokens_decode_to_the_answer_real_tokenizer(default_tokenizer, name):
    task = get_task(name)
    for example in task.examples("train", n=3, seed=0):
        decoded = _located_text(default_tokenizer, task, example)
        # BPE tokens may carry a neighbouring space; the answer text is all there, nothing else.
        squeeze = lambda s: "".join(s.split())  # noqa: E731
        assert squeeze(decoded) == squeeze("".join(example.span_texts()))


def test_humaneval_spans_are_solution_statements_without_docstring():
    task = get_task("humaneval")
    example = next(e for e in task.examples("train", seed=0) if e.id == "HumanEval/0")
    texts = example.span_texts()
    assert texts[0] == "for idx, elem in enumerate(numbers):"
    assert texts[-1] == "return False"
    assert not any('"""' in t or "Check if" in t for t in texts)


def test_statement_spans_skip_comments_blank_lines_and_docstrings():
    code = 'def f(x):\n    """doc"""\n    # comment\n\n    y = x + 1  # trailing\n    return y\n'
    spans = statement_spans(code, start=code.index('"""'))
    assert [code[a:b] for a, b in spans] == ["y = x + 1", "return y"]


@pytest.mark.parametrize("name", ["humaneval", "arithmetic", "gsm-symbolic", "family-mc"])
def test_train_and_test_never_share_a_prompt(name):
    task = get_task(name)
    n = None if name == "humaneval" else 60
    train = {e.prompt for e in task.examples("train", n=n, seed=0)}
    test = {e.prompt for e in task.examples("test", n=None if n is None else 20, seed=0)}
    assert train and test and not train & test


def test_examples_are_reproducible_and_seed_dependent():
    task = get_task("arithmetic")
    assert task.examples("train", n=5, seed=1) == task.examples("train", n=5, seed=1)
    assert task.examples("train", n=5, seed=1) != task.examples("train", n=5, seed=2)


def test_humaneval_split_sizes():
    task = get_task("humaneval")
    splits = {split: {e.id for e in task.examples(split)} for split in ("train", "dev", "test")}
    assert {k: len(v) for k, v in splits.items()} == {"train": 28, "dev": 27, "test": 109}
    assert len(set.union(*splits.values())) == 164


# sha256 of the first 50 test examples (ids and prompts, seed 0) as the release without a dev split
# drew them: carving dev out of train must leave the test split as it was.
TEST_SPLIT_BEFORE_DEV = {"arithmetic": "263b65ac3c4369f6", "family-mc": "4494274bb3ea32e7",
                         "gsm-symbolic": "1c282f3eaab3d1c4"}


@pytest.mark.parametrize("name", list(TEST_SPLIT_BEFORE_DEV))
def test_procedural_dev_split_is_disjoint_and_test_unchanged(name):
    import hashlib
    import json

    task = get_task(name)
    prompts = {split: {e.prompt for e in task.examples(split, n=60, seed=0)} for split in ("train", "dev", "test")}
    assert not (prompts["train"] & prompts["dev"]) and not (prompts["dev"] & prompts["test"])
    assert not (prompts["train"] & prompts["test"])
    test = task.examples("test", n=50, seed=0)
    assert hashlib.sha256(json.dumps([[e.id, e.prompt] for e in test]).encode()).hexdigest()[:16] == \
        TEST_SPLIT_BEFORE_DEV[name]
    dev = task.examples("dev", n=5, seed=0)
    assert all(e.id.split("/")[-3] == "dev" for e in dev)
    assert [task.example_by_id(e.id) for e in dev] == dev


@pytest.mark.parametrize("name", OFFLINE_TASKS)
def test_reference_scores_as_correct_and_garbage_as_wrong(name):
    task = get_task(name)
    example = task.examples("train", n=1, seed=3)[0]
    assert task.score(example, example.reference).passed
    assert not task.score(example, "I do not know.").passed


def test_humaneval_scoring_accepts_a_body_continuing_the_prompt():
    task = get_task("humaneval")
    example = next(e for e in task.examples("train", seed=0) if e.id == "HumanEval/0")
    body = example.reference.split('"""\n', 2)[-1].replace("```", "")
    assert task.score(example, body).passed
    wrong = body.replace("return True", "return False")
    assert task.score(example, wrong).status == "failed"


def test_code_outcome_names_how_a_completion_failed():
    task = get_task("humaneval")
    example = next(e for e in task.examples("train", seed=0) if e.id == "HumanEval/0")
    body = example.reference.split('"""\n', 2)[-1].replace("```", "")
    completions = {"passed": body, "AssertionError": body.replace("return True", "return False"),
                   "SyntaxError": "def has_close_elements(numbers, threshold):\n    return (",
                   "NameError": "def has_close_elements(numbers, threshold):\n    return undefined_name",
                   "timeout": "def has_close_elements(numbers, threshold):\n    while True:\n        pass"}
    task.timeout = 2.0  # the instance is this test's own; keeps the endless loop short
    for kind, completion in completions.items():
        verdict = task.score(example, completion)
        assert task.outcome(verdict.status, verdict.detail) == kind, verdict
    assert task.outcome("failed", "Traceback ...\njson.decoder.JSONDecodeError: bad") == "JSONDecodeError"
    assert task.outcome("error", "Killed") == "error"
    assert get_task("arithmetic").outcome("failed", "answer 3, expected 4") is None


def test_math_answer_extraction():
    assert extract_number("so 3 + 4 = 7. The answer is 7.") == "7"
    assert extract_number("#### 1,234") == "1,234"
    assert extract_number("x = 3, then \\boxed{-5}") == "-5"
    assert extract_number("no digits") is None


# Greedy answers of the default model to arithmetic test questions (verbatim), with the number each
# commits to.
REAL_MATH_ANSWERS = [
    ("The answer to the given arithmetic problem is 59 + 13 = 82.", "82"),
    ("The answer to the given arithmetic problem is 6 + 2 = 8.", "8"),
    ("The final answer to the given arithmetic problem is 2.", "2"),
    ("11 - 18 = 11 - 18 = 1", "1"),
    ("1 + 5 = 6", "6"),
    ("The answer is 1.", "1"),
    # Rambling that happens to end on the expected number (1) commits to no answer.
    ("1.1\n\nThis is a classic example of a mathematical identity that has nothing to do with the number 1.", None),
]


@pytest.mark.parametrize("completion, number", REAL_MATH_ANSWERS)
def test_math_scorer_on_real_answers(completion, number):
    assert extract_number(completion) == number


def test_the_result_of_an_answer_equation_wins_over_its_first_operand():
    assert extract_number("The answer is 59 + 13 = 72") == "72"
    assert extract_number("The answer is 59 + 13 = 72. Then 1 + 1 = 2.") == "72"
    assert extract_number("The answer is 45 - 67 = -22.") == "-22"
    assert extract_number("The answer is 59 + 13.") is None  # an expression, no committed number
    assert extract_number("The answer is **72** apples.") == "72"
    assert extract_number("The answer is 72 - the sum of 59 and 13.") == "72"


def test_the_fallback_reads_the_final_answer_sentence_only():
    assert extract_number("72") == "72" and extract_number(" $72. ") == "72"
    assert extract_number("First 5 + 7 = 12 apples. Then she eats 2, so 12 - 2 = 10.") == "10"
    assert extract_number("The sum of 59 and 13 is 72 apples.") == "72"
    # Rambling that merely contains or ends on a number.
    assert extract_number("Although math is mental, we have found a creative way to add 59 and 13 which gives 72") is None
    assert extract_number("I think 5 - 3 = 2. Then we add 1 and 7") is None
    assert extract_number("x is 3 and y is 4, total 7 cats") is None


def test_code_extraction_prefers_the_block_with_a_def():
    text = "Here:\n```python\nprint(1)\n```\nand\n```python\ndef f():\n    return 2\n```"
    assert extract_code(text).startswith("def f")


def test_mc_scoring_reads_the_letter():
    task = get_task("family-mc")
    example = task.examples("train", n=1, seed=0)[0]
    assert task.score(example, f"The answer is {example.target}.").passed
    other = next(label for label in "ABCD" if label != example.target)
    assert not task.score(example, f"{other}. something").passed


def test_unknown_task_lists_valid_names():
    with pytest.raises(SpdLensError, match="unknown task 'nope'.*humaneval"):
        get_task("nope")
    assert "family-mc" in task_names()


def test_unknown_task_option_is_an_error():
    with pytest.raises(SpdLensError, match="takes no option"):
        get_task("arithmetic", path="x.jsonl")


def test_unlocatable_span_names_the_example(tiny_tokenizer):
    example = Example(id="ex-42", prompt="q", reference="abc", spans=((5, 9),))
    with pytest.raises(SpdLensError, match="ex-42"):
        locate_spans(tiny_tokenizer, example)


def test_procedural_tasks_need_n():
    with pytest.raises(SpdLensError, match="pass n"):
        get_task("arithmetic").examples("train")


# --- hub tasks from local JSONL in the public formats -------------------------------------------

LOCAL_RECORDS = {
    "gsm8k": [{"question": f"Tom has {i} apples and buys 2 more. How many?",
               "answer": f"He has {i} + 2 = <<{i}+2={i + 2}>>{i + 2} apples.\n#### {i + 2}"} for i in range(40)],
    "svamp": [{"ID": f"chal-{i}", "Body": f"There are {i} birds.", "Question": "If 3 fly away, how many are left?",
               "Equation": f"( {i}.0 - 3.0 )", "Answer": float(i - 3)} for i in range(40)],
    "mbpp": [{"task_id": i, "text": f"Write a function add_{i}(x) that adds {i}.",
              "code": f"def add_{i}(x):\n    return x + {i}", "test_list": [f"assert add_{i}(1) == {i + 1}"],
              "test_setup_code": ""} for i in range(1, 30)] + [
             {"task_id": 600 + i, "text": f"Write mul_{i}(x).", "code": f"def mul_{i}(x):\r\n    return x * {i}",
              "test_list": [f"assert mul_{i}(2) == {2 * i}"], "test_setup_code": ""} for i in range(1, 10)],
    "mmlu": [{"question": f"What is {i} times 2?", "choices": [str(2 * i), str(i), str(i + 2), str(3 * i + 1)],
              "answer": 0, "subject": "math"} for i in range(40)],
    "arc": [{"id": f"arc-{i}", "question": f"Which number is {i}?",
             "choices": {"text": [str(i + 1), str(i), str(i + 2)], "label": ["1", "2", "3"]}, "answerKey": "2"}
            for i in range(40)],
}


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.mark.parametrize("name", list(LOCAL_RECORDS))
def test_hub_tasks_load_a_local_jsonl_and_locate_spans(tmp_path, tiny_tokenizer, name):
    task = get_task(name, path=str(_write_jsonl(tmp_path / f"{name}.jsonl", LOCAL_RECORDS[name])))
    train, test = task.examples("train", seed=0), task.examples("test", seed=0)
    assert train and test and not {e.id for e in train} & {e.id for e in test}
    for example in train[:3]:
        decoded = _located_text(tiny_tokenizer, task, example)
        assert decoded == "".join(example.span_texts())
        assert task.score(example, example.reference).passed, example
        assert not task.score(example, "no idea").passed


def test_local_directory_with_public_split_files(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", LOCAL_RECORDS["gsm8k"][:30])
    _write_jsonl(tmp_path / "test.jsonl", LOCAL_RECORDS["gsm8k"][30:])
    task = get_task("gsm8k", path=str(tmp_path))
    train, dev = ({e.prompt for e in task.examples(split)} for split in ("train", "dev"))
    # No dev.jsonl: dev is carved out of train.jsonl, disjoint from what train keeps; test is whole.
    assert len(train) + len(dev) == 30 and dev and not train & dev and len(task.examples("test")) == 10
    _write_jsonl(tmp_path / "dev.jsonl", LOCAL_RECORDS["gsm8k"][:4])
    assert len(task.examples("train")) == 30 and len(task.examples("dev")) == 4  # a dev file is used as given
    example = task.examples("test", n=1)[0]
    assert example.span_texts() == [example.target] and "<<" not in example.reference


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(LOCAL_RECORDS["gsm8k"][0]) + "\n{broken\n")
    with pytest.raises(SpdLensError, match="line 2"):
        get_task("gsm8k", path=str(path)).examples("train")


def test_record_missing_fields_is_named(tmp_path):
    path = _write_jsonl(tmp_path / "x.jsonl", [{"question": "q"}] * 20)
    with pytest.raises(SpdLensError, match=r"lacks the field\(s\) \['answer'\]"):
        get_task("gsm8k", path=str(path)).examples("train")
        get_task("gsm8k", path=str(path)).examples("test")


def test_hub_failure_says_how_to_pass_a_local_file(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SpdLensError, match=r"unreachable.*local JSONL.*--data"):
        get_task("mmlu").examples("test")


def test_example_spans_given_as_lists_become_tuples_and_stay_hashable(tiny_tokenizer):
    from_json = Example("mine/0", "What is 12 + 7?", "19", [[0, 2]])
    assert from_json.spans == ((0, 2),) and from_json == Example("mine/0", "What is 12 + 7?", "19", ((0, 2),))
    assert len({from_json, Example("mine/0", "What is 12 + 7?", "19", ((0, 2),))}) == 1
    assert Example("mine/1", "Q", "19", (0, 2)).spans == ((0, 2),)  # one bare span
    assert locate_spans(tiny_tokenizer, from_json).correctness_mask.count(True) == 2
    with pytest.raises(SpdLensError, match=r"spans must be \(start, end\) pairs.*\[\[0, 1, 2\]\]"):
        Example("mine/2", "Q", "19", [[0, 1, 2]])
    with pytest.raises(SpdLensError, match=r"spans must be \(start, end\) pairs"):
        Example("mine/3", "Q", "19", "0-2")
