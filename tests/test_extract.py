import json

import pytest
import torch
from safetensors.torch import load_file

from spd_lens import SpdLensError
from spd_lens.cli import main as cli
from spd_lens.extract import extract_subspace
from spd_lens.gradient_cache import cache_gradients
from spd_lens.gradients import iterate_gradients, pad_batch, target_mask
from spd_lens.models import boot, load_hf
from spd_lens.subspace import CapabilitySubspace, RankPolicy, random_like
from spd_lens.tasks import Example, get_task


@pytest.fixture(scope="module")
def tiny64():
    model, tokenizer = load_hf("tiny", dtype=torch.float64)
    return model, tokenizer


@pytest.fixture(scope="module")
def encoded(tiny64):
    _, tokenizer = tiny64
    task = get_task("arithmetic")
    return [task.locate(tokenizer, e) for e in task.examples("train", n=6, seed=0)]


def _stacked_rows(model, encoded, layers, **kwargs):
    """Every token's gradient row, examples in the order given (whatever order the batches come in)."""
    rows = {}
    for batch in iterate_gradients(model, encoded, layers=layers, **kwargs):
        for key, grad in batch.grads.items():
            for row, example_id in enumerate(batch.example_ids):
                kept = grad[row][batch.attention_mask[row]]
                rows.setdefault(key, {})[example_id] = kept.reshape(kept.shape[0], -1)
    return {key: torch.cat([by_id[e.example_id] for e in encoded]) for key, by_id in rows.items()}


def test_gradient_matches_finite_differences(tiny64, encoded):
    model, tokenizer = tiny64
    example = encoded[0]
    ids, attention, correct = pad_batch([example], tokenizer.pad_token_id)
    mask = target_mask(attention, correct, "correctness")
    batch = next(iterate_gradients(model, [example], layers=[1], batch_size=1, pad_id=tokenizer.pad_token_id))
    analytic = batch.grads[(1, "k")]  # [1, pos, kv_head, d_head]

    def loss_with(delta_position, delta_index, eps):
        def hook(module, args, output):
            output = output.clone()
            output[0, delta_position, delta_index] += eps
            return output

        handle = model.model.layers[1].self_attn.k_proj.register_forward_hook(hook)
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=attention.long()).logits
        finally:
            handle.remove()
        rows, cols = mask[:, 1:].nonzero(as_tuple=True)
        return torch.nn.functional.cross_entropy(logits[:, :-1][rows, cols], ids[:, 1:][rows, cols]).item()

    position = len(example.input_ids) - 3
    for index in (0, 5, 11):
        eps = 1e-5
        numeric = (loss_with(position, index, eps) - loss_with(position, index, -eps)) / (2 * eps)
        head, dim = divmod(index, 8)
        assert numeric == pytest.approx(analytic[0, position, head, dim].item(), rel=1e-4, abs=1e-9)


def test_bridge_hooks_and_plain_path_give_the_same_gradients(encoded):
    model, tokenizer = load_hf("tiny", dtype=torch.float64)
    plain = _stacked_rows(model, encoded, [1, 3], batch_size=3, pad_id=tokenizer.pad_token_id)
    bridge = boot(model, tokenizer)
    hooked = _stacked_rows(bridge, encoded, [1, 3], batch_size=3, capture="bridge")
    # With no hooks on, the bridge's plain path swaps its eager attention for the model's own (SDPA).
    bridge_attention = [block.original_component._modules["self_attn"] for block in model.model.layers]
    unhooked = _stacked_rows(bridge, encoded, [1, 3], batch_size=3)
    for key in plain:
        # The bridge's attention is eager (the plain model uses sdpa): equal up to op order.
        scale = plain[key].abs().max()
        assert (plain[key] - hooked[key]).abs().max() <= 1e-6 * scale, key
        assert (unhooked[key] - hooked[key]).abs().max() <= 1e-6 * scale, key
    # ...and puts it back: the bridge's own attention modules, computing the pattern for its hooks.
    assert [block.original_component._modules["self_attn"] for block in model.model.layers] == bridge_attention
    _, cache = bridge.run_with_cache(torch.tensor([[1, 70, 71]]), names_filter=lambda name: name.endswith("hook_pattern"))
    assert len(cache) == model.config.num_hidden_layers


