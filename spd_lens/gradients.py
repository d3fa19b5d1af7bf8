"""Gradients of the correctness-token loss with respect to attention keys and values.

For each batch of examples: one forward and one backward pass of the frozen model, with the loss
the mean next-token NLL over each example's correctness-defining tokens (summed over examples,
so an example's gradient does not depend on what it is batched with). dL/dK and dL/dV are taken
at the chosen layers, shaped `[batch, pos, kv_head, d_head]` like `hook_k`/`hook_v` (before RoPE).

Two capture paths give the same numbers (tested):
- on a `TransformerBridge` with hooks attached (a projection, your own): backward hooks on
  `blocks.{l}.attn.hook_k` / `hook_v`, so the gradients are those of the hooked model;
- otherwise (a plain Hugging Face model, or a bridge with no hooks on): tensor hooks on the
  outputs of `k_proj` / `v_proj` of the underlying model, and logits only where the loss is
  taken; the pass uses the model's memory-efficient attention (SDPA) with no attention mask
  (right padding in a causal model needs none; given one, the CPU's SDPA falls back to a kernel
  that keeps the pattern), so it keeps no `T x T` pattern per layer. On a bridge with no hooks
  on, its attention modules (eager, computing scores and pattern for `hook_attn_scores` /
  `hook_pattern`) step aside for the pass in favour of the Hugging Face modules they wrap, so no
  pattern is kept there either.
Either way the weights are frozen for the pass, so backward runs only as far back as the first
target layer, computes no weight gradients, and the layers below keep no activations; with the
correctness loss only the logits of the correctness positions are computed on the plain path.

Batches hold examples of similar length, at most `batch_size`, and no more than the memory
budget allows (`spd_lens.memory`: the estimate of what the pass keeps for backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from spd_lens.errors import SpdLensError
from spd_lens.memory import (OverBudget, batch_plan, bridged_attention, default_budget, gib, gradient_pass_bytes,
                             parse_bytes, release_freed_memory)
from spd_lens.processes import Processes
from spd_lens.runtime import avoid_cudnn_attention
from spd_lens.tasks.base import EncodedExample, check_unique_ids

KINDS = ("k", "v")
LOSSES = ("correctness", "full")
Progress = Callable[[Iterable], Iterable]


@dataclass
class GradientBatch:
    """One batch's K/V gradients, right-padded, with what identifies each row."""

    example_ids: list[str]
    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Bool[Tensor, "batch pos"]
    correctness_mask: Bool[Tensor, "batch pos"]
    grads: dict[tuple[int, str], Float[Tensor, "batch pos kv_head d_head"]]
    loss: float


