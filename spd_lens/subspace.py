"""`CapabilitySubspace`: per layer and K/V, the top right singular vectors of the gradient rows.

From the accumulated Gram matrix GᵀG (float64) of the stacked dL/dK (or dL/dV) rows G, its
eigendecomposition gives G's right singular vectors and singular values (σ² are the
eigenvalues), so the M×d rows never need storing. Bases exist in two layouts:

- `"flat"`: across all KV heads, dimension `kv_heads * d_head` (what the paper's K·P acts on);
- per head `0..kv_heads-1`: dimension `d_head`, from the head's diagonal block of the Gram.

Everything is computed and kept in float64; `basis()` and `projector()` hand out a copy in the
dtype of the model the gradients came from (float32 for the default model) so that
`activations.flatten(-2) @ subspace.basis(15, "k")` works as it is; pass `dtype=torch.float64`
for the exact values.

The rank of each basis follows a `RankPolicy`: a fixed rank (per-head bases take at most
`d_head`), a fraction of the numerical rank (paper default 0.5), or the smallest rank reaching an
energy threshold (fraction of Σσ²).

Example:
    >>> import torch
    >>> g = torch.randn(100, 4, dtype=torch.float64)
    >>> s = CapabilitySubspace.from_grams({(0, "k"): g.T @ g, (0, "v"): g.T @ g}, {"n_kv_heads": 2, "d_head": 2})
    >>> s.basis(0, "k").shape, s.rank(0, "k", 0)
    (torch.Size([4, 2]), 1)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from spd_lens.artifacts import atomic_write, read_json_object, sha256_file
from spd_lens.errors import SpdLensError

Head = int | str  # "flat" or a KV head index
FLAT = "flat"
TENSORS_FILE = "subspace.safetensors"
META_FILE = "subspace.json"
RELATIVE_TOLERANCE = 1e-6  # singular values below this fraction of the largest count as zero


@dataclass(frozen=True)
class RankPolicy:
    """Exactly one of: `rank` (fixed), `frac` (of the numerical rank), `energy` (threshold in (0, 1]).

    Example:
        >>> import torch
        >>> RankPolicy.make()  # nothing given: the paper's half of the numerical rank
        RankPolicy(rank=None, frac=0.5, energy=None)
        >>> RankPolicy.make(energy=0.9).choose(torch.tensor([3.0, 1.0, 0.1]))  # 90% of the squared spectrum
        2
    """

    rank: int | None = None
    frac: float | None = None
    energy: float | None = None

    @classmethod
    def make(cls, rank: int | None = None, frac: float | None = None, energy: float | None = None) -> "RankPolicy":
        given = [name for name, value in (("rank", rank), ("rank_frac", frac), ("energy", energy)) if value is not None]
        if len(given) > 1:
            raise SpdLensError(f"give one rank policy, not {given}: rank=R, rank_frac=F or energy=E")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise SpdLensError(f"rank must be a positive integer, got {rank!r}")
        if frac is not None and not 0 < frac <= 1:
            raise SpdLensError(f"rank_frac must be in (0, 1], got {frac!r}")
        if energy is not None and not 0 < energy <= 1:
            raise SpdLensError(f"energy must be in (0, 1], got {energy!r}")
        if not given:
            frac = 0.5  # the paper's default: half of full rank
        return cls(rank=rank, frac=frac, energy=energy)

    def choose(self, singular_values: Tensor, where: str = "", clip: bool = False) -> int:
        """The rank for one spectrum; with `clip`, a fixed rank above the dimension becomes the dimension."""
        dim = singular_values.numel()
        numerical_rank = int((singular_values > singular_values[0] * RELATIVE_TOLERANCE).sum()) if dim else 0
        if self.rank is not None:
            if clip:
                return min(self.rank, dim)
            if self.rank > dim:
                raise SpdLensError(f"rank {self.rank} is larger than the dimension {dim}{where}: use rank <= {dim}")
            return self.rank
        if self.frac is not None:
            return max(1, round(self.frac * max(numerical_rank, 1)))
        energy = singular_values.double() ** 2
        cumulative = torch.cumsum(energy, 0) / energy.sum()
        return min(dim, int((cumulative < self.energy - 1e-12).sum()) + 1)

    def describe(self) -> str:
        if self.rank is not None:
            return f"rank={self.rank}"
        if self.frac is not None:
            return f"rank_frac={self.frac}"
        return f"energy={self.energy}"


def spectrum(gram: Float[Tensor, "dim dim"]) -> tuple[Float[Tensor, " dim"], Float[Tensor, "dim dim"]]:
    """Singular values (descending) and right singular vectors (columns) from a Gram matrix."""
    eigenvalues, eigenvectors = torch.linalg.eigh(gram.double())
    order = torch.flip(torch.arange(eigenvalues.numel()), [0])
    singular_values = eigenvalues[order].clamp(min=0).sqrt()
    vectors = eigenvectors[:, order]
    # Fix each vector's sign (its largest entry positive), so bases are reproducible.
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    return singular_values, vectors * torch.where(signs == 0, 1.0, signs)


class CapabilitySubspace:
    """Bases and spectra per (layer, K/V, head layout); see the module docstring."""

    def __init__(self, grams: dict[tuple[int, str], Tensor], meta: dict, policy: RankPolicy):
        self.grams = grams
        self.meta = dict(meta)
        self.policy = policy
        self.meta["rank_policy"] = policy.describe()
        self._spectra: dict[tuple[int, str, Head], tuple[Tensor, Tensor]] = {}
        self._ranks: dict[tuple[int, str, Head], int] = {}
        n_kv = self.n_kv_heads
        for (layer, kind), gram in grams.items():
            d_head = gram.shape[0] // n_kv
            blocks = {FLAT: gram, **{h: gram[h * d_head:(h + 1) * d_head, h * d_head:(h + 1) * d_head] for h in range(n_kv)}}
            for head, block in blocks.items():
                values, vectors = spectrum(block)
                self._spectra[(layer, kind, head)] = (values, vectors)
                where = f" of layer {layer} {kind.upper()} {'flattened' if head == FLAT else f'head {head}'}"
                # A fixed rank is meant for the flattened basis; per-head bases take at most d_head.
                self._ranks[(layer, kind, head)] = policy.choose(values, where, clip=head != FLAT)

    @classmethod
    def from_grams(cls, grams: dict[tuple[int, str], Tensor], meta: dict, policy: RankPolicy | None = None):
        if "n_kv_heads" not in meta:
            raise SpdLensError("subspace metadata needs n_kv_heads")
        return cls(grams, meta, policy or RankPolicy.make())

    @classmethod
    def from_cache(cls, cache, rank: int | None = None, rank_frac: float | None = None, energy: float | None = None,
                   layers=None) -> "CapabilitySubspace":
        """The subspace of a `GradientCache` (the same as streaming extraction on the same examples)."""
        grams = {}
        for layer, kind in sorted(cache.grads):
            if layers is None or layer in layers:
                rows = cache.stacked((layer, kind)).double()
                grams[(layer, kind)] = rows.T @ rows
        if not grams:
            raise SpdLensError(f"the cache holds none of the layers {layers}: it has {cache.layers}")
        policy = RankPolicy.make(rank, rank_frac, energy)
        chosen = sorted({layer for layer, _ in grams})
        meta = {**cache.meta, "layers": chosen, "n_rows": int(cache.attention_mask.sum()),
                "example_ids": cache.example_ids, "source": "gradient_cache",
                **derivation(cache.meta.get("config_hash"), f"from_cache(layers={chosen}, {policy.describe()})")}
        return cls(grams, meta, policy)

    def with_rank(self, rank: int | None = None, frac: float | None = None, energy: float | None = None):
        """The same subspace under another rank policy (no new gradients needed); its own id names
        this one as its parent (`parent_id`, `derivation`)."""
        policy = RankPolicy.make(rank, frac, energy)
        meta = {**self.meta, **derivation(self.meta.get("config_hash"), f"with_rank({policy.describe()})")}
        return CapabilitySubspace(self.grams, meta, policy)

    # --- what it holds ----------------------------------------------------------------------

    @property
    def n_kv_heads(self) -> int:
        return int(self.meta["n_kv_heads"])

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.grams})

    def heads(self) -> list[Head]:
        return [FLAT, *range(self.n_kv_heads)]

    def keys(self) -> list[tuple[int, str, Head]]:
        return list(self._spectra)

    def _check(self, layer: int, kind: str, head: Head) -> tuple[int, str, Head]:
        key = (layer, kind, head)
        if key not in self._spectra:
            raise SpdLensError(
                f"no basis for layer {layer} {kind!r} head {head!r}: this subspace has layers {self.layers}, "
                f"kinds 'k'/'v' and heads {self.heads()}"
            )
        return key

    def rank(self, layer: int, kind: str, head: Head = FLAT) -> int:
        return self._ranks[self._check(layer, kind, head)]

    def singular_values(self, layer: int, kind: str, head: Head = FLAT) -> Float[Tensor, " dim"]:
        return self._spectra[self._check(layer, kind, head)][0]

    @property
    def dtype(self) -> torch.dtype:
        """What `basis()` and `projector()` return by default: the source model's dtype (else float32)."""
        dtype = getattr(torch, str(self.meta.get("dtype", "float32")), None)
        return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32

    def basis(self, layer: int, kind: str, head: Head = FLAT, *, dtype: torch.dtype | None = None,
              device=None) -> Float[Tensor, "dim rank"]:
        """Orthonormal columns spanning the subspace, in `dtype` (default: `self.dtype`, the model's)."""
        key = self._check(layer, kind, head)
        basis = self._spectra[key][1][:, : self._ranks[key]]
        return basis.to(dtype=dtype or self.dtype, device=device)

    def projector(self, layer: int, kind: str, head: Head = FLAT, *, dtype: torch.dtype | None = None,
                  device=None) -> Float[Tensor, "dim dim"]:
        """P = V_r V_rᵀ, symmetric and idempotent (built in float64, returned in `dtype` as `basis`)."""
        basis = self.basis(layer, kind, head, dtype=torch.float64)
        return (basis @ basis.T).to(dtype=dtype or self.dtype, device=device)

    def explained_energy(self, layer: int, kind: str, head: Head = FLAT) -> float:
        """Fraction of the gradient energy (Σσ²) inside the basis."""
        values = self.singular_values(layer, kind, head) ** 2
        total = float(values.sum())
        return float(values[: self.rank(layer, kind, head)].sum()) / total if total > 0 else 0.0

    def head_energy(self, layer: int, kind: str) -> list[float]:
        """Each KV head's share of the layer's gradient energy (trace of its Gram block)."""
        gram = self.grams[(layer, kind)]
        d_head = gram.shape[0] // self.n_kv_heads
        traces = [float(torch.diagonal(gram)[h * d_head:(h + 1) * d_head].sum()) for h in range(self.n_kv_heads)]
        total = sum(traces)
        return [t / total if total > 0 else 0.0 for t in traces]

    def summary(self) -> list[dict]:
        """One row per (layer, kind, head): rank, dimension, explained energy, top singular value."""
        rows = []
        for layer, kind, head in self.keys():
            values = self.singular_values(layer, kind, head)
            rows.append({"layer": layer, "kind": kind, "head": head, "dim": values.numel(),
                         "rank": self.rank(layer, kind, head), "explained_energy": self.explained_energy(layer, kind, head),
                         "top_singular_value": float(values[0])})
        return rows

    # --- comparing subspaces ----------------------------------------------------------------

    def principal_angles(self, other: "CapabilitySubspace", layer: int, kind: str, head: Head = FLAT) -> Tensor:
        """Cosines of the principal angles between the two bases (descending, in [0, 1]); there are
        min(rank of self, rank of other) of them."""
        a, b = self.basis(layer, kind, head, dtype=torch.float64), other.basis(layer, kind, head, dtype=torch.float64)
        if a.shape[0] != b.shape[0]:
            raise SpdLensError(f"bases of different dimensions ({a.shape[0]} vs {b.shape[0]}) cannot be compared")
        return torch.linalg.svdvals(a.T @ b).clamp(max=1.0)

    def overlap(self, other: "CapabilitySubspace", head: Head = FLAT, *, normalize: str = "smaller",
                rank: int | None = None) -> dict[tuple[int, str], "Overlap"]:
        """Σ cos² of the principal angles (= ‖AᵀB‖²_F for bases A, B of ranks a, b) per shared
        (layer, kind), divided by:

        - `"smaller"` (default): min(a, b), the mean over the principal angles. 1 when the smaller
          subspace lies inside the larger, so a rank-5 subspace and the rank-32 subspace it was cut
          from read 1.0; equal ranks: 1 = the same subspace.
        - `"larger"`: max(a, b). 1 only when the subspaces are the same; the rank-5 vs rank-32
          example reads 5/32.

        `rank=r` compares the top-r directions of both (per-head bases take at most d_head).

        Each value is an `Overlap`: a float carrying `.baseline`, what uniformly random subspaces
        of the same ranks read in the same dimension d (the flattened K/V width, or d_head per
        head). For a fixed A and a uniformly random B, E[P_B] = (b/d)·I, so
        E‖AᵀB‖²_F = tr(P_A·E[P_B]) = a·b/d: the baseline is max(a, b)/d with `"smaller"` and
        min(a, b)/d with `"larger"`. Near rank d/2 it is about 0.5, so a raw 0.55 says little;
        read `value - baseline` (or `value.excess`). `spd_lens.random_like(self)` is the matched
        random control to measure the same by draws.

        Example:
            >>> import torch
            >>> g = torch.randn(60, 16, dtype=torch.float64)
            >>> s = CapabilitySubspace.from_grams({(0, "k"): g.T @ g}, {"n_kv_heads": 1, "d_head": 16})
            >>> value = s.with_rank(rank=4).overlap(s.with_rank(rank=8))[(0, "k")]
            >>> round(float(value), 6), value.baseline   # rank 4 inside rank 8; random: 8/16
            (1.0, 0.5)
            >>> s.overlap(random_like(s), rank=8)[(0, "k")].baseline
            0.5
        """
        if normalize not in ("smaller", "larger"):
            raise SpdLensError(f"normalize must be 'smaller' or 'larger', got {normalize!r}")
        if rank is not None:
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise SpdLensError(f"overlap rank must be a whole number >= 1, got {rank!r}")
            return self.with_rank(rank=rank).overlap(other.with_rank(rank=rank), head, normalize=normalize)
        shared = [(layer, kind) for layer, kind in self.grams if (layer, kind) in other.grams]
        if not shared:
            raise SpdLensError(f"the subspaces share no layer: {self.layers} vs {other.layers}")
        result = {}
        for key in shared:
            cosines = self.principal_angles(other, *key, head)
            ranks = (self.rank(*key, head), other.rank(*key, head))
            dim = self.grams[key].shape[0] // (1 if head == FLAT else self.n_kv_heads)
            small, large = min(ranks), max(ranks)
            value = float((cosines ** 2).sum()) / (small if normalize == "smaller" else large)
            result[key] = Overlap(value, baseline=(large if normalize == "smaller" else small) / dim,
                                  ranks=ranks, dim=dim)
        return result

    # --- compatibility, save, load ----------------------------------------------------------

    def check_compatible(self, model) -> None:
        """Raise unless `model` has this subspace's layer count, KV heads and head dimension."""
        from spd_lens.models import hf_model_of

        cfg = hf_model_of(model).config
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        ours = (self.meta.get("n_layers"), self.n_kv_heads, self.meta.get("d_head"))
        theirs = (cfg.num_hidden_layers, n_kv, d_head)
        if ours != theirs:
            raise SpdLensError(
                f"subspace made for a model with (layers, KV heads, d_head) = {ours} (model "
                f"{self.meta.get('model_id')!r}) does not fit this model's {theirs}: extract a subspace for this model"
            )

    def save(self, directory: str | Path) -> Path:
        """Write `subspace.safetensors` (tensors) and `subspace.json` (metadata), each atomically.

        The JSON is written last and records the tensors' hash, so a half-written directory
        never loads as complete.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (layer, kind), gram in self.grams.items():
            tensors[f"layer{layer}.{kind}.gram"] = gram.double().contiguous()
        for layer, kind, head in self.keys():
            name = f"layer{layer}.{kind}.{head if head == FLAT else f'head{head}'}"
            tensors[f"{name}.basis"] = self.basis(layer, kind, head).float().contiguous()
            tensors[f"{name}.singular_values"] = self.singular_values(layer, kind, head).float().contiguous()
        tensor_path = directory / TENSORS_FILE
        atomic_write(tensor_path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "spd_lens.subspace"}))
        meta = {**self.meta, "policy": asdict(self.policy), "tensors_sha256": sha256_file(tensor_path),
                "ranks": {f"layer{l}.{k}.{h if h == FLAT else f'head{h}'}": r for (l, k, h), r in self._ranks.items()}}
        atomic_write(directory / META_FILE, lambda tmp: tmp.write_text(json.dumps(meta, indent=2, default=str)))
        return directory

    @classmethod
    def load(cls, directory: str | Path, model=None) -> "CapabilitySubspace":
        """Read a saved subspace; with `model`, also check that it fits that model."""
        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSORS_FILE
        if not meta_path.is_file() or not tensor_path.is_file():
            raise SpdLensError(f"{directory} is not a saved subspace (needs {META_FILE} and {TENSORS_FILE}); "
                               "make one with `spd-lens extract ... --out DIR`")
        meta = read_json_object(meta_path, "a subspace's metadata")
        if meta.get("tensors_sha256") != sha256_file(tensor_path):
            raise SpdLensError(f"{tensor_path} does not match the hash in {meta_path}: incomplete or modified; re-run the extraction")
        try:
            tensors = load_file(str(tensor_path))
            policy = RankPolicy(**meta.pop("policy"))
        except Exception as err:  # safetensors and the metadata can fail in many ways
            raise SpdLensError(f"{directory} holds an unreadable subspace ({err}): re-run the extraction") from err
        grams = {}
        for name, tensor in tensors.items():
            if name.endswith(".gram"):
                layer, kind = name.split(".")[:2]
                grams[(int(layer.removeprefix("layer")), kind)] = tensor
        for key in ("tensors_sha256", "ranks"):
            meta.pop(key, None)
        subspace = cls(grams, meta, policy)
        if model is not None:
            subspace.check_compatible(model)
        return subspace

    def __repr__(self) -> str:
        return (f"CapabilitySubspace(model={self.meta.get('model_id')!r}, task={self.meta.get('task')!r}, "
                f"layers={self.layers}, kv_heads={self.n_kv_heads}, {self.policy.describe()})")


def random_like(subspace: CapabilitySubspace, seed: int = 0) -> CapabilitySubspace:
    """A control: random orthonormal bases with the same layers, layouts and ranks.

    Its "Gram" is a random PSD matrix with a flat-ish spectrum, so each basis is a uniformly
    random subspace; ranks are fixed to the original's per key. One seed gives one random basis per
    key, whose first r directions serve every rank r (draws are nested across ranks).

    Example:
        >>> import torch
        >>> g = torch.randn(50, 4, dtype=torch.float64)
        >>> s = CapabilitySubspace.from_grams({(0, "k"): g.T @ g}, {"n_kv_heads": 2, "d_head": 2}).with_rank(rank=2)
        >>> control = random_like(s, seed=1)
        >>> control.rank(0, "k", 0), control.meta["source"], torch.allclose(control.basis(0, "k"), s.basis(0, "k"))
        (2, 'random', False)
    """
    generator = torch.Generator().manual_seed(seed)
    grams = {}
    for key, gram in subspace.grams.items():
        dim = gram.shape[0]
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))
        grams[key] = q @ torch.diag(torch.linspace(2.0, 1.0, dim, dtype=torch.float64)) @ q.T
    meta = {**subspace.meta, "random_seed": seed, "source": "random", "task": f"random({subspace.meta.get('task')})",
            **derivation(subspace.meta.get("config_hash"), f"random_like(seed={seed})")}
    result = CapabilitySubspace(grams, meta, subspace.policy)
    result._ranks = dict(subspace._ranks)
    return result


class Overlap(float):
    """An overlap value (a float) with the random baseline beside it: `baseline` is the expected
    overlap of uniformly random subspaces of the same `ranks` in dimension `dim` (see
    `CapabilitySubspace.overlap`), `excess` the value minus it.

    Example:
        >>> v = Overlap(0.62, baseline=0.5, ranks=(8, 8), dim=16)
        >>> v > 0.6, round(v.excess, 2), v
        (True, 0.12, Overlap(0.62, baseline=0.5))
    """

    def __new__(cls, value: float, *, baseline: float, ranks: tuple[int, int] = (0, 0), dim: int = 0):
        made = super().__new__(cls, value)
        made.baseline, made.ranks, made.dim = float(baseline), tuple(ranks), int(dim)
        return made

    @property
    def excess(self) -> float:
        return float(self) - self.baseline

    def __repr__(self) -> str:
        return f"Overlap({float(self):.4g}, baseline={self.baseline:.4g})"

    def __reduce__(self):  # pickles (and deep-copies) with its baseline
        return (_overlap, (float(self), self.baseline, self.ranks, self.dim))


def _overlap(value, baseline, ranks, dim):
    return Overlap(value, baseline=baseline, ranks=ranks, dim=dim)


LEGACY_SEEDS = 1000  # control seeds below this were draw indices (0..D-1); control_seed never returns one


def control_seed(split: str, draw: int, stream: int | str = 0) -> int:
    """The `random_like` seed of random control `draw` on `split`: a hash of the three, so the
    random subspaces of a test gate are never those of a dev gate (which a seed equal to the draw
    index made them), and never one of the small seeds 0..999 that earlier tables used. `stream`
    gives an independent sequence on the same split (a fresh call of `spd_lens.ablate` draws one).

    Example:
        >>> control_seed("dev", 0) != control_seed("test", 0), control_seed("dev", 0) == control_seed("dev", 0)
        (True, True)
        >>> min(control_seed(s, d) for s in ("dev", "test") for d in range(100)) >= 1000
        True
    """
    if not isinstance(draw, int) or isinstance(draw, bool) or draw < 0:
        raise SpdLensError(f"control_seed: draw must be a whole number >= 0, got {draw!r}")
    digest = hashlib.sha256(json.dumps(["spd_lens control", str(split), str(stream), draw]).encode()).digest()
    # 62 bits: any two of the (split, stream, draw) triples a study uses collide with chance ~1e-15.
    return LEGACY_SEEDS + int.from_bytes(digest[:8], "big") % (2**62)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]


def derivation(parent_id: str | None, how: str) -> dict:
    """The id of a subspace derived from the one with id `parent_id` by `how` (e.g.
    `"random_like(seed=0)"`), with its parent and derivation beside it: metadata keys
    `config_hash`, `parent_id`, `derivation`.

    Example:
        >>> d = derivation("0123456789ab", "with_rank(rank=4)")
        >>> d["parent_id"], d["derivation"], d["config_hash"] != "0123456789ab"
        ('0123456789ab', 'with_rank(rank=4)', True)
    """
    return {"config_hash": config_hash({"parent_id": parent_id, "derivation": how}), "parent_id": parent_id,
            "derivation": how}
