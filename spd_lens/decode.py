"""Decoding that spends no compute on finished rows: a pool of slots, refilled as rows finish.

Batched `generate` decodes a batch until its longest row stops, so rows that ended early ride
along (54-60% of decoding steps on the code task, `benchmarks/decode_waste.py`). `decode` keeps
at most `slots` rows in flight: a finished row leaves the batch and its KV cache at once, and
waiting prompts are prefilled and merged into the free slots, so every step computes only live rows
and the batch stays full while prompts wait.

How rows of different lengths share one KV cache: each row is right-aligned (its newest token in
the last column), left padding is masked out by the 2-D attention mask, and each row's position
ids count only its own tokens, so a row decodes as it would alone. Columns that are padding for
every remaining row are dropped. Each layer's keys and values live in a buffer with spare columns
(`_SpareColumnsCache`), so a step writes one column in place instead of copying the whole cache, as
`DynamicCache`'s concatenation does (about an eighth of a code-task decoding's time here).

Prompts rendered by one chat template share a prefix (SmolLM2's system turn and user header: 24
of an arithmetic prompt's 53 tokens). Given as `shared_prefix`, it is prefilled once and its keys and values are
copied into every new row that starts with it, so a refill computes only each prompt's own tokens;
such a row's layout is prefix, padding, own tokens. The prefix is a property of the template, never
of the prompts in a call, so a prompt is computed the same way whichever prompts share its call
(a shard, a resumed run).

Sampling uses one random generator per row, seeded from (seed, row): a completion depends on its
prompt, its seed and its index, not on which rows share its batch or on when it was scheduled. That
makes generation resumable per prompt, and makes sharded generation across processes equal to a
single process's.

Example:
    >>> from spd_lens.models import load_hf
    >>> model, tokenizer = load_hf("tiny")
    >>> outs = decode(model, [[1, 5, 6], [1, 7]], max_new_tokens=4, slots=2, stop_ids=[2],
    ...               pad_id=tokenizer.pad_token_id)
    >>> len(outs), all(o.finish_reason in ("stop", "length") and len(o.tokens) <= 4 for o in outs)
    (2, True)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import DynamicCache, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from spd_lens.errors import SpdLensError
from spd_lens.models import hf_model_of

# Refill once this share of the slots is free: one prefill pass then serves several new rows.
REFILL_SHARE = 0.25
# Spare columns a cache buffer gets whenever it is (re)allocated: a reallocation every 128 steps.
SPARE_COLUMNS = 128
# A shared prefix shorter than this is prefilled with each prompt (a second pass would cost more).
MIN_SHARED_PREFIX = 8


class _SpareColumnsLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of buffers with spare columns on the right:
    a new column is written in place; the buffer is copied only when it is full or rebuilt."""

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.assign(key_states, value_states)
            return self.keys, self.values
        used, new = self.keys.shape[-2], key_states.shape[-2]
        if used + new > self._key_buffer.shape[-2]:
            self.assign(self.keys, self.values, spare=new + SPARE_COLUMNS)
        self._key_buffer[:, :, used:used + new] = key_states
        self._value_buffer[:, :, used:used + new] = value_states
        self.keys = self._key_buffer[:, :, :used + new]
        self.values = self._value_buffer[:, :, :used + new]
        return self.keys, self.values

    def _not_here(self, *args, **kwargs):
        raise NotImplementedError("decode's cache changes rows through assign(); this operation is not supported")

    reorder_cache = batch_select_indices = batch_repeat_interleave = offload = prefetch = _not_here

    def assign(self, keys: Tensor, values: Tensor, spare: int | None = None) -> None:
        """Holds copies of `keys` and `values` (batch, heads, columns, d_head) in fresh buffers with
        `spare` (default `SPARE_COLUMNS`) free columns."""
        columns, spare = keys.shape[-2], SPARE_COLUMNS if spare is None else spare
        self._key_buffer = keys.new_empty((*keys.shape[:2], columns + spare, keys.shape[-1]))
        self._value_buffer = values.new_empty((*values.shape[:2], columns + spare, values.shape[-1]))
        self._key_buffer[:, :, :columns] = keys
        self._value_buffer[:, :, :columns] = values
        self.keys = self._key_buffer[:, :, :columns]
        self.values = self._value_buffer[:, :, :columns]


class _SpareColumnsCache(DynamicCache):
    """A `DynamicCache` made of `_SpareColumnsLayer`s, for `decode` only: it rebuilds rows through
    `assign` (`_merge`, `_select`); transformers' own row operations (`reorder_cache`,
    `batch_select_indices`, ...) would replace a layer's keys behind its buffer, so they refuse."""

    def __init__(self):
        super().__init__()
        self.layers = []
        self.layer_class_to_replicate = _SpareColumnsLayer


