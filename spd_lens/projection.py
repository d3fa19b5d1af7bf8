"""Projecting attention keys and values onto a capability subspace (SPD step 4).

Where it sits: on the output of each target layer's `k_proj` / `v_proj`, which is exactly
TransformerLens's `blocks.{l}.attn.hook_k` / `hook_v` (shape `[batch, pos, kv_head, d_head]`),
*before RoPE* and before any key norm. Each K (or V) row k becomes k·M with

    M = (1 - alpha)·I + alpha·P,   P = V_r V_rᵀ  (alpha = 1 is the paper's hard projection K·P)

in the flattened layout (`kv_heads*d_head`), or block-diagonal with one `d_head` projector per
selected KV head in the per-head layout (unselected heads pass unchanged). `complement=True`
uses I - P in place of P: the subspace is removed and the rest kept ("ablate the capability").

alpha: the removed part (the complement of the subspace, or with `complement=True` the subspace
itself) is multiplied by 1 - alpha, the kept part is unchanged. 0 = no change, 1 = removed,
between = partly removed; outside [0, 1] it extrapolates: alpha = 2 flips the sign of the removed
part (a reflection), alpha < 0 amplifies it (alpha = -1 doubles it). Any finite number is allowed.

One head at one layer: `project(model, subspace, layers=15, heads=1)` (a head selection implies
the per-head layout).

Hook lifetime on a bridge: the hooks are permanent TransformerLens hooks, so `model.reset_hooks()`
inside the `with` block leaves the projection on; `reset_hooks(including_permanent=True)` takes it
off, after which `handle.active` is False and leaving the block raises `SpdLensError` (what ran
after the reset was not projected).

Folding: k_proj computes k = x·Wᵀ + b, so k·M = x·(M W)ᵀ + b·M because M is symmetric: the same
map is the linear layer W' = M·W, b' = M·b. Because the projection acts on the linear output
before anything position-dependent (RoPE) or nonlinear, folding is exact; a projector placed
after RoPE could not be folded. Under a KV cache each position's K/V passes the hook once, when
it is computed, so cached and uncached generation agree.

Example:
    >>> from spd_lens import load_model, extract_subspace
    >>> model = load_model("tiny")
    >>> subspace = extract_subspace(model, "arithmetic", n=2, rank=4)
    >>> with project(model, subspace, alpha=1.0):
    ...     logits = model(model.tokenizer("12+3=", return_tensors="pt").input_ids)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor

from spd_lens.errors import SpdLensError
from spd_lens.gradients import KINDS
from spd_lens.models import hf_model_of, kv_linears
from spd_lens.subspace import FLAT, CapabilitySubspace, derivation

LAYOUTS = ("flat", "head")


@dataclass(frozen=True)
class ProjectionSettings:
    """Which K/V to project and how: recorded with every generation."""

    layers: tuple[int, ...] = ()
    kinds: tuple[str, ...] = KINDS
    layout: str = "flat"
    heads: tuple[int, ...] | None = None  # per-head layout only; None = all heads
    alpha: float = 1.0
    complement: bool = False  # project on I - P: remove the subspace, keep the rest

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Projection:
    """The maps M per (layer, kind) for one subspace and settings; attach with `apply()`.

    Example:
        >>> from spd_lens import extract_subspace, load_hf
        >>> model, tokenizer = load_hf("tiny")
        >>> subspace = extract_subspace(model, "arithmetic", n=2, layers=[3], rank=4, tokenizer=tokenizer)
        >>> projection = Projection.build(subspace, kinds=["v"], alpha=0.5)
        >>> sorted(projection.maps), projection.settings.alpha
        ([(3, 'v')], 0.5)
    """

    subspace: CapabilitySubspace
    settings: ProjectionSettings
    maps: dict[tuple[int, str], Float[Tensor, "dim dim"]] = field(default_factory=dict)

    @classmethod
    def build(cls, subspace: CapabilitySubspace, *, layers: Sequence[int] | int | None = None,
              kinds: Sequence[str] = KINDS, layout: str | None = None, heads: Sequence[int] | int | None = None,
              alpha: float = 1.0, complement: bool = False) -> "Projection":
        """The maps for `subspace` (see the module docstring); `layers` and `heads` take one index or
        several, and `layout` defaults to "head" when heads are selected, else "flat"."""
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise SpdLensError(f"alpha must be a finite number (0 = no change, 1 = hard projection; outside [0, 1] "
                               f"extrapolates: the removed part is scaled by 1 - alpha), got {alpha!r}")
        if not isinstance(complement, bool):
            raise SpdLensError(f"complement must be True or False, got {complement!r}")
        layers = [layers] if isinstance(layers, int) else layers
        heads = [heads] if isinstance(heads, int) else heads
        layout = layout if layout is not None else ("head" if heads is not None else "flat")
        if layout not in LAYOUTS:
            raise SpdLensError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
        bad_kinds = [k for k in kinds if k not in KINDS]
        if bad_kinds or not kinds:
            raise SpdLensError(f"kinds must be a non-empty selection of {list(KINDS)}, got {list(kinds)}")
        layers = tuple(subspace.layers if layers is None else sorted(set(layers)))
        missing = [layer for layer in layers if layer not in subspace.layers]
        if missing:
            raise SpdLensError(f"layer(s) {missing} are not in the subspace, which has layers {subspace.layers}")
        n_kv = subspace.n_kv_heads
        if heads is not None:
            if layout != "head":
                raise SpdLensError("selecting heads needs layout='head' (the flattened basis mixes heads)")
            heads = tuple(sorted(set(int(h) for h in heads)))
            bad = [h for h in heads if not 0 <= h < n_kv]
            if bad or not heads:
                raise SpdLensError(f"head(s) {bad or list(heads)} out of range: the model has {n_kv} KV heads (0..{n_kv - 1})")
        settings = ProjectionSettings(layers, tuple(kinds), layout, heads, float(alpha), complement)
        maps = {}
        for layer in layers:
            for kind in kinds:
                dim = subspace.grams[(layer, kind)].shape[0]
                identity = torch.eye(dim, dtype=torch.float64)
                if layout == "flat":
                    projector = subspace.projector(layer, kind, FLAT, dtype=torch.float64)
                    if complement:
                        projector = identity - projector
                else:
                    d_head = dim // n_kv
                    projector = torch.eye(dim, dtype=torch.float64)
                    for h in heads if heads is not None else range(n_kv):
                        block = slice(h * d_head, (h + 1) * d_head)
                        head_projector = subspace.projector(layer, kind, h, dtype=torch.float64)
                        if complement:
                            head_projector = torch.eye(d_head, dtype=torch.float64) - head_projector
                        projector[block, block] = head_projector
                maps[(layer, kind)] = (1.0 - alpha) * identity + alpha * projector
        return cls(subspace, settings, maps)

    def provenance(self) -> dict:
        """What this projection is, as recorded with every output made under it: the subspace's id
        (its parent and derivation where it was derived, a selection of heads included), task,
        model, rank policy and ranks, and the settings."""
        meta = self.subspace.meta
        ranks = {f"layer{layer}.{kind}": self.subspace.rank(layer, kind, FLAT) for layer, kind in self.maps}
        if self.settings.layout == "head":
            ranks = {f"layer{layer}.{kind}.head{h}": self.subspace.rank(layer, kind, h) for layer, kind in self.maps
                     for h in (self.settings.heads or range(self.subspace.n_kv_heads))}
        ids = {"config_hash": meta.get("config_hash"), "parent_id": meta.get("parent_id"),
               "derivation": meta.get("derivation")}
        if self.settings.heads is not None:  # a selection of heads is a subspace of its own
            ids = derivation(ids["config_hash"], f"heads({list(self.settings.heads)})")
        return {"subspace_id": ids["config_hash"], "subspace_parent": ids["parent_id"],
                "subspace_derivation": ids["derivation"], "subspace_task": meta.get("task"),
                "subspace_model": meta.get("model_id"), "rank_policy": meta.get("rank_policy"), "ranks": ranks,
                **self.settings.as_dict()}

    @contextmanager
    def apply(self, model):
        """Install the projection hooks on `model` (bridge or HF); removes exactly them on exit.

        Raises `SpdLensError` on exit when something else took the hooks off inside the block.
        """
        handle = self.attach(model)
        try:
            yield handle
        finally:
            lost = handle._lost()
            handle.remove()
        if lost:
            raise SpdLensError(
                "the projection's hooks were taken off the model inside `with project(...)` (e.g. by "
                "model.reset_hooks(including_permanent=True)): whatever ran after that was not projected. "
                "Reset hooks before entering project(), or use model.reset_hooks(), which keeps the projection"
            )

    def attach(self, model) -> "ProjectionHandle":
        """Install the hooks and return a handle whose `remove()` takes exactly them off.

        The model knows it is projected: see `active_projections`."""
        self.subspace.check_compatible(model)
        if hasattr(model, "original_model"):
            handles = []
            for (layer, kind), matrix in self.maps.items():
                hook_point = model.hook_dict[f"blocks.{layer}.attn.hook_{kind}"]
                # Permanent: a plain model.reset_hooks() inside the `with` block keeps the projection.
                lens_handle = hook_point.add_hook(_bridge_hook(matrix), dir="fwd", is_permanent=True)
                handles.append(_LensRemover(hook_point, lens_handle))
        else:
            handles = []
            linears = kv_linears(hf_model_of(model))  # refuses, by name, attention without k_proj / v_proj
            for (layer, kind), matrix in self.maps.items():
                handles.append(linears[(layer, kind)].register_forward_hook(_linear_hook(matrix)))
        handle = ProjectionHandle(handles, self, _registry(model))
        handle._registry.append(handle)
        return handle


class _LensRemover:
    """Takes one TransformerLens hook off its hook point (and out of its bookkeeping)."""

    def __init__(self, hook_point, lens_handle):
        self.hook_point, self.lens_handle = hook_point, lens_handle

    def remove(self) -> None:
        self.lens_handle.hook.remove()
        self.hook_point.fwd_hooks = [h for h in self.hook_point.fwd_hooks if h is not self.lens_handle]

    @property
    def installed(self) -> bool:
        return any(h is self.lens_handle for h in self.hook_point.fwd_hooks) and _installed(self.lens_handle.hook)


def _installed(torch_handle) -> bool:
    """Whether a torch hook handle's hook is still registered on its module."""
    hooks = torch_handle.hooks_dict_ref()
    return hooks is not None and torch_handle.id in hooks


