"""The instruments that judge SPD: finish reasons, training-data quality, one sampling setting for
every self-generating method, and intervals that account for seeds."""

import json
import random

import pytest

from spd_lens import SpdLensError, get_task
from spd_lens.config import config_from_dict
from spd_lens.evaluate import paired_difference, seeded_ci, training_data_quality
from spd_lens.sampling import SamplingConfig, generate_jsonl, sample_completions
from spd_lens.train import TrainConfig, build_features, read_training_records


def test_every_record_says_why_its_completion_ended(tiny_hf, tmp_path):
    model, tokenizer = tiny_hf
    examples = get_task("arithmetic").examples("train", n=6, seed=0)
    path = generate_jsonl(model, tokenizer, examples, tmp_path / "g.jsonl",
                          SamplingConfig(temperature=1.0, max_new_tokens=3, seed=1), task="arithmetic")
    records = [json.loads(line) for line in open(path)]
    assert {r["finish_reason"] for r in records} <= {"stop", "length"}
    for r in records:
        # A cut-off completion used its whole budget; a stopped one ended before it.
        assert (r["completion_tokens"] == 3) if r["finish_reason"] == "length" else (r["completion_tokens"] < 3)
    # The tiny random model rarely ends its turn within 3 tokens: most are cut off.
    assert sum(r["finish_reason"] == "length" for r in records) >= 3


def test_finish_reason_stop_when_the_turn_ends(tiny_hf):
    model, tokenizer = tiny_hf
    from spd_lens.chat import end_of_turn_ids

    # Make the end-of-turn token win every step: every completion stops, at zero tokens.
    def end_now(module, inputs, logits):
        logits[..., end_of_turn_ids(tokenizer)[0]] = 1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(end_now)
    try:
        stopped = sample_completions(model, tokenizer, ["2+2?", "7-1?"], SamplingConfig(max_new_tokens=5))
    finally:
        handle.remove()
    assert [c.finish_reason for row in stopped for c in row] == ["stop", "stop"]
    assert [(c.tokens, c.text) for row in stopped for c in row] == [(0, ""), (0, "")]


def _record(user, assistant, reason):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
            "finish_reason": reason}


def test_a_cut_off_completion_is_not_taught_to_end(tiny_tokenizer, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [_record("2+2?", "4", "stop"), _record("2+2?", "4", "length")]))
    finished, cut = read_training_records(path)
    assert finished.finished and not cut.finished
    full, truncated = build_features(tiny_tokenizer, [finished, cut], TrainConfig())
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in [t for t in full["labels"] if t != -100]
    assert end_of_turn not in truncated["labels"] and truncated["input_ids"][-1] != end_of_turn
    # The cut-off one is the finished one without what follows the answer text.
    assert truncated["input_ids"] == full["input_ids"][:len(truncated["input_ids"])]
    assert tiny_tokenizer.decode(truncated["input_ids"]).endswith("4")
    assert len(build_features(tiny_tokenizer, [finished, cut], TrainConfig(truncated="drop"))) == 1
    with pytest.raises(SpdLensError, match="truncated must be"):
        TrainConfig(truncated="cut")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_record("q", "a", "eos")) + "\n")
    with pytest.raises(SpdLensError, match="finish_reason 'eos'"):
        read_training_records(bad)


def test_training_data_quality_scores_without_filtering(tmp_path):
    task = get_task("arithmetic")
    examples = task.examples("train", n=4, seed=0)
    answers = [str(examples[0].target), "The answer is 1 + 1", "no idea", str(examples[3].target)]
    reasons = ["stop", "length", "length", "stop"]
    path = tmp_path / "g.jsonl"
    with open(path, "w") as f:
        for example, answer, reason in zip(examples, answers, reasons):
            f.write(json.dumps({"prompt_id": example.id, "completion_tokens": len(answer), **_record(example.prompt, answer, reason)}) + "\n")
    quality = training_data_quality(task, path, examples)
    assert quality["n"] == 4 and quality["correct"] == 0.5 and quality["cut_off"] == 0.5
    assert quality["finish_reasons"] == {"length": 2, "stop": 2}
    assert quality["mean_tokens"] == pytest.approx(sum(map(len, answers)) / 4)
    # Rebuilt from the ids when the examples are not given.
    assert training_data_quality("arithmetic", path)["correct"] == 0.5


