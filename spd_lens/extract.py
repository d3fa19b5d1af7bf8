"""`extract_subspace`: correctness-token gradients streamed into Gram matrices, then SVD.

Memory does not grow with the number of examples or tokens: each batch's gradient rows (all
non-padding positions) are folded into a float64 `kv_heads*d_head` square Gram matrix per layer
and K/V, and dropped.

Example:
    >>> from spd_lens import load_model
    >>> model = load_model("tiny")
    >>> subspace = extract_subspace(model, "arithmetic", n=4, layers=[1, 3], rank=4)
    >>> subspace.basis(3, "v").shape
    torch.Size([16, 4])
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

import spd_lens
from spd_lens.artifacts import check_same_settings, read_json_object
from spd_lens.errors import SpdLensError
from spd_lens.gradients import KINDS, GradientBatch, Progress, check_layers, iterate_gradients
from spd_lens.models import hf_model_of, model_id
from spd_lens.processes import Processes
from spd_lens.projection import projection_provenance
from spd_lens.runtime import Runtime
from spd_lens.stages import runtime_record
from spd_lens.subspace import META_FILE, CapabilitySubspace, RankPolicy, config_hash
from spd_lens.tasks import EncodedExample, Example, Task, get_task, locate_spans
from spd_lens.tasks.base import check_unique_ids

# What a saved subspace must share with a new extraction for the saved one to be reused.
EXTRACTION_SETTINGS = ("model_id", "task", "n", "split", "seed", "layers", "loss", "batch_size", "examples_sha256",
                       "projection", "rank_policy", "runtime")


class GramAccumulator:
    """Running GᵀG (float64) of the gradient rows per (layer, K/V), flattened across KV heads."""

    def __init__(self) -> None:
        self.grams: dict[tuple[int, str], Float[Tensor, "dim dim"]] = {}
        self.n_rows = 0

    def add(self, batch: GradientBatch) -> None:
        mask = batch.attention_mask
        for key, grad in batch.grads.items():
            # float64 whatever the model's dtype, formed where the gradients are (a GPU's memory
            # holds them already), and kept on the CPU: only the small square matrix moves.
            rows = grad[mask.to(grad.device)].reshape(int(mask.sum()), -1).double()
            gram = (rows.T @ rows).cpu()
            self.grams[key] = self.grams[key] + gram if key in self.grams else gram
        self.n_rows += int(mask.sum())

    def sum_over(self, processes: Processes) -> None:
        """Every process's sums, added up (in the same key order everywhere)."""
        for key in sorted(self.grams):
            self.grams[key] = processes.sum(self.grams[key])
        self.n_rows = int(processes.sum(torch.tensor([self.n_rows], dtype=torch.float64)).item())

    def check(self) -> None:
        for (layer, kind), gram in self.grams.items():
            if not torch.isfinite(gram).all():
                raise SpdLensError(f"non-finite gradients accumulated at layer {layer} {kind.upper()}")
            if float(torch.diagonal(gram).sum()) == 0.0:
                raise SpdLensError(
                    f"the gradients at layer {layer} {kind.upper()} are all zero: the loss does not depend on "
                    "this layer's keys/values for these examples (check the correctness spans and the layer)"
                )


CUSTOM = "custom"  # the task name recorded for examples given directly


def encode_examples(model, task_or_examples, *, n, split, seed, tokenizer, task_options=None):
    """(task name, encoded examples) from a task name, a Task, Examples or EncodedExamples.

    A task draws `n` examples of `split` by `seed`; given examples are taken as they are, the
    first `n` of them when `n` is set (more than there are is an error). Repeated example ids are
    an error naming the id (results are keyed by id).
    """
    task_name, encoded = _encode_examples(model, task_or_examples, n=n, split=split, seed=seed, tokenizer=tokenizer,
                                          task_options=task_options)
    check_unique_ids([e.example_id for e in encoded])
    return task_name, encoded


def _encode_examples(model, task_or_examples, *, n, split, seed, tokenizer, task_options=None):
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if isinstance(task_or_examples, (str, Task)):
        task = get_task(task_or_examples, **(task_options or {}))
        if tokenizer is None:
            raise SpdLensError("a plain Hugging Face model carries no tokenizer: pass tokenizer=")
        examples = task.examples(split, n=n, seed=seed)
        return task.name, [task.locate(tokenizer, e) for e in examples]
    if isinstance(task_or_examples, (Example, EncodedExample)):
        task_or_examples = [task_or_examples]
    items = list(task_or_examples)
    if not items:
        raise SpdLensError("no examples given")
    if n is not None:
        if n < 1 or n > len(items):
            raise SpdLensError(f"n={n} but {len(items)} examples were given: pass n between 1 and {len(items)}, "
                               "or n=None to use them all")
        items = items[:n]
    if all(isinstance(e, EncodedExample) for e in items):
        return CUSTOM, items
    if all(isinstance(e, Example) for e in items):
        if tokenizer is None:
            raise SpdLensError("a plain Hugging Face model carries no tokenizer: pass tokenizer=")
        return CUSTOM, [locate_spans(tokenizer, e) for e in items]
    raise SpdLensError("task_or_examples must be a task name, a Task, or a list of Example / EncodedExample")


def run_settings(model, task_name: str, n_examples: int, *, split: str, seed: int, **more) -> dict:
    """What an extraction records about its inputs; `split` and `seed` only where a task drew the
    examples (given examples have neither). Gradients taken under a projection say so."""
    settings = {"model_id": model_id(model), "task": task_name, "n": n_examples}
    if task_name != CUSTOM:
        settings.update(split=split, seed=seed)
    # The resolved device type and dtype: bfloat16 gradients give another subspace (and another id).
    runtime = runtime_record(Runtime.of(model))
    return {**settings, **more, "projection": projection_provenance(model), "runtime": runtime}