def _hook_present(handle) -> bool:
    """Whether a hook (TransformerLens or torch) is still registered (not removed by anyone)."""
    return handle.installed if isinstance(handle, _LensRemover) else _installed(handle)


class ProjectionHandle:
    """Removes the hooks one `Projection.attach` installed (and no others); `provenance()` says
    what they project."""

    def __init__(self, handles: list, projection: "Projection | None" = None, registry: list | None = None):
        self._handles = handles
        self.projection = projection
        self._registry = registry if registry is not None else []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._registry[:] = [h for h in self._registry if h is not self]

    @property
    def active(self) -> bool:
        """True while every hook this handle installed is on the model: False after `remove()`, and
        after something else (`model.reset_hooks(including_permanent=True)`) took them off."""
        return bool(self._handles) and not self._lost()

    def _lost(self) -> bool:
        """Some of the hooks were removed by something other than `remove()`."""
        return any(not _hook_present(h) for h in self._handles)

    def provenance(self) -> dict:
        """The attached projection's `Projection.provenance()`."""
        if self.projection is None:
            raise SpdLensError("this handle was made without its Projection, so it cannot say what it projects")
        return self.projection.provenance()


_REGISTRY = "_spd_lens_projections"


def _registry(model) -> list:
    """The handles of projections attached to `model`, kept on its Hugging Face module (which a
    bridge shares with its `original_model`, so both see the same list)."""
    hf = hf_model_of(model)
    if _REGISTRY not in hf.__dict__:
        hf.__dict__[_REGISTRY] = []
    return hf.__dict__[_REGISTRY]