def test_gradients_do_not_depend_on_batching(tiny64, encoded):
    model, tokenizer = tiny64
    one = _stacked_rows(model, encoded, [2], batch_size=1, pad_id=tokenizer.pad_token_id)
    six = _stacked_rows(model, encoded, [2], batch_size=6, pad_id=tokenizer.pad_token_id)
    for key in one:
        assert torch.allclose(one[key], six[key], atol=1e-12)


def test_streaming_gram_equals_svd_of_stacked_rows(tiny64, encoded):
    model, tokenizer = tiny64
    subspace = extract_subspace(model, encoded, layers=[1, 3], rank=5, batch_size=2, tokenizer=tokenizer)
    rows = _stacked_rows(model, encoded, [1, 3], batch_size=2, pad_id=tokenizer.pad_token_id)
    for (layer, kind), stacked in rows.items():
        _, s, vh = torch.linalg.svd(stacked.double(), full_matrices=False)
        assert torch.allclose(subspace.singular_values(layer, kind), s, rtol=1e-6, atol=1e-12)
        reference = vh[:5].T @ vh[:5]
        assert torch.allclose(subspace.projector(layer, kind), reference, atol=1e-6)
        head_rows = stacked.reshape(stacked.shape[0], 2, 8)[:, 1]
        s_head = torch.linalg.svdvals(head_rows.double())
        assert torch.allclose(subspace.singular_values(layer, kind, 1), s_head, rtol=1e-6, atol=1e-12)


def test_bases_are_orthonormal_and_ranks_follow_the_policy(tiny64, encoded):
    model, tokenizer = tiny64
    half = extract_subspace(model, encoded, tokenizer=tokenizer)
    assert half.layers == [2, 3]  # {L//2, L-1} for L=4
    for layer, kind, head in half.keys():
        basis = half.basis(layer, kind, head)
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-10)
        dim = basis.shape[0]
        assert half.rank(layer, kind, head) == dim // 2  # the rows outnumber the dimension: full rank
    energy = half.with_rank(energy=0.9)
    for layer, kind, head in energy.keys():
        values = energy.singular_values(layer, kind, head) ** 2
        r = energy.rank(layer, kind, head)
        assert values[:r].sum() / values.sum() >= 0.9 - 1e-9
        assert r == 1 or values[: r - 1].sum() / values.sum() < 0.9
    assert half.with_rank(rank=3).basis(3, "v").shape == (16, 3)


def test_full_sequence_loss_gives_another_subspace(tiny64, encoded):
    model, tokenizer = tiny64
    correctness = extract_subspace(model, encoded, layers=[3], tokenizer=tokenizer)
    full = extract_subspace(model, encoded, layers=[3], loss="full", tokenizer=tokenizer)
    assert full.meta["loss"] == "full"
    assert min(correctness.overlap(full).values()) < 0.99


def test_overlap_is_one_with_itself_and_lower_with_random(tiny64, encoded):
    model, tokenizer = tiny64
    subspace = extract_subspace(model, encoded, layers=[3], tokenizer=tokenizer)
    assert all(v == pytest.approx(1.0) for v in subspace.overlap(subspace).values())
    control = random_like(subspace, seed=1)
    assert control.rank(3, "k") == subspace.rank(3, "k")
    assert all(v < 0.95 for v in subspace.overlap(control).values())


