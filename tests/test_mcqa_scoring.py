"""Multiple choice read three ways: the letter a completion states, the labels' log-likelihood, rotations.

The completions below are verbatim outputs of the default model (SmolLM2-135M-Instruct) on
family-mc questions, greedy and sampled at temperature 1, each with the letter it commits to.
"""

import json

import pytest
import torch

from spd_lens import SpdLensError, get_task
from spd_lens.chat import encode, render_prompt
from spd_lens.evaluate import evaluate, evaluate_mc, option_average, summarise_choices
from spd_lens.mc_loglik import choice_query, loglik_choices
from spd_lens.models import load_hf, load_model
from spd_lens.tasks.mcqa import extract_letter, mc_example, option_rotations, rotate_options

ABCD = ["A", "B", "C", "D"]

REAL_COMPLETIONS = [
    # the options read back as a list: no choice (the old reader took the first line's A)
    ("A. aunt\nB. son\nC. nephew\nD. grandmother", None),
    ("A. son\nB. brother\nC. father-in-law\n", None),
    ("A) sons\nB) daughters\nC) aunts\nD) nephe", None),
    # the article or a word starting with a capital A is no option (the old reader took A)
    ("A MaineRailge provided helpful advice, specifically managing the Sarah model, which", None),
    ("A Persian wedding is a marvel baked in the park", None),
    ('First, we identify "A" as a parent (Mother-in-Law', None),
    # "answer is a" is the article, whatever the case-insensitive reader made of it (it read A)
    ("C. father-in-law\n\nThis answer is a typical Aceradian pattern, where the second letter is changed "
     "to a letter (Cor.)", "C"),
    # the letter A as a word, then the stated choice (the old reader took A)
    ("A is not a specific option in this scenario. The correct choice is C, son. The answer D (father) is a "
     "correct option.", "C"),
    ("A is the only correct answer without any restrictions.", "A"),
    # a closed letter, stated or not
    ("A. husband", "A"),
    ("C. grandmother", "C"),
    ("Only A. son", "A"),
    ("A. mother-in-law\n\nThe correct answer is A.\n", "A"),
    ("Correct answer is B. husband", "B"),
    ("The correct option is D. descendant of Sarah. \nA) son is", "D"),
    ("You've already identified the correct answer: C. father-in-law\nChoose option that best fits and "
     "contributes to the answer.", "C"),
    # an answer, then babble with a later option line: the answer stands
    ("B. daughter\n\n\n\nA. please right fill up the answer", "B"),
    ('B. mother-in-law\n\nSolution: "A. husband"', "B"),
    ("B. grandmother\n\nGenus: A\nOptions: A. baby,", "B"),
    ("C. NEMONY\n\nOption D. Lauren", "C"),  # naming an option is not choosing it
    ("B. wife was the correct answer to the question, but we need to reach the D, which is opposite the answer "
     "we want.\nA. brother is", "B"),  # an answer sentence, not a list
    ("D.FATHER", "D"),
]


@pytest.mark.parametrize("completion, letter", REAL_COMPLETIONS)
def test_real_completions_read_as_the_letter_they_commit_to(completion, letter):
    assert extract_letter(completion, ABCD) == letter


@pytest.mark.parametrize("completion, letter", [
    ("The answer is a nephew.", None),  # case-sensitive: "a" is a word
    ("The answer is A nephew.", None),
    ("A nephew is the son of one's brother or sister. So C.", "C"),
    ("A nephew is the son of one's sibling, so the answer is (C) nephew", "C"),
    ("(C)", "C"), ("C)", "C"), ("Answer: C", "C"), ("The answer is C", "C"), ("**C**", "C"),
    ("The answer is **D**.", "D"), ("answer: [B]", "B"), ("C\n", "C"), ("B: niece", "B"),
    ("Between A.M. and noon", None), ("I think so", None), ("", None),
])
def test_a_letter_counts_only_as_a_letter(completion, letter):
    assert extract_letter(completion, ABCD) == letter


def test_other_label_sets():
    assert extract_letter("The answer is 3.", ["1", "2", "3", "4"]) == "3"
    assert extract_letter("It is 1.5 times older, so 2.", ["1", "2", "3", "4"]) == "2"
    assert extract_letter("E. son", ABCD) is None
    assert extract_letter("E. son", [*ABCD, "E"]) == "E"