def active_projections(model) -> list[ProjectionHandle]:
    """The projections whose hooks are on `model` now, in the order they were attached.

    Read from the hooks themselves: a projection taken off by its handle, by leaving `project()`,
    or by `model.reset_hooks(including_permanent=True)` is not listed (a plain `reset_hooks()`
    leaves it on). A projection with only some of its hooks left
    is an error (its outputs would be neither projected nor plain).

    Example:
        >>> from spd_lens import load_model, extract_subspace
        >>> model = load_model("tiny")
        >>> subspace = extract_subspace(model, "arithmetic", n=2, rank=4)
        >>> with project(model, subspace) as handle:
        ...     active_projections(model) == [handle]
        True
        >>> active_projections(model)
        []
    """
    registry = _registry(model)
    live = []
    for handle in registry:
        present = [_hook_present(h) for h in handle._handles]
        if all(present) and present:
            live.append(handle)
        elif any(present):
            raise SpdLensError(
                f"a projection on this model has lost {present.count(False)} of its {len(present)} hooks (some hook "
                "points were cleared): its outputs would be only partly projected; call its handle's remove() "
                "(or model.reset_hooks(including_permanent=True)) and attach it again")
    registry[:] = live
    return list(live)


def projection_provenance(model) -> dict | list[dict] | None:
    """What projects `model`'s keys and values now, as generation records it: None, one
    projection's provenance, or a list of them (folded into the weights first, then the attached
    ones in order)."""
    hf = hf_model_of(model)
    folded = getattr(hf.config, "spd_lens_projection", None)
    found = list(folded) if isinstance(folded, list) else [folded] if folded else []
    found += [handle.provenance() for handle in active_projections(model)]
    return None if not found else found[0] if len(found) == 1 else found


