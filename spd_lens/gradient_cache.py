"""`GradientCache`: the per-token K/V gradients themselves, for looking at before choosing a subspace.

In the spirit of TransformerLens's `ActivationCache`, and indexed the same way:
`cache["k", 15]` (TransformerLens's `get_act_name` shorthand, so also `cache["k15"]` and negative
layers, `cache["v", -1]`) or the hook name `cache["blocks.15.attn.hook_k"]`; `(layer, kind)` tuples
(`cache[15, "k"]`, the order of `CapabilitySubspace.basis(layer, kind)`) are accepted too.
`.keys()`, `.to(device)`, per-head views.
Rows are `[example, pos, kv_head, d_head]`, right-padded, in the order the examples were given,
with the token ids, attention and correctness masks and example ids beside them.

Streaming extraction (`extract_subspace`) is for scale; a cache holds every row, so it has a
memory budget (`max_bytes`, the cache alone) and, like every gradient pass, `max_memory` (the
cache plus the largest batch's pass, see `spd_lens.memory`), both checked before any gradient
is computed.

Example:
    >>> from spd_lens import load_model
    >>> cache = cache_gradients(load_model("tiny"), "arithmetic", n=2, layers=[0, 3])
    >>> cache["blocks.3.attn.hook_v"].shape[2:], cache.keys()[:1]
    (torch.Size([2, 8]), ['blocks.0.attn.hook_k'])
    >>> cache["v", 3] is cache["blocks.3.attn.hook_v"] is cache["v", -1] is cache[3, "v"]
    True
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

import spd_lens
from spd_lens.errors import SpdLensError
from spd_lens.extract import encode_examples, model_dtype, model_shape, run_settings
from spd_lens.gradients import Progress, check_layers, iterate_gradients
from spd_lens.artifacts import atomic_write, read_json_object, sha256_file
from spd_lens.subspace import config_hash

DEFAULT_MAX_BYTES = 4 * 2**30
TENSORS_FILE = "gradients.safetensors"
META_FILE = "gradients.json"


def hook_name(layer: int, kind: str) -> str:
    return f"blocks.{layer}.attn.hook_{kind}"


def parse_hook_name(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if (len(parts) != 4 or parts[0] != "blocks" or not parts[1].lstrip("-").isdigit() or parts[2] != "attn"
            or parts[3] not in ("hook_k", "hook_v")):
        raise SpdLensError(f"{name!r} is not a K/V hook name: a gradient cache holds only keys and values; "
                           "index it as cache['k', layer], cache['v', layer] or cache['blocks.{layer}.attn.hook_k']")
    return int(parts[1]), parts[3][-1]


class GradientCache:
    """dL/dK and dL/dV rows per layer (see the module docstring).

    Example:
        >>> from spd_lens import cache_gradients, load_model
        >>> cache = cache_gradients(load_model("tiny"), "arithmetic", n=2, layers=[3])
        >>> isinstance(cache, GradientCache), cache["k", 3].shape[0]  # one row block per example
        (True, 2)
    """

    def __init__(self, grads: dict[tuple[int, str], Tensor], input_ids: Tensor, attention_mask: Tensor,
                 correctness_mask: Tensor, example_ids: list[str], meta: dict):
        self.grads = grads
        self.input_ids: Int[Tensor, "example pos"] = input_ids
        self.attention_mask: Bool[Tensor, "example pos"] = attention_mask
        self.correctness_mask: Bool[Tensor, "example pos"] = correctness_mask
        self.example_ids = example_ids
        self.meta = meta

    # --- ActivationCache-like access ------------------------------------------------------

    def _key(self, name) -> tuple[int, str]:
        from transformer_lens.utilities import get_act_name  # here: importing TransformerLens takes seconds

        if isinstance(name, str):  # a hook name, or TransformerLens shorthand such as "k15"
            layer, kind = parse_hook_name(name if "." in name else get_act_name(name))
        elif isinstance(name, tuple) and 2 <= len(name) <= 3 and isinstance(name[0], str):
            layer, kind = parse_hook_name(get_act_name(*name))  # TransformerLens order: ("k", 15)
        elif isinstance(name, tuple) and len(name) == 2 and isinstance(name[1], str) and not isinstance(name[0], bool):
            layer, kind = int(name[0]), name[1]  # (layer, kind), the order CapabilitySubspace uses
        else:
            raise SpdLensError(f"cannot index a gradient cache with {name!r}: use cache['k', layer], "
                               "cache['v', layer] or cache['blocks.{layer}.attn.hook_k']")
        n_layers = self.meta.get("n_layers")
        if layer < 0 and n_layers:  # negative layers count from the end, as in ActivationCache
            layer += int(n_layers)
        key = (layer, kind)
        if key not in self.grads:
            raise SpdLensError(f"no gradients cached for {hook_name(*key)}: the cache has {self.keys()}")
        return key

    def __getitem__(self, name) -> Float[Tensor, "example pos kv_head d_head"]:
        return self.grads[self._key(name)]

    def __contains__(self, name) -> bool:
        try:
            self._key(name)
            return True
        except SpdLensError:
            return False

    def keys(self) -> list[str]:
        return [hook_name(layer, kind) for layer, kind in sorted(self.grads)]

    def items(self):
        return [(hook_name(*key), self.grads[key]) for key in sorted(self.grads)]

    def __len__(self) -> int:
        return len(self.example_ids)

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.grads})

    def to(self, device) -> "GradientCache":
        return GradientCache({k: v.to(device) for k, v in self.grads.items()}, self.input_ids.to(device),
                             self.attention_mask.to(device), self.correctness_mask.to(device), self.example_ids, self.meta)

    # --- views ----------------------------------------------------------------------------

    def head(self, name, head: int) -> Float[Tensor, "example pos d_head"]:
        return self[name][:, :, head]

    def token_norms(self, name, head: int | None = None) -> Float[Tensor, "example pos"]:
        """L2 norm of each token's gradient (all heads, or one); 0 at padding."""
        grads = self[name] if head is None else self[name][:, :, head : head + 1]
        return grads.float().flatten(2).norm(dim=-1) * self.attention_mask.to(grads.device)

    def head_energy(self, name) -> Float[Tensor, " kv_head"]:
        """Each KV head's share of the summed squared gradient."""
        energy = (self[name].double() ** 2).sum(dim=(0, 1, 3))
        return energy / energy.sum().clamp(min=1e-300)

    def stacked(self, name, head: int | None = None) -> Float[Tensor, "rows dim"]:
        """The rows of non-padding positions: flattened across heads, or one head's."""
        grads = self[name]
        grads = grads.flatten(2) if head is None else grads[:, :, head]
        return grads[self.attention_mask.to(grads.device)]

    # --- save / load ----------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {f"layer{layer}.{kind}.grad": grad.contiguous() for (layer, kind), grad in self.grads.items()}
        tensors.update(input_ids=self.input_ids.contiguous(), attention_mask=self.attention_mask.contiguous(),
                       correctness_mask=self.correctness_mask.contiguous())
        path = directory / TENSORS_FILE
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "spd_lens.gradients"}))
        meta = {**self.meta, "example_ids": self.example_ids, "tensors_sha256": sha256_file(path)}
        atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> "GradientCache":
        directory = Path(directory)
        meta_path, path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not path.is_file():
            raise SpdLensError(f"{directory} is not a saved gradient cache (needs {META_FILE} and {TENSORS_FILE})")
        meta = read_json_object(meta_path, "a gradient cache's metadata")
        if meta.pop("tensors_sha256", None) != sha256_file(path):
            raise SpdLensError(f"{path} does not match the hash in {meta_path}: incomplete or modified")
        tensors = load_file(str(path))
        grads = {}
        for name, tensor in tensors.items():
            if name.endswith(".grad"):
                layer, kind = name.split(".")[:2]
                grads[(int(layer.removeprefix("layer")), kind)] = tensor
        example_ids = meta.pop("example_ids")
        return cls(grads, tensors["input_ids"], tensors["attention_mask"], tensors["correctness_mask"], example_ids, meta)

    def __repr__(self) -> str:
        return (f"GradientCache(model={self.meta.get('model_id')!r}, task={self.meta.get('task')!r}, "
                f"examples={len(self)}, layers={self.layers}, hooks={len(self.grads)})")