def test_task_scores_by_the_new_reader():
    task = get_task("family-mc")
    example = task.examples("test", n=1, seed=0)[0]  # options aunt, son, nephew, grandmother; answer B
    assert example.target == "B"
    assert not task.score(example, "A. aunt\nB. son\nC. nephew\nD. grandmother").passed
    assert task.answer(example, "A. aunt\nB. son\nC. nephew\nD. grandmother") is None
    assert task.score(example, "Jacob is Barbara's son. The answer is B.").passed


def test_rotation_moves_the_answer_and_keeps_the_question():
    task = get_task("family-mc")
    example = task.examples("test", n=1, seed=0)[0]
    rotations = option_rotations(example)
    assert [r.id for r in rotations] == [example.id] + [f"{example.id}@rot{k}" for k in (1, 2, 3)]
    answer = example.meta["options"][ABCD.index(example.target)]
    for k, rotated in enumerate(rotations):
        options = rotated.meta["options"]
        assert options == example.meta["options"][k:] + example.meta["options"][:k]
        assert options[ABCD.index(rotated.target)] == answer  # the target letter follows the answer
        assert rotated.reference == rotated.target and rotated.span_texts() == [rotated.target]
        assert rotated.prompt.startswith(example.meta["question"])
        assert f"\n{rotated.target}. {answer}\n" in rotated.prompt
    # every option appears once under every label
    for position in range(4):
        assert sorted(r.meta["options"][position] for r in rotations) == sorted(example.meta["options"])
    assert {r.target for r in rotations} == set(ABCD)
    assert rotate_options(example, 4) is example and rotate_options(example, 5).id.endswith("@rot1")
    # A rotated id names its example: scoring a file of rotated answers rebuilds each one.
    assert [task.example_by_id(r.id) for r in rotations] == rotations
    with pytest.raises(SpdLensError, match="is not an example id"):
        task.example_by_id("family-mc/test/0/x@rot1")
    with pytest.raises(SpdLensError, match="not a multiple-choice example"):
        rotate_options(get_task("arithmetic").examples("test", n=1)[0], 1)


def _question(index: int, answer: int):
    return mc_example(f"q{index}", f"Question {index}?", ["w", "x", "y", "z"], answer)


def test_debiased_figures_expose_a_model_that_always_says_a():
    examples = [_question(i, i % 4) for i in range(8)]
    asked = [r for e in examples for r in option_rotations(e)]
    by_id = {e.id: e for e in asked}
    always_a = [{"prompt_id": e.id, "chosen": "A", "passed": e.target == "A"} for e in asked]
    summary = summarise_choices(always_a, by_id)
    assert summary["accuracy"] == 0.25 and summary["choice_rates"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0}
    debiased = summary["debiased"]
    assert debiased["accuracy"] == 0.25 and debiased["consistent"] == 0.0 and debiased["rotations"] == 32
    assert [r["prompt_id"] for r in debiased["results"]] == [e.id for e in examples]
    assert all(r["passed"] == 0.25 and r["chosen"] == ["A"] * 4 for r in debiased["results"])
    knows = [{"prompt_id": e.id, "chosen": e.target, "passed": True} for e in asked]
    debiased = summarise_choices(knows, by_id)["debiased"]
    assert debiased["accuracy"] == 1.0 and debiased["consistent"] == 1.0
    assert debiased["choice_rates"] == {label: 0.25 for label in ABCD}
    unread = summarise_choices([{**r, "chosen": None, "passed": False} for r in knows], by_id)
    assert unread["choice_rates"]["none"] == 1.0 and unread["debiased"]["accuracy"] == 0.0


def test_option_average_removes_a_label_preference():
    # log-prob = a strong preference for the label A + a weaker one for the right option's text
    examples = [_question(i, i % 4) for i in range(8)]
    asked = [r for e in examples for r in option_rotations(e)]
    by_id = {e.id: e for e in asked}
    rows = []
    for e in asked:
        logprobs = {label: (-0.5 if label == "A" else -3.0) + (1.0 if label == e.target else 0.0) for label in ABCD}
        chosen = max(logprobs, key=logprobs.get)
        rows.append({"prompt_id": e.id, "logprobs": logprobs, "chosen": chosen, "passed": chosen == e.target})
    assert summarise_choices(rows, by_id)["debiased"]["accuracy"] == 0.25
    averaged = option_average(rows, by_id)
    assert averaged["accuracy"] == 1.0
    assert [r["chosen"] for r in averaged["results"]] == [e.target for e in examples]


