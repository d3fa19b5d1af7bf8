"""Which KV heads carry a capability: gradient energy, concentration, and the causal effect of
projecting one head at a time.

`head_attribution(model, task_or_examples, ...)` takes one streaming gradient pass over all chosen
layers (every layer by default), then for each (layer, KV head):

- `energy_share_k` / `_v`: the head's share of its layer's correctness-token gradient energy;
- `effective_rank_k` / `_v`: exp(entropy of the normalised σ²), how spread the head's gradient is;
- `top_energy_k` / `_v`: energy inside the head's rank-r basis (r from the rank policy);
- `delta_loss`: correctness-token loss with only that head's K and V projected on its basis,
  minus the unprojected loss (one batched forward per head);
- `delta_score`: for the `score_top` heads with the largest `delta_loss`, the change of the task
  score on `score_n` held-out examples under the same one-head projection (greedy). It needs a
  task (its test split and scorer): with your own examples it is None unless `score_task=` names one.

`correctness_loss(model, examples)` is the loss `delta_loss` is made of: the mean over examples of
the NLL of their correctness tokens, under whatever hooks are on the model, so it composes with
`project()` for sweeps (alpha, rank, heads).

Cost: one gradient pass plus (layers x KV heads) forward passes over the calibration examples,
plus 2 x `score_top` short evaluations; it scales linearly in layers x heads and in n.

Example:
    >>> from spd_lens import load_model
    >>> rows = head_attribution(load_model("tiny"), "arithmetic", n=2, score_top=0)
    >>> sorted(rows[0])[:3]
    ['baseline_loss', 'delta_loss', 'delta_score']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from spd_lens.artifacts import read_json_object
from spd_lens.errors import SpdLensError
from spd_lens.extract import encode_examples, extract_subspace, model_shape
from spd_lens.gradients import pad_batch, summed_example_means, target_mask
from spd_lens.models import hf_model_of
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, sample
from spd_lens.subspace import CapabilitySubspace
from spd_lens.tasks import EncodedExample, Task, get_task


def effective_rank(singular_values: torch.Tensor) -> float:
    energy = singular_values.double() ** 2
    total = energy.sum()
    if total <= 0:
        return 0.0
    p = energy[energy > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def correctness_loss(model, examples, *, pad_id: int | None = None, tokenizer=None, n: int | None = None,
                     batch_size: int = 8) -> float:
    """Mean over examples of the correctness-token NLL (no gradients; hooks in place apply).

    `examples`: `EncodedExample`s, your own `Example`s, or a task name / `Task` (its first `n`
    train examples); the tokenizer is the bridge's or `tokenizer=`. Each example's loss is the
    mean NLL of its correctness tokens, each predicted from the position before it.

    Example:
        >>> from spd_lens import load_model, extract_subspace, project
        >>> from spd_lens.tasks import Example
        >>> model = load_model("tiny")
        >>> mine = [Example("mine/0", "What is 12 + 7?", "19", ((0, 2),))]
        >>> subspace = extract_subspace(model, mine, rank=2)
        >>> base = correctness_loss(model, mine)
        >>> with project(model, subspace, alpha=0.5):
        ...     halfway = correctness_loss(model, mine)
        >>> base != halfway
        True
    """
    encoded = examples
    if isinstance(examples, (str, Task)) or not all(isinstance(e, EncodedExample) for e in examples):
        _, encoded = encode_examples(model, examples, n=n, split="train", seed=0, tokenizer=tokenizer)
    if not encoded:
        raise SpdLensError("no examples to take the correctness loss on")
    if pad_id is None:
        known = tokenizer or getattr(model, "tokenizer", None)
        pad_id = known.pad_token_id if known is not None else (hf_model_of(model).config.pad_token_id or 0)
    hf = hf_model_of(model)
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            ids, attention, correct = pad_batch(encoded[start:start + batch_size], pad_id)
            mask = target_mask(attention, correct, "correctness").to(hf.device)
            ids, attention = ids.to(hf.device), attention.to(hf.device)
            rows, cols = mask[:, 1:].nonzero(as_tuple=True)
            hidden = hf.model(input_ids=ids, attention_mask=attention.long()).last_hidden_state
            logits = hf.lm_head(hidden[rows, cols])
            total += float(summed_example_means(logits, ids[:, 1:][rows, cols], rows, ids.shape[0]))
    return total / len(encoded)


def task_score(model, tokenizer, task, examples, max_new_tokens: int) -> float:
    config = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=16)
    completions = [c[0] for c in sample(model, tokenizer, examples, config)]  # each with its own system prompt
    return sum(task.score(e, c).passed for e, c in zip(examples, completions)) / len(examples)


def head_attribution(model, task_or_examples, *, n: int | None = None, seed: int = 0,
                     layers: Sequence[int] | None = None, rank_frac: float | None = None, rank: int | None = None,
                     score_top: int | None = None, score_n: int = 32, score_task=None, tokenizer=None,
                     subspace: CapabilitySubspace | None = None, progress: Callable | None = None,
                     max_memory: int | str | None = None) -> list[dict]:
    """One row per (layer, KV head); see the module docstring.

    `task_or_examples` is a task (then `n`, default 16, train examples drawn by `seed`) or your own
    `Example`s / `EncodedExample`s as `extract_subspace` takes them (all, or the first `n`).
    `score_top` (default 5 for a task, 0 for your own examples) heads get a `delta_score` on
    `score_n` test examples of the task, or of `score_task` for your own examples. `max_memory`
    bounds the gradient pass as in `extract_subspace`.
    """
    tokenizer = tokenizer or model.tokenizer
    shape = model_shape(model)
    layers = list(range(shape["n_layers"])) if layers is None else list(layers)
    is_task = isinstance(task_or_examples, (str, Task))
    task = get_task(task_or_examples) if is_task else (get_task(score_task) if score_task is not None else None)
    if is_task and n is None:
        n = 16
    if score_top is None:
        score_top = 5 if is_task else 0
    if score_top > 0 and task is None:
        raise SpdLensError(f"score_top={score_top} needs a task to score generations with: pass score_task='name' "
                           "(its test split is scored) or score_top=0 for your own examples")
    _, encoded = encode_examples(model, task if is_task else task_or_examples, n=n, split="train", seed=seed,
                                 tokenizer=tokenizer)
    if subspace is None:  # from the same examples (a task's draw is recorded as such)
        subspace = extract_subspace(model, task if is_task else encoded, n=n if is_task else None, seed=seed,
                                    layers=layers, rank=rank, rank_frac=rank_frac, tokenizer=tokenizer,
                                    max_memory=max_memory)
    pad_id = tokenizer.pad_token_id
    baseline = correctness_loss(model, encoded, pad_id=pad_id)
    rows = []
    pairs = [(layer, head) for layer in subspace.layers for head in range(shape["n_kv_heads"])]
    for layer, head in progress(pairs) if progress else pairs:
        row = {"layer": layer, "head": head}
        for kind in ("k", "v"):
            values = subspace.singular_values(layer, kind, head)
            row[f"energy_share_{kind}"] = subspace.head_energy(layer, kind)[head]
            row[f"effective_rank_{kind}"] = effective_rank(values)
            row[f"top_energy_{kind}"] = subspace.explained_energy(layer, kind, head)
        projection = Projection.build(subspace, layers=[layer], layout="head", heads=[head])
        with projection.apply(model):
            row["delta_loss"] = correctness_loss(model, encoded, pad_id=pad_id) - baseline
        row["delta_score"] = None
        rows.append(row)
    if score_top > 0:
        examples = task.examples("test", n=score_n, seed=seed)
        budget = task.max_new_tokens
        base_score = task_score(model, tokenizer, task, examples, budget)
        for row in sorted(rows, key=lambda r: -abs(r["delta_loss"]))[:score_top]:
            projection = Projection.build(subspace, layers=[row["layer"]], layout="head", heads=[row["head"]])
            with projection.apply(model):
                row["delta_score"] = task_score(model, tokenizer, task, examples, budget) - base_score
    for row in rows:
        row["baseline_loss"] = baseline
        row.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return rows


def write_heads_report(out: str | Path) -> Path:
    """`OUT/heads.html` (energy share, loss change and effective rank per layer x head) from `OUT/heads.json`."""
    from spd_lens.viz import head_attribution_figure, write_report

    out = Path(out)
    table = read_json_object(out / "heads.json", "a head-attribution table (spd-lens heads)")
    figures = [head_attribution_figure(table["rows"], v) for v in ("energy_share", "delta_loss", "effective_rank")]
    write_report(out / "heads.html", figures, f"which heads carry {table.get('task')} ({table.get('model')})")
    return out / "heads.html"
