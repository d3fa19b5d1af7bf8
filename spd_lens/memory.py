"""How much memory a gradient pass takes, and batches that stay inside a budget.

A gradient pass (forward with autograd, then backward to the first target layer) keeps, for
every layer from the first target layer up, the activations its backward needs; the layers below
it keep nothing (the weights are frozen during the pass, so no layer needs its input for a weight
gradient). What is kept per layer and token was counted with autograd's saved-tensor hooks on
Llama-style models (tests check the estimate against that count on the tiny model and, marked
slow, the default one):

- per token and kept layer, about `3 d_mlp + 4 d_model + 2 (n_heads + 2 n_kv_heads) d_head`
  values (MLP gate/up/activation, two RMSNorms, queries/keys/values around RoPE and attention),
  and `2 d_model` more on a booted model's plain path (the bridge's wrappers);
- eager attention adds `n_heads x T x T` values per kept layer, 2.5 times over on a bridge's hook
  path (the bridge computes attention itself and keeps scores and pattern for
  `hook_attn_scores`/`hook_pattern`; measured peaks read about 2.3), 1.5 times on a plain model
  without SDPA; the plain path (a plain model, or a bridge with no hooks on, whose attention
  modules step aside for the model's own during the pass) uses the memory-efficient SDPA
  attention, which keeps only a per-row log-sum-exp;
- the attention mask, `T x T` per example, once;
- logits: the correctness-only unembedding of the plain-model path computes a row per
  correctness token (a few for an arithmetic answer, hundreds for a program); the bridge path
  (and the full-sequence loss) computes `T x vocab` per example; their backward another tensor of
  that size;
- working room for one layer's backward (its gradients are as large as what it kept).

The budget: `max_memory` when given. Otherwise batches aim at half of the memory available now
(`MemAvailable` on the CPU, what the OS could give without swapping; the free memory of the
model's GPU), at most 3 GiB on the CPU, where larger batches buy little speed and a laptop has
other things open; an example too long for that still runs alone if it fits in half of the
available memory. Batches are formed in order of length, as large as `batch_size` allows while
the estimate of the batch stays inside the budget, so long examples go in smaller batches; an
example that does not fit alone is refused with the estimate, before any gradient is taken.

Example:
    >>> from spd_lens import load_model
    >>> model = load_model("tiny")
    >>> estimate = gradient_pass_bytes(model, batch=4, length=512, first_layer=2)
    >>> 0 < estimate < 2**30
    True
    >>> batch_plan([512, 8, 8, 16], batch_size=4, estimate=lambda b, t: b * t, budget=600)
    [[1, 2, 3], [0]]
"""

from __future__ import annotations

import ctypes
import re
import sys
from collections.abc import Callable, Sequence

import torch

from spd_lens.errors import SpdLensError

DEFAULT_SHARE = 0.5  # of the memory available when the pass starts
CPU_TARGET = 3 * 2**30  # what batches aim at on the CPU when no budget is given
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: int | float | str | None) -> int | None:
    """A memory size: bytes as a number, or text such as `"3GB"`, `"512 MiB"`; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise SpdLensError(f"max_memory={value!r} must be positive (bytes, or text such as '4GB')")
        return int(value)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if match is None or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise SpdLensError(f"max_memory={value!r} is not a memory size: use bytes or text such as '4GB', '512MiB'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory that could be used now: a GPU's free memory, or the CPU's `MemAvailable`."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # not Linux: the portable answer

    return int(psutil.virtual_memory().available)


def default_budget(device: torch.device | str = "cpu") -> tuple[int, int]:
    """(what batches aim at, the most one example may take) when no `max_memory` is given."""
    limit = int(DEFAULT_SHARE * available_bytes(device))
    return (min(limit, CPU_TARGET) if torch.device(device).type == "cpu" else limit), limit


def release_freed_memory() -> None:
    """Hand the memory the process has freed back to the OS. glibc keeps freed heap pages, so
    without this a notebook kernel stays near the peak of its last gradient pass (measured: 2.8 GB
    resident after caching 8 HumanEval examples, 1.2 GB after the trim). A no-op off glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def gib(n_bytes: float) -> str:
    """A size in GiB, or MiB / bytes where GiB would read 0.00."""
    if n_bytes >= 2**30:
        return f"{n_bytes / 2**30:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{int(n_bytes)} bytes"


