"""The architectures users bring, each through every stage, in float32 and bfloat16.

Each architecture is a tiny random model built from its own transformers config (no hub), with
what sets it apart kept: Qwen2 (the paper's Qwen2.5 family) has q/k/v biases, grouped KV heads and
tied embeddings; Qwen3 a q/k norm; Gemma 3 a q/k norm, scaled embeddings and sliding-window layers
(a window shorter than the prompts, so it matters); Mistral a sliding window and untied embeddings.
Stages: K/V gradients through the bridge and through plain hooks (same subspace), projected
greedy generation hooked == folded, `save_folded` reloaded by plain transformers, LoRA training and
evaluation. docs/gpu.md's table of architectures x stages lists what `STAGES` names here.
"""

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config,
                          Qwen3Config)

from spd_lens import SpdLensError
from spd_lens.evaluate import evaluate
from spd_lens.extract import extract_subspace
from spd_lens.models import boot, check_kv_hook_points, kv_linears, load_hf
from spd_lens.projection import Projection, fold_projection, save_folded
from spd_lens.runtime import Runtime
from spd_lens.sampling import SamplingConfig
from spd_lens.tiny_tokenizer import build_byte_tokenizer
from spd_lens.train import TrainConfig, load_trained, train_on_jsonl

LAYERS = [1, 3]
PROMPTS = ["What is 12 + 7? Answer with the number.", "Add 31 and 4, then say the result."]
NEW_TOKENS = 10

# The stages test_every_stage takes each architecture through, in float32 and bfloat16 (the
# columns of docs/gpu.md's table, which test_the_docs_table_is_what_these_tests_check keeps equal).
STAGES = ("bridge boots, hook_k/hook_v = k_proj/v_proj output", "gradients: bridge == plain hooks",
          "projected greedy: hooked == folded¹", "save_folded loaded by transformers, same greedy",
          "LoRA training + evaluation")


def _configs(vocab: int, special: dict) -> dict:
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512, initializer_range=0.3, **special)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True, architectures=["Qwen2ForCausalLM"]),
        "qwen3": Qwen3Config(**common, tie_word_embeddings=True, architectures=["Qwen3ForCausalLM"]),
        "gemma3": Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                   architectures=["Gemma3ForCausalLM"]),
        "mistral": MistralConfig(**common, sliding_window=16, tie_word_embeddings=False,
                                 architectures=["MistralForCausalLM"]),
    }


ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", "mistral")
KEY_NORM = {"qwen3", "gemma3"}
FEATURES = {
    "llama": "Llama: grouped KV heads, tied embeddings",
    "qwen2": "Qwen2 (Qwen2.5): q/k/v biases, grouped KV heads, tied embeddings",
    "qwen3": "Qwen3: q/k norm, grouped KV heads, tied embeddings",
    "gemma3": "Gemma 3: q/k norm, sliding window (3 of 4 layers), scaled embeddings",
    "mistral": "Mistral: sliding window, untied embeddings",
}