@dataclass
class Decoded:
    """One finished row: generated ids (an end-of-turn id that ended it is left out), why it ended."""

    tokens: list[int]
    finish_reason: str  # "stop" | "length"


@dataclass
class _Row:
    index: int
    length: int  # real tokens of this row in the cache
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)


def row_seed(seed: int, index: int) -> int:
    """The seed of row `index`'s random generator (a fixed mix, stable across versions)."""
    return (seed * 1_000_003 + index * 7919 + 12345) % (2**63 - 1)


def _warpers(temperature: float, top_k: int, top_p: float) -> LogitsProcessorList:
    """transformers' own warpers, in the order `generate` applies them."""
    warpers = LogitsProcessorList()
    if temperature and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


def decode(model, prompts: Sequence[Sequence[int]], **options) -> list[Decoded]:
    """Every prompt's `Decoded`, in prompt order (see `decode_stream` for the options)."""
    results: list[Decoded | None] = [None] * len(prompts)
    for index, decoded in decode_stream(model, prompts, **options):
        results[index] = decoded
    return results  # type: ignore[return-value]


def decode_stream(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    slots: int,
    stop_ids: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    row_indices: Sequence[int] | None = None,
    stopped: Callable[[list[int]], bool] | None = None,
    shared_prefix: Sequence[int] = (),
) -> Iterator[tuple[int, Decoded]]:
    """Yields (i, decoded) for every prompt i (token ids, no padding) as it finishes, with at most
    `slots` rows in flight.

    `temperature` 0 is greedy; otherwise row i samples with its own generator seeded from
    (`seed`, `row_indices[i]`, default i), after transformers' temperature, top-k and top-p
    warpers. `stopped(tokens)` may end a row early (stop strings). `shared_prefix` (e.g.
    `spd_lens.chat.template_prefix(tokenizer)`) is prefilled once for the prompts that start with it
    and are longer; it must not depend on which prompts are passed.
    """
    hf = hf_model_of(model)
    device = hf.device
    indices = list(range(len(prompts))) if row_indices is None else list(row_indices)
    if len(indices) != len(prompts):
        raise SpdLensError(f"row_indices has {len(indices)} entries for {len(prompts)} prompts: give one per prompt")
    if slots < 1:
        raise SpdLensError(f"slots must be >= 1, got {slots}")
    warpers = _warpers(temperature, top_k, top_p) if temperature else None
    stop_set = set(stop_ids)
    refill_at = max(1, int(slots * REFILL_SHARE))
    # Longest prompts first: the prompts of one refill then have similar lengths, so its prefill pads
    # little (unsorted, 40% of a HumanEval evaluation's prefill tokens were padding). Outputs do not
    # depend on the order (rows decode as alone, each with its own generator).
    waiting = deque(sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))
    rows: list[_Row] = []
    cache: DynamicCache | None = None
    mask: Int[Tensor, "batch cols"] | None = None

    def choose(logits: Float[Tensor, "batch vocab"], batch_rows: list[_Row]) -> list[int]:
        logits = logits.float()
        if warpers is None:
            return logits.argmax(dim=-1).tolist()
        ids = torch.tensor([[r.tokens[-1] if r.tokens else pad_id] for r in batch_rows], device=device)
        return draw(torch.softmax(warpers(ids, logits), dim=-1), [r.generator for r in batch_rows])

    def finish(row: _Row) -> Decoded | None:
        token = row.tokens[-1]
        if token in stop_set:
            return Decoded(row.tokens[:-1], "stop")
        if stopped is not None and stopped(row.tokens):
            return Decoded(list(row.tokens), "stop")
        if len(row.tokens) >= max_new_tokens:
            return Decoded(list(row.tokens), "length")
        return None

    with torch.no_grad():
        prefix = _SharedPrefix(hf, list(shared_prefix)) if prompts and len(shared_prefix) >= MIN_SHARED_PREFIX else None
        while waiting or rows:
            if waiting and (not rows or slots - len(rows) >= min(refill_at, len(waiting))):
                new = [_Row(i, len(prompts[i]), _generator(seed, indices[i], temperature))
                       for i in (waiting.popleft() for _ in range(min(slots - len(rows), len(waiting))))]
                # Rows that start with the shared prefix take its cached keys and values; others
                # (none, with prompts rendered by the prefix's template) are prefilled whole.
                starts = [prefix is not None and prefix.starts(prompts[r.index]) for r in new]
                for group, with_prefix in (([r for r, s in zip(new, starts) if s], True),
                                           ([r for r, s in zip(new, starts) if not s], False)):
                    if not group:
                        continue
                    logits, new_cache, new_mask = _prefill(hf, [prompts[r.index] for r in group], pad_id,
                                                           prefix if with_prefix else None)
                    for row, token in zip(group, choose(logits, group)):
                        row.tokens.append(token)
                    cache, mask = _merge(cache, mask, new_cache, new_mask)
                    rows += group
            else:
                last = torch.tensor([[r.tokens[-1]] for r in rows], device=device)
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = torch.tensor([[r.length] for r in rows], device=device)
                out = hf(input_ids=last, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True)
                for row, token in zip(rows, choose(out.logits[:, -1, :], rows)):
                    row.length += 1
                    row.tokens.append(token)
            ended = [finish(r) for r in rows]
            if any(e is not None for e in ended):
                for row, e in zip(rows, ended):
                    if e is not None:
                        yield row.index, e
                keep = [i for i, e in enumerate(ended) if e is None]
                rows = [rows[i] for i in keep]
                cache, mask = _select(cache, mask, keep)