def test_loglik_reads_the_label_token_at_the_answer_position():
    model, tok = load_hf("tiny")
    examples = get_task("family-mc").examples("test", n=5, seed=0)
    batched = loglik_choices(model, tok, examples, batch_size=5)  # prompts of different lengths: padded
    for example, row in zip(examples, batched):
        ids = encode(tok, render_prompt(tok, example.prompt))
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        for label in ABCD:
            token = tok.convert_tokens_to_ids(label)
            assert row["logprobs"][label] == pytest.approx(float(expected[token]), abs=1e-4)
        assert row["chosen"] == max(row["logprobs"], key=row["logprobs"].get)
        assert row["passed"] == (row["chosen"] == example.target) and row["prompt_id"] == example.id
        mass = sum(float(expected[tok.convert_tokens_to_ids(label)].exp()) for label in ABCD)
        assert row["label_mass"] == pytest.approx(mass)
    bridge = load_model("tiny")
    through_bridge = loglik_choices(bridge, bridge.tokenizer, examples, batch_size=2)
    assert [r["chosen"] for r in through_bridge] == [r["chosen"] for r in batched]
    for a, b in zip(through_bridge, batched):
        assert a["logprobs"] == pytest.approx(b["logprobs"], abs=1e-4)


def test_loglik_refuses_labels_that_are_not_one_token():
    _, tok = load_hf("tiny")  # a byte tokenizer: "AB" is two tokens
    example = mc_example("q", "Which?", ["x", "y"], 0, labels=["AB", "CD"])
    with pytest.raises(SpdLensError, match="'AB' .* is not one token"):
        choice_query(tok, example)
    with pytest.raises(SpdLensError, match="no option labels"):
        choice_query(tok, get_task("arithmetic").examples("test", n=1)[0])


def test_evaluate_mc_reports_every_reading(tmp_path):
    model, tok = load_hf("tiny")
    result = evaluate_mc(model, tok, "family-mc", n=3, generations=tmp_path / "g.jsonl", batch_size=4)
    assert result["n"] == 3 and result["rotations"] is True
    records = [json.loads(line) for line in open(tmp_path / "g.jsonl")]
    assert len(records) == 12 and sum("@rot" in r["prompt_id"] for r in records) == 9
    for reading in ("generative", "loglik"):
        summary = result[reading]
        assert summary["n"] == 3 and len(summary["results"]) == 3
        assert all("@rot" not in r["prompt_id"] for r in summary["results"])
        assert sum(summary["choice_rates"].values()) == pytest.approx(1.0)
        assert summary["debiased"]["rotations"] == 12 and len(summary["debiased"]["results"]) == 3
        assert 0 <= summary["debiased"]["consistent"] <= summary["debiased"]["accuracy"] <= 1
    assert "option_average" in result["loglik"]["debiased"]
    # the generative reading is the task's scorer applied to the stored completions
    plain = evaluate(model, tok, "family-mc", n=3, generations=tmp_path / "plain.jsonl")
    assert result["generative"]["accuracy"] == pytest.approx(plain.score)
    only_loglik = evaluate_mc(model, tok, "family-mc", n=3, rotations=False)
    assert only_loglik["generative"] is None and "debiased" not in only_loglik["loglik"]
    assert [r["chosen"] for r in only_loglik["loglik"]["results"]] == [r["chosen"] for r in result["loglik"]["results"]]
    with pytest.raises(SpdLensError, match="not multiple choice"):
        evaluate_mc(model, tok, "arithmetic", n=2)
    with pytest.raises(SpdLensError, match="nothing to evaluate"):
        evaluate_mc(model, tok, "family-mc", n=2, loglik=False)


@pytest.mark.slow
def test_default_model_answers_with_the_unspaced_label(default_bridge, default_tokenizer):
    examples = get_task("family-mc").examples("test", n=8, seed=0)
    rows = loglik_choices(default_bridge, default_tokenizer, examples, batch_size=4)
    query = choice_query(default_tokenizer, examples[0])
    assert query.label_ids == {label: default_tokenizer.convert_tokens_to_ids(label) for label in ABCD}
    # the letters take most of the next-token probability: the answer position is the right one
    assert all(r["label_mass"] > 0.5 for r in rows)
    alone = loglik_choices(default_bridge, default_tokenizer, examples[:1], batch_size=1)[0]
    assert alone["logprobs"] == pytest.approx(rows[0]["logprobs"], abs=1e-3)
