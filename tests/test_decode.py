"""Refill decoding (spd_lens.decode): same tokens as transformers' generate, no step on a finished row,
samples independent of how prompts are grouped, projections and folded weights on that path."""

import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.chat import encode, end_of_turn_ids, render_prompt, template_prefix
from spd_lens.decode import decode, draw
from spd_lens.extract import extract_subspace
from spd_lens.models import load_hf
from spd_lens.projection import Projection, fold_projection
from spd_lens.sampling import SamplingConfig, generate_jsonl, sample_completions
from spd_lens.tasks import get_task
from spd_lens.tasks.records import read_jsonl

PROMPTS = ["2+2?", "What is the capital of France? Answer in one word, please.", "x", "List three colours.",
           "Say hi", "Count from one to five, slowly and carefully."]
# The same prompts behind a common instruction: a shared prefix long enough to be prefilled once.
SHARED = [f"Answer in one short sentence, please. {p}" for p in PROMPTS]


@pytest.fixture(scope="module")
def tiny():
    return load_hf("tiny")


def _encoded(tokenizer):
    return [encode(tokenizer, render_prompt(tokenizer, p)) for p in PROMPTS]


def _reference(model, tokenizer, prompt, max_new_tokens, stop_ids):
    """One prompt alone through transformers' generate: the tokens before the first stop id."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
    tokens = out[0, len(prompt):].tolist()
    return tokens[:next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))]


def _options(tokenizer, **extra):
    return {"max_new_tokens": 10, "stop_ids": [tokenizer.eos_token_id], "pad_id": tokenizer.pad_token_id, **extra}


def test_greedy_refill_equals_generate_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    prompts = _encoded(tokenizer)
    # A frequent token as the stop id, so that rows end at different steps and slots are refilled.
    stop = [int(torch.tensor([t for p in prompts for t in p]).mode().values)]
    expected = [_reference(model, tokenizer, p, 10, stop) for p in prompts]
    for slots in (1, 2, 4, 16):
        got = decode(model, prompts, **_options(tokenizer, stop_ids=stop, slots=slots))
        assert [d.tokens for d in got] == expected, f"slots={slots}"
        assert [d.finish_reason for d in got] == ["length" if len(e) == 10 else "stop" for e in expected]


def test_cache_buffers_grow_and_steps_write_in_place(tiny, monkeypatch):
    """With 3 spare columns the buffers are outgrown every few steps and rebuilt as rows leave;
    the tokens still equal generate's, and a step that fits writes into the same buffer."""
    import spd_lens.decode as decoding

    model, tokenizer = tiny
    prompts = _encoded(tokenizer)
    stop = [int(torch.tensor([t for p in prompts for t in p]).mode().values)]
    expected = [_reference(model, tokenizer, p, 25, stop) for p in prompts]
    monkeypatch.setattr(decoding, "SPARE_COLUMNS", 3)
    got = decode(model, prompts, **_options(tokenizer, stop_ids=stop, slots=3, max_new_tokens=25))
    assert [d.tokens for d in got] == expected

    layer = decoding._SpareColumnsLayer()
    keys = torch.randn(2, 1, 4, 8)
    layer.update(keys, keys + 1)
    buffer = layer._key_buffer.data_ptr()
    for step in range(3):  # fits in the 3 spare columns: same buffer
        layer.update(torch.full((2, 1, 1, 8), float(step)), torch.zeros(2, 1, 1, 8))
        assert layer._key_buffer.data_ptr() == buffer
    layer.update(torch.full((2, 1, 1, 8), 9.0), torch.zeros(2, 1, 1, 8))  # full: a new, larger buffer
    assert layer._key_buffer.data_ptr() != buffer and layer.keys.shape == (2, 1, 8, 8)
    assert torch.equal(layer.keys[:, :, :4], keys) and torch.equal(layer.values[:, :, :4], keys + 1)
    assert layer.keys[:, :, 4:, 0].tolist() == [[[0.0, 1.0, 2.0, 9.0]]] * 2