def _apply_map(flat: Tensor, matrix: Tensor, cast: dict) -> Tensor:
    # Half-precision activations are multiplied in float32 (one rounding, as folded weights get);
    # `cast` keeps the map on the activations' device, so decoding does not copy it every step.
    dtype = torch.float32 if flat.dtype in (torch.bfloat16, torch.float16) else flat.dtype
    key = (flat.device, dtype)
    if key not in cast:
        cast[key] = matrix.to(device=flat.device, dtype=dtype)
    return (flat.to(dtype) @ cast[key]).to(flat.dtype)


def _linear_hook(matrix: Tensor):
    cast: dict = {}

    def hook(module, args, output):
        return _apply_map(output, matrix, cast)

    return hook


def _bridge_hook(matrix: Tensor):
    cast: dict = {}

    def hook(tensor: Float[Tensor, "batch pos kv_head d_head"], hook) -> Tensor:
        shape = tensor.shape
        return _apply_map(tensor.reshape(*shape[:-2], -1), matrix, cast).reshape(shape)

    return hook


@contextmanager
def project(model, subspace: CapabilitySubspace, *, layers: Sequence[int] | int | None = None,
            kinds: Sequence[str] = KINDS, layout: str | None = None, heads: Sequence[int] | int | None = None,
            alpha: float = 1.0, complement: bool = False):
    """`with project(model, subspace):` K and V at the subspace's layers are projected.

    Works on a TransformerBridge (hooks on `hook_k`/`hook_v`, also active during
    `model.original_model.generate`) and on a plain HF model (hooks on `k_proj`/`v_proj`).
    Yields the `ProjectionHandle`; while inside, `active_projections(model)` lists it and
    `generate_jsonl` records `handle.provenance()` with every output.
    `with project(model, subspace, layers=15, heads=1):` projects one KV head at one layer;
    `complement=True` removes the subspace instead (K·(I - P)); alpha: see the module docstring.
    """
    projection = Projection.build(subspace, layers=layers, kinds=kinds, layout=layout, heads=heads, alpha=alpha,
                                  complement=complement)
    with projection.apply(model) as handle:
        yield handle


def fold_projection(model, projection: Projection):
    """A copy of the (unbooted) HF model with each M folded into k_proj / v_proj: no hooks needed.

    Example:
        >>> import torch
        >>> from spd_lens import extract_subspace, load_hf
        >>> model, tokenizer = load_hf("tiny")
        >>> projection = Projection.build(extract_subspace(model, "arithmetic", n=2, layers=[3], rank=4, tokenizer=tokenizer))
        >>> ids = torch.tensor([[1, 20, 13, 20]])
        >>> with projection.apply(model):
        ...     hooked = model(ids).logits
        >>> torch.allclose(fold_projection(model, projection)(ids).logits, hooked, atol=1e-5)
        True
    """
    if hasattr(model, "original_model"):
        raise SpdLensError("fold on the plain model from spd_lens.load_hf, not a TransformerBridge "
                           "(booting rewires the modules, so a booted copy cannot be saved as a plain checkpoint)")
    projection.subspace.check_compatible(model)
    if active_projections(model):
        raise SpdLensError("the model has projection hooks attached: a folded copy would carry them too; fold the "
                           "model without hooks (leave `project()` or call the handle's remove() first)")
    folded = copy.deepcopy(model)
    folded.__dict__.pop(_REGISTRY, None)  # the copy's projections are in its weights (recorded below), not hooks
    linears = kv_linears(folded)
    with torch.no_grad():
        for (layer, kind), matrix in projection.maps.items():
            linear = linears[(layer, kind)]
            m = matrix.to(dtype=torch.float64, device=linear.weight.device)
            linear.weight.copy_((m @ linear.weight.double()).to(linear.weight.dtype))
            if linear.bias is not None:
                linear.bias.copy_((m @ linear.bias.double()).to(linear.bias.dtype))
    earlier = getattr(model.config, "spd_lens_projection", None)  # a model folded before
    earlier = list(earlier) if isinstance(earlier, list) else [earlier] if earlier else []
    now = {**projection.provenance(), "folded": True}
    folded.config.spd_lens_projection = [*earlier, now] if earlier else now
    return folded


def save_folded(folded, tokenizer, directory) -> None:
    """A plain Hugging Face checkpoint directory (`AutoModelForCausalLM.from_pretrained` loads it)."""
    from pathlib import Path

    directory = Path(directory)
    folded.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