def cache_gradients(
    model,
    task_or_examples,
    *,
    n: int | None = None,
    split: str = "train",
    seed: int = 0,
    layers: Sequence[int] | None = None,
    hook_names: Sequence[str] = ("hook_k", "hook_v"),
    loss: str = "correctness",
    batch_size: int = 4,
    tokenizer=None,
    task_options: dict | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_memory: int | str | None = None,
    progress: Progress | None = None,
) -> GradientCache:
    """Cache the correctness-token K/V gradients of every chosen layer (all layers by default).

    `task_or_examples` as in `extract_subspace`: a task (n examples of `split` by `seed`) or your
    own examples (all, or the first `n`). Two budgets, both checked before any gradient is taken:
    `max_bytes` for the cache itself, and `max_memory` (bytes or "4GB"; default: half of the
    memory available) for the cache plus the largest batch's gradient pass, which sets how many
    examples go in a batch (at most `batch_size`; the cached numbers do not depend on it).
    """
    shape = model_shape(model)
    layers = list(range(shape["n_layers"])) if layers is None else check_layers(layers, shape["n_layers"])
    kinds = []
    for name in hook_names:
        if name not in ("hook_k", "hook_v"):
            raise SpdLensError(f"hook name {name!r} is not supported: use 'hook_k' and/or 'hook_v'")
        kinds.append(name[-1])
    task_name, encoded = encode_examples(model, task_or_examples, n=n, split=split, seed=seed, tokenizer=tokenizer,
                                         task_options=task_options)
    length = max(len(e.input_ids) for e in encoded)
    needed = len(encoded) * length * len(layers) * len(kinds) * shape["n_kv_heads"] * shape["d_head"] * 4
    if needed > max_bytes:
        raise SpdLensError(
            f"caching {len(encoded)} examples x {length} positions x {len(layers)} layers x {len(kinds)} hooks needs "
            f"{needed / 2**30:.2f} GiB, over the budget of {max_bytes / 2**30:.2f} GiB: use fewer layers or examples, "
            "raise max_bytes, or use extract_subspace (streaming, constant memory)"
        )
    order = {e.example_id: i for i, e in enumerate(encoded)}
    pad_id = (tokenizer or getattr(model, "tokenizer", None)).pad_token_id
    grads = {(layer, kind): torch.zeros(len(encoded), length, shape["n_kv_heads"], shape["d_head"])
             for layer in layers for kind in kinds}
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros(len(encoded), length, dtype=torch.bool)
    correct = torch.zeros(len(encoded), length, dtype=torch.bool)
    started = time.time()
    for batch in iterate_gradients(model, encoded, layers=layers, loss=loss, batch_size=batch_size, pad_id=pad_id,
                                   progress=progress, max_memory=max_memory, reserved=needed):
        rows = [order[example_id] for example_id in batch.example_ids]
        width = batch.input_ids.shape[1]
        input_ids[rows, :width] = batch.input_ids
        attention[rows, :width] = batch.attention_mask
        correct[rows, :width] = batch.correctness_mask
        for (layer, kind), grad in batch.grads.items():
            if kind in kinds:
                grads[(layer, kind)][rows, :width] = grad.float().cpu()
    settings = run_settings(model, task_name, len(encoded), split=split, seed=seed, layers=layers, loss=loss,
                            batch_size=batch_size)
    meta = {**settings, **shape, "dtype": model_dtype(model), "kinds": kinds, "spd_lens_version": spd_lens.__version__,
            "config_hash": config_hash(settings), "seconds": round(time.time() - started, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return GradientCache(grads, input_ids, attention, correct, [e.example_id for e in encoded], meta)


