"""The engine interface on the tiny model: the HF engine is the refill decoder, the engine is
recorded with every generation, and a file made by another engine is refused on resume."""

import json

import pytest

from spd_lens import get_task
from spd_lens.engines import HFEngine, VLLMEngine, VLLMSettings, check_engine, get_engine
from spd_lens.errors import SpdLensError
from spd_lens.sampling import SamplingConfig, generate_jsonl, resume_view


class _Renamed(HFEngine):
    """The HF decoder under another name: what a resume must compare is the recorded engine."""

    name = "vllm"


def _records(path):
    return [json.loads(line) for line in open(path)]


def test_hf_engine_writes_what_the_decoder_writes(tmp_path, tiny_hf):
    model, tokenizer = tiny_hf
    examples = get_task("arithmetic").examples("train", n=5, seed=0)
    config = SamplingConfig(temperature=1.0, max_new_tokens=6, num_samples=2, batch_size=3)
    plain = generate_jsonl(model, tokenizer, examples, tmp_path / "plain.jsonl", config, task="arithmetic")
    engine = generate_jsonl(model, tokenizer, examples, tmp_path / "engine.jsonl", config, task="arithmetic",
                            engine=get_engine("hf"))
    assert _records(plain) == _records(engine)
    assert {r["settings"]["engine"] for r in _records(engine)} == {"hf"}


def test_resume_under_another_engine_is_refused(tmp_path, tiny_hf):
    model, tokenizer = tiny_hf
    examples = get_task("arithmetic").examples("train", n=3, seed=0)
    config = SamplingConfig(max_new_tokens=4)
    out = tmp_path / "gen.jsonl"
    generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic")
    # a partial file written by the HF engine (one prompt done), resumed by another
    out.with_name(out.name + ".partial").write_text(json.dumps(_records(out)[0]) + "\n")
    out.unlink()
    with pytest.raises(SpdLensError, match="engine"):
        generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic", engine=_Renamed())
    # the same engine resumes it
    generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic", engine=HFEngine())
    assert len(_records(out)) == 3


def test_files_without_an_engine_read_as_the_hf_decoders():
    assert resume_view({"model": "m"}) == resume_view({"model": "m", "engine": "hf"})
    assert resume_view({"model": "m"}) != resume_view({"model": "m", "engine": "vllm"})


def test_bad_engine_settings_are_refused(tmp_path):
    with pytest.raises(SpdLensError, match="engine must be one of"):
        check_engine("sglang")
    with pytest.raises(SpdLensError, match="tensor_parallel_size"):
        VLLMSettings(tensor_parallel_size=0)
    with pytest.raises(SpdLensError, match="config.json"):
        VLLMEngine(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SpdLensError, match="no LoRA adapter"):
        VLLMEngine(tmp_path, adapter=tmp_path)


def test_engine_settings_in_a_config():
    from spd_lens.config import config_from_dict

    config = config_from_dict({"sampling": {"engine": "vllm"}, "eval": {"engine": "vllm"},
                               "vllm": {"tensor_parallel_size": 2, "data_parallel_size": 4}})
    assert (config.sampling.engine, config.eval.engine) == ("vllm", "vllm")
    assert (config.vllm.tensor_parallel_size, config.vllm.data_parallel_size) == (2, 4)
    # defaults are not written: a run directory made before engines existed still matches its config
    written = config_from_dict({}).to_dict()
    assert "engine" not in written["sampling"] and "engine" not in written["eval"] and "vllm" not in written
    with pytest.raises(SpdLensError, match="sampling.engine = 'sglang'"):
        config_from_dict({"sampling": {"engine": "sglang"}})
    with pytest.raises(SpdLensError, match="data_parallel_size"):
        config_from_dict({"vllm": {"data_parallel_size": 0}})