def test_a_shared_prefix_is_prefilled_once_and_changes_no_token(tiny):
    import os

    import spd_lens.decode as decoding

    model, tokenizer = tiny
    # Five prompts behind a common instruction and one without it (prefilled whole, in its own pass).
    prompts = [encode(tokenizer, render_prompt(tokenizer, p)) for p in SHARED[:5]] + _encoded(tokenizer)[5:]
    shared = os.path.commonprefix(prompts[:5])
    assert len(shared) >= decoding.MIN_SHARED_PREFIX and not prompts[5][:len(shared)] == shared
    stop = [int(torch.tensor([t for p in prompts for t in p[len(shared):]]).mode().values)]
    expected = [_reference(model, tokenizer, p, 12, stop) for p in prompts]
    for slots in (1, 3, 16):
        prefills = []
        handle = model.register_forward_pre_hook(
            lambda m, args, kwargs: prefills.append(kwargs["input_ids"].shape) if kwargs["input_ids"].shape[1] > 1 else None,
            with_kwargs=True)
        try:
            got = decode(model, prompts, **_options(tokenizer, stop_ids=stop, slots=slots, max_new_tokens=12,
                                                    shared_prefix=shared))
        finally:
            handle.remove()
        assert [d.tokens for d in got] == expected, f"slots={slots}"
        # One pass over the prefix, then only each prompt's own tokens (the sixth prompt's all of them).
        assert prefills[0] == (1, len(shared))
        assert sum(rows for rows, _ in prefills[1:]) == len(prompts)
        if slots == 1:
            assert sorted(width for _, width in prefills[1:]) == sorted(
                [len(p) - len(shared) for p in prompts[:5]] + [len(prompts[5])])


def test_the_template_prefix_starts_every_rendered_prompt_and_depends_on_no_prompt():
    from spd_lens.chat import template_prefix

    _, tokenizer = load_hf("tiny")
    prefix = template_prefix(tokenizer)
    assert prefix and prefix == template_prefix(tokenizer)
    for prompt in [*PROMPTS, *SHARED, " leading space", "\nnewline first"]:
        assert encode(tokenizer, render_prompt(tokenizer, prompt))[:len(prefix)] == prefix
    with_system = template_prefix(tokenizer, system="Be brief.")
    assert len(with_system) > len(prefix)


def test_waiting_prompts_are_prefilled_longest_first(tiny):
    """Refills take the longest waiting prompts, so one prefill's prompts have similar lengths."""
    model, tokenizer = tiny
    prompts = _encoded(tokenizer)
    widths = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: widths.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        decode(model, prompts, **_options(tokenizer, slots=1))
    finally:
        handle.remove()
    assert widths == sorted((len(p) for p in prompts), reverse=True)


def test_no_step_is_spent_on_a_finished_row(tiny):
    model, tokenizer = tiny
    prompts = _encoded(tokenizer)
    stop = [int(torch.tensor([t for p in prompts for t in p]).mode().values)]
    rows_per_step = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: rows_per_step.append(
        (kwargs["input_ids"].shape[0], kwargs["input_ids"].shape[1])), with_kwargs=True)
    try:
        got = decode(model, prompts, **_options(tokenizer, stop_ids=stop, slots=3))
    finally:
        handle.remove()
    # Every row gets its first token from its prefill and each later one from a decoding step in
    # which it takes part; a row that stopped also generated its stop token.
    produced = sum(len(d.tokens) + (d.finish_reason == "stop") for d in got)
    decoding_rows = sum(rows for rows, width in rows_per_step if width == 1)
    assert decoding_rows == produced - len(prompts)
    assert max(rows for rows, _ in rows_per_step) <= 3


def test_samples_do_not_depend_on_slots_or_order(tiny):
    model, tokenizer = tiny
    prompts = _encoded(tokenizer)
    options = _options(tokenizer, temperature=1.0, top_k=20, top_p=0.9, seed=5)
    wide = decode(model, prompts, slots=6, **options)
    narrow = decode(model, prompts, slots=2, **options)
    backwards = decode(model, prompts[::-1], slots=3, row_indices=list(range(len(prompts)))[::-1], **options)
    assert [d.tokens for d in wide] == [d.tokens for d in narrow] == [d.tokens for d in backwards[::-1]]
    other_seed = decode(model, prompts, slots=6, **{**options, "seed": 6})
    assert [d.tokens for d in other_seed] != [d.tokens for d in wide]