def test_every_self_generating_method_samples_alike():
    from spd_lens.experiment import Run

    config = config_from_dict({"model": {"name": "tiny"}})
    assert config.seeds == [0, 1, 2]
    run = Run(config, "/nonexistent-run-dir")
    psr, spd, ssd = (run.sampling_config(m, 0) for m in ("psr", "spd", "ssd"))
    assert psr == spd and (psr.top_k, psr.top_p, psr.temperature) == (20, 0.8, 1.0)
    assert (ssd.top_k, ssd.top_p, ssd.temperature) == (20, 0.8, 1.5)
    # ssd follows a changed [sampling] truncation...
    changed = Run(config_from_dict({"model": {"name": "tiny"}, "sampling": {"top_p": 0.95}}), "/x")
    assert changed.sampling_config("ssd", 0).top_p == 0.95
    # ...and is refused another one unless the config says so.
    with pytest.raises(SpdLensError, match=r"ssd.top_k = 50 vs sampling.top_k = 20.*own_truncation"):
        config_from_dict({"ssd": {"top_k": 50}})
    own = config_from_dict({"ssd": {"top_k": 50, "own_truncation": True}})
    assert Run(own, "/x").sampling_config("ssd", 0).top_k == 50
    with pytest.raises(SpdLensError, match="repeat a seed"):
        config_from_dict({"seeds": [0, 0]})


def _results(rates, n=200, seed=0):
    rng = random.Random(seed)
    return [{"prompt_id": f"q{q}", "passed": rng.random() < rate, "seed": s}
            for s, rate in enumerate(rates) for q in range(n)]


def test_seed_aware_intervals_widen_when_seeds_disagree():
    agreeing = seeded_ci(_results([0.3, 0.3, 0.3]))
    disagreeing = seeded_ci(_results([0.05, 0.3, 0.55]))
    width = lambda r: r["ci"][1] - r["ci"][0]  # noqa: E731
    assert width(disagreeing) > 2 * width(agreeing)
    assert disagreeing["seeds_differ"] and not agreeing["seeds_differ"] and disagreeing["seed_p"] < 1e-6
    assert disagreeing["n"] == 200 and disagreeing["n_seeds"] == 3
    # One seed: the question bootstrap, nothing flagged.
    single = seeded_ci(_results([0.3]))
    assert single["n_seeds"] == 1 and not single["seeds_differ"] and single["seed_p"] == 1.0
    assert single["ci"][0] < single["score"] < single["ci"][1]


def test_paired_difference_resamples_seeds_and_flags_their_spread():
    base = [{"prompt_id": f"q{q}", "passed": q % 5 == 0} for q in range(200)]
    # Seed 0 gains 10 points on the same questions, seed 1 loses nothing: the mean gain is 5 points.
    gain = [{"prompt_id": f"q{q}", "passed": q % 5 == 0 or (s == 0 and q % 10 == 1), "seed": s}
            for s in range(2) for q in range(200)]
    result = paired_difference(gain, base)
    assert result["difference"] == pytest.approx(0.05)
    assert result["seed_spread"] == pytest.approx(0.10)
    # Questions alone would call this resolved (every question moves one way); seeds do not.
    assert result["ci_questions"][0] > 0 and result["ci"][0] <= 0.0 and result["seeds_differ"]
    steady = [{"prompt_id": f"q{q}", "passed": q % 5 == 0 or q % 10 == 1, "seed": s} for s in range(2) for q in range(200)]
    resolved = paired_difference(steady, base)
    assert resolved["ci"][0] > 0 and not resolved["seeds_differ"]


