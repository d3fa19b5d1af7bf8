"""`[eval] cut_off`: how an answer that stopped at the token budget is scored."""

import pytest

from spd_lens import SpdLensError, get_task
from spd_lens.config import config_from_dict
from spd_lens.evaluate import score_records
from spd_lens.experiment import run_experiment
from spd_lens.tasks.base import Score


def _records(task):
    examples = task.examples("test", n=2, seed=0)
    # Both answers are right as written; the first stopped at the budget ("...: 16", cut off).
    records = [{"prompt_id": e.id, "completion": f"The answer is {e.reference}", "finish_reason": reason}
               for e, reason in zip(examples, ("length", "stop"))]
    return {e.id: e for e in examples}, records


def test_a_cut_off_answer_is_scored_as_written_or_wrong_by_policy():
    task = get_task("arithmetic")
    examples, records = _records(task)
    as_written = score_records(task, examples, records)  # the default: "score"
    assert [r["passed"] for r in as_written.results] == [True, True]
    assert [r["finish_reason"] for r in as_written.results] == ["length", "stop"]
    wrong = score_records(task, examples, records, cut_off="wrong")
    assert [r["passed"] for r in wrong.results] == [False, True] and wrong.score == 0.5
    assert wrong.results[0]["status"] == "cut_off" and wrong.results[0]["scored_as"] is True
    with pytest.raises(SpdLensError, match="cut_off = 'drop'"):
        score_records(task, examples, records, cut_off="drop")


def test_the_policy_is_a_checked_config_setting_that_old_run_directories_match():
    assert config_from_dict({}).eval.cut_off == "score"
    # The default is not written, so a run directory made before the setting still matches its config.
    assert "cut_off" not in config_from_dict({}).to_dict()["eval"]
    assert config_from_dict({"eval": {"cut_off": "wrong"}}).to_dict()["eval"]["cut_off"] == "wrong"
    with pytest.raises(SpdLensError, match=r"eval.cut_off = 'drop'.*'score'.*'wrong'"):
        config_from_dict({"eval": {"cut_off": "drop"}})


def test_a_run_applies_the_policy_to_its_evaluations(tmp_path, monkeypatch):
    # Every answer of the tiny model stops at a 2-token budget; a scorer that passes everything
    # makes the policy the only thing that decides the score.
    monkeypatch.setattr(type(get_task("arithmetic")), "score", lambda self, example, completion: Score(True, "passed"))
    config = {"model": {"name": "tiny"}, "seeds": [0], "methods": ["base"],
              "task": {"name": "arithmetic", "train_n": 2, "eval_n": 4}, "subspace": {"n": 2},
              "eval": {"max_new_tokens": 2}}
    scored = run_experiment(config_from_dict(config), tmp_path / "score")["methods"]["base"]
    assert scored["finish_reasons"] == {"length": 4} and scored["score"] == 1.0
    config["eval"]["cut_off"] = "wrong"
    wrong = run_experiment(config_from_dict(config), tmp_path / "wrong")["methods"]["base"]
    assert wrong["finish_reasons"] == {"length": 4} and wrong["score"] == 0.0