def test_refill_and_static_batching_agree_greedy_with_projection_hooks_and_folded(tiny, monkeypatch):
    model, tokenizer = tiny
    subspace = extract_subspace(model, "arithmetic", n=6, layers=[1, 3], rank=6, tokenizer=tokenizer)
    # Extrapolated (alpha -3): the random tiny model answers newlines whatever a milder projection does.
    projection = Projection.build(subspace, alpha=-3.0)
    config = SamplingConfig(max_new_tokens=10, batch_size=2)
    with projection.apply(model):
        hooked = sample_completions(model, tokenizer, PROMPTS, config)
        static = sample_completions(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=10, batch_size=6,
                                                                             batching="static"))
    folded = sample_completions(fold_projection(model, projection), tokenizer, PROMPTS, config)
    plain = sample_completions(model, tokenizer, PROMPTS, config)
    assert hooked == static == folded
    assert hooked != plain  # the projection changed what was generated
    # With the template's opening prefilled once (6 tokens on the tiny tokenizer: sharing allowed
    # from 1 token here), under the hooks too: still the same as static batches.
    import spd_lens.decode as decoding

    monkeypatch.setattr(decoding, "MIN_SHARED_PREFIX", 1)
    passes = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: passes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    with projection.apply(model):
        hooked = sample_completions(model, tokenizer, SHARED, config)
        static = sample_completions(model, tokenizer, SHARED, SamplingConfig(max_new_tokens=10, batch_size=6,
                                                                            batching="static"))
    handle.remove()
    assert passes[0] == (1, len(template_prefix(tokenizer)))  # the prefix pass came first
    assert hooked == static == sample_completions(fold_projection(model, projection), tokenizer, SHARED, config)
    assert hooked != sample_completions(model, tokenizer, SHARED, config)


def test_sampling_with_the_template_prefix_shared_gives_the_same_samples(tiny, monkeypatch):
    import spd_lens.decode as decoding

    model, tokenizer = tiny
    config = SamplingConfig(temperature=1.0, top_k=20, top_p=0.9, max_new_tokens=10, num_samples=2, batch_size=3)
    monkeypatch.setattr(decoding, "MIN_SHARED_PREFIX", 10**9)
    whole = sample_completions(model, tokenizer, SHARED, config)
    monkeypatch.setattr(decoding, "MIN_SHARED_PREFIX", 1)
    prefills = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: prefills.append(kwargs["input_ids"].shape[1]) if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        shared = sample_completions(model, tokenizer, SHARED, config)
    finally:
        handle.remove()
    assert prefills[0] == len(template_prefix(tokenizer))
    assert shared == whole and len({c[0] for c in whole}) > 1


def test_generation_file_resumes_per_prompt_and_keeps_example_order(tiny, tmp_path):
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=7, seed=0)
    config = SamplingConfig(temperature=1.0, top_k=20, top_p=0.8, max_new_tokens=8, num_samples=2, batch_size=3)
    whole = generate_jsonl(model, tokenizer, examples, tmp_path / "a.jsonl", config, task="arithmetic")
    records = read_jsonl(whole)
    assert [(r["prompt_id"], r["sample_index"]) for r in records] == [(e.id, k) for e in examples for k in range(2)]
    # An interrupted file that holds prompts 1, 4 and half of 5 (out of order, as refill writes them)
    partial = tmp_path / "b.jsonl.partial"
    keep = [r for r in records if r["prompt_id"] in {examples[4].id, examples[1].id}]
    keep += [r for r in records if r["prompt_id"] == examples[5].id][:1]
    partial.write_text("".join(__import__("json").dumps(r) + "\n" for r in keep[::-1]))
    resumed = generate_jsonl(model, tokenizer, examples, tmp_path / "b.jsonl", config, task="arithmetic")
    assert resumed.read_bytes() == whole.read_bytes()
    assert not partial.exists()


def test_bad_decoding_settings_are_named(tiny):
    model, tokenizer = tiny
    with pytest.raises(SpdLensError, match="slots must be >= 1, got 0"):
        decode(model, [[1, 2]], slots=0, **_options(tokenizer))
    with pytest.raises(SpdLensError, match="row_indices has 1 entries for 2 prompts"):
        decode(model, [[1, 2], [1, 3]], slots=2, row_indices=[0], **_options(tokenizer))
    with pytest.raises(SpdLensError, match=r"batching must be one of \['refill', 'static'\], got 'dynamic'"):
        SamplingConfig(batching="dynamic")


def test_stop_ids_of_a_chat_model_end_rows(tiny):
    model, tokenizer = tiny
    stop = end_of_turn_ids(tokenizer)
    got = decode(model, _encoded(tokenizer), slots=2, **_options(tokenizer, stop_ids=stop, max_new_tokens=6))
    assert all(not set(d.tokens) & set(stop) for d in got)  # the stop id itself is not part of the text


def test_draw_follows_the_distribution_and_never_picks_a_zero_mass_token():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]] * 2)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    picks = [draw(probs, generators) for _ in range(6000)]
    for row in range(2):
        counts = torch.bincount(torch.tensor([p[row] for p in picks]), minlength=6).double() / len(picks)
        assert counts[[0, 2, 5]].sum() == 0
        assert torch.allclose(counts, probs[row].double(), atol=0.025)
    again = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    assert [draw(probs, again) for _ in range(50)] == picks[:50]  # the row's generator alone decides
