"""Which layers and KV heads carry a capability: gradient energy, concentration, and the causal
effect of projecting one layer or one head at a time.

`head_attribution(model, task_or_examples, ...)` takes one streaming gradient pass over all chosen
layers (every layer by default). First the layer view, on every row of the layer (`layer_rows`
collects one row per layer):

- `layer_energy_k` / `_v`: the layer's correctness-token gradient energy Σσ² (absolute, so layers
  compare: a per-head share hides which layer holds the energy), `layer_energy_share` of all;
- `layer_delta_loss` / `layer_delta_loss_remove`: the loss change with the whole layer's K and V
  projected onto its subspace (`keep`, P) or with the subspace projected out (`remove`, I − P).

Then for each (layer, KV head):

- `energy_share_k` / `_v`: the head's share of its layer's gradient energy; `energy_k` / `_v`
  the head's own Σσ²;
- `effective_rank_k` / `_v`: exp(entropy of the normalised σ²), how spread the head's gradient is;
- `top_energy_k` / `_v`: energy inside the head's rank-r basis (r from the rank policy);
- `delta_loss` (`keep`) / `delta_loss_remove`: correctness-token loss with only that head's K and V
  projected onto its basis / with its basis projected out, minus the unprojected loss;
- `delta_score` / `delta_score_remove`: for the `score_top` heads with the largest `delta_loss`,
  the change of the task score on `score_n` held-out examples under the same one-head projection
  (greedy). It needs a task (its test split and scorer): with your own examples it is None unless
  `score_task=` names one (a `Capability` is a task).

A bridge with no hooks on runs through its plain HF model (`unbooted`): the same rows, without the
bridge's per-module hook overhead; with hooks on (your own), through the bridge, so they apply.

`correctness_loss(model, examples)` is the loss `delta_loss` is made of: the mean over examples of
the NLL of their correctness tokens, under whatever hooks are on the model, so it composes with
`project()` for sweeps (alpha, rank, heads); `reduction="none"` gives one value per example, and
`span_accuracy` whether the model puts the span's tokens first (teacher-forced).

Cost: one gradient pass plus (layers x (KV heads + 1) x modes) forward passes over the calibration
examples, plus 2 x `score_top` x modes short evaluations; linear in layers x heads and in n.

Example:
    >>> from spd_lens import load_model
    >>> rows = head_attribution(load_model("tiny"), "arithmetic", n=2, score_top=0)
    >>> sorted(k for k in rows[0] if "delta" in k)
    ['delta_loss', 'delta_loss_remove', 'delta_score', 'delta_score_remove', 'layer_delta_loss', 'layer_delta_loss_remove']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from spd_lens.artifacts import read_json_object
from spd_lens.errors import SpdLensError
from spd_lens.extract import encode_examples, extract_subspace, model_shape
from spd_lens.gradients import pad_batch, target_mask
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


def correctness_values(model, examples, *, pad_id: int | None = None, tokenizer=None, n: int | None = None,
                       batch_size: int = 8) -> tuple[list[float], list[float]]:
    """Per example, in one forward pass each: the mean NLL of its correctness tokens, and 1.0 when
    every one of them is the model's top prediction (teacher-forced), else 0.0. Hooks in place
    apply; see `correctness_loss` and `span_accuracy` for what `examples` may be."""
    encoded = examples
    if isinstance(examples, (str, Task)) or not all(isinstance(e, EncodedExample) for e in examples):
        _, encoded = encode_examples(model, examples, n=n, split="train", seed=0, tokenizer=tokenizer)
    if not encoded:
        raise SpdLensError("no examples to take the correctness loss on")
    if pad_id is None:
        known = tokenizer or getattr(model, "tokenizer", None)
        pad_id = known.pad_token_id if known is not None else (hf_model_of(model).config.pad_token_id or 0)
    hf = hf_model_of(model)
    losses: list[float] = []
    spans: list[float] = []
    with torch.no_grad():
        for start in range(0, len(encoded), batch_size):
            ids, attention, correct = pad_batch(encoded[start:start + batch_size], pad_id)
            mask = target_mask(attention, correct, "correctness").to(hf.device)
            ids, attention = ids.to(hf.device), attention.to(hf.device)
            rows, cols = mask[:, 1:].nonzero(as_tuple=True)
            hidden = hf.model(input_ids=ids, attention_mask=attention.long()).last_hidden_state
            logits = hf.lm_head(hidden[rows, cols]).float()
            targets = ids[:, 1:][rows, cols]
            nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none").double()
            size = ids.shape[0]
            count = torch.zeros(size, dtype=torch.float64, device=nll.device).index_add_(0, rows, torch.ones_like(nll))
            summed = torch.zeros(size, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
            wrong = torch.zeros(size, dtype=torch.float64, device=nll.device).index_add_(
                0, rows, (logits.argmax(-1) != targets).double())
            losses += (summed / count.clamp(min=1)).tolist()
            spans += [float(w == 0 and c > 0) for w, c in zip(wrong.tolist(), count.tolist())]
    return losses, spans


def _reduce(values: list[float], reduction: str, what: str):
    if reduction == "mean":
        return sum(values) / len(values)
    if reduction == "none":
        return values
    raise SpdLensError(f"{what}: reduction={reduction!r}: use 'mean' (one number) or 'none' (one per example)")


def correctness_loss(model, examples, *, pad_id: int | None = None, tokenizer=None, n: int | None = None,
                     batch_size: int = 8, reduction: str = "mean") -> float | list[float]:
    """Mean over examples of the correctness-token NLL (no gradients; hooks in place apply);
    `reduction="none"`: one value per example, in the examples' order.

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
        >>> base != halfway, correctness_loss(model, mine, reduction="none") == [base]
        (True, True)
    """
    losses, _ = correctness_values(model, examples, pad_id=pad_id, tokenizer=tokenizer, n=n, batch_size=batch_size)
    return _reduce(losses, reduction, "correctness_loss")


def span_accuracy(model, examples, *, pad_id: int | None = None, tokenizer=None, n: int | None = None,
                  batch_size: int = 8, reduction: str = "mean") -> float | list[float]:
    """Teacher-forced span accuracy: per example 1.0 when the model puts every token of the
    answer's correctness span first (each predicted from the true text before it), else 0.0; the
    mean, or one value per example with `reduction="none"`. No generation: it reads whether the
    capability is there without a decoding budget or a scorer; hooks in place apply.

    Example:
        >>> from spd_lens import load_model
        >>> from spd_lens.tasks import Example
        >>> mine = [Example(f"mine/{i}", f"What is {i} + 1?", str(i + 1), ((0, 1),)) for i in range(3)]
        >>> values = span_accuracy(load_model("tiny"), mine, reduction="none")
        >>> len(values), set(values) <= {0.0, 1.0}
        (3, True)
    """
    _, spans = correctness_values(model, examples, pad_id=pad_id, tokenizer=tokenizer, n=n, batch_size=batch_size)
    return _reduce(spans, reduction, "span_accuracy")


def task_score(model, tokenizer, task, examples, max_new_tokens: int) -> float:
    config = SamplingConfig(max_new_tokens=max_new_tokens, batch_size=16)
    completions = [c[0] for c in sample(model, tokenizer, examples, config)]  # each with its own system prompt
    return sum(task.score(e, c).passed for e, c in zip(examples, completions)) / len(examples)


def hooks_on(model) -> bool:
    """Whether any TransformerLens hook (yours, or a projection's) is on a bridge's hook points."""
    return any(point.fwd_hooks or point.bwd_hooks for point in getattr(model, "hook_dict", {}).values())


def unbooted(model):
    """The plain HF model a bridge was booted from, sharing its weights (no copy): its forward
    pass skips the bridge's hook points, which cost time even with no hook on them. A plain HF
    model is returned as it is. Made once per bridge and kept on it.

    Booting rewires the HF modules in place (each wrapped with its hook points), so the plain
    model is rebuilt from the config on the meta device and handed the bridge's own tensors.

    Example:
        >>> import torch
        >>> from spd_lens import load_model
        >>> bridge = load_model("tiny")
        >>> plain = unbooted(bridge)
        >>> ids = bridge.tokenizer("12+3=", return_tensors="pt").input_ids
        >>> torch.allclose(plain(ids).logits, bridge(ids), atol=1e-5), hasattr(plain, "hook_dict")
        (True, False)
    """
    if not hasattr(model, "original_model"):
        return model
    cached = getattr(model, "_spd_lens_unbooted", None)
    if cached is not None:
        return cached
    wrapped = hf_model_of(model)
    tensors = {}
    for name, tensor in [*wrapped.state_dict(keep_vars=True).items(), *wrapped.named_buffers()]:
        tensors.setdefault(name.replace("._original_component", ""), tensor)
    with torch.device("meta"):
        plain = type(wrapped)(wrapped.config)
    state = plain.state_dict()
    missing = [k for k in state if k not in tensors]
    if missing:
        raise SpdLensError(f"cannot rebuild the plain model under this bridge: no weights for {missing[:3]}; "
                           "pass the HF model (spd_lens.load_hf) instead")
    plain.load_state_dict({k: tensors[k] for k in state}, assign=True)
    for name, _ in list(plain.named_buffers()):  # non-persistent buffers (rotary frequencies)
        owner, _, leaf = name.rpartition(".")
        module = plain.get_submodule(owner) if owner else plain
        module._buffers[leaf] = tensors[name]
    plain.generation_config = wrapped.generation_config
    plain.eval()
    model._spd_lens_unbooted = plain
    return plain


MODES = ("keep", "remove")


def _modes(modes) -> tuple[str, ...]:
    modes = (modes,) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise SpdLensError(f"modes {list(modes)}: use 'keep' (project onto the subspace, P) and/or 'remove' "
                           "(project it out, I - P)")
    return modes


def head_attribution(model, task_or_examples, *, n: int | None = None, seed: int = 0,
                     layers: Sequence[int] | None = None, rank_frac: float | None = None, rank: int | None = None,
                     score_top: int | None = None, score_n: int = 32, score_task=None, tokenizer=None,
                     subspace: CapabilitySubspace | None = None, progress: Callable | None = None,
                     max_memory: int | str | None = None, modes: Sequence[str] = MODES,
                     route: str = "auto") -> list[dict]:
    """One row per (layer, KV head); see the module docstring.

    `task_or_examples` is a task (then `n`, default 16, train examples drawn by `seed`) or your own
    `Example`s / `EncodedExample`s as `extract_subspace` takes them (all, or the first `n`).
    `score_top` (default 5 for a task, 0 for your own examples) heads get a `delta_score` on
    `score_n` test examples of the task, or of `score_task` for your own examples. `max_memory`
    bounds the gradient pass as in `extract_subspace`. `modes`: `keep` (the head's K and V
    projected onto its subspace: `delta_loss`, `delta_score`) and/or `remove` (its subspace
    projected out: `delta_loss_remove`, `delta_score_remove`). `route`: `auto` runs a bridge
    with no hooks on through its plain HF model (`unbooted`: the same numbers, faster), a bridge
    with hooks on through the bridge (so that they apply); `bridge` / `plain` choose.
    """
    modes = _modes(modes)
    if route not in ("auto", "bridge", "plain"):
        raise SpdLensError(f"route={route!r}: use 'auto', 'bridge' or 'plain'")
    tokenizer = tokenizer or model.tokenizer
    if route == "plain" or (route == "auto" and not hooks_on(model)):
        model = unbooted(model)
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
    suffix = {"keep": "", "remove": "_remove"}
    # The layer view first: a layer's absolute gradient energy (comparable across layers, unlike
    # the per-head shares) and the loss change with the whole layer's K and V projected.
    energy = {(layer, kind): float((subspace.singular_values(layer, kind).double() ** 2).sum())
              for layer in subspace.layers for kind in ("k", "v")}
    total = sum(energy.values()) or 1.0
    per_layer = {}
    for layer in subspace.layers:
        per_layer[layer] = {"layer_energy_k": energy[(layer, "k")], "layer_energy_v": energy[(layer, "v")],
                            "layer_energy_share": (energy[(layer, "k")] + energy[(layer, "v")]) / total}
        for mode in modes:
            projection = Projection.build(subspace, layers=[layer], complement=mode == "remove")
            with projection.apply(model):
                per_layer[layer][f"layer_delta_loss{suffix[mode]}"] = correctness_loss(model, encoded,
                                                                                       pad_id=pad_id) - baseline
    rows = []
    pairs = [(layer, head) for layer in subspace.layers for head in range(shape["n_kv_heads"])]
    for layer, head in progress(pairs) if progress else pairs:
        row = {"layer": layer, "head": head}
        for kind in ("k", "v"):
            values = subspace.singular_values(layer, kind, head)
            row[f"energy_share_{kind}"] = subspace.head_energy(layer, kind)[head]
            row[f"energy_{kind}"] = float((values.double() ** 2).sum())
            row[f"effective_rank_{kind}"] = effective_rank(values)
            row[f"top_energy_{kind}"] = subspace.explained_energy(layer, kind, head)
        for mode in modes:
            projection = Projection.build(subspace, layers=[layer], layout="head", heads=[head],
                                          complement=mode == "remove")
            with projection.apply(model):
                row[f"delta_loss{suffix[mode]}"] = correctness_loss(model, encoded, pad_id=pad_id) - baseline
            row[f"delta_score{suffix[mode]}"] = None
        row.update(per_layer[layer])
        rows.append(row)
    if score_top > 0:
        examples = task.examples("test", n=score_n, seed=seed)
        budget = task.max_new_tokens
        base_score = task_score(model, tokenizer, task, examples, budget)
        key = f"delta_loss{suffix[modes[0]]}"
        for row in sorted(rows, key=lambda r: -abs(r[key]))[:score_top]:
            for mode in modes:
                projection = Projection.build(subspace, layers=[row["layer"]], layout="head", heads=[row["head"]],
                                              complement=mode == "remove")
                with projection.apply(model):
                    row[f"delta_score{suffix[mode]}"] = task_score(model, tokenizer, task, examples, budget) - base_score
    for row in rows:
        row["baseline_loss"] = baseline
        row.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return rows


def layer_rows(rows: list[dict]) -> list[dict]:
    """The per-layer view of `head_attribution` rows: one row per layer with its absolute
    gradient energy (`layer_energy_k` / `_v`, and its share of all layers' energy) and the loss
    change with the whole layer's K and V projected (`layer_delta_loss`, `..._remove`)."""
    seen = {}
    for row in rows:
        if row["layer"] not in seen:
            seen[row["layer"]] = {"layer": row["layer"], **{k: v for k, v in row.items() if k.startswith("layer_")}}
    return list(seen.values())


def write_heads_report(out: str | Path, *, scale: str = "clip") -> Path:
    """`OUT/heads.html` from `OUT/heads.json`: the layer view (gradient energy and loss change per
    layer), then per layer x head the energy share, the loss change kept / removed (red = worse)
    and the effective rank; PNG copies beside it."""
    from spd_lens.viz import head_attribution_figure, layer_attribution_figure, write_report

    out = Path(out)
    table = read_json_object(out / "heads.json", "a head-attribution table (spd-lens heads)")
    rows = table["rows"]
    figures = [layer_attribution_figure(rows)] if "layer_energy_k" in rows[0] else []
    figures += [head_attribution_figure(rows, v, scale=scale)
                for v in ("energy_share", "delta_loss", "delta_loss_remove", "effective_rank") if v in rows[0]
                or f"{v}_k" in rows[0]]
    write_report(out / "heads.html", figures, f"which heads carry {table.get('task')} ({table.get('model')})")
    return out / "heads.html"
