"""`make_plan(config)`: what `spd-lens run` will do with a config, and about how long it will take,
without loading or running a model.

It checks what can be checked before a run: the device and dtype resolve on this machine, the
model can be found (an embedded model's package, a local directory; a hub id only with the hub
reachable), and every task has the examples the config asks for (local JSONL and offline tasks
are read; hub data is read when the hub answers, and otherwise reported as not checkable
offline). It counts each stage's work exactly as `spd_lens.experiment` will do it: subspace
extractions and their calibration examples, self-generated completions, training records and
tokens, evaluations.

The time is an estimate from the project's own recorded runs (see `REFERENCE`), scaled to the
model's parameter count and this machine's CPU threads, or, with `figures=` from
`benchmarks/gpu_check.py`, to measured GPU throughput. Decoding is counted as every completion
running to its token budget and training tokens as prompt plus full budget, so both are upper
bounds of the work; the recorded runs the rates come from were counted the same way.

Example:
    >>> from spd_lens.config import config_from_dict
    >>> plan = make_plan(config_from_dict({"seeds": [0], "methods": ["base", "spd"], "model": {"name": "tiny"}}))
    >>> [stage.name for stage in plan.stages]
    ['extract', 'generate', 'train', 'eval']
    >>> plan.stages[1].completions
    64
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from spd_lens.config import ExperimentConfig, build_task
from spd_lens.errors import SpdLensError
from spd_lens.methods import METHOD_TABLE

# Work rates of the reference setting: 2 CPU cores (torch threads 2), SmolLM2-135M-Instruct in
# float32, fitted by `python benchmarks/plan_rates.py` to the stage seconds recorded in
# experiments/results/{code,demo,math}/metrics.json with this module's own counts. With these
# rates the three runs' totals are estimated at 0.91x, 1.31x and 1.27x of their recorded seconds;
# single stages at 0.77x (code evaluation, whose scoring runs tests) to 2.6x (greedy arithmetic
# evaluation, which mostly stops long before its budget).
REFERENCE = {
    "setting": "2 CPU cores, SmolLM2-135M-Instruct, float32 (runs in experiments/results/)",
    "parameters": 134_515_008,
    "threads": 2,
    "decode_slots_per_s": 88.8,  # completion-token slots per second in batches of 16 (scoring included)
    "train_tokens_per_s": 278.3,  # prompt + budget tokens per second: LoRA forward, backward and step
    "extract_tokens_per_s": 303.2,  # calibration tokens per second: forward, backward to the first target layer
}
# Batched decoding throughput relative to batches of 8 (benchmarks/bench_batching.py: 16 gives
# 1.55x, 32 gives 1.93x); interpolated in log2(batch), flat beyond 32 on a CPU.
BATCH_SPEEDUP = {1: 0.2, 8: 1.0, 16: 1.55, 32: 1.93}
# Published split sizes of the hub datasets, for counting when the hub cannot be read (bbh: about a
# fifth of its 6,511 questions, which spd_lens divides 80/20 by hash).
HUB_SPLIT_SIZES = {("gsm8k", "test"): 1319, ("svamp", "test"): 300, ("mbpp", "test"): 500, ("mmlu", "test"): 14042,
                   ("arc", "test"): 1172, ("bbh", "test"): 1302}
# Sizes of hub models the project's configs name, for estimating offline (from their published configs).
KNOWN_PARAMETERS = {"Qwen/Qwen2.5-0.5B-Instruct": 494_032_768}
CHARS_PER_TOKEN = 4.0  # English text and code with the BPE vocabularies these models use
TEMPLATE_TOKENS = 30  # chat-template tokens around each prompt (system turn, role markers)


@dataclass
class Stage:
    """One kind of work: how many runs of it and how much each does."""

    name: str
    runs: int = 0
    examples: int = 0  # calibration examples (extract), prompts (generate), records (train), questions (eval)
    completions: int = 0
    decode_slots: int = 0  # completions x token budget: decoding work if every completion runs to its budget
    tokens: int = 0  # training tokens (records x epochs x (prompt + budget)) or calibration tokens
    seconds: float | None = None
    detail: list[str] = field(default_factory=list)


@dataclass
class Plan:
    config: ExperimentConfig
    stages: list[Stage]
    checks: list[tuple[str, str, str]]  # (what, "ok" | "unchecked" | "error", message)
    runtime: str
    estimate_basis: str

    @property
    def errors(self) -> list[str]:
        return [f"{what}: {message}" for what, status, message in self.checks if status == "error"]

    @property
    def seconds(self) -> float | None:
        parts = [s.seconds for s in self.stages if s.runs]
        return None if any(p is None for p in parts) else sum(parts)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def batch_speedup(batch: int, gpu: bool = False) -> float:
    """Decoding throughput at `batch` relative to batches of 8 (CPU figures; a GPU keeps gaining)."""
    points = sorted(BATCH_SPEEDUP.items())
    x = math.log2(max(batch, 1))
    for (b0, s0), (b1, s1) in zip(points, points[1:]):
        if batch <= b1:
            t = (x - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return s0 + t * (s1 - s0)
    last = points[-1][1]
    return last * (batch / points[-1][0]) ** 0.5 if gpu else last


def count_work(config: ExperimentConfig, *, lengths: dict[str, float] | None = None,
               eval_size: int | None = None) -> list[Stage]:
    """The stages `run_experiment` will run for `config` (a fresh run directory, no reuse).

    `lengths` gives mean characters of the train prompts (`prompt`), the calibration prompts and
    references (`calibration`); `eval_size` the evaluation split's size when `task.eval_n` is None.
    """
    from spd_lens.tasks import get_task

    lengths = lengths or {}
    c = config
    task = build_task(c, shots=0)
    seeds, methods = c.seeds, [METHOD_TABLE[m] for m in c.methods]
    subspaces = set()
    for m in methods:
        kind = {"random": "gradient"}.get(m.subspace, m.subspace)
        if kind is not None:
            subspaces |= {(kind, s) for s in (seeds if m.sampling else seeds[:1])}
    prompt_tokens = lengths.get("prompt", 200) / CHARS_PER_TOKEN + TEMPLATE_TOKENS
    calibration_tokens = lengths.get("calibration", 300) / CHARS_PER_TOKEN + TEMPLATE_TOKENS

    extract = Stage("extract", runs=len(subspaces), examples=len(subspaces) * c.subspace.n)
    extract.tokens = round(extract.examples * calibration_tokens)
    extract.detail = [f"{kind} subspace, seed(s) {', '.join(str(s) for k, s in sorted(subspaces) if k == kind)}: "
                      f"{c.subspace.n} calibration examples each" for kind in sorted({k for k, _ in subspaces})]

    trained = [(m.name, s) for m in methods if m.sampling for s in seeds]
    budget = c.sampling.max_new_tokens or task.max_new_tokens
    per_run = c.task.train_n * c.sampling.num_samples
    generate = Stage("generate", runs=len(trained), examples=len(trained) * c.task.train_n,
                     completions=len(trained) * per_run)
    generate.decode_slots = _slots(per_run, c.sampling.batch_size, budget) * len(trained)
    generate.detail = [f"{per_run} completions of at most {budget} tokens per run, batches of {c.sampling.batch_size}"]

    train = Stage("train", runs=len(trained), examples=len(trained) * per_run)
    train.tokens = round(train.examples * c.train.epochs * (prompt_tokens + budget))
    train.detail = [f"{per_run} records x {c.train.epochs} epochs per run, "
                    f"{'LoRA r=' + str(c.train.lora_r) if c.train.lora else 'full fine-tuning'}"]

    questions = c.task.eval_n if c.task.eval_n is not None else eval_size
    evaluations = sum(len(seeds) if m.seeded else 1 for m in methods)
    eval_budget = c.eval.max_new_tokens or task.max_new_tokens
    evaluate = Stage("eval", runs=evaluations)
    if questions is not None:
        evaluate.examples = evaluate.completions = evaluations * questions
        evaluate.decode_slots = _slots(questions, c.eval.batch_size, eval_budget) * evaluations
    evaluate.detail = [f"{questions if questions is not None else 'all (unknown: data not read)'} {c.task.eval_split} "
                       f"questions per evaluation, at most {eval_budget} tokens, batches of {c.eval.batch_size}"]
    return [extract, generate, train, evaluate]


def count_ablation(config: ExperimentConfig, *, eval_size: int | None = None) -> list[Stage]:
    """The work `spd-lens ablate` will do for `config` (a fresh output directory): one gradient
    subspace per seed, then one evaluation per row of `spd_lens.ablate.grid` (the
    unprojected baseline, each cell and its random draws; greedy, or `ablate.samples` sampled
    completions per question), each with the correctness loss on `ablate.loss_n` calibration examples."""
    from spd_lens.ablate import cell_of, check_decoding, grid, random_seeds, subspace_seeds
    from spd_lens.tasks import get_task

    c = config
    check_decoding(c)
    task = build_task(c, shots=0)
    # Without [subspace] layers the run extracts {L//2, L-1}: two layers stand for them here, and
    # layer sets are counted as given (the run refuses one outside {L//2, L-1}; L is not read here).
    layers = c.subspace.layers or sorted({layer for s in c.ablate.layer_sets or [] for layer in s}) or [0, 1]
    rows = grid(c, layers)
    calibration_tokens = 300 / CHARS_PER_TOKEN + TEMPLATE_TOKENS
    seeds = subspace_seeds(c)
    extract = Stage("extract", runs=len(seeds), examples=len(seeds) * c.subspace.n + c.ablate.loss_n)
    extract.tokens = round(extract.examples * calibration_tokens)
    extract.detail = [f"gradient subspace per seed {seeds}: {c.subspace.n} calibration examples each, layers "
                      f"{c.subspace.layers or 'L/2 and L-1'}; {c.ablate.loss_n} more for the loss column"]
    questions = c.task.eval_n if c.task.eval_n is not None else eval_size
    sampled = c.ablate.decoding == "sampling"
    samples = c.ablate.samples if sampled else 1
    budget = ((c.sampling.max_new_tokens if sampled else c.eval.max_new_tokens) or task.max_new_tokens)
    cells = len({json.dumps(cell_of(r)) for r in rows if r["subspace"] == "gradient"})
    per_seed = f" x {len(seeds)} seeds" if len(seeds) > 1 else ""
    evaluate = Stage("eval", runs=len(rows))
    if questions is not None:
        evaluate.examples = len(rows) * questions
        evaluate.completions = evaluate.examples * samples
        evaluate.decode_slots = _slots(questions * samples, c.eval.batch_size, budget) * len(rows)
    how = f"{samples} sampled completion(s) each (the [sampling] settings)" if sampled else "greedy"
    draws = f"{len(random_seeds(c))} random draws{', per seed at energy policies' if per_seed else ''}"
    evaluate.detail = [f"{len(rows)} rows: the baseline, {cells} cells x (gradient{per_seed} + {draws}); "
                       f"{questions if questions is not None else 'all'} {c.task.eval_split} questions each, "
                       f"{how}, at most {budget} tokens, batches of {c.eval.batch_size}"]
    return [extract, evaluate]


def _slots(n: int, batch: int, budget: int) -> int:
    """Decoding slots of `n` completions in batches: each batch decodes until its longest ends."""
    full, rest = divmod(n, batch)
    return (full * batch + rest) * budget


def estimate(stages: list[Stage], config: ExperimentConfig, *, parameters: int | None,
             figures: dict | None = None, threads: int | None = None) -> str:
    """Fill each stage's `seconds`; returns what the estimate rests on, in words."""
    size = (parameters or REFERENCE["parameters"]) / REFERENCE["parameters"]
    if figures is None:
        threads = threads or torch.get_num_threads()
        speed = threads / REFERENCE["threads"]
        rates = {k: REFERENCE[k] * speed / size for k in ("decode_slots_per_s", "train_tokens_per_s", "extract_tokens_per_s")}
        basis = (f"estimate from {REFERENCE['setting']}: {REFERENCE['decode_slots_per_s']:.0f} decoding slots/s at "
                 f"batch 16, {REFERENCE['train_tokens_per_s']:.0f} training tokens/s, "
                 f"{REFERENCE['extract_tokens_per_s']:.0f} calibration tokens/s; speed scaled by parameters "
                 f"(x{1 / size:.2f}) and by CPU threads (x{speed:.2f}: {threads} vs 2, assumed proportional, "
                 "which is optimistic). Expect the real time within about a factor of 2.")
        gpu = False
        reference_batch = 16
    else:
        figure_size = figures.get("parameters", REFERENCE["parameters"]) / (parameters or REFERENCE["parameters"])
        rates = {"decode_slots_per_s": figures["sampling_tokens_per_s"] * figure_size,
                 "train_tokens_per_s": figures["train_tokens_per_s"] * figure_size,
                 "extract_tokens_per_s": figures["extract_tokens_per_s"] * figure_size}
        reference_batch = figures.get("sampling_batch", 16)
        basis = (f"estimate from measured figures ({figures.get('device', 'a GPU')}, {figures.get('dtype', '?')}, "
                 f"model {figures.get('model', '?')}): {figures['sampling_tokens_per_s']:.0f} sampling tokens/s at "
                 f"batch {reference_batch}, {figures['train_tokens_per_s']:.0f} training tokens/s, "
                 f"{figures['extract_tokens_per_s']:.0f} calibration tokens/s; speed scaled by parameters "
                 f"(x{figure_size:.2f}). Expect the real time within about a factor of 2.")
        gpu = True
    for stage in stages:
        if stage.name == "extract":
            stage.seconds = stage.tokens / rates["extract_tokens_per_s"]
        elif stage.name == "train":
            stage.seconds = stage.tokens / rates["train_tokens_per_s"]
        else:
            batch = config.sampling.batch_size if stage.name == "generate" else config.eval.batch_size
            factor = batch_speedup(batch, gpu) / batch_speedup(reference_batch, gpu)
            stage.seconds = stage.decode_slots / (rates["decode_slots_per_s"] * factor) if stage.examples or not stage.runs else None
    return basis


