"""What a stage was made from, and the one rule that decides whether a finished stage is reused.

A run is a set of stages: subspace, generation, training, evaluation. Each records its inputs:

- `data`: a content hash of the examples it read (`examples_hash`: id, prompt, reference, spans,
  system and target of each), so a shipped task, a local JSONL file and a user's own list of
  examples are named alike, and a file edited in place is noticed (paths are not compared);
- `runtime`: the resolved device type and dtype ("cuda", "bfloat16"; never "auto");
- `weights`: the model's weights id (`weights_id`: a hash of its files, not its name);
- `upstream`: the ids of the stages it was made from (a training stage names its generation);
- `settings`: only the settings that can change its output (`effective` drops the rest);
- `processes`: the number of processes, only where it changes the result.

A stage is reused only when every one of these equals the recorded one (`Stage.differences`):
anything that differs is named with the recorded and the current value. A record written before
an input was kept reads as "not recorded", never as equal. Settings that cannot change an output
(batch sizes of decoding with refill, evaluation batches, checkpointing, threads, the device
index) are never part of a stage, so they never block a resume.

Example:
    >>> from spd_lens.tasks import Example
    >>> a = Stage("evaluation", data=examples_hash([Example("q/0", "1+1?", "2", [[0, 1]])]),
    ...           runtime={"device": "cpu", "dtype": "float32"}, weights="tiny", settings={"n": 1})
    >>> b = Stage("evaluation", data=examples_hash([Example("q/0", "1+1?", "3", [[0, 1]])]),
    ...           runtime={"device": "cpu", "dtype": "float32"}, weights="tiny", settings={"n": 1})
    >>> [d.split(":")[0] for d in b.differences(a.record())]
    ['data']
    >>> effective({"eval": {"batch_size": 64, "max_new_tokens": 8}})
    {'eval': {'max_new_tokens': 8}}
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spd_lens.artifacts import canonical, settings_differences
from spd_lens.errors import SpdLensError

# Settings (dotted, in a run's config) that cannot change any stage's output. Decoding refills
# its rows (`spd_lens.decode`): a prompt's completion depends on nothing but itself and its
# position, so how many rows are in flight does not change it.
NO_EFFECT = ("train.checkpoint_every", "eval.batch_size", "sampling.batch_size")

UNRECORDED = "not recorded (made by an older version)"


def examples_hash(examples: Sequence) -> str:
    """A content hash of examples: the id, prompt, reference, spans, system and target of each.

    Example:
        >>> from spd_lens.tasks import Example
        >>> e = Example("q/0", "1+1?", "2", [[0, 1]], target=2)
        >>> examples_hash([e]) == examples_hash([Example("q/0", "1+1?", "2", ((0, 1),), target=2)])
        True
        >>> examples_hash([e]) == examples_hash([Example("q/0", "1+1?", "2", [[0, 1]], target=3)])
        False
    """
    rows = [[e.id, e.prompt, e.reference, [list(s) for s in e.spans], e.system, e.target] for e in examples]
    return hashlib.sha256(json.dumps(canonical(rows)).encode()).hexdigest()[:16]


_WEIGHTS: dict[tuple, str] = {}


def weights_id(name: str) -> str:
    """The id of a model's weights: a hash of the files they load from (the embedded model's GGUF
    file, a local directory's `*.safetensors` / `*.bin`), computed once per process and file
    state; `tiny` is built from a fixed seed. A hub id names no local files: its name stands in.

    Example:
        >>> weights_id("tiny")
        'tiny:seed0'
    """
    from spd_lens.models import EMBEDDED_MODELS, TINY_MODEL, _embedded_source

    if name == TINY_MODEL:
        return "tiny:seed0"
    if name in EMBEDDED_MODELS:
        files = [_embedded_source(EMBEDDED_MODELS[name])]
    elif Path(name).expanduser().is_dir():
        directory = Path(name).expanduser()
        files = sorted([*directory.glob("*.safetensors"), *directory.glob("*.bin")])
        if not files:
            return f"dir:{directory.resolve()}"
    else:
        return f"hub:{name}"
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _WEIGHTS:
        digest = hashlib.sha256()
        for f in files:
            with open(f, "rb") as handle:
                digest.update(hashlib.file_digest(handle, "sha256").digest())
        _WEIGHTS[key] = "sha256:" + digest.hexdigest()[:16]
    return _WEIGHTS[key]


def runtime_record(runtime) -> dict[str, str]:
    """The resolved device type and dtype of a `Runtime` (the device index never changes a result)."""
    return {"device": runtime.device.type, "dtype": str(runtime.dtype).removeprefix("torch.")}


def effective(settings: dict, no_effect: Sequence[str] = NO_EFFECT) -> dict:
    """`settings` (nested by section) without the dotted keys in `no_effect`, in canonical form."""
    out = canonical(settings)
    for key in no_effect:
        section, _, name = key.partition(".")
        if isinstance(out.get(section), dict):
            out[section].pop(name, None)
    return out


@dataclass(frozen=True)
class Stage:
    """One stage's inputs (see the module docstring); `id` names them."""

    kind: str  # "subspace" | "generation" | "training" | "evaluation"
    data: str | None = None
    runtime: dict | None = None
    weights: str | None = None
    upstream: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    processes: int | None = None  # only where the number of processes changes the result

    def record(self) -> dict:
        inputs = canonical({"kind": self.kind, "data": self.data, "runtime": self.runtime, "weights": self.weights,
                            "upstream": self.upstream, "settings": effective(self.settings),
                            "processes": self.processes})
        return {**inputs, "id": hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]}

    @property
    def id(self) -> str:
        return self.record()["id"]

    def differences(self, recorded: dict | None, *, label: str = "recorded") -> list[str]:
        """Each input that differs from a `recorded` stage, as `"name: recorded X, now Y"`; an
        input the record lacks reads as not recorded."""
        mine = self.record()
        if not recorded:
            return [f"inputs: {UNRECORDED}"]
        found = []
        for key in ("kind", "data", "runtime", "weights", "upstream", "settings", "processes"):
            if key not in recorded:
                found.append(f"{key}: {UNRECORDED}, now {mine[key]!r}")
            elif canonical(recorded[key]) != mine[key]:
                # settings by their own names (`eval.max_new_tokens`), every other input by its key
                pair = (recorded[key], mine[key]) if key == "settings" else ({key: recorded[key]}, {key: mine[key]})
                found += settings_differences(*pair, recorded=label)
        return found

    def check(self, recorded: dict | None, what: str, fix: str) -> None:
        """Refuse, naming every input that differs, unless `recorded` is this stage."""
        differences = self.differences(recorded)
        if differences:
            raise SpdLensError(f"{what} was made from other inputs ({'; '.join(differences)}). {fix}")