def draw(probs: Float[Tensor, "batch vocab"], generators: Sequence[torch.Generator]) -> list[int]:
    """One token per row of `probs`, by inverse-CDF sampling with one uniform draw from each row's
    own generator: the draws are tiny and on the CPU, the distribution stays on its device."""
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
    cdf = probs.double().cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniform.to(probs.device).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # right=True: the first token whose cumulative mass exceeds the draw, never a zero-mass one
    return torch.searchsorted(cdf, target, right=True).squeeze(1).tolist()


def _generator(seed: int, index: int, temperature: float) -> torch.Generator | None:
    return torch.Generator().manual_seed(row_seed(seed, index)) if temperature else None


class _SharedPrefix:
    """Tokens many prompts start with (a chat template's opening), prefilled once per call."""

    def __init__(self, hf, tokens: list[int]):
        self.tokens = tokens
        ids = torch.tensor([tokens], device=hf.device)
        self.cache = _SpareColumnsCache()
        hf(input_ids=ids, attention_mask=torch.ones_like(ids), past_key_values=self.cache, use_cache=True,
           logits_to_keep=1)

    def starts(self, prompt: Sequence[int]) -> bool:
        """Whether `prompt` begins with the prefix and has tokens of its own after it."""
        return len(prompt) > len(self.tokens) and list(prompt[:len(self.tokens)]) == self.tokens

    def cache_for(self, rows: int) -> _SpareColumnsCache:
        """A cache holding the prefix's keys and values for `rows` rows."""
        cache = _SpareColumnsCache()
        for i, layer in enumerate(self.cache.layers):
            cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), i)
        return cache


def _prefill(hf, prompts: list[Sequence[int]], pad_id: int, prefix: _SharedPrefix | None = None):
    """Last-position logits, the KV cache and the attention mask of left-padded prompts (after the
    shared `prefix`'s cached keys and values, when given)."""
    shared = len(prefix.tokens) if prefix is not None else 0
    own = [p[shared:] for p in prompts]
    width = max(len(p) for p in own)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in own], device=hf.device)
    mask = torch.tensor([[1] * shared + [0] * (width - len(p)) + [1] * len(p) for p in own], device=hf.device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)[:, shared:]
    cache = prefix.cache_for(len(prompts)) if prefix is not None else _SpareColumnsCache()
    out = hf(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
             logits_to_keep=1)
    return out.logits[:, -1, :], out.past_key_values, mask


def _left_pad(t: Tensor, cols: int, dim: int) -> Tensor:
    if cols == 0:
        return t
    shape = list(t.shape)
    shape[dim] = cols
    return torch.cat([t.new_zeros(shape), t], dim=dim)


def _merge(cache, mask, new_cache, new_mask):
    """One cache (and mask) holding the rows of both, right-aligned."""
    if cache is None or mask is None or mask.shape[0] == 0:
        return new_cache, new_mask
    width = max(mask.shape[1], new_mask.shape[1])
    for layer, new_layer in zip(cache.layers, new_cache.layers):
        layer.assign(*(torch.cat([_left_pad(old, width - old.shape[-2], -2), _left_pad(add, width - add.shape[-2], -2)])
                       for old, add in ((layer.keys, new_layer.keys), (layer.values, new_layer.values))))
    mask = torch.cat([_left_pad(mask, width - mask.shape[1], 1), _left_pad(new_mask, width - new_mask.shape[1], 1)])
    return cache, mask


def _select(cache, mask, keep: list[int]):
    """The cache and mask of the rows `keep`, without columns that are padding in all of them."""
    if len(keep) == mask.shape[0]:
        return cache, mask
    if not keep:
        return None, None
    index = torch.tensor(keep, device=mask.device)
    mask = mask.index_select(0, index)
    first = int(mask.any(dim=0).nonzero()[0])
    mask = mask[:, first:]
    for layer in cache.layers:
        layer.assign(layer.keys.index_select(0, index)[:, :, first:, :],
                     layer.values.index_select(0, index)[:, :, first:, :])
    return cache, mask