def model_dtype(model) -> str:
    """The model's parameter dtype as a name (`"float32"`): bases are handed out in it."""
    return str(hf_model_of(model).dtype).removeprefix("torch.")


def model_shape(model) -> dict:
    cfg = hf_model_of(model).config
    return {
        "n_layers": cfg.num_hidden_layers,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        "d_head": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
    }


def extract_subspace(
    model,
    task_or_examples: str | Task | Sequence[Example] | Sequence[EncodedExample],
    *,
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    rank: int | None = None,
    rank_frac: float | None = None,
    energy: float | None = None,
    loss: str = "correctness",
    batch_size: int = 4,
    tokenizer=None,
    task_options: dict | None = None,
    progress: Progress | None = None,
    out: str | Path | None = None,
    processes: Processes | None = None,
    max_memory: int | str | None = None,
    capture: str = "auto",
) -> CapabilitySubspace:
    """The capability subspace of `model` for a task (SPD steps 1-3).

    `task_or_examples` is a task name, a `Task` or `Capability` (your own examples and scorer,
    `spd_lens.capability`), or the path of a JSONL file of your examples (then `n` examples of
    `split`, drawn by `seed`), or a list of your own `Example`s / `EncodedExample`s (all of them,
    or the first `n`). Each example is rendered with the system prompt and shots it carries.
    `layers` defaults to {L//2, L-1}; the rank policy is one of `rank`, `rank_frac` (default 0.5
    of the numerical rank) or `energy`; `loss="full"` takes the full-sequence loss (the ablation).
    Works on a `TransformerBridge` or a plain HF model: through the bridge's hook_k/hook_v backward
    hooks when hooks are on it (so they apply; `capture="bridge"` always), otherwise on the
    underlying model's k_proj/v_proj outputs (same numbers, faster, less memory).

    With `out`, the subspace is saved there; a directory already holding one made with the same
    settings (`EXTRACTION_SETTINGS`) is loaded instead (no gradients taken), and one made with
    other settings is refused, naming them.

    `batch_size` is the most examples a batch holds; `max_memory` (bytes or "4GB"; default: half
    of the memory available) bounds each batch's estimated gradient pass, so long examples go in
    smaller batches and one that cannot fit alone is refused up front (`spd_lens.memory`). The
    sums, and so the subspace, do not depend on the batching.

    Under a multi-process launch (`processes`, default `Processes.current()`) each process takes
    every world-th batch, the Gram matrices are summed across processes (the same batches as one
    process would form, so the same sums), and the main process saves `out`.
    """
    processes = processes or Processes.current()
    policy = RankPolicy.make(rank, rank_frac, energy)
    shape = model_shape(model)
    layers = check_layers(layers, shape["n_layers"])
    if policy.rank is not None and policy.rank > shape["n_kv_heads"] * shape["d_head"]:
        raise SpdLensError(f"rank {policy.rank} is larger than the flattened K/V dimension "
                           f"{shape['n_kv_heads'] * shape['d_head']}: use a smaller rank")
    torch.manual_seed(seed)
    task_name, encoded = encode_examples(model, task_or_examples, n=n, split=split, seed=seed, tokenizer=tokenizer,
                                         task_options=task_options)
    settings = run_settings(model, task_name, len(encoded), split=split, seed=seed, layers=layers, loss=loss,
                            batch_size=batch_size, examples_sha256=examples_hash(encoded))
    if out is not None and (Path(out) / META_FILE).is_file():
        saved = read_json_object(Path(out) / META_FILE, "a subspace's metadata")
        # Settings a subspace saved by an earlier version does not record are not compared.
        recorded = [k for k in EXTRACTION_SETTINGS if k in saved]
        current = {**settings, "rank_policy": policy.describe()}
        check_same_settings({k: saved[k] for k in recorded}, {k: current[k] for k in recorded}, str(out),
                            "Use another --out or the same settings", recorded="directory has")
        return CapabilitySubspace.load(out, model)
    known_tokenizer = tokenizer or getattr(model, "tokenizer", None)
    pad_id = known_tokenizer.pad_token_id if known_tokenizer is not None else None
    started = time.time()
    accumulator = GramAccumulator()
    for batch in iterate_gradients(model, encoded, layers=layers, loss=loss, batch_size=batch_size, pad_id=pad_id,
                                   progress=progress if processes.is_main else None, max_memory=max_memory,
                                   processes=processes, capture=capture):
        accumulator.add(batch)
    if processes.parallel:
        accumulator.sum_over(processes)
    accumulator.check()
    meta = {**settings, **shape, "dtype": model_dtype(model), "kinds": list(KINDS), "n_rows": accumulator.n_rows,
            "example_ids": [e.example_id for e in encoded], "spd_lens_version": spd_lens.__version__,
            "config_hash": config_hash({**settings, "policy": policy.describe()}),
            "seconds": round(time.time() - started, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if processes.parallel:
        meta["processes"] = processes.world
    subspace = CapabilitySubspace.from_grams(accumulator.grams, meta, policy)
    if out is not None:
        if processes.is_main:
            subspace.save(out)
        processes.barrier()  # every process returns once the directory is complete
    return subspace


def examples_hash(encoded: Sequence[EncodedExample]) -> str:
    """A short hash of the examples (ids, tokens, correctness masks): names the data a result was made from."""
    rows = [[e.example_id, e.input_ids, [int(x) for x in e.correctness_mask]] for e in encoded]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
