"""Device and dtype: how settings resolve, what is refused, and bfloat16 through every stage on the CPU."""

import json

import pytest
import torch
from safetensors.torch import load_file

from spd_lens import SpdLensError, get_task
from spd_lens.cli import main as cli
from spd_lens.config import comparable, config_from_dict
from spd_lens.evaluate import evaluate
from spd_lens.experiment import run_experiment
from spd_lens.extract import extract_subspace
from spd_lens.models import boot, load_hf, load_model
from spd_lens.projection import Projection, fold_projection
from spd_lens.runtime import Runtime, resolve_runtime, torch_build, unused_gpu_advice
from spd_lens.sampling import SamplingConfig, generate_jsonl, sample_completions
from spd_lens.train import TrainConfig, load_trained, train_on_jsonl

BF16 = Runtime.resolve("cpu", "bfloat16")


# --- resolution -----------------------------------------------------------------------------------


def test_auto_on_a_machine_without_cuda_is_cpu_float32():
    assert not torch.cuda.is_available()  # this suite runs on CPU machines
    assert Runtime.resolve() == Runtime.resolve("auto", "auto") == Runtime(torch.device("cpu"), torch.float32)
    assert Runtime.resolve(None, None) == Runtime.resolve("cpu", "float32")
    assert Runtime.resolve("cpu", "bfloat16").describe() == {"device": "cpu", "dtype": "bfloat16"}
    assert Runtime.resolve(torch.device("cpu"), torch.float16).dtype == torch.float16
    assert Runtime.resolve("cpu", torch.float64).dtype == torch.float64  # from code, for numerical checks


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_asked_without_cuda_is_refused_with_the_fix(device):
    with pytest.raises(SpdLensError, match=rf"device '{device}' was asked for, but this machine has no usable CUDA.*'cpu' or 'auto'"):
        Runtime.resolve(device, "auto")


@pytest.mark.parametrize("device", ["gpu", "mps", "cpu:1", "cuda:x", "CUDA", ""])
def test_unknown_devices_are_named(device):
    with pytest.raises(SpdLensError, match=r"device .* is not understood: use one of \['auto', 'cpu', 'cuda', 'cuda:N'\]"):
        Runtime.resolve(device)


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "float64", "half", torch.int8, torch.complex64])
def test_unknown_dtypes_are_named(dtype):
    with pytest.raises(SpdLensError, match=r"dtype .* (is not understood|is not supported)"):
        Runtime.resolve("cpu", dtype)


def test_runtime_or_device_and_dtype_not_both():
    with pytest.raises(SpdLensError, match="either runtime= or device="):
        resolve_runtime(BF16, device="cpu")
    with pytest.raises(SpdLensError, match="must be a spd_lens.runtime.Runtime"):
        load_hf("tiny", "cpu")