def gradient_pass_bytes(model, *, batch: int, length: int, first_layer: int, full_logits: bool = False,
                        bridge_attention: bool = False, targets: int = 8) -> int:
    """Estimated transient memory of one gradient pass over `batch` examples of `length` tokens
    (see the module docstring); `full_logits`: the pass computes logits at every position (the
    bridge path, the full-sequence loss); `bridge_attention`: a booted bridge's own attention runs
    (the bridge path, or any hooks on; otherwise the model's own attention stands in for it);
    `targets`: the most correctness tokens an example has (the rows whose logits the plain path
    computes: a few for an arithmetic answer, hundreds for a program)."""
    from spd_lens.models import hf_model_of

    hf = hf_model_of(model)
    cfg = hf.config
    # Copies of the attention pattern a kept layer holds: a bridge's own eager attention, a plain
    # model's eager attention, or none with SDPA.
    if bridge_attention and bridged_attention(hf):
        pattern_copies = 2.5
    else:
        pattern_copies = 0.0 if getattr(hf, "_supports_sdpa", False) else 1.5
    element = torch.finfo(hf.dtype).bits // 8
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    kept = cfg.num_hidden_layers - first_layer
    tokens = batch * length
    per_token_layer = 3 * cfg.intermediate_size + 4 * cfg.hidden_size + 2 * (n_heads + 2 * n_kv) * d_head
    if bridged_attention(hf) and not bridge_attention:
        # On the plain path a booted model's blocks are still the bridge's wrappers, which keep about
        # 1.5 d_model more per token and layer (default model, 4 x 653 tokens: 3.14 GB against 2.86 unbooted).
        per_token_layer += 2 * cfg.hidden_size
    # +15%: measured peaks on the plain path read 9% above autograd's count of what is kept
    layer = int(1.15 * tokens * per_token_layer * element)
    layer += int(pattern_copies * batch * n_heads * length * length * element)
    total = kept * layer + layer  # every kept layer, plus one layer's backward working room
    total += batch * length * length * 4  # the attention mask (float, or bool plus temporaries)
    logit_rows = tokens if full_logits else batch * min(targets, length)
    total += 2 * logit_rows * cfg.vocab_size * 4  # float32 logits and their gradient
    return int(total)


def bridged_attention(hf) -> bool:
    """Whether this model's attention modules are a bridge's (booted into a `TransformerBridge`)."""
    layers = getattr(getattr(hf, "model", None), "layers", None)
    return layers is not None and len(layers) > 0 and type(layers[0].self_attn).__module__.startswith("transformer_lens")


def batch_plan(lengths: Sequence[int], *, batch_size: int, estimate: Callable[[int, int], int],
               budget: int | None, limit: int | None = None) -> list[list[int]]:
    """Indices of `lengths` in batches: shortest first, at most `batch_size` each, and each batch's
    `estimate(batch, longest length)` within `budget` (None: no budget). An example over the
    budget runs alone if it is within `limit` (default: the budget); over that, `OverBudget`."""
    limit = budget if limit is None else limit
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable: equal lengths keep their order
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        grown = len(current) + 1
        if current and (grown > batch_size or (budget is not None and estimate(grown, lengths[index]) > budget)):
            batches.append(current)
            current = []
        if not current and limit is not None and estimate(1, lengths[index]) > limit:
            raise OverBudget(lengths[index], estimate(1, lengths[index]), limit)
        current.append(index)
    if current:
        batches.append(current)
    return batches


class OverBudget(SpdLensError):
    """One example's gradient pass alone is estimated above the memory budget."""

    def __init__(self, length: int, needed: int, budget: int):
        self.length, self.needed, self.budget = length, needed, budget
        super().__init__(f"one example of {length} tokens needs an estimated {gib(needed)} for its gradient pass, "
                         f"over the memory budget of {gib(budget)}")