def test_intervals_resample_prompts_within_seeds_when_each_seed_has_its_own():
    """Training data: each seed samples its own prompts. Filling the prompts a seed never saw with
    its mean made the question-only interval about three times too narrow with three seeds (and
    flagged seed spreads that were only prompt noise)."""
    rng = random.Random(1)
    n = 300
    own = [{"prompt_id": f"s{s}/q{q}", "passed": rng.random() < 0.3, "seed": s} for s in range(3) for q in range(n)]
    stats = seeded_ci(own)
    width = stats["ci_questions"][1] - stats["ci_questions"][0]
    analytic = 2 * 1.96 * (stats["score"] * (1 - stats["score"]) / (3 * n)) ** 0.5
    assert 0.8 * analytic < width < 1.2 * analytic
    assert stats["ci"][0] <= stats["score"] <= stats["ci"][1] and stats["n"] == 3 * n
    # Paired over each seed's prompts: b answers a's prompts right except 20 per seed.
    other = [{**r, "passed": r["passed"] or int(r["prompt_id"].split("q")[1]) < 20} for r in own]
    c = paired_difference(other, own)
    truth = sum(o["passed"] - r["passed"] for o, r in zip(other, own)) / (3 * n)
    assert c["difference"] == pytest.approx(truth) and c["ci_questions"][0] > 0 and c["n"] == 3 * n
    differences = [o["passed"] - r["passed"] for o, r in zip(other, own)]
    mean = sum(differences) / len(differences)
    sd = (sum((d - mean) ** 2 for d in differences) / len(differences)) ** 0.5
    paired_width = c["ci_questions"][1] - c["ci_questions"][0]
    assert 0.8 * 2 * 1.96 * sd / (3 * n) ** 0.5 < paired_width < 1.2 * 2 * 1.96 * sd / (3 * n) ** 0.5
    # The order results come in does not change the design or the answer.
    assert paired_difference(list(reversed(other)), own) == c
    # Seeds drawing overlapping prompts from one pool (a shuffled dataset) are nested too.
    pool = [{"prompt_id": f"q{(q * 7 + s * 101) % 600}", "passed": rng.random() < 0.3, "seed": s}
            for s in range(3) for q in range(n)]
    overlapping = seeded_ci(pool)
    width = overlapping["ci_questions"][1] - overlapping["ci_questions"][0]
    analytic = 2 * 1.96 * (overlapping["score"] * (1 - overlapping["score"]) / (3 * n)) ** 0.5
    assert 0.8 * analytic < width < 1.2 * analytic
    # Evaluations (every seed the same questions) keep the crossed design: unchanged by this.
    crossed = seeded_ci(_results([0.3, 0.3, 0.3]))
    assert crossed["n"] == 200 and crossed["n_seeds"] == 3
    assert seeded_ci(list(reversed(_results([0.3, 0.3, 0.3])))) == crossed


def test_seeds_are_said_to_differ_at_the_test_level_not_a_quarter_of_the_time():
    """The seed flag is a test at 5%: with no seed effect it fires about one time in twenty
    (comparing the seeds' range with the question-only interval fired about one in four at three
    seeds, three in four at five)."""
    import numpy as np

    from spd_lens.evaluate import _crossed_seed_p, _nested_seed_p, seeds_differ

    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, size=300)  # questions differ a lot; seeds do not
    crossed = [_crossed_seed_p((rng.uniform(size=(s, 300)) < difficulty).astype(float))
               for s in (3, 5) for _ in range(200)]
    nested = [_nested_seed_p([(rng.uniform(size=300) < 0.3).astype(float) for _ in range(3)]) for _ in range(200)]
    assert np.mean(np.array(crossed) < 0.05) < 0.1 and np.mean(np.array(nested) < 0.05) < 0.1
    shifted = (rng.uniform(size=(3, 300)) < np.clip(difficulty + np.array([[-0.1], [0.0], [0.1]]), 0, 1)).astype(float)
    assert _crossed_seed_p(shifted) < 0.01
    # Records written before the test keep the older rule's flag, and are read by it.
    assert seeds_differ({"seed_spread_exceeds_ci": True}) and not seeds_differ({"seeds_differ": False})