def parameter_count(model_config) -> int | None:
    """Parameters of a decoder-only model from its Hugging Face config (Llama / Qwen / Mistral shape)."""
    try:
        hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
        heads = model_config.num_attention_heads
        kv = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or hidden // heads
        vocab, inter = model_config.vocab_size, model_config.intermediate_size
    except AttributeError:
        return None
    attention = hidden * head_dim * (2 * heads + 2 * kv)
    embeddings = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    return layers * (attention + 3 * hidden * inter + 2 * hidden) + embeddings + hidden


def check_model(name: str) -> tuple[str, str, int | None]:
    """(status, message, parameters) for a model name, without loading its weights."""
    from transformers import AutoConfig

    from spd_lens.models import EMBEDDED_MODELS, TINY_MODEL, _embedded_source, _looks_like_hub_id, build_tiny_model
    from spd_lens.tasks.records import hub_reachable

    if name == TINY_MODEL:
        return "ok", "the tiny random test model", parameter_count(build_tiny_model()[0].config)
    if name in EMBEDDED_MODELS:
        spec = EMBEDDED_MODELS[name]
        try:
            _embedded_source(spec)
        except SpdLensError as err:
            return "error", str(err), spec.parameters
        return "ok", f"embedded ({spec.description})", spec.parameters
    path = Path(name).expanduser()
    if path.is_dir():
        try:
            return "ok", f"local directory {path}", parameter_count(AutoConfig.from_pretrained(str(path)))
        except (OSError, ValueError) as err:
            return "error", f"{path} holds no Hugging Face model config: {err}", None
    if not _looks_like_hub_id(name):
        return "error", f"unknown model {name!r}: an embedded name, 'tiny', a local directory or a hub id", None
    try:  # a config already in the Hugging Face cache answers offline
        parameters = parameter_count(AutoConfig.from_pretrained(name, local_files_only=not hub_reachable()))
        return "ok", f"hub id {name} (config found)", parameters
    except (OSError, ValueError):
        if hub_reachable():
            return "error", f"hub id {name!r} has no model config on the hub: check the id", None
        known = KNOWN_PARAMETERS.get(name)
        size = ("its published size is used" if known else
                "its size is unknown, so the time below assumes the reference model's size")
        return "unchecked", (f"hub id {name!r} cannot be checked offline (the hub is unreachable from this "
                             f"machine and the model is not in the local cache); {size}"), known