def test_save_load_round_trip_with_named_tensors(tmp_path, tiny64, encoded):
    model, tokenizer = tiny64
    subspace = extract_subspace(model, "arithmetic", n=4, layers=[1], rank_frac=0.25, seed=7, tokenizer=tokenizer)
    subspace.save(tmp_path)
    tensors = load_file(str(tmp_path / "subspace.safetensors"))
    assert "layer1.k.head0.basis" in tensors and "layer1.v.flat.basis" in tensors
    meta = json.loads((tmp_path / "subspace.json").read_text())
    for field in ("model_id", "task", "n", "layers", "loss", "seed", "spd_lens_version", "config_hash"):
        assert field in meta
    assert (meta["model_id"], meta["task"], meta["n"], meta["seed"]) == ("tiny", "arithmetic", 4, 7)
    loaded = CapabilitySubspace.load(tmp_path, model)
    assert torch.allclose(loaded.basis(1, "k", 1), subspace.basis(1, "k", 1))
    assert loaded.policy == subspace.policy


def test_tampered_or_incomplete_subspace_is_refused(tmp_path, tiny64, encoded):
    model, tokenizer = tiny64
    extract_subspace(model, encoded, layers=[1], tokenizer=tokenizer).save(tmp_path)
    with open(tmp_path / "subspace.safetensors", "ab") as f:
        f.write(b"junk")
    with pytest.raises(SpdLensError, match="does not match the hash"):
        CapabilitySubspace.load(tmp_path)
    (tmp_path / "subspace.json").unlink()
    with pytest.raises(SpdLensError, match="not a saved subspace"):
        CapabilitySubspace.load(tmp_path)


def test_subspace_for_another_model_shape_is_refused(tmp_path, tiny64, encoded):
    model, tokenizer = tiny64
    extract_subspace(model, encoded, layers=[1], tokenizer=tokenizer).save(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=4, head_dim=8))
    with pytest.raises(SpdLensError, match=r"\(layers, KV heads, d_head\) = \(4, 2, 8\).*\(4, 4, 8\)"):
        CapabilitySubspace.load(tmp_path, other)


def test_bad_layers_and_ranks_are_named(tiny64, encoded):
    model, tokenizer = tiny64
    with pytest.raises(SpdLensError, match=r"layer\(s\) \[4\] out of range.*4 layers"):
        extract_subspace(model, encoded, layers=[1, 4], tokenizer=tokenizer)
    with pytest.raises(SpdLensError, match="rank 17 is larger than the flattened K/V dimension 16"):
        extract_subspace(model, encoded, rank=17, tokenizer=tokenizer)
    subspace = extract_subspace(model, encoded, layers=[1], rank=12, tokenizer=tokenizer)
    assert subspace.rank(1, "k") == 12 and subspace.rank(1, "k", 0) == 8  # per-head bases: at most d_head
    with pytest.raises(SpdLensError, match="rank 17 is larger than the dimension 16"):
        subspace.with_rank(rank=17)
    with pytest.raises(SpdLensError, match="one rank policy"):
        RankPolicy.make(rank=2, frac=0.5)
    with pytest.raises(SpdLensError, match="rank_frac must be in"):
        RankPolicy.make(frac=1.5)