def stage_table() -> str:
    """The markdown table of architectures x stages that docs/gpu.md holds: what this file tests."""
    head = ["architecture (tiny random config)", *STAGES, "projection before the key norm²"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arch in ARCHITECTURES:
        cells = ["float32, bfloat16"] * len(STAGES) + ["checked" if arch in KEY_NORM else "no key norm"]
        rows.append("| " + " | ".join([FEATURES[arch], *cells]) + " |")
    return "\n".join(rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Models this small gain nothing from a second thread and lose a lot to its synchronisation on a
    busy machine (one 32x64 linear: 0.1 ms on one thread, 15 ms on two with the cores shared)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Each architecture saved as a local Hugging Face directory (what a user's model is)."""
    tokenizer = build_byte_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    dirs = {}
    for name, config in _configs(len(tokenizer), special).items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # biases are zero at init: give Qwen2's q/k/v biases values, so folding them is tested
            for linear in kv_linears(model).values():
                if linear.bias is not None:
                    linear.bias.normal_(0, 0.5)
        directory = tmp_path_factory.mktemp(name)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        dirs[name] = str(directory)
    return dirs


def _prompt_ids(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def _greedy(model, batch) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[:, batch["input_ids"].shape[1]:]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_stage(arch, dtype, model_dirs, data, tmp_path):
    path = model_dirs[arch]
    runtime = Runtime.resolve("cpu", dtype)
    model, tokenizer = load_hf(path, runtime)
    assert type(model).__name__.lower().startswith(arch[:5]) and model.dtype == runtime.dtype
    batch = _prompt_ids(tokenizer)
    assert batch["input_ids"].shape[1] > 16  # longer than the sliding windows (8 and 16)

    # 1-2. Gradients through the plain model's k_proj / v_proj hooks and through the bridge's
    # hook_k / hook_v (booting checks that those are the linears' outputs): the same Grams.
    plain = extract_subspace(model, "arithmetic", n=4, layers=LAYERS, rank=4, tokenizer=tokenizer)
    bridge = boot(load_hf(path, runtime)[0], tokenizer)
    bridged = extract_subspace(bridge, "arithmetic", n=4, layers=LAYERS, rank=4, capture="bridge")
    # float32: the bridge runs eager attention, the plain pass SDPA (summation order only);
    # bfloat16: activations rounded to 8 bits of mantissa along two different kernels.
    tolerance = 1e-4 if dtype == "float32" else 0.1
    for key, gram in plain.grams.items():
        assert _relative(bridged.grams[key], gram) < tolerance, (key, _relative(bridged.grams[key], gram))

    # 3. Projected greedy generation: hooks on the plain model == the map folded into the weights.
    projection = Projection.build(plain)
    with projection.apply(model):
        hooked = _greedy(model, batch)
    folded = fold_projection(model, projection)
    folded_tokens = _greedy(folded, batch)
    if dtype == "float32":
        assert torch.equal(hooked, folded_tokens), (hooked, folded_tokens)
    else:
        # In bfloat16 the two round differently (the hook rounds k_proj's output, then the projected
        # one; folding rounds M·W once), so a near-tie can flip a greedy token on a random model. What
        # must hold: along the hooked continuation, folding moves the logits no more than bfloat16
        # itself does (the hooked float32 model against the hooked bfloat16 one).
        tokens = torch.cat([batch["input_ids"], hooked], dim=1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(hooked)], dim=1)
        reference, _ = load_hf(path, device="cpu", dtype="float32")
        with torch.no_grad():
            with projection.apply(model):
                hooked_logits = model(tokens, attention_mask=mask).logits.float()
            with projection.apply(reference):
                exact = reference(tokens, attention_mask=mask).logits
            folding_error = _relative(folded(tokens, attention_mask=mask).logits.float(), hooked_logits)
        assert folding_error <= _relative(hooked_logits, exact), (folding_error, _relative(hooked_logits, exact))
    assert not torch.equal(hooked, _greedy(model, batch))  # the projection changes the output
    single = batch["input_ids"][:1, batch["attention_mask"][0].argmax():]  # one prompt, unpadded
    with torch.no_grad(), projection.apply(bridge):
        bridge_logits = bridge(single)
    with torch.no_grad():
        folded_logits = folded(single).logits
    assert _relative(bridge_logits.float(), folded_logits.float()) < (1e-4 if dtype == "float32" else 0.05)

    # 4. save_folded loads into plain transformers, in the saved dtype, with the same greedy output.
    save_folded(folded, tokenizer, tmp_path / "folded")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "folded")  # offline-ok: local directory
    assert reloaded.dtype == runtime.dtype and type(reloaded) is type(model)
    assert torch.equal(_greedy(reloaded, batch), folded_tokens)

    # 5. LoRA training (float32 adapter over the runtime's base) and evaluation of the trained model.
    out = train_on_jsonl(path, data, tmp_path / "train", TrainConfig(lr=1e-2, epochs=1, batch_size=6), runtime=runtime)
    meta = json.loads((out / "train.json").read_text())
    assert meta["steps"] == 2 and all(loss == loss for loss in meta["loss_history"])
    trained, _ = load_trained(path, out, runtime=runtime)
    base_logits = model(**batch).logits.float()
    with torch.no_grad():
        assert _relative(trained(**batch).logits.float(), base_logits) > 1e-3  # the update is there
    result = evaluate(trained, tokenizer, "arithmetic", n=2, generations=tmp_path / "eval.jsonl",
                      config=SamplingConfig(temperature=0.0, max_new_tokens=NEW_TOKENS))
    assert len(result.results) == 2 and 0.0 <= result.score <= 1.0


@pytest.mark.parametrize("arch", sorted(KEY_NORM))
def test_key_norm_models_project_before_the_norm(arch, model_dirs):
    """Qwen3 and Gemma 3 normalise keys after k_proj. The projection point is k_proj's output (pre-norm,
    pre-RoPE), where folding is exact: projected keys lie in the subspace there, and after the norm
    (an RMS rescale with a per-dimension gain) they do not. What SPD constrains on these models is
    the pre-norm key; docs/gpu.md says so."""
    model, tokenizer = load_hf(model_dirs[arch], device="cpu", dtype="float32")
    subspace = extract_subspace(model, "arithmetic", n=4, layers=[3], rank=3, tokenizer=tokenizer, )
    projection = Projection.build(subspace, kinds=["k"])
    attention = model.model.layers[3].self_attn
    seen = {}
    hooks = [attention.k_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("normed", o.detach())),
             attention.k_norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("pre", a[0].detach()))]
    with projection.apply(model), torch.no_grad():
        model(**_prompt_ids(tokenizer))
    for hook in hooks:
        hook.remove()
    p = projection.maps[(3, "k")].float()
    # [batch, pos, kv_head, d_head] (Qwen3 normalises before transposing) or [batch, kv_head, pos, d_head] (Gemma 3)
    rows = {k: (v if v.shape[2] == 2 else v.transpose(1, 2)).flatten(-2) for k, v in seen.items()}
    outside = {k: float((v - v @ p).norm() / v.norm()) for k, v in rows.items()}  # share outside the subspace
    assert outside["pre"] < 1e-5 and outside["normed"] > 0.05, outside


def test_a_bridge_whose_hook_k_is_not_k_proj_is_refused(model_dirs):
    """If a TransformerLens version moved hook_k after the key norm, bridge projections and gradients
    would silently differ from the folded model's: such a bridge is refused by name."""
    model, tokenizer = load_hf(model_dirs["qwen3"], device="cpu")
    linears = kv_linears(model)
    bridge = boot(model, tokenizer)  # booting checks every layer: here hook_k is k_proj's output
    check_kv_hook_points(bridge, linears)
    attention = bridge.blocks[1].attn
    attention.k = attention.k_norm  # layer 1's hook_k now sits on the key norm's output
    with pytest.raises(SpdLensError, match=r"blocks\.1\.attn\.hook_k is not the output of layer 1's k_proj"):
        check_kv_hook_points(bridge, linears)


def test_fused_qkv_attention_is_refused_by_name():
    from transformers import Phi3Config

    config = Phi3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    with pytest.raises(SpdLensError, match=r"Phi3ForCausalLM has no model.layers\[i\].self_attn.k_proj"):
        kv_linears(AutoModelForCausalLM.from_config(config))


def test_the_docs_table_is_what_these_tests_check():
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "gpu.md").read_text(encoding="utf-8")
    assert stage_table() in docs, "docs/gpu.md's table is stale: paste tests.test_architectures.stage_table() there"
