import pytest
import torch
from transformers import AutoModelForCausalLM

from spd_lens import SpdLensError
from spd_lens.extract import extract_subspace
from spd_lens.models import boot, load_hf
from spd_lens.projection import Projection, fold_projection, project, save_folded
from spd_lens.sampling import SamplingConfig, sample


@pytest.fixture(scope="module")
def tiny_subspace():
    model, tokenizer = load_hf("tiny")
    return extract_subspace(model, "arithmetic", n=6, layers=[1, 3], rank=6, tokenizer=tokenizer)


@pytest.fixture
def tiny():
    return load_hf("tiny")


def _ids(tokenizer, text="What is 12 + 7? Answer with the number."):
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def _kv_outputs(model, ids, layer):
    seen = {}
    attention = model.model.layers[layer].self_attn
    handles = [getattr(attention, f"{k}_proj").register_forward_hook(
        lambda m, a, o, k=k: seen.__setitem__(k, o.detach().clone())) for k in "kv"]
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


def test_hard_projection_puts_k_and_v_in_the_subspace(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    # A later hook sees the projected output: register it after the projection's hooks.
    with project(model, tiny_subspace):
        seen = _kv_outputs(model, ids, 3)
    for kind in "kv":
        p = tiny_subspace.projector(3, kind).float()
        assert torch.allclose(seen[kind] @ p, seen[kind], atol=1e-5)  # already in the subspace
    base = _kv_outputs(model, ids, 3)
    assert not torch.allclose(base["k"] @ tiny_subspace.projector(3, "k").float(), base["k"], atol=1e-5)


def test_alpha_interpolates(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    base = _kv_outputs(model, ids, 1)["v"]
    with project(model, tiny_subspace, alpha=0.25):
        mixed = _kv_outputs(model, ids, 1)["v"]
    p = tiny_subspace.projector(1, "v").float()
    assert torch.allclose(mixed, 0.75 * base + 0.25 * base @ p, atol=1e-5)
    with project(model, tiny_subspace, alpha=0.0):
        assert torch.allclose(_kv_outputs(model, ids, 1)["v"], base, atol=1e-6)


def test_per_head_selection_leaves_other_heads_alone(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    base = _kv_outputs(model, ids, 3)["k"].reshape(1, -1, 2, 8)
    with project(model, tiny_subspace, layers=[3], layout="head", heads=[1], kinds=["k"]):
        out = _kv_outputs(model, ids, 3)["k"].reshape(1, -1, 2, 8)
    assert torch.allclose(out[:, :, 0], base[:, :, 0])
    p1 = tiny_subspace.projector(3, "k", 1).float()
    assert torch.allclose(out[:, :, 1], base[:, :, 1] @ p1, atol=1e-5)


def test_hooks_are_removed_on_exit_and_on_error_user_hooks_stay(tiny, tiny_subspace):
    model, tokenizer = tiny
    bridge = boot(model, tokenizer)
    ids = _ids(tokenizer)
    calls = []
    user = bridge.hook_dict["blocks.3.attn.hook_k"].add_hook(lambda t, hook: calls.append(1), dir="fwd")
    with torch.no_grad():
        base = bridge(ids)
        with pytest.raises(RuntimeError, match="boom"):
            with project(bridge, tiny_subspace):
                projected = bridge(ids)
                raise RuntimeError("boom")
        after = bridge(ids)
    assert not torch.allclose(base, projected)
    assert torch.equal(base, after)
    assert len(calls) == 3 and len(bridge.hook_dict["blocks.3.attn.hook_k"].fwd_hooks) == 1
    user.hook.remove()


def test_bridge_and_plain_hooks_and_folding_agree(tiny, tiny_subspace, tmp_path):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    projection = Projection.build(tiny_subspace, alpha=0.8)
    folded = fold_projection(model, projection)
    with torch.no_grad():
        with projection.apply(model):
            hooked = model(ids).logits
        folded_logits = folded(ids).logits
        save_folded(folded, tokenizer, tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits  # offline-ok: local directory
        bridge = boot(model, tokenizer)
        with projection.apply(bridge):
            bridged = bridge(ids)
    assert torch.allclose(hooked, folded_logits, atol=1e-5)
    assert torch.allclose(hooked, reloaded, atol=1e-5)
    assert torch.allclose(hooked, bridged, atol=1e-4)


def test_cached_generation_equals_uncached_under_projection(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    with project(model, tiny_subspace), torch.no_grad():
        cached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_bad_projection_settings_are_named(tiny, tiny_subspace):
    model, _ = tiny
    for alpha in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(SpdLensError, match="alpha must be a finite number"):
            Projection.build(tiny_subspace, alpha=alpha)
    with pytest.raises(SpdLensError, match="complement must be True or False"):
        Projection.build(tiny_subspace, complement="yes")
    with pytest.raises(SpdLensError, match=r"layer\(s\) \[2\] are not in the subspace"):
        Projection.build(tiny_subspace, layers=[2])
    with pytest.raises(SpdLensError, match="needs layout='head'"):
        Projection.build(tiny_subspace, layout="flat", heads=[0])
    with pytest.raises(SpdLensError, match=r"head\(s\) \[5\] out of range"):
        Projection.build(tiny_subspace, layout="head", heads=[5])
    with pytest.raises(SpdLensError, match="not a TransformerBridge"):
        fold_projection(boot(*load_hf("tiny")), Projection.build(tiny_subspace))
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=8))
    with pytest.raises(SpdLensError, match="does not fit this model"):
        with project(other, tiny_subspace):
            pass


def test_sampling_is_seeded_and_batched_like_single(tiny):
    model, tokenizer = tiny
    prompts = ["2+2?", "What is the capital of France?", "x"]
    config = SamplingConfig(temperature=1.0, top_p=0.9, top_k=20, max_new_tokens=8, num_samples=2, seed=3)
    first = sample(model, tokenizer, prompts, config)
    again = sample(model, tokenizer, prompts, config)
    other = sample(model, tokenizer, prompts, SamplingConfig(**{**config.__dict__, "seed": 4}))
    assert first == again and first != other
    assert [len(s) for s in first] == [2, 2, 2]
    greedy = SamplingConfig(max_new_tokens=8)
    batched = sample(model, tokenizer, prompts, greedy)
    single = [sample(model, tokenizer, [p], greedy)[0] for p in prompts]
    assert batched == single  # left padding with the attention mask changes nothing


def test_sampling_config_rejects_bad_values():
    for bad in ({"temperature": -1}, {"temperature": 1e-100}, {"top_p": 0}, {"top_k": -2}, {"max_new_tokens": 0}, {"num_samples": 0}):
        with pytest.raises(SpdLensError):
            SamplingConfig(**bad)


def test_complement_removes_the_subspace_and_keeps_the_rest(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    base = _kv_outputs(model, ids, 1)  # the first projected layer: its input is unchanged
    with project(model, tiny_subspace, complement=True):
        removed = _kv_outputs(model, ids, 1)
    with project(model, tiny_subspace, complement=True, alpha=0.5):
        half = _kv_outputs(model, ids, 1)
    for kind in "kv":
        p = tiny_subspace.projector(1, kind)
        assert torch.allclose(removed[kind] @ p, torch.zeros_like(removed[kind]), atol=1e-5)  # nothing left in it
        assert torch.allclose(removed[kind], base[kind] - base[kind] @ p, atol=1e-5)
        assert torch.allclose(half[kind], base[kind] - 0.5 * base[kind] @ p, atol=1e-5)
    projection = Projection.build(tiny_subspace, complement=True)
    assert projection.provenance()["complement"] is True
    with torch.no_grad():  # folding I - P is as exact as folding P
        with projection.apply(model):
            hooked = model(ids).logits
        assert torch.allclose(fold_projection(model, projection)(ids).logits, hooked, atol=1e-5)


def test_alpha_outside_zero_one_scales_the_removed_part_by_one_minus_alpha(tiny, tiny_subspace):
    model, tokenizer = tiny
    ids = _ids(tokenizer)
    base = _kv_outputs(model, ids, 1)["v"]
    p = tiny_subspace.projector(1, "v")
    inside, outside = base @ p, base - base @ p
    for alpha in (2.0, -1.0):
        with project(model, tiny_subspace, alpha=alpha):
            out = _kv_outputs(model, ids, 1)["v"]
        assert torch.allclose(out, inside + (1 - alpha) * outside, atol=1e-5)
        with project(model, tiny_subspace, alpha=alpha, complement=True):
            out = _kv_outputs(model, ids, 1)["v"]
        assert torch.allclose(out, outside + (1 - alpha) * inside, atol=1e-5)


def test_one_head_at_one_layer_in_one_call(tiny, tiny_subspace):
    model, tokenizer = tiny
    short = Projection.build(tiny_subspace, layers=3, heads=1)
    long = Projection.build(tiny_subspace, layers=[3], layout="head", heads=[1])
    assert short.settings == long.settings and short.settings.layout == "head"
    assert all(torch.equal(short.maps[key], long.maps[key]) for key in long.maps)
    ids = _ids(tokenizer)
    base = _kv_outputs(model, ids, 3)["k"].reshape(1, -1, 2, 8)
    with project(model, tiny_subspace, layers=3, heads=1):
        out = _kv_outputs(model, ids, 3)["k"].reshape(1, -1, 2, 8)
    assert torch.equal(out[:, :, 0], base[:, :, 0])
    assert torch.allclose(out[:, :, 1], base[:, :, 1] @ tiny_subspace.projector(3, "k", 1), atol=1e-5)


def test_projection_survives_reset_hooks_and_ends_loudly_when_removed(tiny_subspace):
    bridge = boot(*load_hf("tiny"))
    ids = _ids(bridge.tokenizer)
    with torch.no_grad():
        base = bridge(ids)
        with project(bridge, tiny_subspace) as handle:
            projected = bridge(ids)
            bridge.reset_hooks()  # the TransformerLens habit: the projection stays on
            assert handle.active and torch.equal(bridge(ids), projected)
            # run_with_hooks and run_with_cache leave it on too
            logits, cache = bridge.run_with_cache(ids, names_filter="blocks.3.attn.hook_k")
            assert torch.equal(logits, projected)
            k = cache["blocks.3.attn.hook_k"].flatten(-2)
            assert torch.allclose(k @ tiny_subspace.projector(3, "k"), k, atol=1e-5)
        assert not handle.active and torch.equal(bridge(ids), base)
        with pytest.raises(SpdLensError, match="taken off the model inside"):
            with project(bridge, tiny_subspace) as handle:
                bridge.reset_hooks(including_permanent=True)
                assert not handle.active  # the handle knows
                assert torch.equal(bridge(ids), base)
        assert not any(bridge.hook_dict[f"blocks.{l}.attn.hook_{k}"].fwd_hooks for l in (1, 3) for k in "kv")


def test_plain_model_handle_knows_when_its_hooks_are_gone(tiny, tiny_subspace):
    model, _ = tiny
    with pytest.raises(SpdLensError, match="taken off the model inside"):
        with project(model, tiny_subspace) as handle:
            assert handle.active
            model.model.layers[3].self_attn.k_proj._forward_hooks.clear()
            assert not handle.active
    assert not any(layer.self_attn.v_proj._forward_hooks for layer in model.model.layers)
