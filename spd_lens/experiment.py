"""`run_experiment`: one run directory per config, stage by stage, each stage resumable.

    RUN/config.json                      resolved config (a rerun with another config is refused)
    RUN/subspaces/{gradient,fullseq}-seed{s}/   capability subspaces (random ones derive from gradient)
    RUN/generations/{method}-seed{s}.jsonl      self-generated training data (with finish reasons)
    RUN/generations/{method}-seed{s}.quality.json  its quality: share correct, share cut off, length
    RUN/adapters/{method}-seed{s}/              trained LoRA adapters
    RUN/eval/{method}[-seed{s}].jsonl / .json   evaluation generations and scores
    RUN/stage_seconds.json               wall-clock seconds per stage: "completed" (calls that finished
                                         the stage) and "interrupted" (calls that stopped with an
                                         error or Ctrl-C; work they finished is kept and resumed)
    RUN/metrics.json                     {"methods": {name: {"score", "ci", "n", "seeds", ...}}, ...}

Intervals of seeded methods come from a hierarchical bootstrap (seeds, then questions), so a
method whose seeds disagree gets a wide interval; a result whose per-seed spread exceeds its
question-only interval is flagged. Every method that self-generates samples with the one
[sampling] setting (ssd at its own temperature), and the quality of each training file is
measured, never filtered.

A finished stage (its artifact complete) is not redone, and an artifact made with other settings
(the projection included) is refused rather than reused. RUN/inputs.json keeps what the stages
read (`spd_lens.stages`: content hashes of the examples, the resolved runtime, the weights id): a
later call whose inputs differ is refused, so one table never mixes data, dtypes or weights.
The gradient subspace, the base evaluation and the prompts are shared by all methods that need
them; `reuse=[OTHER_RUN]` also takes base / psr / ssd evaluations from another run when their
stage (`evaluation_stage`) and the settings that can change them (`RESULT_SETTINGS`) are the same,
and psr / ssd training data when its generation settings are (an `lr` change retrains, it does
not sample again); every reuse decision is logged and kept in metrics["reuse"].
`metrics.json` describes every method the directory holds evaluations for, whichever subset of
methods the last call ran.

Launched on several processes (`torchrun --nproc_per_node N -m spd_lens.cli -- run CONFIG`),
every stage runs data-parallel (`spd_lens.processes`): extraction sums the Gram matrices of each
process's batches, generation and evaluation give each process every N-th prompt and merge the
parts, training is accelerate's DDP (`train.batch_size` is the global batch, shared out); the main
process writes every file and the others wait for it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import spd_lens
from spd_lens.config import ExperimentConfig, build_task, comparable
from spd_lens.errors import SpdLensError
from spd_lens.artifacts import (atomic_write, canonical, exclusive, read_json_object, read_stage_seconds,
                                settings_differences, write_json)
from spd_lens.evaluate import (evaluate, evaluate_mc, paired_difference, seeded_ci, seeds_differ,
                               training_data_quality)
from spd_lens.extract import extract_subspace
from spd_lens.methods import METHOD_TABLE
from spd_lens.models import load_hf, load_tokenizer
from spd_lens.precision import Precision
from spd_lens.processes import Processes
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, finished_generations, generate_jsonl, generation_settings
from spd_lens.stages import NO_EFFECT as STAGE_NO_EFFECT
from spd_lens.stages import Stage, compare_inputs, effective, examples_hash, runtime_record, weights_id
from spd_lens.sandbox import summarise_isolation
from spd_lens.subspace import META_FILE as SUBSPACE_META
from spd_lens.subspace import CapabilitySubspace, config_hash, random_like
from spd_lens.tasks import Task
from spd_lens.tasks.code import configure_sandbox
from spd_lens.train import load_trained, train_on_jsonl

Progress = Callable[[str], Callable] | None

# The settings that can change a reused evaluation, per kind of method (dotted config keys; a
# section name stands for all of its keys). Not listed, so never blocking reuse: the run's name,
# methods and seeds (an evaluation file is per method and seed), train.checkpoint_every,
# the subspace / projection / ablate sections (methods that depend on them are never reused).
RESULT_SETTINGS = {
    None: ["model", "task", "eval"],
    "plain": ["model", "task", "eval", "sampling", "train"],
    "ssd": ["model", "task", "eval", "sampling", "ssd", "train"],
}
NO_EFFECT = STAGE_NO_EFFECT  # settings that change no stage's output (spd_lens.stages): never block
INPUTS_FILE = "inputs.json"  # what the run's stages read: data contents, resolved runtime, weights id
RUN_ONLY = ("name", "seeds", "methods", "sandbox", "vllm", "spd_lens_version")  # what is run, not what a result is


# Paired differences every run reports: each method against the base model, and SPD against the
# baselines and controls that isolate what its subspace adds.
COMPARISONS = [(m, "base") for m in METHOD_TABLE if m != "base"] + [
    ("spd", "psr"), ("spd", "ssd"), ("spd", "spd-random"), ("spd", "spd-fullseq")]


def _result_settings(config: dict, sections: Sequence[str]) -> dict:
    """The sections of a resolved config that can change a reused result, less `NO_EFFECT` keys."""
    return effective({section: config.get(section) for section in sections}, NO_EFFECT)


def _loglik_summary(loglik: dict) -> dict:
    """The figures of a log-likelihood multiple-choice reading that a run keeps."""
    debiased = loglik["debiased"]
    return {"accuracy": loglik["accuracy"], "ci": loglik["ci"], "choice_rates": loglik["choice_rates"],
            "debiased_accuracy": debiased["accuracy"], "debiased_ci": debiased["ci"],
            "consistent": debiased["consistent"], "debiased_choice_rates": debiased["choice_rates"],
            "option_average_accuracy": debiased["option_average"]["accuracy"]}


def _mean_loglik(per_seed: list[dict]) -> dict:
    """Seed means of the log-likelihood figures (choice rates label by label)."""
    mean = {}
    for key, value in per_seed[0].items():
        if isinstance(value, dict):
            mean[key] = {label: sum(r[key].get(label, 0) for r in per_seed) / len(per_seed) for label in value}
        elif isinstance(value, (int, float)):
            mean[key] = sum(r[key] for r in per_seed) / len(per_seed)
    return mean


class Run:
    def __init__(self, config: ExperimentConfig, out: str | Path, progress: Progress = None, log: Callable = None,
                 reuse: Sequence[str | Path] = (), seeds: Sequence[int] | None = None):
        self.config = config
        self.out = Path(out)
        # The seeds this call runs (a subset of the config's, e.g. one per process or machine, each
        # in a directory of its own); the config, its metrics and its other seeds stay as they are.
        if seeds is not None:
            unknown = [s for s in seeds if s not in config.seeds]
            if unknown or not seeds:
                raise SpdLensError(f"--seeds {','.join(map(str, seeds)) or '(none)'}: run seeds from the config's "
                                   f"seeds {config.seeds} (unknown: {unknown or 'none given'})")
        self.seeds_now = [s for s in config.seeds if seeds is None or s in seeds]
        self.reuse = [Path(r) for r in reuse]
        for other in self.reuse:
            if not (other / "config.json").is_file():
                raise SpdLensError(f"--reuse {other}: not a run directory (no config.json); pass a directory "
                                   "written by `spd-lens run`")
        self.progress = progress
        self.processes = Processes.current()
        self.log = (log if self.processes.is_main else None) or (lambda message: None)
        self.runtime = config.model.runtime()  # fails here, before any work, when the device is absent
        # Under torchrun every process runs every stage on its shard; the main one writes the files.
        self._base = self._eval_base = None
        # Difficulty and shots from [task]; shots left unset depend on the model's chat template.
        # Only the tokenizer is loaded for that: the model waits until a stage needs it.
        tokenizer = load_tokenizer(config.model.name) if config.task.shots is None else None
        self.task = build_task(config, tokenizer)
        configure_sandbox(self.task, config.sandbox)  # code: refuse now, not after training, where no sandbox works
        self.subspace_task = build_task(config, tokenizer, calibration=True)
        self._eval_examples = None
        self._inputs: dict[bool, dict] = {}  # `inputs` by whether the call evaluates
        self.reuse_decisions: dict[str, dict] = {}

    # --- shared pieces ------------------------------------------------------------------------

    def base_model(self):
        if self._base is None:
            self._base = load_hf(self.config.model.name, self.runtime)
        return self._base

    def evaluation_base(self):
        """The base model as evaluations see it: in the precision policy's evaluation dtype
        (float32, `spd_lens.precision`), like every trained model it is compared with."""
        runtime = Precision.of(self.runtime).evaluation_runtime()
        if runtime == self.runtime:
            return self.base_model()
        if self._eval_base is None:
            self._eval_base = load_hf(self.config.model.name, runtime)
        return self._eval_base

    def _bar(self, label: str):
        return self.progress(label) if self.progress and self.processes.is_main else None

    def _write_json(self, path: Path, value) -> None:
        """`write_json` by the main process; every process goes on once the file is there."""
        if self.processes.is_main:
            write_json(path, value)
        self.processes.barrier()

    def _timed(self, stage: str, fn):
        started = time.time()
        outcome = "interrupted"
        try:
            result = fn()
            outcome = "completed"
            return result
        finally:
            # Kept on disk after every stage: the cost of a run resumed over several calls adds up,
            # and time spent by calls that stopped part way is kept apart.
            recorded = self._stage_seconds()
            recorded[outcome][stage] = round(recorded[outcome].get(stage, 0) + time.time() - started, 2)
            if self.processes.is_main:  # no barrier: an interrupted process must not wait for the others
                write_json(self.out / "stage_seconds.json", recorded)

    def subspace(self, kind: str, seed: int) -> CapabilitySubspace:
        if kind == "random":
            return random_like(self.subspace("gradient", seed), seed=seed)
        directory = self.out / "subspaces" / f"{kind}-seed{seed}"
        model, tokenizer = self.base_model()
        s = self.config.subspace

        def extract():  # a saved subspace with these settings is loaded; one with others is refused
            return extract_subspace(
                model, self.subspace_task, n=s.n, split="train", seed=seed, layers=s.layers, rank=s.rank,
                rank_frac=s.rank_frac, energy=s.energy, loss="full" if kind == "fullseq" else "correctness",
                batch_size=s.batch_size, tokenizer=tokenizer, progress=self._bar(f"gradients {kind}"), out=directory)

        if (directory / SUBSPACE_META).is_file():
            return extract()
        self.log(f"extracting the {kind} subspace (seed {seed})")
        return self._timed("extract", extract)

    def projection(self, kind: str, seed: int) -> Projection:
        p = self.config.projection
        return Projection.build(self.subspace(kind, seed), kinds=p.kinds, layout=p.layout, heads=p.heads, alpha=p.alpha)

    # --- stages -------------------------------------------------------------------------------

    def generations(self, method: str, seed: int) -> Path:
        spec = METHOD_TABLE[method]
        path = self.out / "generations" / f"{method}-seed{seed}.jsonl"
        # A finished file is not skipped here: generate_jsonl checks its settings (the projection
        # included) and returns it untouched when they match.
        config = self.sampling_config(method, seed)
        c = self.config
        model, tokenizer = self.base_model()
        examples = self.task.examples("train", n=c.task.train_n, seed=seed)
        provenance = {"method": method}  # the projection is recorded from the model
        if spec.sampling == "projected":
            projection = self.projection(spec.subspace, seed)  # extracts the subspace first if needed
            if not path.is_file():
                self.log(f"self-generation for {method} (seed {seed})")
            # With vLLM the hooks only make the records name the projection; vLLM generates from
            # the folded checkpoint (the same map in the weights).
            engine = self._engine(c.sampling.engine, model, projection)
            with projection.apply(model):
                return self._timed("generate", lambda: generate_jsonl(
                    model, tokenizer, examples, path, config, task=self.task.name, provenance=provenance,
                    progress=self._bar(f"generate {method}"), engine=engine))
        self._reuse_generations(path, generation_settings(model, examples, config, task=self.task.name,
                                                          provenance=provenance, engine=c.sampling.engine),
                                len(examples) * config.num_samples)
        if not path.is_file():
            self.log(f"self-generation for {method} (seed {seed})")
        engine = self._engine(c.sampling.engine, model)
        return self._timed("generate", lambda: generate_jsonl(
            model, tokenizer, examples, path, config, task=self.task.name, provenance=provenance,
            progress=self._bar(f"generate {method}"), engine=engine))

    def _engine(self, name: str, model, projection: Projection | None = None, adapter: Path | None = None):
        """None for the HF decoder; for "vllm" an engine on the model's checkpoint (`projection`
        folded in float32, cast to the model's dtype), started once per checkpoint for the whole
        run, with `adapter` applied unmerged."""
        if name == "hf":
            return None
        from spd_lens.engines import VLLMEngine, dtype_of, folded_checkpoint

        dtype = dtype_of(model)
        checkpoint = folded_checkpoint(self.config.model.name, projection, dtype=dtype)
        engines = self.__dict__.setdefault("_engines", {})
        if checkpoint not in engines:
            for other in engines.values():  # one engine at a time holds the memory
                other.close()
            engines.clear()
            engines[checkpoint] = VLLMEngine(checkpoint, dtype=dtype, enable_lora=True,
                                             settings=self.config.vllm)
        return engines[checkpoint].with_adapter(adapter)

    def _close_engines(self) -> None:
        for engine in self.__dict__.pop("_engines", {}).values():
            engine.close()

    def _reuse_generations(self, path: Path, settings: dict, count: int) -> None:
        """Take over a `reuse` run's finished training data made with the same settings (model,
        runtime, prompts, sampling: `generation_settings`): sampling depends on none of the
        training settings, so an `lr` change retrains without sampling again. Unprojected
        methods only (a projected one's subspace is not shared between runs)."""
        partial = path.with_name(path.name + ".partial")
        if not self.reuse or path.is_file() or partial.exists():
            return
        stem = f"generations/{path.stem}"
        source = next((other / "generations" / path.name for other in self.reuse
                       if finished_generations(other / "generations" / path.name, settings, count)), None)
        if source is None:
            self._decide(stem, {"reused": False, "why": "no --reuse run holds it finished with the same settings"})
            return
        self._decide(stem, {"reused": True, "from": str(source.parent.parent)})
        self.processes.barrier()  # every process has looked for the file before it appears
        if self.processes.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
        self.processes.barrier()

    def sampling_config(self, method: str, seed: int) -> SamplingConfig:
        """The one [sampling] setting; ssd changes the temperature (and, when the config says so
        explicitly, its truncation)."""
        s, ssd = self.config.sampling, self.config.ssd
        is_ssd = METHOD_TABLE[method].sampling == "ssd"
        return SamplingConfig(
            temperature=ssd.temperature if is_ssd else s.temperature,
            top_p=ssd.top_p if is_ssd and ssd.top_p is not None else s.top_p,
            top_k=ssd.top_k if is_ssd and ssd.top_k is not None else s.top_k,
            max_new_tokens=self.task.max_new_tokens if s.max_new_tokens is None else s.max_new_tokens,
            num_samples=s.num_samples, seed=seed, batch_size=s.batch_size)

    def data_quality(self, method: str, seed: int) -> dict:
        """Quality of the self-generated training data (cached beside it; code runs the tests).

        The main process measures it (or finds it cached) and writes it; every process passes
        the same one barrier and then reads it. Deciding "cached?" on each process would not do:
        one that looked after the main process had written the file would skip the barrier the
        main process waits at, and a two-process run would fail when timing allowed."""
        data = self.out / "generations" / f"{method}-seed{seed}.jsonl"
        path = data.with_name(data.name.removesuffix(".jsonl") + ".quality.json")
        if self.processes.is_main:
            cached = read_json_object(path, "a training file's quality") if path.is_file() else {}
            if "outcomes" not in cached:  # files written before verdicts were kept are measured again
                examples = self.task.examples("train", n=self.config.task.train_n, seed=seed)
                write_json(path, training_data_quality(self.task, data, examples,
                                                       progress=self._bar(f"score data {method}")))
        self.processes.barrier()
        return read_json_object(path, "a training file's quality")

    def adapter(self, method: str, seed: int) -> Path:
        data = self.generations(method, seed)
        out = self.out / "adapters" / f"{method}-seed{seed}"
        train_config = type(self.config.train)(**{**self.config.train.__dict__, "seed": seed})
        self.log(f"training {method} (seed {seed})")
        return self._timed("train", lambda: train_on_jsonl(
            self.config.model.name, data, out, train_config, runtime=self.runtime, progress=self._bar(f"train {method}"),
            provenance={"method": method, "seed": seed, "run": str(self.out)}))

    def evaluation(self, method: str, seed: int | None) -> dict:
        spec = METHOD_TABLE[method]
        stem = method if seed is None else f"{method}-seed{seed}"
        result_path = self.out / "eval" / f"{stem}.json"
        if result_path.is_file():
            return json.loads(result_path.read_text())
        reused = self._reused(method, stem, seed)
        if reused is not None:
            return reused
        c = self.config
        adapter = None
        if spec.sampling is not None:
            adapter = self.adapter(method, seed)
            model, tokenizer = load_trained(c.model.name, adapter, runtime=self.runtime)
        else:
            model, tokenizer = self.evaluation_base()
        config = SamplingConfig(temperature=c.eval.temperature, max_new_tokens=self.task.max_new_tokens if c.eval.max_new_tokens is None else c.eval.max_new_tokens,
                                seed=0, batch_size=c.eval.batch_size)
        provenance = {"method": method, "seed": seed}

        hooks = self.projection(spec.subspace, c.seeds[0]) if spec.eval_hooks else None
        # vLLM: the evaluation dtype's base checkpoint (projected where the method evaluates
        # projected), a trained adapter applied unmerged by its LoRA support
        if c.eval.engine != "hf" and adapter is not None and not (adapter / "adapter").is_dir():
            raise SpdLensError(f"eval.engine = {c.eval.engine!r} applies LoRA adapters; {adapter} holds a fully "
                               "fine-tuned model: evaluate it with eval.engine = 'hf'")
        engine = self._engine(c.eval.engine, model, hooks, adapter / "adapter" if adapter is not None else None)

        def run():
            result = evaluate(model, tokenizer, self.task, n=c.task.eval_n, split=c.task.eval_split, seed=0,
                              config=config, generations=self.out / "eval" / f"{stem}.jsonl", provenance=provenance,
                              progress=self._bar(f"eval {stem}"), cut_off=c.eval.cut_off, engine=engine)
            extra = {}
            if self.task.family == "mcqa":
                # Beside the generated letter: the label log-likelihood, as asked and averaged over
                # cyclic rotations of the options (no generation; a few forward passes).
                mc = evaluate_mc(model, tokenizer, self.task, n=c.task.eval_n, split=c.task.eval_split, seed=0,
                                 rotations=True, loglik=True, batch_size=c.eval.batch_size)
                extra["loglik"] = _loglik_summary(mc["loglik"])
            return result, extra

        self.log(f"evaluating {stem}")
        if spec.eval_hooks:
            projection = self.projection(spec.subspace, c.seeds[0])
            with projection.apply(model):
                result = self._timed("eval", run)
        else:
            result = self._timed("eval", run)
        result, extra = result
        record = {**result.as_dict(), **extra, "method": method, "seed": seed,
                  "stage": self.evaluation_stage(method, seed).record()}
        self._write_json(result_path, record)
        return record

    # --- what the stages read (spd_lens.stages) -------------------------------------------------

    def inputs(self, evaluates: bool = True) -> dict:
        """What this run's stages read (kept in RUN/inputs.json): the resolved runtime and the
        evaluation's (`spd_lens.precision`), the weights id, and content hashes of the evaluation
        examples, each seed's training prompts (methods that self-generate) and each seed's
        calibration examples (methods with a subspace). `evaluates=False` (the data gate, which
        evaluates nothing) leaves the evaluation examples out: a split too small for `eval_n` is
        no reason to refuse sampling, and a later full run adds their hash to the record."""
        if evaluates not in self._inputs:
            c = self.config
            data = {}
            if evaluates:
                data["eval"] = examples_hash(self.task.examples(c.task.eval_split, n=c.task.eval_n, seed=0))
            if any(METHOD_TABLE[m].sampling is not None for m in c.methods):
                data["train"] = {str(s): examples_hash(self.task.examples("train", n=c.task.train_n, seed=s))
                                 for s in c.seeds}
            if any(METHOD_TABLE[m].subspace is not None for m in c.methods):
                data["calibration"] = {str(s): examples_hash(self.subspace_task.examples("train", n=c.subspace.n, seed=s))
                                       for s in c.seeds}
            self._inputs[evaluates] = canonical({
                "runtime": runtime_record(self.runtime),
                "evaluation_runtime": runtime_record(Precision.of(self.runtime).evaluation_runtime()),
                "weights": weights_id(c.model.name), "data": data})
        return self._inputs[evaluates]

    def evaluation_stage(self, method: str, seed: int | None) -> Stage:
        """The evaluation of `method` (at `seed`) as a stage: the evaluation examples, the runtime
        it is evaluated in, the weights, the data its training read, the settings that change it."""
        spec, inputs = METHOD_TABLE[method], self.inputs()
        upstream = {}
        if spec.sampling is not None:
            upstream["train_data"] = inputs["data"]["train"][str(seed)]
        if spec.subspace is not None:
            upstream["calibration"] = inputs["data"]["calibration"][str(self.config.seeds[0] if seed is None else seed)]
        config = comparable(self.config.to_dict())
        sections = RESULT_SETTINGS.get(spec.sampling) or [k for k in config if k not in RUN_ONLY]
        settings = effective({k: config.get(k) for k in sections}, (*NO_EFFECT, "model.dtype", "model.device"))
        return Stage("evaluation", data=inputs["data"]["eval"], runtime=inputs["evaluation_runtime"],
                     weights=inputs["weights"], upstream=upstream, settings=settings)

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> dict:
        with self._exclusive("run"):
            try:
                return self._run()
            finally:
                self._close_engines()

    def _exclusive(self, command: str):
        """The run directory, held by the main process while it writes (`artifacts.exclusive`);
        the other processes of a multi-process run write there under its hold."""
        return exclusive(self.out, command) if self.processes.is_main else nullcontext()

    def _run(self) -> dict:
        self._claim_directory()
        self._claim_inputs()
        plan = self._plan()
        # Decided once, after _claim_directory's barrier and before any evaluation is written (a
        # computed or reused one is written only after a barrier), so every process refreshes alike.
        fresh = [(method, seed) for method, seed in plan if not self._evaluation_path(method, seed).is_file()]
        for method, seed in plan:
            self.evaluation(method, seed)
            if (method, seed) in fresh[:-1]:
                self.metrics()  # a partial table to read (spd-lens summary) while the rest runs
        return self.metrics()

    def _plan(self) -> list[tuple[str, int | None]]:
        """The evaluations this call makes, in order. Seed by seed, every method of a seed before
        the next seed: a run stopped part way holds whole comparisons (every method at seed 0)
        rather than one method at every seed."""
        plan = []
        for index, seed in enumerate(self.seeds_now):
            for method in self.config.methods:
                if METHOD_TABLE[method].seeded:
                    plan.append((method, seed))
                elif index == 0:
                    plan.append((method, None))
        return plan

    def metrics(self) -> dict:
        """metrics.json and report.html from every evaluation this directory holds, whether this
        call ran it or an earlier one did (`--methods` subsets); `pending` names the evaluations of
        the methods this call was asked for that are not finished (empty once they all are; a run
        that stopped keeps its list until it is resumed)."""
        methods, outcomes = {}, {}
        for method in METHOD_TABLE:
            spec = METHOD_TABLE[method]
            stored = {seed: self._stored_evaluation(method, seed) for seed in self._seeds(method)}
            per_seed = [r for r in stored.values() if r is not None]
            if not per_seed:
                continue
            seeds = [seed for seed, r in stored.items() if r is not None]
            outcomes[method] = [{**r, "seed": result["seed"]} for result in per_seed for r in result["results"]]
            stats = seeded_ci(outcomes[method])
            methods[method] = {
                "score": sum(r["score"] for r in per_seed) / len(per_seed),
                "ci": stats["ci"],
                "n": len(outcomes[method]),
                "questions": stats["n"],
                "seed_spread": stats["seed_spread"],
                "seed_p": stats["seed_p"],
                "seeds_differ": stats["seeds_differ"],
                "seeds": {str(r["seed"]): {"score": r["score"], "ci": r["ci"], "n": r["n"]} for r in per_seed}
                if spec.seeded else {},
                "finish_reasons": dict(sorted(Counter(r.get("finish_reason", "unknown") for r in outcomes[method]).items())),
            }
            if all("loglik" in r for r in per_seed):
                methods[method]["loglik"] = _mean_loglik([r["loglik"] for r in per_seed])
            if len(seeds) < len(stored):
                methods[method]["missing_seeds"] = [seed for seed, r in stored.items() if r is None]
            if spec.sampling is not None:
                training_data = self._training_data(method, seeds)
                if training_data:
                    methods[method]["training_data"] = training_data
            answers = self._answer_counts(outcomes[method])
            if answers:
                methods[method]["answers"] = answers
            kinds = self._outcome_counts(outcomes[method])
            if kinds:
                methods[method]["outcomes"] = kinds
        comparisons = {f"{a} - {b}": paired_difference(outcomes[a], outcomes[b])
                       for a, b in COMPARISONS if a in outcomes and b in outcomes}
        seconds = self._stage_seconds()
        metrics = {"run": self.config.name, "task": self.task.name, "subspace_task": self.subspace_task.name,
                   "model": self.config.model.name, "runtime": self.runtime.describe(),
                   "precision": Precision.of(self.runtime).describe(), "methods": methods,
                   "comparisons": comparisons,
                   "pending": [path.stem for path in (self._evaluation_path(m, s) for m, s in self._plan())
                               if not path.is_file()],
                   "stage_seconds": seconds["completed"], "stage_seconds_interrupted": seconds["interrupted"],
                   "reuse": self.reuse_decisions,
                   "sandbox": summarise_isolation(r for results in outcomes.values() for r in results),
                   "config_hash": config_hash(self.config.to_dict()), "spd_lens_version": spd_lens.__version__,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        # Only the main process reads and writes the files, and every process reaches the barrier:
        # a process that returned early (it found the main one's fresh metrics.json) would leave the
        # main one waiting for it, and the launch would fail.
        if self.processes.is_main:
            previous = self.out / "metrics.json"
            kept = (read_json_object(previous, "a run's metrics")
                    if previous.is_file() and (self.out / "report.html").is_file() else None)
            if kept is not None and canonical({**kept, "finished": None}) == canonical({**metrics, "finished": None}):
                metrics = kept  # nothing changed: the files stay byte for byte as they were
            else:
                write_json(self.out / "metrics.json", metrics)
                write_run_report(self.out)
        self.processes.barrier()
        return metrics

    def _seeds(self, method: str) -> list:
        return self.config.seeds if METHOD_TABLE[method].seeded else [None]

    def _evaluation_path(self, method: str, seed: int | None) -> Path:
        return self.out / "eval" / f"{method if seed is None else f'{method}-seed{seed}'}.json"

    def _stored_evaluation(self, method: str, seed: int | None) -> dict | None:
        path = self._evaluation_path(method, seed)
        return read_json_object(path, "an evaluation written by spd-lens run") if path.is_file() else None

    def _training_data(self, method: str, seeds: list[int]) -> dict | None:
        """Each seed's training-data quality and their means, for the seeds whose training data is
        in this directory (an evaluation reused from another run brings none)."""
        per_seed = {str(seed): self.data_quality(method, seed) for seed in seeds
                    if (self.out / "generations" / f"{method}-seed{seed}.jsonl").is_file()}
        if not per_seed:
            return None
        summary = {}
        for key in ("correct", "cut_off", "mean_tokens"):
            values = [q[key] for q in per_seed.values() if q.get(key) is not None]
            summary[key] = sum(values) / len(values) if values else None
        reasons = Counter()
        for q in per_seed.values():
            reasons.update(q.get("finish_reasons", {}))
        seeds = {seed: {k: v for k, v in q.items() if k != "outcomes"} for seed, q in per_seed.items()}
        return {**summary, "n": sum(q["n"] for q in per_seed.values()), "finish_reasons": dict(sorted(reasons.items())),
                "seeds": seeds}

    def data_gate(self) -> dict:
        """The gate before training: every trained method's self-generated data and its quality,
        nothing trained or evaluated. `RUN/data_gate.json` holds, per method, the share correct,
        cut off and mean length (mean over seeds, and per seed), and each comparison of the run
        (spd - psr, spd - spd-random, ...) as a difference in the share correct, paired over the
        prompts (every method samples the same prompts for a seed), with a bootstrap over seeds
        and prompts. Resumable: generations and their scores are kept in the run directory."""
        trained = [m for m in self.config.methods if METHOD_TABLE[m].sampling is not None]
        if not trained:
            raise SpdLensError(f"methods {self.config.methods} train nothing: the data gate compares the training data "
                               "of trained methods (psr, ssd, spd, spd-random, spd-fullseq)")
        with self._exclusive("run --data-only"):
            try:
                return self._data_gate(trained)
            finally:
                self._close_engines()

    def _data_gate(self, trained: list[str]) -> dict:
        self._claim_directory()
        self._claim_inputs(evaluates=False)
        outcomes: dict[str, list[dict]] = {}
        for method in trained:
            for seed in self._seeds(method):
                self.generations(method, seed)
                quality = self.data_quality(method, seed)
                outcomes.setdefault(method, []).extend({**o, "seed": seed} for o in quality["outcomes"])
        sampling = dataclasses.asdict(self.sampling_config(trained[0], self.config.seeds[0]))
        report = {"run": self.config.name, "task": self.task.name, "train_n": self.config.task.train_n,
                  "seeds": self.config.seeds, "sampling": sampling,
                  "methods": {m: self._training_data(m, self._seeds(m)) for m in trained},
                  "comparisons": training_data_comparisons(outcomes),
                  "config_hash": config_hash(self.config.to_dict()), "spd_lens_version": spd_lens.__version__}
        if self.processes.is_main:
            write_json(self.out / "data_gate.json", report)
        self.processes.barrier()
        return report

    def _stage_seconds(self) -> dict[str, dict[str, float]]:
        return read_stage_seconds(self.out)

    def _reused(self, method: str, stem: str, seed: int | None = None) -> dict | None:
        """A finished evaluation of `method` from a `reuse` run made from the same inputs: the
        settings that can change it (`RESULT_SETTINGS`), and its stage record's data, runtime,
        weights and upstream data (`evaluation_stage`; an evaluation written before stages were
        recorded has none, and is not reused). Each decision is logged and kept in `reuse_decisions`."""
        if not self.reuse:
            return None
        spec = METHOD_TABLE[method]
        if spec.subspace is not None:
            self._decide(stem, {"reused": False, "why": "depends on a subspace, which runs do not share"})
            return None
        sections = RESULT_SETTINGS[spec.sampling]
        mine = comparable(self.config.to_dict())
        reasons = {}
        for other in self.reuse:
            theirs = comparable(read_json_object(other / "config.json", "a run's resolved config"))
            source = other / "eval" / f"{stem}.json"
            differences = settings_differences(_result_settings(theirs, sections), _result_settings(mine, sections),
                                               recorded="run has")
            if not differences and source.is_file():
                recorded = read_json_object(source, "an evaluation written by spd-lens run").get("stage")
                differences = self.evaluation_stage(method, seed).differences(recorded, label="run has")
            if differences or not source.is_file():
                reasons[str(other)] = differences or [f"no finished evaluation {source.name}"]
                continue
            self._decide(stem, {"reused": True, "from": str(other)})
            record = {**read_json_object(source, "an evaluation written by spd-lens run"), "reused_from": str(other)}
            # Every process decides alike (the other run's files do not change); the barrier keeps
            # the main process from writing the copy before every other process has looked for it
            # (one that found it would skip this path's barriers, and a launch would hang).
            self.processes.barrier()
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            if (other / "eval" / f"{stem}.jsonl").is_file() and self.processes.is_main:
                atomic_write(self.out / "eval" / f"{stem}.jsonl",
                             lambda tmp: shutil.copyfile(other / "eval" / f"{stem}.jsonl", tmp))
            self._write_json(self.out / "eval" / f"{stem}.json", record)
            return record
        self._decide(stem, {"reused": False, "why": reasons})
        return None

    def _decide(self, stem: str, decision: dict) -> None:
        self.reuse_decisions[stem] = decision
        if decision["reused"]:
            self.log(f"reusing {stem} from {decision['from']}")
        elif isinstance(decision["why"], str):
            self.log(f"not reusing {stem}: {decision['why']}")
        else:
            for other, why in decision["why"].items():
                self.log(f"not reusing {stem} from {other}: {'; '.join(why)}")

    def _answer_counts(self, results: list[dict]) -> dict[str, int] | None:
        """How often each answer was given (multiple choice: each letter; "none" = no answer found)."""
        if type(self.task).answer is Task.answer:
            return None
        if self._eval_examples is None:
            c = self.config.task
            self._eval_examples = {e.id: e for e in self.task.examples(c.eval_split, n=c.eval_n, seed=0)}
        counts = Counter(self.task.answer(self._eval_examples[r["prompt_id"]], r["completion"]) or "none"
                         for r in results)
        return dict(sorted(counts.items()))

    def _outcome_counts(self, results: list[dict]) -> dict[str, int] | None:
        """How often each kind of result occurred (code: passed, timeout, or the exception raised)."""
        kinds = [self.task.outcome(r["status"], r.get("detail", "")) for r in results]
        if not kinds or None in kinds:
            return None
        return dict(Counter(kinds).most_common())

    def _claim_directory(self, free: tuple[str, ...] = ()) -> None:
        """Write config.json, refusing a directory that holds a run of another config; `free`
        names (dotted) settings that may differ, because results are kept per value of them."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.json"
        resolved = self.config.to_dict()
        if path.is_file():
            # Adding methods to a finished run is fine; changing what they share is not.
            previous = comparable(read_json_object(path, "a run's resolved config"))
            current = comparable(resolved)
            ignored = ("methods", "sandbox")  # what is run, and how code runs: not what a result is
            changed = settings_differences({k: previous.get(k) for k in current if k not in ignored},
                                           {k: v for k, v in current.items() if k not in ignored}, recorded="run has")
            changed = [c for c in changed if c.split(":")[0] not in (*free, *NO_EFFECT)]
            # What only an evaluation reads may change while nothing here was evaluated (a data
            # gate's directory, which a full run then completes).
            evaluated = any(self.out.glob("eval/*")) or any(self.out.glob("ablation.json*"))
            if not evaluated:
                changed = [c for c in changed if not _evaluation_only(c.split(":")[0])]
            if changed:
                raise SpdLensError(f"{self.out} holds a run with another config (differs in {'; '.join(changed)}); "
                                   "use another --out or the same config")
        self.processes.barrier()  # everyone has read the old config before it is rewritten
        self._write_json(path, {**resolved, "spd_lens_version": spd_lens.__version__})

    def _claim_inputs(self, evaluates: bool = True) -> None:
        """Refuse a directory whose stages read other data, ran in another resolved runtime or on
        other weights (`inputs`, kept in RUN/inputs.json): its finished methods and the ones this
        call would add could not share one table. Data of seeds or stages the record lacks is added."""
        path, current = self.out / INPUTS_FILE, self.inputs(evaluates)
        recorded = read_json_object(path, "the inputs of a run's stages") if path.is_file() else None
        finished = [*self.out.glob("eval/*.json"), *self.out.glob("generations/*.jsonl"),
                    *self.out.glob("adapters/*/train.json"), *self.out.glob("subspaces/*/subspace.json")]
        self.processes.barrier()  # every process has looked before the main one writes: all decide alike
        if recorded is None:
            if finished:  # written before inputs were kept: unknown, and left so (never certified now)
                self.log(f"{self.out} records no inputs (made by an older version): the data contents, runtime and "
                         "weights its finished stages read are unknown; they are kept as they are (pass another --out "
                         "to make them again from today's inputs)")
            else:
                self._write_json(path, current)
            return
        changed, merged = compare_inputs(recorded, current)
        if changed:
            raise SpdLensError(f"{self.out} holds stages made from other inputs (differs in {'; '.join(changed)}); "
                               "its finished methods and new ones would share one table. Use another --out, with "
                               f"--reuse {self.out} to take over every finished evaluation and training data whose "
                               "inputs are the same (what differs is made again)")
        if merged is not None:
            self._write_json(path, merged)


def _evaluation_only(setting: str) -> bool:
    """A setting (dotted) that only evaluations read: the evaluation split, its size, [eval]."""
    return setting in ("task.eval_split", "task.eval_n") or setting.startswith("eval.")


def training_data_comparisons(outcomes: dict[str, list[dict]]) -> dict:
    """The share of correct training completions, method against method (spd - psr, ...), paired
    over each seed's prompts; `outcomes` maps a method to its per-prompt verdicts with `seed`."""
    return {f"{a} - {b}": paired_difference(outcomes[a], outcomes[b])
            for a, b in COMPARISONS if a in outcomes and b in outcomes}


def recompute_data_gate(run_dir: str | Path, *, write: bool = True) -> dict:
    """`RUN/data_gate.json` with its comparisons computed again from the verdicts kept beside the
    training data (`generations/*.quality.json`), by this version's intervals; nothing is generated
    or scored again, so a gate whose prompts another version drew is recomputed as it was run.
    `write=False` returns the report without rewriting the file."""
    run_dir = Path(run_dir)
    report = read_json_object(run_dir / "data_gate.json", "a data gate (spd-lens run --data-only)")
    outcomes: dict[str, list[dict]] = {}
    for method in report.get("methods", {}):
        for seed in report.get("seeds", []):
            path = run_dir / "generations" / f"{method}-seed{seed}.quality.json"
            if not path.is_file():
                raise SpdLensError(f"{path} is missing: the data gate's verdicts are kept there; run "
                                   "spd-lens run CONFIG --data-only --out RUN to make them")
            quality = read_json_object(path, "a training file's quality")
            if not quality.get("outcomes"):
                raise SpdLensError(f"{path} keeps no verdicts ('outcomes'; written by an older version): run "
                                   "spd-lens run CONFIG --data-only --out RUN, which measures it again")
            outcomes.setdefault(method, []).extend({**o, "seed": seed} for o in quality["outcomes"])
    comparisons = training_data_comparisons(outcomes)
    if not comparisons:
        raise SpdLensError(f"{run_dir / 'data_gate.json'} names no pair of methods to compare "
                           f"({', '.join(outcomes) or 'none'}): nothing to recompute")
    report = {**report, "comparisons": comparisons, "spd_lens_version": spd_lens.__version__}
    if write:
        write_json(run_dir / "data_gate.json", report)
    return report


def run_experiment(config: ExperimentConfig, out: str | Path, *, progress: Progress = None, log: Callable = None,
                   reuse: Sequence[str | Path] = (), seeds: Sequence[int] | None = None) -> dict:
    """Run every configured method; returns (and writes) the metrics. See the module docstring.

    `seeds`: run only these of the config's seeds now (metrics still describe every seed the
    directory holds, and name the missing ones).

    `reuse`: other run directories whose finished base / psr / ssd evaluations are taken over when
    every setting they depend on (model, task, eval, and sampling / ssd / train for the trained
    ones) is the same here; each such record names the run it came from (`reused_from`).
    """
    return Run(config, out, progress, log, reuse, seeds).run()


# The run report and its table live in spd_lens.report; imported here for code that takes them from this module.
from spd_lens.report import SPREAD_FLAG, format_table, write_run_report  # noqa: E402,F401
