import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.extract import extract_subspace
from spd_lens.gradient_cache import GradientCache, cache_gradients
from spd_lens.gradients import iterate_gradients
from spd_lens.models import load_hf
from spd_lens.subspace import CapabilitySubspace
from spd_lens.tasks import get_task
from spd_lens.viz import head_energy_figure, token_gradient_figure


@pytest.fixture(scope="module")
def tiny():
    return load_hf("tiny")


@pytest.fixture(scope="module")
def cache(tiny):
    model, tokenizer = tiny
    return cache_gradients(model, "family-mc", n=5, seed=1, tokenizer=tokenizer, batch_size=2)


def test_cache_is_indexable_like_an_activation_cache(cache):
    assert cache.keys() == [f"blocks.{l}.attn.hook_{k}" for l in range(4) for k in "kv"]
    grad = cache["blocks.2.attn.hook_v"]
    assert grad.shape[0] == 5 and grad.shape[2:] == (2, 8)
    assert torch.equal(cache[2, "v"], grad) and "blocks.2.attn.hook_v" in cache
    assert torch.equal(cache.head("blocks.2.attn.hook_v", 1), grad[:, :, 1])
    with pytest.raises(SpdLensError, match="not a K/V hook name"):
        cache["blocks.2.attn.hook_q"]
    assert cache.to("cpu")["blocks.0.attn.hook_k"].device.type == "cpu"


def test_cache_takes_transformer_lens_keys(cache):
    grad = cache["blocks.2.attn.hook_k"]
    assert cache["k", 2] is grad and cache["k2"] is grad and cache["key", 2] is grad and cache["k", 2, "attn"] is grad
    assert cache["k", -2] is grad and cache[2, "k"] is grad  # negative layers; the (layer, kind) order still works
    assert ("v", 3) in cache and ("v", 7) not in cache
    with pytest.raises(SpdLensError, match=r"only keys and values.*cache\['k', layer\]"):
        cache["q", 2]
    with pytest.raises(SpdLensError, match="no gradients cached for blocks.9.attn.hook_k"):
        cache["k", 9]
    with pytest.raises(SpdLensError, match="cannot index a gradient cache with 3"):
        cache[3]


def test_gradient_rows_compose_with_bases_in_the_model_dtype(cache):
    subspace = CapabilitySubspace.from_cache(cache, layers=[3])
    assert subspace.dtype == torch.float32 and subspace.basis(3, "k").dtype == torch.float32
    coordinates = cache["blocks.3.attn.hook_k"].flatten(-2) @ subspace.basis(3, "k")  # float32 @ float32
    assert coordinates.shape[-1] == subspace.rank(3, "k")
    exact = subspace.basis(3, "k", dtype=torch.float64)
    assert exact.dtype == torch.float64 and torch.allclose(exact.float(), subspace.basis(3, "k"))
    assert subspace.projector(3, "v", 1).dtype == torch.float32


def test_rows_keep_the_given_example_order(tiny, cache):
    model, tokenizer = tiny
    task = get_task("family-mc")
    examples = task.examples("train", n=5, seed=1)
    assert cache.example_ids == [e.id for e in examples]
    for row, example in enumerate(examples):
        encoded = task.locate(tokenizer, example)
        n = len(encoded.input_ids)
        assert cache.input_ids[row, :n].tolist() == encoded.input_ids
        assert cache.correctness_mask[row, :n].tolist() == encoded.correctness_mask
        assert not cache.attention_mask[row, n:].any()
    batch = next(iterate_gradients(model, [task.locate(tokenizer, examples[3])], layers=[1], pad_id=tokenizer.pad_token_id))
    n = batch.input_ids.shape[1]
    assert torch.allclose(cache[1, "k"][3, :n], batch.grads[(1, "k")][0], atol=1e-7)


def test_views_padding_and_head_energy(cache):
    norms = cache.token_norms("blocks.3.attn.hook_k")
    assert (norms[~cache.attention_mask] == 0).all() and (norms[cache.attention_mask] >= 0).all()
    energy = cache.head_energy("blocks.3.attn.hook_k")
    assert energy.shape == (2,) and energy.sum().item() == pytest.approx(1.0)
    rows = cache.stacked("blocks.3.attn.hook_k")
    assert rows.shape == (int(cache.attention_mask.sum()), 16)
    assert cache.stacked("blocks.3.attn.hook_k", head=0).shape[1] == 8


