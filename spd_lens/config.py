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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from spd_lens.engines import ENGINES, VLLMSettings
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
    device: str = "auto"  # "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1"
    dtype: str = "auto"  # "auto" (bfloat16 on CUDA, else float32), "float32", "bfloat16", "float16"

    def runtime(self):
        """The `spd_lens.runtime.Runtime` these settings resolve to on this machine."""
        from spd_lens.runtime import Runtime

        return Runtime.resolve(self.device, self.dtype)


@dataclass(frozen=True)
class TaskSection:
    name: str = "arithmetic"
    # local JSONL / directory for hub tasks, or one file per split: {train = "...", test = "..."}
    data: str | dict[str, str] | None = None
    train_n: int = 64  # prompts for self-generation (the training set)
    eval_n: int | None = 100  # held-out examples (None = the whole split)
    eval_split: str = "test"
    preset: str | None = None  # difficulty preset of a procedural task (arithmetic, family-mc: "easy", "hard")
    options: dict = field(default_factory=dict)  # more constructor options, e.g. {max_digits = 1}
    shots: int | None = None  # demonstrations per prompt; None: 0 with a chat template, the task's base_shots without
    # Your own capability (spd_lens.tasks.custom): a JSONL of {id, prompt, answer, span(s)}, or one file
    # per split {train = "...", test = "..."}; `name` then names it (default: the file's stem) and
    # `options` may set max_new_tokens. `scorer`: "package.module:function" (default: span match).
    examples: str | dict[str, str] | None = None
    scorer: str | None = None


@dataclass(frozen=True)
class SubspaceSection:
    task: str | None = None  # calibration task; another task than [task] gives the out-of-domain setting
    data: str | dict[str, str] | None = None
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
    """Self-generation for every method that self-generates: psr, spd, spd-random, spd-fullseq and
    (at its own temperature) ssd; one raw completion per prompt by default.

    The default truncation (top-k 20, top-p 0.8) is the one SSD's released generator uses; the
    SPD paper publishes none. Untruncated sampling (top-p 1, no top-k) from a small model is mostly
    word salad, and every method gets the same truncation so none is handicapped by its data.
    """

    temperature: float = 1.0
    top_p: float = 0.8
    top_k: int = 20
    max_new_tokens: int | None = None  # default: the task's budget
    num_samples: int = 1
    batch_size: int = 16
    engine: str = "hf"  # or "vllm" (spd_lens.engines; its settings in [vllm])


@dataclass(frozen=True)
class SsdSection:
    """Simple self-distillation: the shared [sampling] settings at a shifted temperature (its
    released generator: temperature 1.5-1.6 with top-k 20, top-p 0.8).

    `top_p` / `top_k` default to [sampling]'s; other values are refused unless
    `own_truncation = true` says the difference is meant.
    """

    temperature: float = 1.5
    top_p: float | None = None
    top_k: int | None = None
    own_truncation: bool = False


@dataclass(frozen=True)
class EvalSection:
    """Evaluation: greedy by default, at the task's token budget. `cut_off` says how an answer
    that hit the budget (finish reason "length") is scored: "score" reads it as written (its last
    sentence may still hold a right answer), "wrong" counts it wrong (`spd_lens.evaluate.CUT_OFF`)."""

    temperature: float = 0.0
    max_new_tokens: int | None = None
    batch_size: int = 16
    cut_off: str = "score"
    engine: str = "hf"  # or "vllm": trained adapters applied by its LoRA support, unmerged


