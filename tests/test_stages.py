"""Reuse decided on contents and the resolved runtime (spd_lens.stages): one test per case."""

import json

import pytest
import torch

from spd_lens import SpdLensError, get_task
from spd_lens.config import ModelSection, config_from_dict
from spd_lens.experiment import Run, run_experiment
from spd_lens.extract import extract_subspace
from spd_lens.models import load_hf
from spd_lens.runtime import Runtime
from spd_lens.sampling import SamplingConfig, generate_jsonl
from tests.helpers import read_records

TINY = {"model": {"name": "tiny"}, "seeds": [0], "task": {"name": "arithmetic", "train_n": 4, "eval_n": 3},
        "subspace": {"n": 2}, "sampling": {"max_new_tokens": 4}, "eval": {"max_new_tokens": 4},
        "train": {"epochs": 1, "lr": 1e-3}}


def gsm8k_files(tmp_path, answer_offset=1, prompt="what is"):
    files = {}
    for split, n in (("train", 16), ("test", 3)):
        records = [{"question": f"{split} {i}: {prompt} {i} + 1?", "answer": f"#### {i + answer_offset}"} for i in range(n)]
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"name": "gsm8k", "data": {k: str(v) for k, v in files.items()}, "train_n": 4, "eval_n": 3}


def test_changed_gold_answers_are_not_reused(tmp_path):
    config = {**TINY, "methods": ["base"], "task": gsm8k_files(tmp_path)}
    run_experiment(config_from_dict(config), tmp_path / "run")
    gsm8k_files(tmp_path, answer_offset=2)  # every gold answer edited in place; same paths
    with pytest.raises(SpdLensError, match=r"other inputs \(differs in data.eval: run has '\w+', now '\w+'\).*--reuse"):
        run_experiment(config_from_dict(config), tmp_path / "run")
    # Nor is it taken over by another run.
    metrics = run_experiment(config_from_dict(config), tmp_path / "other", reuse=[tmp_path / "run"])
    assert metrics["reuse"]["base"]["reused"] is False
    assert any(w.startswith("data: run has") for w in metrics["reuse"]["base"]["why"][str(tmp_path / "run")])


def test_changed_training_prompts_are_refused(tmp_path):
    config = {**TINY, "methods": ["psr"], "task": gsm8k_files(tmp_path)}
    Run(config_from_dict(config), tmp_path / "run").data_gate()  # psr's training data, nothing trained
    gsm8k_files(tmp_path, prompt="compute")
    with pytest.raises(SpdLensError, match=r"differs in data.train.0: run has"):  # the gate reads no eval data
        Run(config_from_dict({**config, "methods": ["ssd"]}), tmp_path / "run").data_gate()  # psr not rerun
    assert not (tmp_path / "run" / "generations" / "ssd-seed0.jsonl").exists()


def test_auto_resolved_to_another_dtype_is_refused(tmp_path, monkeypatch):
    config = config_from_dict({**TINY, "methods": ["base"]})  # dtype "auto": float32 on this CPU
    run_experiment(config, tmp_path)
    # The same config on a machine where "auto" means bfloat16 (a GPU node).
    monkeypatch.setattr(ModelSection, "runtime", lambda self: Runtime.resolve("cpu", "bfloat16"))
    with pytest.raises(SpdLensError, match=r"runtime.dtype: run has 'float32', now 'bfloat16'"):
        run_experiment(config_from_dict({**TINY, "methods": ["base", "hook-only"]}), tmp_path)
    assert not (tmp_path / "eval" / "hook-only.json").exists()


def test_a_float32_file_is_not_continued_in_bfloat16(tmp_path, tiny_hf):
    examples = get_task("arithmetic").examples("train", n=3, seed=0)
    out = generate_jsonl(*tiny_hf, examples, tmp_path / "g.jsonl", SamplingConfig(max_new_tokens=4), task="arithmetic")
    half, tokenizer = load_hf("tiny", Runtime.resolve("cpu", "bfloat16"))
    with pytest.raises(SpdLensError, match=r"runtime.dtype: file has 'float32', now 'bfloat16'"):
        generate_jsonl(half, tokenizer, examples, out, SamplingConfig(max_new_tokens=4), task="arithmetic")


