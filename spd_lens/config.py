"""Experiment configs: dataclasses whose defaults follow the paper; TOML files only override.

`load_config(path)` rejects keys that do not exist (naming the nearest valid one) and values of
the wrong type, before any long work starts.

Example:
    >>> config = config_from_dict({"task": {"name": "arithmetic", "train_n": 16}})
    >>> config.task.train_n, config.train.lr
    (16, 1e-05)
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.sandbox import SandboxOptions
from spd_lens.train import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METHODS = ("base", "psr", "ssd", "spd", "spd-random", "spd-fullseq", "hook-only")


@dataclass(frozen=True)
class ModelSection:
    name: str = "smollm2-135m-instruct"


@dataclass(frozen=True)
class TaskSection:
    name: str = "arithmetic"
    data: str | None = None  # local JSONL / directory for hub tasks
    train_n: int = 64  # prompts for self-generation (the training set)
    eval_n: int | None = 100  # held-out examples (None = the whole split)
    eval_split: str = "test"


@dataclass(frozen=True)
class SubspaceSection:
    task: str | None = None  # calibration task; another task than [task] gives the out-of-domain setting
    data: str | None = None
    n: int = 32  # calibration examples (paper: 20-500)
    layers: list[int] | None = None  # default {L//2, L-1}
    rank: int | None = None
    rank_frac: float | None = None  # default 0.5 when no policy is given
    energy: float | None = None
    batch_size: int = 4


@dataclass(frozen=True)
class ProjectionSection:
    alpha: float = 1.0
    kinds: list[str] = field(default_factory=lambda: ["k", "v"])
    layout: str = "flat"
    heads: list[int] | None = None


@dataclass(frozen=True)
class SamplingSection:
    """Self-generation for psr / spd / spd-random / spd-fullseq (one raw completion per prompt)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int | None = None  # default: the task's budget
    num_samples: int = 1
    batch_size: int = 16


@dataclass(frozen=True)
class SsdSection:
    """Simple self-distillation: sampling at a shifted temperature (its released generator's settings)."""

    temperature: float = 1.5
    top_p: float = 0.8
    top_k: int = 20


@dataclass(frozen=True)
class EvalSection:
    temperature: float = 0.0
    max_new_tokens: int | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class AblateSection:
    """`spd-lens ablate`: projected decoding (no training) over a grid; every combination is run."""

    ranks: list[int] = field(default_factory=lambda: [16, 48, 96])
    layer_sets: list[list[int]] | None = None  # default: each subspace layer alone
    alphas: list[float] = field(default_factory=lambda: [1.0])
    heads: list[int] | None = None  # per-head layout, each head alone; default: flattened, all heads
    kinds: list[str] = field(default_factory=lambda: ["k", "v"])
    loss_n: int = 16  # calibration examples for the correctness-loss column


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seeds: list[int] = field(default_factory=lambda: [0])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    subspace: SubspaceSection = field(default_factory=SubspaceSection)
    projection: ProjectionSection = field(default_factory=ProjectionSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    ssd: SsdSection = field(default_factory=SsdSection)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    ablate: AblateSection = field(default_factory=AblateSection)
    # How code tasks run programs ([sandbox] strict / unsafe / backend): how, not what, is computed,
    # so a run directory accepts a change of it.
    sandbox: SandboxOptions = field(default_factory=SandboxOptions)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _check_type(value, annotation, where: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, where)
            except SpdLensError as err:
                errors.append(err)
        raise errors[0]
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SpdLensError(f"{where} must be a list, got {value!r}")
        inner = typing.get_args(annotation)[0]
        items = [_check_type(item, inner, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is bool:
        if not isinstance(value, bool):
            raise SpdLensError(f"{where} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpdLensError(f"{where} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpdLensError(f"{where} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise SpdLensError(f"{where} must be a string, got {value!r}")
        return value
    raise SpdLensError(f"{where}: unsupported setting type {annotation}")


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise SpdLensError(f"{where.rstrip('.') or 'the config'} must be a table, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; valid keys: {names}"
            raise SpdLensError(f"unknown config key {where + key!r}{hint}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            kwargs[key] = _build(annotation, value, f"{where}{key}.")
        else:
            kwargs[key] = _check_type(value, annotation, where + key)
    return cls(**kwargs)


def check_methods(methods: list[str]) -> None:
    """Every name is a method and there is at least one."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SpdLensError(f"unknown method(s) {unknown or '(none given)'}: use some of {list(METHODS)}")


def config_from_dict(values: dict) -> ExperimentConfig:
    config = _build(ExperimentConfig, values, "")
    check_methods(config.methods)
    if not config.seeds:
        raise SpdLensError("seeds must list at least one seed")
    if config.task.train_n < 1 or config.subspace.n < 1:
        raise SpdLensError("task.train_n and subspace.n must be positive")
    from spd_lens.tasks import task_names

    for where, name in (("task.name", config.task.name), ("subspace.task", config.subspace.task)):
        if name is not None and name not in task_names():
            raise SpdLensError(f"{where} = {name!r} is not a task: use one of {task_names()}")
    return config


def load_config(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise SpdLensError(f"config {str(path)!r} is not a file")
    try:
        values = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SpdLensError(f"{path} is not valid TOML: {err}") from err
    values.setdefault("name", path.stem)
    return config_from_dict(values)