def test_cli_extract_writes_a_subspace(tmp_path, capsys):
    out = tmp_path / "sub"
    assert cli(["extract", "--model", "tiny", "--task", "family-mc", "--n", "3", "--layers", "0,3",
                "--rank", "4", "--out", str(out)]) == 0
    loaded = CapabilitySubspace.load(out)
    assert loaded.layers == [0, 3] and loaded.rank(0, "k") == 4
    assert "layer" in capsys.readouterr().out
    # A subspace shares everything with itself; a random one of the same ranks shares far less.
    assert cli(["overlap", str(out), str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("layer")]
    assert len(lines) == 4
    for line in lines:
        same, control = float(line.split()[3]), float(line.split()[-1])
        assert same == 1.0 and control < 0.9
    assert cli(["overlap", str(out), str(tmp_path / "missing")]) == 2


def test_cli_extract_bad_input_is_a_clear_error(tmp_path, capsys):
    assert cli(["extract", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--layers", "9",
                "--out", str(tmp_path / "x")]) == 2
    assert "out of range" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_extract_on_the_default_model(tmp_path):
    out = tmp_path / "he"
    # A budget well under the default's 3 GiB keeps the suite's peak far from its 4 GB (README "Memory").
    assert cli(["extract", "--model", "smollm2-135m-instruct", "--task", "humaneval", "--n", "8", "--max-memory", "1.5GB",
                "--out", str(out)]) == 0
    subspace = CapabilitySubspace.load(out)
    meta = subspace.meta
    assert meta["model_id"] == "smollm2-135m-instruct" and meta["task"] == "humaneval" and meta["layers"] == [15, 29]
    for layer, kind, head in subspace.keys():
        basis = subspace.basis(layer, kind, head, dtype=torch.float64)
        assert torch.allclose(basis.T @ basis, torch.eye(basis.shape[1], dtype=basis.dtype), atol=1e-8)
        assert basis.shape == ((192, 96) if head == "flat" else (64, 32))


def test_given_examples_take_n_of_them_and_record_no_split_or_seed(tiny64):
    model, tokenizer = tiny64
    mine = [Example(f"mine/{i}", f"What is {i} + 7?", str(i + 7), [[0, len(str(i + 7))]]) for i in range(3)]
    one = extract_subspace(model, mine, n=1, layers=[3], rank=2, tokenizer=tokenizer)
    assert one.meta["n"] == 1 and one.meta["example_ids"] == ["mine/0"]
    assert one.meta["task"] == "custom" and "split" not in one.meta and "seed" not in one.meta
    assert extract_subspace(model, mine, layers=[3], rank=2, tokenizer=tokenizer).meta["n"] == 3
    with pytest.raises(SpdLensError, match=r"n=5 but 3 examples were given"):
        extract_subspace(model, mine, n=5, tokenizer=tokenizer)
    drawn = extract_subspace(model, "arithmetic", n=2, seed=3, layers=[3], rank=2, tokenizer=tokenizer)
    assert (drawn.meta["split"], drawn.meta["seed"]) == ("train", 3)
    assert cache_gradients(model, mine, n=2, layers=[3], tokenizer=tokenizer).example_ids == ["mine/0", "mine/1"]


def test_overlap_of_a_subspace_with_its_own_larger_version(tiny64, encoded):
    model, tokenizer = tiny64
    big = extract_subspace(model, encoded, layers=[3], rank=8, tokenizer=tokenizer)
    small = big.with_rank(rank=2)
    # The rank-2 basis lies inside the rank-8 one: 1 over the smaller rank, 2/8 over the larger.
    assert all(v == pytest.approx(1.0) for v in small.overlap(big).values())
    assert all(v == pytest.approx(2 / 8) for v in small.overlap(big, normalize="larger").values())
    assert all(v == pytest.approx(1.0) for v in big.overlap(big, normalize="larger").values())
    control = random_like(big, seed=0)
    assert all(v < 0.9 for v in big.overlap(control, normalize="larger").values())
    with pytest.raises(SpdLensError, match="normalize must be 'smaller' or 'larger'"):
        big.overlap(small, normalize="mean")


def test_bases_are_handed_out_in_the_model_dtype(tiny64, encoded):
    model, tokenizer = tiny64
    subspace = extract_subspace(model, encoded, layers=[3], rank=4, tokenizer=tokenizer)
    assert subspace.meta["dtype"] == "float64" and subspace.basis(3, "k").dtype == torch.float64
    float32 = extract_subspace(load_hf("tiny")[0], encoded, layers=[3], rank=4, tokenizer=tokenizer)
    assert float32.basis(3, "k").dtype == float32.projector(3, "k").dtype == torch.float32
    assert float32.basis(3, "k", dtype=torch.float64).dtype == torch.float64
    assert torch.allclose(float32.basis(3, "k", dtype=torch.float64), subspace.basis(3, "k"), atol=1e-4)
    assert float32.basis(3, "k", dtype=torch.bfloat16).dtype == torch.bfloat16