def test_float32_and_bfloat16_subspaces_have_different_ids(tiny_bridge):
    f32 = extract_subspace(tiny_bridge, "arithmetic", n=2, layers=[1], rank=2)
    tiny_bridge.original_model.to(torch.bfloat16)
    b16 = extract_subspace(tiny_bridge, "arithmetic", n=2, layers=[1], rank=2)
    assert f32.meta["config_hash"] != b16.meta["config_hash"]
    assert (f32.meta["runtime"]["dtype"], b16.meta["runtime"]["dtype"]) == ("float32", "bfloat16")


def test_batch_sizes_never_block_a_resume(tmp_path, tiny_hf):
    examples = get_task("arithmetic").examples("train", n=5, seed=0)
    config = SamplingConfig(temperature=1.0, max_new_tokens=6, batch_size=2)
    whole = read_records(generate_jsonl(*tiny_hf, examples, tmp_path / "whole.jsonl", config, task="arithmetic"))
    partial = tmp_path / "g.jsonl.partial"  # an interrupted file: its first three prompts done
    partial.write_text("".join(json.dumps(r) + "\n" for r in whole[:3]))
    bigger = SamplingConfig(temperature=1.0, max_new_tokens=6, batch_size=4)
    resumed = read_records(generate_jsonl(*tiny_hf, examples, tmp_path / "g.jsonl", bigger, task="arithmetic"))
    assert [r["messages"] for r in resumed] == [r["messages"] for r in whole]
    # A run's evaluation batch size and sampling batch size change nothing either.
    metrics = run_experiment(config_from_dict({**TINY, "methods": ["base"]}), tmp_path / "run")
    larger = {**TINY, "methods": ["base"], "eval": {**TINY["eval"], "batch_size": 64}, "sampling": {"batch_size": 3, "max_new_tokens": 4}}
    again = run_experiment(config_from_dict(larger), tmp_path / "run")
    assert again["methods"] == metrics["methods"] and again["stage_seconds"] == metrics["stage_seconds"]


def test_an_lr_change_retrains_on_the_same_training_data(tmp_path):
    first = tmp_path / "first"
    run_experiment(config_from_dict({**TINY, "methods": ["psr"]}), first)
    changed = {**TINY, "methods": ["psr"], "train": {**TINY["train"], "lr": 5e-4}}
    with pytest.raises(SpdLensError, match="train.lr: run has 0.001, now 0.0005"):
        run_experiment(config_from_dict(changed), first)
    metrics = run_experiment(config_from_dict(changed), tmp_path / "second", reuse=[first])
    assert metrics["reuse"]["generations/psr-seed0"] == {"reused": True, "from": str(first)}
    assert metrics["reuse"]["psr-seed0"]["reused"] is False
    data = "generations/psr-seed0.jsonl"
    assert (tmp_path / "second" / data).read_bytes() == (first / data).read_bytes()
    assert "train" in metrics["stage_seconds"]
    trained = json.loads((tmp_path / "second" / "adapters" / "psr-seed0" / "train.json").read_text())
    assert trained["config"]["lr"] == 5e-4


def test_a_directory_from_before_stage_records_reads_as_unknown(tmp_path):
    old = tmp_path / "old"
    first = run_experiment(config_from_dict({**TINY, "methods": ["base"]}), old)
    # As an older version left it: no inputs.json, evaluations without a stage record.
    (old / "inputs.json").unlink()
    record = json.loads((old / "eval" / "base.json").read_text())
    (old / "eval" / "base.json").write_text(json.dumps({k: v for k, v in record.items() if k != "stage"}))
    logged = []
    again = run_experiment(config_from_dict({**TINY, "methods": ["base"]}), old, log=logged.append)
    assert again["methods"] == first["methods"] and not (old / "inputs.json").exists()
    assert any("records no inputs" in m and "unknown" in m for m in logged)
    metrics = run_experiment(config_from_dict({**TINY, "methods": ["base"]}), tmp_path / "new", reuse=[old])
    assert metrics["reuse"]["base"] == {"reused": False, "why": {str(old): ["inputs: not recorded (made by an older version)"]}}
