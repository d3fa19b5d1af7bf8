"""The real embedded default model (SmolLM2-135M-Instruct): slow, but run in CI."""

import os
import shutil

import pytest
import torch

from spd_lens.cache import cache_root
from spd_lens.chat import encode, end_of_turn_ids, render_prompt
from spd_lens.models import DEFAULT_MODEL, load_hf

pytestmark = pytest.mark.slow


def _greedy(model, tokenizer, question, max_new_tokens=24, use_cache=True):
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, question))])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             use_cache=use_cache, eos_token_id=end_of_turn_ids(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_default_model_knows_the_capital_of_france(default_bridge):
    answer = _greedy(default_bridge.original_model, default_bridge.tokenizer, "What is the capital of France?")
    assert "Paris" in answer


def test_default_model_shape(default_bridge):
    cfg = default_bridge.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)


def test_cached_generation_equals_uncached_after_boot(default_bridge):
    # transformers 5.24 broke this for booted Llama models; the pin in pyproject keeps it away.
    model, tokenizer = default_bridge.original_model, default_bridge.tokenizer
    cached = _greedy(model, tokenizer, "What is 12 + 7?", use_cache=True)
    uncached = _greedy(model, tokenizer, "What is 12 + 7?", use_cache=False)
    assert cached == uncached
    assert cached.startswith("12 + 7 =")  # a real answer, not the "1-----" of a broken cache


def test_broken_cache_is_rebuilt_not_loaded(tmp_path, monkeypatch, default_bridge):
    good = cache_root() / "models" / DEFAULT_MODEL
    monkeypatch.setenv("SPD_LENS_CACHE", str(tmp_path))
    copy = tmp_path / "models" / DEFAULT_MODEL
    shutil.copytree(good, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:  # same size, damaged bytes in the middle
        f.seek(os.path.getsize(weights) // 2)
        f.write(b"\xff" * 64)
    model, tokenizer = load_hf()
    reference = default_bridge.original_model.model.layers[15].self_attn.k_proj.weight
    assert torch.equal(model.model.layers[15].self_attn.k_proj.weight, reference)


def test_transformer_lens_tokenisation_gives_the_project_tokens(default_bridge):
    from spd_lens.chat import NO_SYSTEM, to_chat_tokens

    tokenizer = default_bridge.tokenizer
    rendered = render_prompt(tokenizer, "What is the capital of France?")
    tokens = to_chat_tokens(default_bridge, "What is the capital of France?")
    assert tokens[0].tolist() == encode(tokenizer, rendered)
    assert torch.equal(default_bridge.to_tokens(rendered), tokens)  # no second <|im_start|> in front
    paris = encode(tokenizer, " Paris")[0]
    with torch.no_grad():
        from_text = default_bridge(rendered)[0, -1].log_softmax(-1)[paris]
        from_tokens = default_bridge(tokens)[0, -1].log_softmax(-1)[paris]
    assert float(from_text) == float(from_tokens)
    short = to_chat_tokens(default_bridge, "What is the capital of France?", system=NO_SYSTEM)
    assert "SmolLM" not in tokenizer.decode(short[0]) and short.shape[1] < tokens.shape[1]