def check_data(config: ExperimentConfig, *, ablate: bool = False,
               data_only: bool = False) -> tuple[list[tuple[str, str, str]], dict[str, float], int | None]:
    """Checks of every task's examples, mean prompt lengths, and the evaluation split's size. For
    `spd-lens ablate`: the evaluation split and the calibration examples (the subspace's, and the
    loss column's `ablate.loss_n`); no training prompts are drawn. For `run --data-only`
    (`data_only`): no evaluation split is read."""
    from spd_lens.tasks import get_task
    from spd_lens.tasks.records import describe_source, hub_reachable

    c = config
    checks, lengths, eval_size = [], {}, None
    calibration_task = c.subspace.task or c.task.name
    calibration_data = c.subspace.data if c.subspace.task else c.task.data
    needs_subspace = any(METHOD_TABLE[m].subspace for m in c.methods)
    wanted = [(c.task.name, c.task.data, "train", c.task.train_n, "prompt")] if not ablate else []
    if not data_only:
        wanted.append((c.task.name, c.task.data, c.task.eval_split, c.task.eval_n, "eval"))
    if ablate:
        wanted.append((calibration_task, calibration_data, "train", max(c.subspace.n, c.ablate.loss_n), "calibration"))
    elif needs_subspace:
        wanted.append((calibration_task, calibration_data, "train", c.subspace.n, "calibration"))
    online = None
    for name, data, split, n, role in wanted:
        # The configured task with its preset and options; another calibration task at its defaults.
        configured = name == c.task.name and data == c.task.data
        task = build_task(c, shots=0) if configured else get_task(name, **({"path": data} if data else {}))
        what = f"data {task.name} {split} ({role})"
        from_hub = hasattr(task, "path") and data is None  # tasks that take a path otherwise read the hub
        source = (f"your examples {c.task.examples}" if configured and c.task.examples is not None else
                  describe_source(data) if hasattr(task, "path") else "a package (offline)")
        if from_hub:
            online = hub_reachable() if online is None else online
            if not online:
                known = HUB_SPLIT_SIZES.get((name, split))
                if role == "eval" and known:
                    eval_size = known
                checks.append((what, "unchecked", f"from {source}: cannot be checked offline (the hub is "
                                                  "unreachable from this machine); give local JSONL as the "
                                                  "config's data to check it here"))
                continue
        try:
            examples = task.examples(split, n=n, seed=c.seeds[0])
        except SpdLensError as err:
            checks.append((what, "error", str(err)))
            continue
        checks.append((what, "ok", f"{len(examples)} examples from {source}"))
        if role == "eval":
            eval_size = len(examples)
        elif role == "prompt":
            lengths["prompt"] = sum(len(e.prompt) for e in examples) / len(examples)
        else:
            lengths["calibration"] = sum(len(e.prompt) + len(e.reference) for e in examples) / len(examples)
    return checks, lengths, eval_size