def compare_inputs(recorded: dict, current: dict) -> tuple[list[str], dict | None]:
    """What differs between a run directory's recorded inputs and this call's (`"data.eval: run
    has X, now Y"`, `"runtime.dtype: ..."`), and the record to write when this call adds data the
    record lacks (a new seed's, or a new kind of stage's; None when nothing is new).

    Example:
        >>> then = {"runtime": {"device": "cpu", "dtype": "float32"}, "data": {"eval": "a"}}
        >>> compare_inputs(then, {**then, "runtime": {"device": "cpu", "dtype": "bfloat16"}})[0]
        ["runtime.dtype: run has 'float32', now 'bfloat16'"]
        >>> compare_inputs(then, {**then, "data": {"eval": "a", "train": {"0": "b"}}})
        ([], {'runtime': {'device': 'cpu', 'dtype': 'float32'}, 'data': {'eval': 'a', 'train': {'0': 'b'}}})
    """
    old, new = _flatten(canonical(recorded)), _flatten(canonical(current))
    shared = [k for k in new if k in old or not k.startswith("data.")]
    changed = settings_differences({k: old.get(k) for k in shared}, {k: new[k] for k in shared}, recorded="run has")
    return changed, (_unflatten({**new, **old}) if set(new) - set(old) else None)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Data hashes by dotted name ({"data": {"train": {"0": h}}} as {"data.train.0": h}); runtimes stay whole."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not key.endswith("runtime"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return tree