def test_subspace_from_cache_equals_streaming_extraction(tiny, cache):
    model, tokenizer = tiny
    streaming = extract_subspace(model, "family-mc", n=5, seed=1, layers=[1, 3], tokenizer=tokenizer, batch_size=3)
    cached = CapabilitySubspace.from_cache(cache, layers=[1, 3])
    # The sums are the same up to float32 rounding in other batches...
    for key, gram in streaming.grams.items():
        assert torch.allclose(cached.grams[key], gram, rtol=0, atol=1e-6 * gram.abs().max())
    for layer, kind, head in streaming.keys():
        expected = streaming.singular_values(layer, kind, head)
        assert torch.allclose(cached.singular_values(layer, kind, head), expected, rtol=1e-5, atol=1e-5 * expected[0])
        # ...and so the projectors, up to that rounding amplified where the rank cut falls between
        # two close singular values (here 4.04e-4 and 3.81e-4 at one head: 3e-5).
        assert torch.allclose(cached.projector(layer, kind, head), streaming.projector(layer, kind, head), atol=1e-4)


def test_save_and_load(tmp_path, cache):
    cache.save(tmp_path)
    loaded = GradientCache.load(tmp_path)
    assert loaded.keys() == cache.keys() and loaded.example_ids == cache.example_ids
    assert torch.equal(loaded["blocks.1.attn.hook_v"], cache["blocks.1.attn.hook_v"])
    assert loaded.meta["model_id"] == "tiny" and loaded.meta["task"] == "family-mc"
    with open(tmp_path / "gradients.safetensors", "ab") as f:
        f.write(b"x")
    with pytest.raises(SpdLensError, match="does not match"):
        GradientCache.load(tmp_path)


def test_memory_budget_is_checked_before_any_work(tiny):
    model, tokenizer = tiny
    with pytest.raises(SpdLensError, match=r"over the budget.*extract_subspace"):
        cache_gradients(model, "arithmetic", n=4, tokenizer=tokenizer, max_bytes=1000)


def test_only_the_asked_hooks_are_cached(tiny):
    model, tokenizer = tiny
    cache = cache_gradients(model, "arithmetic", n=2, layers=[2], hook_names=("hook_v",), tokenizer=tokenizer)
    assert cache.keys() == ["blocks.2.attn.hook_v"]
    with pytest.raises(SpdLensError, match="hook_q"):
        cache_gradients(model, "arithmetic", n=2, hook_names=("hook_q",), tokenizer=tokenizer)


def test_figures_show_tokens_and_heads(tiny, cache):
    _, tokenizer = tiny
    figure = token_gradient_figure(cache, tokenizer, example=1, layer=3, kind="v")
    heatmap = figure.data[0]
    n = int(cache.attention_mask[1].sum())
    values = [v for row in heatmap.z for v in row if v is not None]
    assert len(values) == n
    # Bold: the positions that predict a correctness token (one before each); outlined: the tokens.
    correct = cache.correctness_mask[1, :n].tolist()
    cells = [t for row in heatmap.text for t in row][:n]
    assert [i for i, t in enumerate(cells) if "<b>" in t] == [i - 1 for i, c in enumerate(correct) if c]
    assert len(figure.layout.shapes) == sum(correct)
    assert "predicted from the position before" in figure.layout.title.text
    last = max(i for i, c in enumerate(correct) if c)  # nothing after it is in the loss: no gradient
    assert float(cache.token_norms("blocks.3.attn.hook_v")[1, last]) == 0.0
    assert float(cache.token_norms("blocks.3.attn.hook_v")[1, last - 1]) > 0.0
    assert "token" in heatmap.hovertext[0][0] and "|grad|" in heatmap.hovertext[0][0]
    assert "<html" in figure.to_html(include_plotlyjs=False, full_html=True)
    assert len(head_energy_figure(cache, "k").data[0].z) == 4
    with pytest.raises(SpdLensError, match="example 9 out of range"):
        token_gradient_figure(cache, tokenizer, example=9, layer=3)


@pytest.mark.slow
def test_default_model_all_layers_for_eight_humaneval_examples(default_bridge, tmp_path):
    hf, tokenizer = default_bridge.original_model, default_bridge.tokenizer
    # A budget well under the default's 3 GiB keeps the suite's peak far from its 4 GB (README "Memory").
    cache = cache_gradients(hf, "humaneval", n=8, tokenizer=tokenizer, max_memory="1.5GB")
    assert cache.layers == list(range(30))
    streaming = extract_subspace(hf, "humaneval", n=8, tokenizer=tokenizer, max_memory="1.5GB")
    cached = CapabilitySubspace.from_cache(cache, layers=streaming.layers)
    for layer, kind, head in streaming.keys():
        assert torch.allclose(cached.singular_values(layer, kind, head), streaming.singular_values(layer, kind, head),
                              rtol=1e-4)
    figure = token_gradient_figure(cache, tokenizer, example=0, layer=15, kind="k")
    (tmp_path / "tokens.html").write_text(figure.to_html())
    assert (tmp_path / "tokens.html").stat().st_size > 1000