def make_plan(config: ExperimentConfig, *, figures: dict | str | Path | None = None,
              threads: int | None = None, ablate: bool = False, data_only: bool = False) -> Plan:
    """Validate `config` and its data and count and time every stage (see the module docstring);
    with `ablate`, the stages of `spd-lens ablate` rather than `spd-lens run`; with `data_only`,
    those of `spd-lens run --data-only` (extraction and self-generation: nothing trained or evaluated)."""
    if ablate and data_only:
        raise SpdLensError("plan --ablate and --data-only: an ablation has no data gate; pass one of them")
    checks = []
    try:
        runtime = str(config.model.runtime())
        checks.append(("runtime", "ok", f"{runtime} (device {config.model.device!r}, dtype {config.model.dtype!r})"))
    except SpdLensError as err:
        runtime = f"device {config.model.device!r}, dtype {config.model.dtype!r}"
        checks.append(("runtime", "error", str(err)))
    status, message, parameters = check_model(config.model.name)
    size = f", {parameters / 1e6:.0f}M parameters" if parameters else ""
    checks.append((f"model {config.model.name}", status, message + size))
    data_checks, lengths, eval_size = check_data(config, ablate=ablate, data_only=data_only)
    checks += data_checks
    if ablate:
        try:
            stages = count_ablation(config, eval_size=eval_size)
        except SpdLensError as err:
            checks.append(("ablate", "error", str(err)))
            stages = []
    else:
        stages = count_work(config, lengths=lengths, eval_size=eval_size)
        if data_only:
            stages = [stage for stage in stages if stage.name in ("extract", "generate")]
            if not any(METHOD_TABLE[m].sampling is not None for m in config.methods):
                checks.append(("methods", "error", f"methods {config.methods} train nothing: the data gate compares the "
                                                   "training data of trained methods (psr, ssd, spd, spd-random, spd-fullseq)"))
    if isinstance(figures, (str, Path)):
        figures = read_figures(figures)
    basis = estimate(stages, config, parameters=parameters, figures=figures, threads=threads)
    return Plan(config, stages, checks, runtime, basis)