def check_layers(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    """The target layers, default {L//2, L-1}; out-of-range indices are an error."""
    if layers is None:
        return sorted({n_layers // 2, n_layers - 1})
    layers = sorted(set(int(layer) for layer in layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad or not layers:
        raise SpdLensError(f"layer(s) {bad or layers} out of range: the model has {n_layers} layers (0..{n_layers - 1})")
    return layers


def pad_batch(encoded: Sequence[EncodedExample], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and correctness mask."""
    length = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.bool)
    correct = torch.zeros((len(encoded), length), dtype=torch.bool)
    for row, example in enumerate(encoded):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = True
        correct[row, :n] = torch.tensor(example.correctness_mask)
    return ids, attention, correct


def target_mask(attention: Tensor, correct: Tensor, loss: str) -> Bool[Tensor, "batch pos"]:
    """Which tokens the loss is taken on (as prediction targets)."""
    if loss not in LOSSES:
        raise SpdLensError(f"unknown loss {loss!r}: use 'correctness' (the method) or 'full' (the ablation)")
    mask = (correct if loss == "correctness" else attention).clone()
    mask[:, 0] = False  # the first token has no prediction
    return mask


def summed_example_means(logits: Float[Tensor, "n vocab"], targets: Tensor, rows: Tensor, n_rows: int) -> Tensor:
    """Sum over examples of each example's mean NLL; `rows` says which example each target is in."""
    device = logits.device  # index_add_ needs the sums, the indices and the values on one device
    nll = torch.nn.functional.cross_entropy(logits.float(), targets.to(device), reduction="none")
    rows = rows.to(device)
    per_example = torch.zeros(n_rows, dtype=nll.dtype, device=device).index_add_(0, rows, nll)
    counts = torch.zeros(n_rows, dtype=nll.dtype, device=device).index_add_(0, rows, torch.ones_like(nll))
    return (per_example / counts.clamp(min=1)).sum()


def iterate_gradients(
    model,
    encoded: Sequence[EncodedExample],
    *,
    layers: Sequence[int] | None = None,
    loss: str = "correctness",
    batch_size: int = 4,
    pad_id: int | None = None,
    progress: Progress | None = None,
    max_memory: int | str | None = None,
    reserved: int = 0,
    processes: Processes | None = None,
    capture: str = "auto",
) -> Iterator[GradientBatch]:
    """Yield each batch's dL/dK and dL/dV at `layers` (see the module docstring).

    Batches hold examples of similar length (sorted by length, the longest batch first);
    `example_ids` say which.
    `max_memory` (bytes or text such as "4GB"; default: half of the memory available) bounds the
    estimated memory of each batch's pass plus `reserved` (what the caller keeps, e.g. a cache).
    With `processes` (a multi-process launch) this process takes every world-th of the batches one
    process would form. `capture` is "auto", "bridge" or "plain" (which path, see above).
    """
    from spd_lens.models import hf_model_of

    hf = hf_model_of(model)
    n_layers = hf.config.num_hidden_layers
    layers = check_layers(layers, n_layers)
    if batch_size < 1:
        raise SpdLensError(f"batch_size must be at least 1, got {batch_size}")
    if not encoded:
        raise SpdLensError("no examples to take gradients on")
    check_unique_ids([e.example_id for e in encoded])  # batches name their rows by example id
    pad_id = pad_id if pad_id is not None else (hf.config.pad_token_id or 0)
    on_bridge = _bridge_path(model, capture)
    batches = gradient_batches(model, encoded, layers=layers, loss=loss, batch_size=batch_size,
                               max_memory=max_memory, reserved=reserved, on_bridge=on_bridge, processes=processes)
    if processes is not None and processes.parallel:
        if len(batches) < processes.world:
            raise SpdLensError(f"{len(encoded)} examples make {len(batches)} batch(es), fewer than the "
                               f"{processes.world} processes: use more examples, a smaller batch_size or fewer processes")
        batches = [batches[b] for b in processes.shard(len(batches))]
    # Longest first: the first pass takes the largest blocks and the shorter ones after it fit in
    # them (shortest first, each longer pass may need fresh memory on top of what the allocator
    # keeps; the default model, 28 HumanEval problems, peak of three runs each: median 2.73 GB
    # against 3.01, noisy), and a pass that cannot run fails at once, not at the end. The sums
    # and the cache do not depend on the order.
    batches = batches[::-1]
    avoid_cudnn_attention(hf.device)  # its backward pass can return NaN (see that function)
    try:
        yield from _passes(model, hf, batches, layers, loss, pad_id, on_bridge, progress)
    finally:
        release_freed_memory()  # the passes' transient memory, back to the OS


def _passes(model, hf, batches, layers, loss, pad_id, on_bridge, progress) -> Iterator[GradientBatch]:
    for chunk in progress(batches) if progress else batches:
        ids, attention, correct = pad_batch(chunk, pad_id)
        mask = target_mask(attention, correct, loss)
        if not mask.any():
            raise SpdLensError(f"examples {[e.example_id for e in chunk]} have no tokens to take the loss on")
        ids, attention_dev, mask_dev = ids.to(hf.device), attention.to(hf.device), mask.to(hf.device)
        if on_bridge:
            with _frozen(hf):
                grads, value = _bridge_pass(model, ids, attention_dev, mask_dev, layers)
        else:
            with _frozen(hf), _memory_efficient_attention(hf):
                grads, value = _hf_pass(hf, ids, mask_dev, layers, loss)
        for key, grad in grads.items():
            if not torch.isfinite(grad).all():
                raise SpdLensError(
                    f"non-finite gradient at layer {key[0]} {key[1].upper()} for examples "
                    f"{[e.example_id for e in chunk]} (loss {value}); the model or inputs produce NaN/inf"
                )
        yield GradientBatch([e.example_id for e in chunk], ids.cpu(), attention, correct, grads, value)


def gradient_batches(model, encoded: Sequence[EncodedExample], *, layers: Sequence[int], loss: str, batch_size: int,
                     max_memory: int | str | None = None, reserved: int = 0, on_bridge: bool | None = None,
                     processes: Processes | None = None) -> list[list[EncodedExample]]:
    """The batches a gradient pass takes: by length, at most `batch_size`, within the budget.
    Under several `processes` the budget is the smallest any of them has, so all form the same."""
    from spd_lens.models import hf_model_of

    hf = hf_model_of(model)
    on_bridge = _bridge_path(model, "auto") if on_bridge is None else on_bridge
    target, limit, given = _budget(max_memory, hf.device)
    if processes is not None and processes.parallel:
        agreed = processes.gather((target, limit))
        target, limit = min(t for t, _ in agreed), min(lim for _, lim in agreed)
    first = min(layers)
    eager_bridge = on_bridge or _has_lens_hooks(hf)  # the bridge's own attention runs (see _memory_efficient_attention)
    targets = max(sum(e.correctness_mask) for e in encoded)

    def estimate(batch: int, length: int) -> int:
        return gradient_pass_bytes(model, batch=batch, length=length, first_layer=first, targets=targets,
                                   full_logits=on_bridge or loss == "full", bridge_attention=eager_bridge)

    lengths = [len(e.input_ids) for e in encoded]
    try:
        plan = batch_plan(lengths, batch_size=batch_size, estimate=estimate, budget=max(target - reserved, 0),
                          limit=max(limit - reserved, 0))
    except OverBudget as err:
        kept = f"layers {first}..{hf.config.num_hidden_layers - 1}"
        held = f" beside {gib(reserved)} for the result itself" if reserved else ""
        now = f"max_memory={gib(limit)}" if given else f"by default half the available memory, {gib(limit)}"
        raise SpdLensError(f"{err}{held} ({now}): raise max_memory, take gradients at later layers only "
                           f"(the backward pass keeps {kept}), or use shorter examples") from None
    return [[encoded[i] for i in batch] for batch in plan]


def _budget(max_memory, device) -> tuple[int, int, bool]:
    """(what batches aim at, the most one example may take, whether max_memory was given)."""
    given = parse_bytes(max_memory)
    if given is not None:
        return given, given, True
    return (*default_budget(device), False)


def _bridge_path(model, capture: str) -> bool:
    """Whether gradients are taken through the bridge's hook points (hooks on it must apply)."""
    if capture not in ("auto", "bridge", "plain"):
        raise SpdLensError(f"capture={capture!r}: use 'auto', 'bridge' or 'plain'")
    is_bridge = hasattr(model, "original_model")
    if capture == "bridge" and not is_bridge:
        raise SpdLensError("capture='bridge' needs a TransformerBridge, got a plain model")
    if capture != "auto":
        return capture == "bridge"
    return is_bridge and _has_lens_hooks(model)


def _has_lens_hooks(bridge) -> bool:
    from transformer_lens.hook_points import HookPoint

    return any(isinstance(m, HookPoint) and (m.fwd_hooks or m.bwd_hooks) for m in bridge.modules())


@contextmanager
def _frozen(hf):
    """No weight needs a gradient during the pass (the caller's flags come back after)."""
    flags = [(p, p.requires_grad) for p in hf.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


@contextmanager
def _memory_efficient_attention(hf):
    """SDPA instead of eager attention for the pass. A booted bridge runs its own eager attention
    (it keeps scores and pattern for its hooks, 2.5 copies of `heads x T x T` per layer); with no
    hooks on, each decoder layer gets back the Hugging Face attention module the bridge's wraps
    (same weights, same k_proj/v_proj), which follows the config's SDPA setting."""
    config = hf.config
    previous = getattr(config, "_attn_implementation", None)
    switch = previous == "eager" and getattr(hf, "_supports_sdpa", False)
    swapped: list[tuple[torch.nn.Module, torch.nn.Module]] = []
    try:
        if bridged_attention(hf) and not _has_lens_hooks(hf):
            _unwrap_attention(hf, swapped)
        if switch:
            config._attn_implementation = "sdpa"
        yield
    finally:
        for decoder_layer, bridge_attention in swapped:
            decoder_layer._modules["self_attn"] = bridge_attention
        if switch:
            config._attn_implementation = previous


def _unwrap_attention(hf, swapped: list) -> None:
    """Puts each bridged decoder layer's original attention module in place of the bridge's,
    adding (decoder layer, bridge attention) to `swapped` as it goes, so all are put back."""
    for block in hf.model.layers:
        decoder_layer = getattr(block, "original_component", block)
        bridge_attention = decoder_layer._modules.get("self_attn")
        original = getattr(bridge_attention, "original_component", None)
        if original is not None:
            swapped.append((decoder_layer, bridge_attention))
            decoder_layer._modules["self_attn"] = original


def _loss_from_logits(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    predict = logits[:, :-1]
    rows, cols = mask[:, 1:].nonzero(as_tuple=True)
    return summed_example_means(predict[rows, cols], ids[:, 1:][rows, cols], rows, ids.shape[0])


def _hf_pass(hf, ids, mask, layers, loss) -> tuple[dict, float]:
    captured: dict[tuple[int, str], Tensor] = {}
    handles = []

    def capture(key):
        def hook(module, args, output):
            if not output.requires_grad:  # frozen weights (e.g. a peft base model)
                output.requires_grad_(True)
            captured[key] = output
            return output

        return hook

    attn_layers = hf.model.layers
    for layer in layers:
        for kind in KINDS:
            proj = getattr(attn_layers[layer].self_attn, f"{kind}_proj")
            handles.append(proj.register_forward_hook(capture((layer, kind))))
    # Right padding needs no attention mask in a causal model: a real token attends only to earlier
    # positions, all real, and padding takes no loss, so it sends no gradient back to real tokens
    # (tested: the same gradients batched or alone). Without a mask SDPA runs its causal kernel,
    # which keeps no T x T pattern for backward; with one, the CPU's falls back to one that does.
    try:
        with torch.enable_grad():
            if loss == "correctness":
                # Only the correctness positions' logits are needed: skip the rest of the unembedding.
                hidden = hf.model(input_ids=ids).last_hidden_state
                rows, cols = mask[:, 1:].nonzero(as_tuple=True)
                logits = hf.lm_head(hidden[rows, cols])
                value = summed_example_means(logits, ids[:, 1:][rows, cols], rows, ids.shape[0])
            else:
                logits = hf(input_ids=ids).logits
                value = _loss_from_logits(logits, ids, mask)
            keys = list(captured)
            tensors = [captured[k] for k in keys]
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    cfg = hf.config
    n_kv, d_head = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {}
    for key, tensor, grad in zip(keys, tensors, grads):
        grad = torch.zeros_like(tensor) if grad is None else grad
        out[key] = grad.detach().reshape(*grad.shape[:2], n_kv, d_head)
    return out, float(value.detach())


def _bridge_pass(bridge, ids, attention, mask, layers) -> tuple[dict, float]:
    grads: dict[tuple[int, str], Tensor] = {}
    start: list[Tensor] = []

    def capture_start(tensor, hook):
        # Differentiate down to the first target block's input: backward then passes through every
        # target hook_k/hook_v (firing their hooks), computes no weight gradients, and stops there.
        tensor = tensor if tensor.requires_grad else tensor.detach().requires_grad_(True)
        start.append(tensor)
        return tensor

    def backward_hook(key):
        def hook(grad, hook):
            grads[key] = grad.detach().clone()

        return hook

    names = {(layer, kind): f"blocks.{layer}.attn.hook_{kind}" for layer in layers for kind in KINDS}
    bwd = [(name, backward_hook(key)) for key, name in names.items()]
    fwd = [(f"blocks.{layers[0]}.hook_in", capture_start)]
    with torch.enable_grad(), bridge.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        logits = bridge(ids, attention_mask=attention.long())
        value = _loss_from_logits(logits, ids, mask)
        torch.autograd.grad(value, start)
    missing = [names[k] for k in names if k not in grads]
    if missing:
        raise SpdLensError(f"no backward hook fired on {missing}: the bridge did not route gradients through them")
    return {k: grads[k] for k in names}, float(value.detach())
