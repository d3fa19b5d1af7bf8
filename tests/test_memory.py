"""Gradient passes within a memory budget: the estimate, the batches it makes, the refusal."""

import doctest

import pytest
import torch

import spd_lens.memory
from spd_lens import SpdLensError
from spd_lens.extract import extract_subspace
from spd_lens.gradient_cache import cache_gradients
from spd_lens.gradients import gradient_batches, iterate_gradients
from spd_lens.memory import batch_plan, gradient_pass_bytes, parse_bytes
from spd_lens.models import boot, load_hf
from spd_lens.tasks import get_task
from spd_lens.tasks.base import EncodedExample


@pytest.fixture(scope="module")
def tiny64():
    return load_hf("tiny", dtype=torch.float64)


def _examples(lengths):
    return [EncodedExample(f"e{i}", [5 + i % 7] * n, [False] * (n - 3) + [True] * 3, [False] * (n - 3) + [True] * 3,
                           n - 3) for i, n in enumerate(lengths)]


def _saved_bytes(model, encoded, layers, capture):
    """What autograd keeps for the backward pass (weights excluded), counted by storage."""
    from spd_lens.models import hf_model_of

    weights = {p.untyped_storage().data_ptr() for p in hf_model_of(model).parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for _ in iterate_gradients(model, encoded, layers=layers, batch_size=len(encoded), pad_id=0, capture=capture):
            pass
    return sum(seen.values())


@pytest.mark.parametrize("capture", ["plain", "bridge", "bridged-plain"])
def test_the_estimate_covers_what_the_pass_keeps(capture):
    hf, tokenizer = load_hf("tiny")
    model = hf if capture == "plain" else boot(hf, tokenizer)
    cases = [(1, 64, 2, 64), (2, 256, 0, 256), (1, 600, 0, 600), (3, 128, 1, 128)]
    if capture != "bridge":  # padded batches: the plain path keeps no pattern for them either (it runs without a mask)
        cases += [(2, 600, 0, 300), (3, 400, 1, 100)]
    for batch, length, first, shortest in cases:
        encoded = _examples([length] * (batch - 1) + [shortest])
        saved = _saved_bytes(model, encoded, [first, 3], "bridge" if capture == "bridge" else "plain")
        estimate = gradient_pass_bytes(model, batch=batch, length=length, first_layer=first,
                                       full_logits=capture == "bridge", bridge_attention=capture == "bridge")
        # An upper bound, and not a wild one: beyond the logits (computed and freed, never kept)
        # the rest is working room the pass also needs.
        logits = 2 * (batch * length if capture == "bridge" else batch * 8) * hf.config.vocab_size * 4
        assert saved <= estimate <= 3 * saved + logits, (capture, batch, length, first, saved, estimate)


def test_batches_count_the_logits_of_every_correctness_token(tiny_hf):
    # A program's correctness tokens are hundreds, an arithmetic answer's a few: the plain path
    # computes a logit row for each, so the same lengths with more targets make smaller batches.
    model, _ = tiny_hf
    lengths = [300] * 4
    few = _examples(lengths)
    many = [EncodedExample(e.example_id, e.input_ids, [False] * 50 + [True] * 250, e.answer_mask, e.prompt_length)
            for e in few]
    budget = gradient_pass_bytes(model, batch=4, length=300, first_layer=3, targets=3)
    assert gradient_pass_bytes(model, batch=4, length=300, first_layer=3, targets=250) > budget
    plan = {name: [len(b) for b in gradient_batches(model, examples, layers=[3], loss="correctness", batch_size=4,
                                                    max_memory=budget)]
            for name, examples in (("few", few), ("many", many))}
    assert plan["few"] == [4] and len(plan["many"]) > 1, plan


def test_frozen_weights_keep_nothing_below_the_first_target_layer(tiny_hf):
    model, _ = tiny_hf
    encoded = _examples([200, 200])
    low, high = _saved_bytes(model, encoded, [0, 3], "plain"), _saved_bytes(model, encoded, [3], "plain")
    assert high < 0.4 * low  # one kept layer of four, not all of them


def test_the_pass_leaves_the_model_as_it_found_it(tiny_hf):
    model, _ = tiny_hf
    flags = [p.requires_grad for p in model.parameters()]
    next(model.parameters()).requires_grad_(not flags[0])
    expected = [p.requires_grad for p in model.parameters()]
    attention = model.config._attn_implementation
    list(iterate_gradients(model, _examples([20]), layers=[2], pad_id=0))
    assert [p.requires_grad for p in model.parameters()] == expected
    assert model.config._attn_implementation == attention
    next(model.parameters()).requires_grad_(flags[0])


def test_batches_shrink_for_long_examples_and_the_numbers_do_not_change(tiny64):
    model, tokenizer = tiny64
    lengths = [30, 40, 300, 310, 35, 320]
    encoded = _examples(lengths)
    big = gradient_pass_bytes(model, batch=2, length=300, first_layer=1)
    budget = big - 1  # two long examples no longer fit together; four short ones do
    batches = gradient_batches(model, encoded, layers=[1, 3], loss="correctness", batch_size=4, max_memory=budget)
    assert [len(b) for b in batches] == [3, 1, 1, 1]
    free = {b.example_ids[0]: b for b in iterate_gradients(model, encoded, layers=[1, 3], batch_size=1, pad_id=0)}
    tight = list(iterate_gradients(model, encoded, layers=[1, 3], batch_size=4, pad_id=0, max_memory=budget))
    assert len(tight) == 4
    for batch in tight:
        for row, example_id in enumerate(batch.example_ids):
            n = len(encoded[int(example_id[1:])].input_ids)
            for key, grad in batch.grads.items():
                assert torch.allclose(grad[row, :n], free[example_id].grads[key][0, :n], atol=1e-12), key


def test_cache_and_subspace_are_the_same_at_a_budget(tiny64):
    model, tokenizer = tiny64
    task = get_task("humaneval")
    ample = cache_gradients(model, task, n=6, layers=[1, 3], tokenizer=tokenizer, max_memory="20GB")
    lengths = sorted(int(m.sum()) for m in ample.attention_mask)
    one = gradient_pass_bytes(model, batch=1, length=lengths[-1], first_layer=1)
    budget = one + ample["k", 1].numel() * 8 * 4 + 1  # the cache itself, and one long example at a time
    calls = []
    tight = cache_gradients(model, task, n=6, layers=[1, 3], tokenizer=tokenizer, max_memory=budget,
                            progress=lambda batches: calls.append(len(batches)) or batches)
    assert calls and calls[0] > 6 // 4 + 1  # more batches than batch_size alone makes
    for name, grad in ample.items():
        assert torch.allclose(tight[name], grad, atol=1e-12), name
    a = extract_subspace(model, task, n=6, layers=[1, 3], rank=4, tokenizer=tokenizer, max_memory="20GB")
    b = extract_subspace(model, task, n=6, layers=[1, 3], rank=4, tokenizer=tokenizer, max_memory=budget)
    for key in a.grams:
        assert torch.allclose(a.grams[key], b.grams[key], rtol=1e-10, atol=1e-12), key


def test_an_example_that_cannot_fit_is_refused_before_any_work(tiny_hf):
    model, tokenizer = tiny_hf
    with pytest.raises(SpdLensError, match=r"895 tokens needs an estimated .* MiB .* \(max_memory=1000 bytes\).*later layers"):
        extract_subspace(model, "humaneval", n=2, layers=[1, 3], tokenizer=tokenizer, max_memory=1000)
    with pytest.raises(SpdLensError, match=r"for the result itself"):
        cache_gradients(model, "humaneval", n=2, layers=[1, 3], tokenizer=tokenizer, max_memory="1MB")


def test_without_a_budget_batches_aim_low_on_the_cpu_but_long_examples_still_run(monkeypatch, tiny_hf):
    model, _ = tiny_hf
    monkeypatch.setattr(spd_lens.memory, "CPU_TARGET", 1)  # nothing fits the target...
    batches = gradient_batches(model, _examples([50, 60, 70]), layers=[3], loss="correctness", batch_size=4)
    assert [len(b) for b in batches] == [1, 1, 1]  # ...so every example runs alone, within the limit


def test_batch_plan_and_sizes():
    assert batch_plan([5, 1, 3], batch_size=2, estimate=lambda b, t: b * t, budget=None) == [[1, 2], [0]]
    with pytest.raises(SpdLensError, match="100 tokens needs"):
        batch_plan([100], batch_size=1, estimate=lambda b, t: b * t * 2**30, budget=2**30)
    assert batch_plan([100], batch_size=1, estimate=lambda b, t: b * t, budget=10, limit=1000) == [[0]]
    assert parse_bytes("4GB") == 4 * 10**9 and parse_bytes("512 MiB") == 2**29 and parse_bytes(1000) == 1000
    for bad in ("lots", "-3GB", 0, "4 parsecs"):
        with pytest.raises(SpdLensError, match="max_memory"):
            parse_bytes(bad)


def test_a_bridge_with_hooks_on_takes_gradients_through_them(tiny_hf):
    hf, tokenizer = load_hf("tiny")
    bridge = boot(hf, tokenizer)
    task = get_task("arithmetic")
    encoded = [task.locate(tokenizer, e) for e in task.examples("train", n=2, seed=0)]
    plain = {b.example_ids[0]: b for b in iterate_gradients(bridge, encoded, layers=[3], batch_size=1, pad_id=0)}
    bridge.blocks[1].attn.hook_v.add_hook(lambda v, hook: 3 * v)
    try:
        hooked = {b.example_ids[0]: b for b in iterate_gradients(bridge, encoded, layers=[3], batch_size=1, pad_id=0)}
    finally:
        bridge.reset_hooks()
    first = encoded[0].example_id
    assert not torch.allclose(hooked[first].grads[(3, "k")], plain[first].grads[(3, "k")], rtol=1e-3, atol=0)


def test_memory_module_examples_run():
    assert doctest.testmod(spd_lens.memory).failed == 0


def test_cli_extract_takes_a_budget_and_the_bridge_path(tmp_path, capsys):
    from spd_lens.cli import main as cli
    from spd_lens.subspace import CapabilitySubspace

    base = ["extract", "--model", "tiny", "--task", "arithmetic", "--n", "4", "--layers", "1,3", "--rank", "2"]
    assert cli([*base, "--max-memory", "1000", "--out", str(tmp_path / "refused")]) == 2
    assert "needs an estimated" in capsys.readouterr().err and not (tmp_path / "refused" / "subspace.json").exists()
    assert cli([*base, "--max-memory", "2GB", "--out", str(tmp_path / "plain")]) == 0
    assert cli([*base, "--via-bridge", "--out", str(tmp_path / "bridge")]) == 0
    plain, bridge = CapabilitySubspace.load(tmp_path / "plain"), CapabilitySubspace.load(tmp_path / "bridge")
    for key, gram in plain.grams.items():
        assert torch.allclose(bridge.grams[key], gram, rtol=1e-4, atol=1e-10), key
