import json

import pytest

from spd_lens import SpdLensError, get_task
from spd_lens.cli import main as cli
from spd_lens.evaluate import bootstrap_ci, evaluate, score_records
from spd_lens.models import load_hf
from spd_lens.sampling import SamplingConfig


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    lo, hi = bootstrap_ci([True] * 30 + [False] * 70)
    assert lo < 0.3 < hi and 0.1 < hi - lo < 0.25
    lo_big, hi_big = bootstrap_ci(([True] * 30 + [False] * 70) * 10)
    assert hi_big - lo_big < (hi - lo) / 2
    assert bootstrap_ci([True] * 5) == (1.0, 1.0)
    with pytest.raises(SpdLensError):
        bootstrap_ci([])


def test_evaluate_reports_score_ci_and_per_example_results(tmp_path):
    model, tokenizer = load_hf("tiny")
    result = evaluate(model, tokenizer, "arithmetic", n=6, config=SamplingConfig(max_new_tokens=6),
                      generations=tmp_path / "g.jsonl")
    assert result.n == 6 and len(result.results) == 6 and 0 <= result.score <= 1
    assert result.ci[0] <= result.score <= result.ci[1]
    assert {r["status"] for r in result.results} <= {"passed", "failed"}
    assert all(r["prompt_id"].startswith("arithmetic/test/") for r in result.results)


def test_code_scoring_runs_the_tests():
    task = get_task("humaneval")
    examples = {e.id: e for e in task.examples("test")[:3]}
    records = [{"prompt_id": pid, "completion": e.reference} for pid, e in examples.items()]
    records.append({"prompt_id": records[0]["prompt_id"], "completion": "```python\ndef nothing(): pass\n```"})
    result = score_records(task, examples, records)
    assert [r["passed"] for r in result.results] == [True, True, True, False]
    assert result.score == 0.75
    with pytest.raises(SpdLensError, match="is not an example"):
        score_records(task, examples, [{"prompt_id": "HumanEval/999", "completion": ""}])


def test_eval_cli_on_tiny(tmp_path, capsys):
    out = tmp_path / "e.json"
    assert cli(["eval", "--model", "tiny", "--task", "family-mc", "--n", "4", "--max-new-tokens", "4",
                "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 4 and len(saved["results"]) == 4 and "ci" in saved and "loglik" not in saved
    # --mc-loglik: the label log-likelihood beside the generated letter, over every rotation too
    capsys.readouterr()
    assert cli(["eval", "--model", "tiny", "--task", "family-mc", "--n", "4", "--max-new-tokens", "4", "--mc-loglik",
                "--out", str(tmp_path / "l.json")]) == 0
    loglik = json.loads((tmp_path / "l.json").read_text())["loglik"]
    assert sum(loglik["choice_rates"].values()) == pytest.approx(1) and loglik["debiased"]["rotations"] == 16
    assert "option_average_accuracy" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loglik"]
    assert cli(["eval", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--mc-loglik",
                "--out", str(tmp_path / "x.json")]) == 2
    assert "--mc-loglik reads option letters: task 'arithmetic' is math" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_humaneval_pass_at_1_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "he.json"
    assert cli(["eval", "--model", "smollm2-135m-instruct", "--task", "humaneval", "--n", "10", "--max-new-tokens",
                "256", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n"] == 10 and saved["task"] == "humaneval"
    statuses = {r["status"] for r in saved["results"]}
    assert statuses <= {"passed", "failed", "timeout", "error"} and "failed" in statuses
    assert saved["score"] == sum(r["passed"] for r in saved["results"]) / 10


def test_paired_difference_pairs_prompts_and_averages_seeds():
    from spd_lens.evaluate import paired_difference

    base = [{"prompt_id": str(i), "passed": i < 5} for i in range(20)]
    # Two seeds: seed 0 also solves prompts 5-9, seed 1 solves only what base solves.
    method = [{"prompt_id": str(i), "passed": i < 10} for i in range(20)]
    method += [{"prompt_id": str(i), "passed": i < 5} for i in range(20)]
    result = paired_difference(method, base)
    assert result["n"] == 20 and result["difference"] == pytest.approx(5 * 0.5 / 20)
    assert result["ci"][0] <= result["difference"] <= result["ci"][1]
    # Identical outcomes: the difference and its whole interval are zero, however hard the questions.
    same = paired_difference(base, list(reversed(base)))
    assert same["difference"] == 0 and same["ci"] == [0.0, 0.0]
    # Only shared prompts count.
    assert paired_difference(base[:3], base)["n"] == 3
    with pytest.raises(SpdLensError, match="share no prompt"):
        paired_difference(base[:3], base[3:])
