"""The bbh task (local JSONL, scoring as the evaluation harness defines it) and local data given per split."""

import json

import pytest

from spd_lens import SpdLensError, get_task
from spd_lens.cli import main as cli
from spd_lens.config import config_from_dict
from spd_lens.tasks.bbh import answers_match, extract_answer
from spd_lens.tasks.records import describe_source

BBH_RECORDS = [
    {"subtask": "boolean_expressions", "input": f"not ( True ) and ( {v} ) is", "target": "False"} for v in ("True", "False")
] + [
    {"subtask": "date_understanding", "input": f"Today is Oct {d}. What is tomorrow?\nOptions:\n(A) Oct {d + 1}\n(B) Oct {d - 1}",
     "target": "(A)"} for d in range(2, 30)
] + [
    {"subtask": "word_sorting", "input": f"Sort the following words alphabetically: List: pear apple {w}",
     "target": " ".join(sorted(["pear", "apple", w]))} for w in ("kiwi", "fig", "lime", "plum", "date", "yam")
] + [
    {"subtask": "object_counting", "input": f"I have {k} apples and a banana. How many fruits do I have?", "target": str(k + 1)}
    for k in range(2, 24)
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def bbh_file(tmp_path):
    return write_jsonl(tmp_path / "bbh.jsonl", BBH_RECORDS)


def test_answer_extraction_follows_the_harness():
    assert extract_answer("Let's think. not True is False. So the answer is False.") == "False"
    assert extract_answer("The answer is (B).\nMore text. So the answer is (C).") == "(B)"  # the first one
    assert extract_answer("So the answer is **apple fig pear**.") == "apple fig pear"
    assert extract_answer("So the answer is 12") == "12"
    assert extract_answer("I think it is False.") is None
    assert extract_answer("THE ANSWER IS False.") is None  # the harness matches "The"/"the" only


def test_exact_match_after_normalisation():
    assert answers_match("False", "False") and not answers_match("false", "False")
    assert answers_match("(A)", "(A)") and answers_match("A", "(A)") and answers_match("(A) Oct 3", "(A)")
    assert not answers_match("(B)", "(A)") and not answers_match("AB", "(A)") and not answers_match("(A)x", "(A)")
    assert answers_match("apple fig pear", "apple fig pear") and not answers_match("apple pear fig", "apple fig pear")
    assert not answers_match("12 apples", "12")


def test_bbh_from_a_local_file(bbh_file, tiny_tokenizer):
    task = get_task("bbh", path=str(bbh_file))
    train, dev, test = task.examples("train"), task.examples("dev"), task.examples("test")
    assert len(train) + len(dev) + len(test) == len(BBH_RECORDS) and test and dev  # 64/16/20 by hash, disjoint
    assert not {e.prompt for e in train} & {e.prompt for e in test}
    assert not {e.prompt for e in dev} & ({e.prompt for e in train} | {e.prompt for e in test})
    example = next(e for e in train + dev + test if e.meta["subtask"] == "date_understanding")
    assert example.span_texts() == ["(A)"] and example.reference == "So the answer is (A)."
    assert example.prompt.endswith('then end with "So the answer is <answer>."')
    assert task.score(example, "Tomorrow comes after today. So the answer is (A).").passed
    assert task.score(example, "So the answer is A.").passed
    assert not task.score(example, "So the answer is (B).").passed
    verdict = task.score(example, "(A)")
    assert not verdict.passed and "no 'the answer is'" in verdict.detail
    encoded = task.locate(tiny_tokenizer, example)
    marked = [t for t, m in zip(encoded.input_ids, encoded.correctness_mask) if m]
    assert tiny_tokenizer.decode(marked).strip() == "(A)"
    assert task.example_by_id(example.id) == example


def test_bbh_subtasks_and_bad_records(tmp_path, bbh_file):
    only = get_task("bbh", path=str(bbh_file), subtasks=["word_sorting"])
    assert {e.meta["subtask"] for s in ("train", "dev", "test") for e in only.examples(s)} == {"word_sorting"}
    with pytest.raises(SpdLensError, match="unknown BBH subtask"):
        get_task("bbh", subtasks=["chess"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "x", "answer": "y"}] * 10)
    with pytest.raises(SpdLensError, match=r"lacks the field\(s\) \['input', 'target'\]"):
        [get_task("bbh", path=str(bad)).examples(split) for split in ("train", "dev", "test")]


# --- local data given per split ---------------------------------------------------------------------------


def gsm8k_records(prefix, n):
    return [{"question": f"{prefix} question {i}: what is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
            for i in range(n)]


def test_a_file_given_for_a_split_is_used_whole(tmp_path):
    test_file = write_jsonl(tmp_path / "test.jsonl", gsm8k_records("test", 50))
    train_file = write_jsonl(tmp_path / "train.jsonl", gsm8k_records("train", 30))
    whole = get_task("gsm8k", path={"train": str(train_file), "test": str(test_file)})
    # Without a dev file, dev is carved out of the train file.
    assert len(whole.examples("test")) == 50 and len(whole.examples("train")) + len(whole.examples("dev")) == 30
    # One file alone is divided by hash: its test split is about a fifth of it.
    single = get_task("gsm8k", path=str(test_file))
    assert sum(len(single.examples(s)) for s in ("train", "dev", "test")) == 50 and len(single.examples("test")) < 25
    only_test = get_task("gsm8k", path={"test": str(test_file)})
    assert len(only_test.examples("test")) == 50
    with pytest.raises(SpdLensError, match=r"no data file is given for the 'train' split.*add train ="):
        only_test.examples("train")
    assert "divided by hash" in describe_source(str(test_file))
    assert "(whole)" in describe_source({"test": str(test_file)})


def test_config_and_cli_take_a_file_per_split(tmp_path, capsys):
    test_file = write_jsonl(tmp_path / "test.jsonl", gsm8k_records("test", 12))
    config = config_from_dict({"task": {"name": "gsm8k", "data": {"train": "a.jsonl", "test": str(test_file)}}})
    assert config.task.data == {"train": "a.jsonl", "test": str(test_file)}
    with pytest.raises(SpdLensError, match="takes the keys 'train', 'dev' and/or 'test'"):
        config_from_dict({"task": {"name": "gsm8k", "data": {"validation": "v.jsonl"}}})
    with pytest.raises(SpdLensError, match=r"task.data.test must be a string"):
        config_from_dict({"task": {"name": "gsm8k", "data": {"test": 3}}})
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", "tiny", "--task", "gsm8k", "--data", f"test={test_file}", "--n", "12",
                "--max-new-tokens", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 12  # all 12 questions of the file, none held back as train
    assert cli(["eval", "--model", "tiny", "--task", "gsm8k", "--data", "validation=x.jsonl", "--out", str(out)]) == 2
    assert "SPLIT=FILE once per split" in capsys.readouterr().err