def read_figures(path: str | Path) -> dict:
    """Throughput figures: the JSON line `benchmarks/gpu_check.py` prints (the file's last line)."""
    path = Path(path)
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        figures = json.loads(lines[-1])
    except (OSError, IndexError, json.JSONDecodeError) as err:
        raise SpdLensError(f"--figures {str(path)!r}: expected the JSON line benchmarks/gpu_check.py prints ({err})") from err
    missing = [k for k in ("sampling_tokens_per_s", "train_tokens_per_s", "extract_tokens_per_s") if k not in figures]
    if missing:
        raise SpdLensError(f"--figures {str(path)!r} lacks {missing}: pass the last line of benchmarks/gpu_check.py's output")
    return figures


def format_plan(plan: Plan) -> str:
    """The checks, one table row per stage, the total, and what the estimate rests on."""
    mark = {"ok": "ok", "unchecked": "??", "error": "!!"}
    lines = [f"{mark[status]:<2} {what}: {message}" for what, status, message in plan.checks]
    lines += ["", f"{'stage':<9} {'runs':>4} {'examples':>9} {'completions':>11} {'decode slots':>12} "
                  f"{'tokens':>10}  {'est. time':>10}"]
    for s in plan.stages:
        lines.append(f"{s.name:<9} {s.runs:>4} {s.examples:>9} {s.completions:>11} {s.decode_slots:>12} "
                     f"{s.tokens:>10}  {format_duration(s.seconds) if s.runs else '-':>10}")
        lines += [f"{'':<10}{d}" for d in s.detail]
    lines += [f"{'total':<9} {'':>62}{format_duration(plan.seconds):>10}", "", plan.estimate_basis]
    if os.environ.get("LOCAL_RANK") is not None:
        lines.append("(planned as one process; a multi-process launch divides the decoding and training time)")
    return "\n".join(lines)