@pytest.fixture
def two_gpus(monkeypatch):
    """What resolution sees on a machine with two CUDA devices that support bfloat16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_resolution_on_a_cuda_machine(two_gpus, monkeypatch):
    assert Runtime.resolve() == Runtime(torch.device("cuda", 0), torch.bfloat16)
    assert Runtime.resolve("cuda:1", "float32") == Runtime(torch.device("cuda", 1), torch.float32)
    assert Runtime.resolve("cpu") == Runtime(torch.device("cpu"), torch.float32)
    with pytest.raises(SpdLensError, match=r"'cuda:2' does not exist: this machine has 2 CUDA device\(s\), cuda:0..cuda:1"):
        Runtime.resolve("cuda:2")
    monkeypatch.setenv("LOCAL_RANK", "1")  # a process of a multi-process launch takes its own GPU
    assert Runtime.resolve("cuda").device == torch.device("cuda", 1)
    assert Runtime.resolve("auto").device == torch.device("cuda", 1)
    # A GPU without native bfloat16: auto picks float16, an explicit bfloat16 is refused.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert Runtime.resolve("cuda:0").dtype == torch.float16
    with pytest.raises(SpdLensError, match="Old GPU has no native bfloat16: use dtype 'float16' or 'float32'"):
        Runtime.resolve("cuda:0", "bfloat16")


# --- configs and the command line --------------------------------------------------------------------


def test_config_takes_device_and_dtype_and_refuses_bad_values():
    config = config_from_dict({"model": {"name": "tiny", "device": "cuda:1", "dtype": "bfloat16"}})
    assert (config.model.device, config.model.dtype) == ("cuda:1", "bfloat16")
    assert config_from_dict({}).model.runtime() == Runtime.resolve("cpu", "float32")
    with pytest.raises(SpdLensError, match=r"device 'gpu' is not understood"):
        config_from_dict({"model": {"device": "gpu"}})
    with pytest.raises(SpdLensError, match=r"dtype 'bf16' is not understood.*'bfloat16'"):
        config_from_dict({"model": {"dtype": "bf16"}})
    with pytest.raises(SpdLensError, match="no usable CUDA"):
        config.model.runtime()


def test_run_directories_compare_dtype_but_not_device():
    old = {"model": {"name": "tiny"}, "seeds": [0]}  # a config.json written before device/dtype existed
    today = config_from_dict({"model": {"name": "tiny", "device": "cpu"}, "seeds": [0]}).to_dict()
    assert comparable(old)["model"] == comparable(today)["model"] == {"name": "tiny", "dtype": "auto"}
    bf16 = config_from_dict({"model": {"name": "tiny", "dtype": "bfloat16"}}).to_dict()
    assert comparable(bf16)["model"] != comparable(today)["model"]


def test_cli_refuses_cuda_here_before_loading_anything(capsys):
    assert cli(["ask", "hi", "--model", "tiny", "--device", "cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
    assert cli(["ask", "hi", "--model", "tiny", "--dtype", "fp8"]) == 2
    assert "dtype 'fp8' is not understood" in capsys.readouterr().err


def test_cli_ask_in_bfloat16(capsys):
    assert cli(["ask", "What is 2+2?", "--model", "tiny", "--dtype", "bfloat16", "--max-new-tokens", "4"]) == 0
    # The first line says what the command resolved and which torch runs it.
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"runtime: device cpu, dtype bfloat16, torch {torch.__version__} ({torch_build()}), "
                     "CUDA available: no")


def test_banner_names_the_torch_build(two_gpus, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    banner = Runtime.resolve("cuda:1", "bfloat16").banner()
    assert banner == (f"runtime: device cuda:1 (Old GPU), dtype bfloat16, torch {torch.__version__} (CUDA 12.8 build), "
                      "CUDA available: yes")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert torch_build() == "CPU-only build"


@pytest.mark.parametrize("cuda_build", [None, "13.0"])
def test_auto_warns_when_an_nvidia_gpu_is_there_but_torch_cannot_use_it(monkeypatch, cuda_build):
    monkeypatch.setattr("spd_lens.runtime.nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    with pytest.warns(RuntimeWarning, match=r"NVIDIA GPU but torch .* so 'auto' runs on the CPU: .*"
                                            r"SPD_LENS_TORCH_INDEX=https://download.pytorch.org/whl/cu128 bash run.sh setup"):
        assert Runtime.resolve("auto", "auto") == Runtime(torch.device("cpu"), torch.float32)
    assert ("CPU-only build" if cuda_build is None else "built for CUDA 13.0") in unused_gpu_advice()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Runtime.resolve("cpu", "auto")  # the CPU asked for by name: nothing to warn about
        monkeypatch.setattr("spd_lens.runtime.nvidia_gpu_visible", lambda: False)
        Runtime.resolve("auto", "auto")  # no GPU on the machine: nothing either


# --- bfloat16 end to end on the CPU ---------------------------------------------------------------------


def test_bfloat16_models_load_and_boot():
    model, _ = load_hf("tiny", BF16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    # Rotary frequencies stay float32, as from_pretrained leaves them (bfloat16 would shift positions).
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, load_hf("tiny", device="cpu", dtype="float32")[0].model.rotary_emb.inv_freq)
    bridge = load_model("tiny", dtype="bfloat16")
    assert bridge.original_model.dtype == torch.bfloat16 and Runtime.of(bridge) == BF16


def test_bfloat16_extraction_keeps_float64_grams_and_finds_the_float32_subspace():
    model32, tokenizer = load_hf("tiny", device="cpu", dtype="float32")
    model16, _ = load_hf("tiny", BF16)
    s32 = extract_subspace(model32, "arithmetic", n=6, layers=[1, 3], rank=4, tokenizer=tokenizer)
    s16 = extract_subspace(model16, "arithmetic", n=6, layers=[1, 3], rank=4, tokenizer=tokenizer)
    assert all(g.dtype == torch.float64 for g in s16.grams.values())
    # bfloat16 gradients carry 3 significant digits: the subspace is the float32 one, nearly.
    overlap = s16.overlap(s32)
    assert min(overlap.values()) > 0.99, overlap  # a random subspace of these ranks: about 0.3
    bridge = boot(*load_hf("tiny", BF16))
    via_bridge = extract_subspace(bridge, "arithmetic", n=6, layers=[1, 3], rank=4, tokenizer=tokenizer)
    assert min(via_bridge.overlap(s16).values()) > 0.95


def test_bfloat16_hooked_bridged_and_folded_sampling_agree():
    model, tokenizer = load_hf("tiny", BF16)
    subspace = extract_subspace(model, "arithmetic", n=6, layers=[1, 3], rank=6, tokenizer=tokenizer)
    projection = Projection.build(subspace)
    folded = fold_projection(model, projection)
    assert folded.model.layers[1].self_attn.k_proj.weight.dtype == torch.bfloat16
    ids = torch.tensor([tokenizer("What is 12 + 7?", add_special_tokens=False).input_ids])
    with torch.no_grad():
        with projection.apply(model):
            hooked = model(ids).logits.float()
        plain = model(ids).logits.float()
        folded_logits = folded(ids).logits.float()
    # The two differ by bfloat16 rounding only, far less than the projection itself moves them.
    assert (hooked - folded_logits).abs().max() < 0.1 * (hooked - plain).abs().max()
    prompts = [e.prompt for e in get_task("arithmetic").examples("test", n=4, seed=0)]
    config = SamplingConfig(max_new_tokens=10)
    with projection.apply(model):
        hooked_out = sample_completions(model, tokenizer, prompts, config)
    folded_out = sample_completions(folded, tokenizer, prompts, config)
    bridge = boot(*load_hf("tiny", BF16))
    with projection.apply(bridge):
        bridged_out = sample_completions(bridge, tokenizer, prompts, config)
    for out in (hooked_out, folded_out, bridged_out):
        assert len(out) == 4 and all(c[0].finish_reason in ("stop", "length") for c in out)
    assert [c[0].text for c in hooked_out] == [c[0].text for c in bridged_out]


def test_bfloat16_lora_training_keeps_float32_adapters_and_evaluates(tmp_path):
    model, tokenizer = load_hf("tiny", BF16)
    examples = get_task("arithmetic").examples("train", n=8, seed=0)
    data = generate_jsonl(model, tokenizer, examples, tmp_path / "gen.jsonl",
                          SamplingConfig(temperature=1.0, max_new_tokens=12), task="arithmetic")
    out = train_on_jsonl("tiny", data, tmp_path / "lora", TrainConfig(epochs=2, lr=1e-5, batch_size=4), runtime=BF16)
    record = json.loads((out / "train.json").read_text())
    assert record["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    assert all(torch.isfinite(torch.tensor(record["final_losses"])))
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    # lr 1e-5 moves lora_B off zero: steps this small survive because the adapter is float32.
    assert max(t.abs().max() for name, t in tensors.items() if "lora_B" in name) > 0
    trained, tokenizer = load_trained("tiny", out, runtime=BF16)
    assert trained.dtype == torch.float32  # evaluated in float32 (spd_lens.precision): a bf16 merge loses the update
    result = evaluate(trained, tokenizer, "arithmetic", n=4, config=SamplingConfig(max_new_tokens=8),
                      generations=tmp_path / "eval.jsonl")
    assert result.n == 4 and 0 <= result.score <= 1


def test_bfloat16_full_fine_tuning_keeps_float32_weights(tmp_path, data):
    out = train_on_jsonl("tiny", data, tmp_path / "full", TrainConfig(lora=False, epochs=1, lr=1e-4), runtime=BF16)
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    with pytest.raises(SpdLensError, match="full fine-tuning in float16 needs loss scaling"):
        train_on_jsonl("tiny", data, tmp_path / "fp16", TrainConfig(lora=False, epochs=1),
                       runtime=Runtime.resolve("cpu", "float16"))


def test_bfloat16_experiment_end_to_end(tmp_path):
    settings = {"seeds": [0], "methods": ["base", "spd", "hook-only"],
                "task": {"name": "arithmetic", "train_n": 6, "eval_n": 5}, "subspace": {"n": 4},
                "sampling": {"max_new_tokens": 8}, "eval": {"max_new_tokens": 8}, "train": {"epochs": 1, "lr": 1e-3}}
    metrics = run_experiment(config_from_dict({**settings, "model": {"name": "tiny", "dtype": "bfloat16"}}), tmp_path)
    assert metrics["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    assert set(metrics["methods"]) == {"base", "spd", "hook-only"}
    assert all(m["n"] == 5 for m in metrics["methods"].values())
    trained = json.loads((tmp_path / "adapters" / "spd-seed0" / "train.json").read_text())
    assert trained["runtime"]["dtype"] == "bfloat16"
    # The directory goes on on another device (same numbers), but refuses float32 (other numbers).
    again = run_experiment(config_from_dict({**settings, "model": {"name": "tiny", "device": "cpu",
                                                                    "dtype": "bfloat16"}}), tmp_path)
    assert again["methods"] == metrics["methods"]
    with pytest.raises(SpdLensError, match=r"differs in model.dtype: run has 'bfloat16', now 'float32'"):
        run_experiment(config_from_dict({**settings, "model": {"name": "tiny", "dtype": "float32"}}), tmp_path)
