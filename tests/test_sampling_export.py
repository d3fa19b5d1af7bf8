
import pytest

from spd_lens import SpdLensError, extract_subspace, get_task
from spd_lens.artifacts import canonical
from spd_lens.projection import project
from spd_lens.cli import main as cli
from spd_lens.models import load_hf
from spd_lens.sampling import SamplingConfig, generate_jsonl
from tests.helpers import read_records


@pytest.fixture(scope="module")
def tiny():
    return load_hf("tiny")




def test_export_format_and_provenance(tmp_path, tiny):
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=3, seed=0)
    config = SamplingConfig(temperature=0.7, max_new_tokens=6, num_samples=2, seed=5, batch_size=2)
    subspace = extract_subspace(model, "arithmetic", n=2, tokenizer=tokenizer)
    with project(model, subspace, alpha=0.5) as handle:  # recorded from the model, not passed in
        out = generate_jsonl(model, tokenizer, examples, tmp_path / "g.jsonl", config, task="arithmetic",
                             provenance={"method": "spd"})
    records = read_records(out)
    assert len(records) == 6 and not (tmp_path / "g.jsonl.partial").exists()
    first = records[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant"]
    assert first["messages"][0]["content"] == examples[0].prompt
    assert {first["id"], first["task"], first["prompt_id"], first["sample_index"]} == {f"{examples[0].id}#0", "arithmetic", examples[0].id, 0}
    settings = first["settings"]
    assert settings["model"] == "tiny" and settings["seed"] == 5 and settings["temperature"] == 0.7
    assert settings["projection"] == canonical(handle.provenance()) and settings["projection"]["alpha"] == 0.5
    assert settings["method"] == "spd" and "spd_lens_version" in settings
    assert sorted((r["prompt_id"], r["sample_index"]) for r in records) == sorted(
        (e.id, k) for e in examples for k in range(2))


def test_resume_refuses_other_settings_and_names_them(tmp_path, tiny):
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=2, seed=0)
    out = tmp_path / "g.jsonl"
    generate_jsonl(model, tokenizer, examples, out, SamplingConfig(max_new_tokens=4), task="arithmetic")
    with pytest.raises(SpdLensError, match=r"refusing to mix.*max_new_tokens: file has 4, now 5"):
        generate_jsonl(model, tokenizer, examples, out, SamplingConfig(max_new_tokens=5), task="arithmetic")
    assert len(read_records(out)) == 2  # the finished file is left as it was


def test_unwritable_or_directory_outputs_are_clear_errors(tmp_path, tiny):
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=1, seed=0)
    with pytest.raises(SpdLensError, match="is a directory"):
        generate_jsonl(model, tokenizer, examples, tmp_path, SamplingConfig(max_new_tokens=2), task="arithmetic")
    with pytest.raises(SpdLensError, match="cannot"):
        generate_jsonl(model, tokenizer, examples, "/proc/spd_lens/x.jsonl", SamplingConfig(max_new_tokens=2),
                       task="arithmetic")


@pytest.mark.slow
def test_hooked_and_folded_generation_agree_on_the_default_model(tmp_path):
    sub = tmp_path / "sub"
    assert cli(["extract", "--task", "arithmetic", "--n", "8", "--out", str(sub)]) == 0
    common = ["generate", "--model", "smollm2-135m-instruct", "--task", "arithmetic", "--n", "4", "--subspace",
              str(sub), "--temperature", "0", "--max-new-tokens", "32"]
    assert cli([*common, "--out", str(tmp_path / "A.jsonl")]) == 0
    before = (tmp_path / "A.jsonl").read_bytes()
    assert cli([*common, "--out", str(tmp_path / "A.jsonl")]) == 0  # projected output resumes (layers 15, 29)
    assert (tmp_path / "A.jsonl").read_bytes() == before
    assert cli([*common, "--fold", "--out", str(tmp_path / "B.jsonl")]) == 0
    a, b = read_records(tmp_path / "A.jsonl"), read_records(tmp_path / "B.jsonl")
    assert len(a) == len(b) == 4
    assert [r["messages"] for r in a] == [r["messages"] for r in b]
    assert a[0]["settings"]["projection"]["subspace_task"] == "arithmetic"


@pytest.mark.slow
def test_projected_cached_generation_equals_uncached_on_the_default_model(default_bridge):
    import torch

    from spd_lens.chat import encode, render_prompt
    from spd_lens.extract import extract_subspace
    from spd_lens.projection import project

    hf, tokenizer = default_bridge.original_model, default_bridge.tokenizer
    subspace = extract_subspace(hf, "arithmetic", n=4, tokenizer=tokenizer)
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, "What is 12 + 7?"))])
    with project(default_bridge, subspace), torch.no_grad():
        cached = hf.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True, pad_token_id=2)
        uncached = hf.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False, pad_token_id=2)
    assert torch.equal(cached, uncached)