@dataclass(frozen=True)
class AblateSection:
    """`spd-lens ablate`: projected decoding (no training) over a grid; every combination is run."""

    ranks: list[int] = field(default_factory=lambda: [16, 48, 96])
    energies: list[float] = field(default_factory=list)  # more cells: the energy rank policy at these shares
    layer_sets: list[list[int]] | None = None  # default: each subspace layer alone
    alphas: list[float] = field(default_factory=lambda: [1.0])
    heads: list[int] | None = None  # per-head layout, each head alone; default: flattened, all heads
    kinds: list[str] = field(default_factory=lambda: ["k", "v"])
    kind_sets: list[list[str]] | None = None  # e.g. [["k"], ["v"], ["k", "v"]]; default: [kinds]
    # "keep": project onto the subspace (P); "remove": take it out and keep the rest (I - P).
    modes: list[str] = field(default_factory=lambda: ["keep"])
    random_draws: int = 0  # matched random subspaces (same layers and ranks) per cell, as its control
    # The draws' random_like seeds; default: control_seed(eval_split, draw), disjoint across splits.
    random_seeds: list[int] | None = None
    loss_n: int = 16  # calibration examples for the correctness-loss column
    # "greedy", or "sampling": psr's self-generation settings ([sampling] temperature, top-k, top-p
    # and budget, seed seeds[0]) with `samples` completions per question, scored by their mean.
    decoding: str = "greedy"
    samples: int = 1
    # Gradient subspaces to run each cell with, one extraction per seed (default: seeds[0] alone).
    subspace_seeds: list[int] | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
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
    # How vLLM runs where an engine is "vllm" (tensor/data parallel, lengths): how, not what.
    vllm: VLLMSettings = field(default_factory=VLLMSettings)

    def to_dict(self) -> dict:
        values = json.loads(json.dumps(dataclasses.asdict(self)))
        # Settings added after run directories already existed are written only when set, so a
        # run directory made before them still matches its config on resume and --reuse.
        for key in ("preset", "options", "shots", "examples", "scorer"):
            if values["task"][key] in (None, {}):
                del values["task"][key]
        for key, default in (("decoding", "greedy"), ("samples", 1), ("subspace_seeds", None),
                             ("random_seeds", None), ("modes", ["keep"])):
            if values["ablate"][key] == default:
                del values["ablate"][key]
        if values["eval"]["cut_off"] == "score":
            del values["eval"]["cut_off"]
        for section in ("sampling", "eval"):
            if values[section]["engine"] == "hf":
                del values[section]["engine"]
        if values["vllm"] == json.loads(json.dumps(dataclasses.asdict(VLLMSettings()))):
            del values["vllm"]
        return values


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
                # a table's error is about its entries: report that one, not "must be a string"
                errors.insert(0 if typing.get_origin(option) is dict and isinstance(value, dict) else len(errors), err)
        raise errors[0]
    if origin is dict:
        if not isinstance(value, dict):
            raise SpdLensError(f"{where} must be a table, got {value!r}")
        key_type, value_type = typing.get_args(annotation)
        return {_check_type(k, key_type, f"{where} key"): _check_type(v, value_type, f"{where}.{k}")
                for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise SpdLensError(f"{where} must be a list, got {value!r}")
        inner = typing.get_args(annotation)[0]
        items = [_check_type(item, inner, f"{where}[{i}]") for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if annotation is dict:
        if not isinstance(value, dict):
            raise SpdLensError(f"{where} must be a table, got {value!r}")
        return dict(value)
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
    if config.task.examples is not None and config.task.name == TaskSection.name:
        # Your own capability is named by its file (the default name belongs to a shipped task).
        from spd_lens.tasks.custom import _stem

        config = dataclasses.replace(config, task=dataclasses.replace(config.task, name=_stem(config.task.examples)))
    check_methods(config.methods)
    if not config.seeds:
        raise SpdLensError("seeds must list at least one seed")
    if len(set(config.seeds)) != len(config.seeds):
        raise SpdLensError(f"seeds {config.seeds} repeat a seed: list each seed once")
    ssd, sampling = config.ssd, config.sampling
    differing = [f"ssd.{key} = {getattr(ssd, key)} vs sampling.{key} = {getattr(sampling, key)}"
                 for key in ("top_p", "top_k") if getattr(ssd, key) is not None and getattr(ssd, key) != getattr(sampling, key)]
    if differing and not ssd.own_truncation:
        raise SpdLensError(f"ssd would sample with another truncation than the other methods ({'; '.join(differing)}): "
                           "a method must not get better or worse sampling settings than its baselines. Remove the "
                           "[ssd] value(s), or set ssd.own_truncation = true to mean it")
    from spd_lens.runtime import check_device, check_dtype

    check_device(config.model.device)
    check_dtype(config.model.dtype)
    for where, data in (("task.data", config.task.data), ("subspace.data", config.subspace.data)):
        if isinstance(data, dict) and (not data or set(data) - {"train", "dev", "test"}):
            raise SpdLensError(f"{where} = {data!r}: a table of data files takes the keys 'train', 'dev' and/or "
                               "'test' (dev, when not given, is carved out of train), "
                               'e.g. {train = "gsm8k/train.jsonl", test = "gsm8k/test.jsonl"}')
    for where, engine in (("sampling.engine", config.sampling.engine), ("eval.engine", config.eval.engine)):
        if engine not in ENGINES:
            raise SpdLensError(f"{where} = {engine!r}: use one of {list(ENGINES)}")
    if config.eval.cut_off not in ("score", "wrong"):
        raise SpdLensError(f"eval.cut_off = {config.eval.cut_off!r}: score an answer cut off at the token budget "
                           "as written ('score') or count it wrong ('wrong')")
    if config.task.eval_split not in ("dev", "test"):
        raise SpdLensError(f"task.eval_split = {config.task.eval_split!r}: evaluate on 'dev' (where settings are "
                           "chosen) or 'test' (touched once per final configuration)")
    if config.task.train_n < 1 or config.subspace.n < 1:
        raise SpdLensError("task.train_n and subspace.n must be positive")
    from spd_lens.tasks import task_names

    c = config.task
    if c.examples is None and c.scorer is not None:
        raise SpdLensError(f"task.scorer = {c.scorer!r} scores your own examples: give them as task.examples = "
                           "\"FILE.jsonl\" (a shipped task has its own scorer)")
    if c.examples is not None and (c.data is not None or c.preset is not None):
        raise SpdLensError("task.examples is your own capability: task.data and task.preset belong to shipped tasks; "
                           "give the files as task.examples = {train = \"...\", test = \"...\"} instead")
    for where, name in (("task.name", None if c.examples is not None else c.name), ("subspace.task", config.subspace.task)):
        if name is not None and name not in task_names():
            raise SpdLensError(f"{where} = {name!r} is not a task: use one of {task_names()}")
    build_task(config, shots=config.task.shots or 0)  # bad options are errors now, not after model loading
    return config


def build_task(config: ExperimentConfig, tokenizer=None, *, calibration: bool = False, shots: int | None = None):
    """The [task] task with its data, difficulty (`preset`, `options`) and shots, or with
    `calibration=True` the subspace's calibration task: [task] itself unless `subspace.task` names
    another, which then gets its own `subspace.data`, its default difficulty and the same shots.

    `task.shots` unset resolves with the model's tokenizer (`tasks.default_shots`): no
    demonstrations with a chat template, the task's `base_shots` without one.

    >>> config = config_from_dict({"task": {"name": "arithmetic", "preset": "easy", "shots": 2}})
    >>> task = build_task(config)
    >>> task.variant, task.shots
    ('easy', 2)
    """
    from spd_lens.tasks import TASKS, Capability, default_shots, get_task

    c = config.task
    other = calibration and config.subspace.task is not None
    if c.examples is not None and not other:
        shots = c.shots if shots is None else shots
        if set(c.options) - {"max_new_tokens"}:
            raise SpdLensError(f"task.options = {c.options!r}: your own capability takes only max_new_tokens "
                               "(its generation budget)")
        made = Capability.from_jsonl(c.examples, scorer=c.scorer, name=None if c.name in TASKS else c.name,
                                     **c.options)
        made.shots = shots or 0  # your prompts are used as written unless shots are asked for
        return made
    name = config.subspace.task if other else c.name
    data = config.subspace.data if other else c.data
    options = {} if other else {**({"preset": c.preset} if c.preset is not None else {}), **c.options}
    shots = c.shots if shots is None else shots
    if shots is None:
        if tokenizer is None:
            raise SpdLensError("task.shots is not set: pass the model's tokenizer to choose the default number "
                               "of demonstrations")
        shots = default_shots(TASKS[name], tokenizer)
    return get_task(name, **({"path": data} if data else {}), **options, shots=shots)


def comparable(resolved: dict) -> dict:
    """A resolved config (`config.json`) as run directories compare it: settings added since it was
    written take their defaults (e.g. `model.dtype`), and `model.device` is left out (where a run
    computes does not change what it computes; its dtype does)."""
    out = dict(resolved)
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        section = hints[f.name]
        if dataclasses.is_dataclass(section) and isinstance(out.get(f.name), dict):
            out[f.name] = {**json.loads(json.dumps(dataclasses.asdict(section()))), **out[f.name]}
    if isinstance(out.get("model"), dict):
        out["model"] = {k: v for k, v in out["model"].items() if k != "device"}
    return out


def load_config(path: str | Path, overrides: Sequence[str | Path] = ()) -> ExperimentConfig:
    """The config in the TOML file `path`, with each file of `overrides` merged on top in order
    (tables merge key by key, any other value replaces; `merge_overrides`).

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "big.toml").write_text('[model]\\nname = "Qwen/Qwen2.5-0.5B-Instruct"\\n[task]\\ntrain_n = 2000')
        >>> _ = (folder / "small.toml").write_text('[model]\\nname = "tiny"')
        >>> config = load_config(folder / "big.toml", overrides=[folder / "small.toml"])
        >>> config.model.name, config.task.train_n, config.name
        ('tiny', 2000, 'big')
    """
    values = _read_toml(path)
    values.setdefault("name", Path(path).stem)
    for override in overrides:
        values = merge_overrides(values, _read_toml(override))
    return config_from_dict(values)


def merge_overrides(base: dict, override: dict) -> dict:
    """`base` with `override` on top: tables merged key by key (recursively), other values replaced.

    Example:
        >>> merge_overrides({"task": {"name": "gsm8k", "train_n": 2000}}, {"task": {"train_n": 8}})
        {'task': {'name': 'gsm8k', 'train_n': 8}}
    """
    merged = dict(base)
    for key, value in override.items():
        merged[key] = (merge_overrides(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


def _read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise SpdLensError(f"config {str(path)!r} is not a file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise SpdLensError(f"{path} is not valid TOML: {err}") from err
