"""`run_experiment`: one run directory per config, stage by stage, each stage resumable.

    RUN/config.json                      resolved config (a rerun with another config is refused)
    RUN/subspaces/{gradient,fullseq}-seed{s}/   capability subspaces (random ones derive from gradient)
    RUN/generations/{method}-seed{s}.jsonl      self-generated training data
    RUN/adapters/{method}-seed{s}/              trained LoRA adapters
    RUN/eval/{method}[-seed{s}].jsonl / .json   evaluation generations and scores
    RUN/stage_seconds.json               wall-clock seconds per stage, summed over resumed calls
    RUN/metrics.json                     {"methods": {name: {"score", "ci", "n", "seeds", ...}}, ...}

A finished stage (its artifact complete) is not redone, and an artifact made with other settings
(the projection included) is refused rather than reused. The gradient subspace, the base
evaluation and the prompts are shared by all methods that need them; `reuse=[OTHER_RUN]` also
takes base / psr / ssd evaluations from another run when nothing they depend on differs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import spd_lens
from spd_lens.config import ExperimentConfig
from spd_lens.errors import SpdLensError
from spd_lens.artifacts import atomic_write, canonical, read_json_object, settings_differences, write_json
from spd_lens.evaluate import bootstrap_ci, evaluate, paired_difference
from spd_lens.extract import extract_subspace
from spd_lens.methods import METHOD_TABLE
from spd_lens.models import load_hf
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.subspace import META_FILE as SUBSPACE_META
from spd_lens.subspace import CapabilitySubspace, config_hash, random_like
from spd_lens.tasks import Task, get_task
from spd_lens.train import load_trained, train_on_jsonl

Progress = Callable[[str], Callable] | None


# Paired differences every run reports: each method against the base model, and SPD against the
# baselines and controls that isolate what its subspace adds.
COMPARISONS = [(m, "base") for m in METHOD_TABLE if m != "base"] + [
    ("spd", "psr"), ("spd", "ssd"), ("spd", "spd-random"), ("spd", "spd-fullseq")]


class Run:
    def __init__(self, config: ExperimentConfig, out: str | Path, progress: Progress = None, log: Callable = None,
                 reuse: Sequence[str | Path] = ()):
        self.config = config
        self.out = Path(out)
        self.reuse = [Path(r) for r in reuse]
        for other in self.reuse:
            if not (other / "config.json").is_file():
                raise SpdLensError(f"--reuse {other}: not a run directory (no config.json); pass a directory "
                                   "written by `spd-lens run`")
        self.progress = progress
        self.log = log or (lambda message: None)
        self.task = get_task(config.task.name, **({"path": config.task.data} if config.task.data else {}))
        subspace_task = config.subspace.task or config.task.name
        data = config.subspace.data if config.subspace.task else config.task.data
        self.subspace_task = get_task(subspace_task, **({"path": data} if data else {}))
        self._base = None
        self._eval_examples = None

    # --- shared pieces ------------------------------------------------------------------------

    def base_model(self):
        if self._base is None:
            self._base = load_hf(self.config.model.name)
        return self._base

    def _bar(self, label: str):
        return self.progress(label) if self.progress else None

    def _timed(self, stage: str, fn):
        started = time.time()
        result = fn()
        # Kept on disk after every stage, so the cost of a run interrupted and resumed adds up.
        recorded = self._stage_seconds()
        recorded[stage] = round(recorded.get(stage, 0) + time.time() - started, 2)
        write_json(self.out / "stage_seconds.json", recorded)
        return result

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
        c = self.config
        sampling = c.ssd if spec.sampling == "ssd" else c.sampling
        config = SamplingConfig(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                max_new_tokens=self.task.max_new_tokens if c.sampling.max_new_tokens is None else c.sampling.max_new_tokens,
                                num_samples=c.sampling.num_samples, seed=seed, batch_size=c.sampling.batch_size)
        model, tokenizer = self.base_model()
        examples = self.task.examples("train", n=c.task.train_n, seed=seed)
        provenance = {"method": method}  # the projection is recorded from the model
        self.log(f"self-generation for {method} (seed {seed})")
        if spec.sampling == "projected":
            projection = self.projection(spec.subspace, seed)
            with projection.apply(model):
                return self._timed("generate", lambda: generate_jsonl(
                    model, tokenizer, examples, path, config, task=self.task.name, provenance=provenance,
                    progress=self._bar(f"generate {method}")))
        return self._timed("generate", lambda: generate_jsonl(
            model, tokenizer, examples, path, config, task=self.task.name, provenance=provenance,
            progress=self._bar(f"generate {method}")))

    def adapter(self, method: str, seed: int) -> Path:
        data = self.generations(method, seed)
        out = self.out / "adapters" / f"{method}-seed{seed}"
        train_config = type(self.config.train)(**{**self.config.train.__dict__, "seed": seed})
        self.log(f"training {method} (seed {seed})")
        return self._timed("train", lambda: train_on_jsonl(
            self.config.model.name, data, out, train_config, progress=self._bar(f"train {method}"),
            provenance={"method": method, "seed": seed, "run": str(self.out)}))

    def evaluation(self, method: str, seed: int | None) -> dict:
        spec = METHOD_TABLE[method]
        stem = method if seed is None else f"{method}-seed{seed}"
        result_path = self.out / "eval" / f"{stem}.json"
        if result_path.is_file():
            return json.loads(result_path.read_text())
        reused = self._reused(method, stem)
        if reused is not None:
            return reused
        c = self.config
        if spec.sampling is not None:
            adapter = self.adapter(method, seed)
            model, tokenizer = load_trained(c.model.name, adapter)
        else:
            model, tokenizer = self.base_model()
        config = SamplingConfig(temperature=c.eval.temperature, max_new_tokens=self.task.max_new_tokens if c.eval.max_new_tokens is None else c.eval.max_new_tokens,
                                seed=0, batch_size=c.eval.batch_size)
        provenance = {"method": method, "seed": seed}

        def run():
            return evaluate(model, tokenizer, self.task, n=c.task.eval_n, split=c.task.eval_split, seed=0, config=config,
                            generations=self.out / "eval" / f"{stem}.jsonl", provenance=provenance,
                            progress=self._bar(f"eval {stem}"))

        self.log(f"evaluating {stem}")
        if spec.eval_hooks:
            projection = self.projection(spec.subspace, c.seeds[0])
            with projection.apply(model):
                result = self._timed("eval", run)
        else:
            result = self._timed("eval", run)
        record = {**result.as_dict(), "method": method, "seed": seed}
        write_json(result_path, record)
        return record

    # --- the whole run ------------------------------------------------------------------------

    def run(self) -> dict:
        self._claim_directory()
        methods, outcomes = {}, {}
        for method in self.config.methods:
            spec = METHOD_TABLE[method]
            seeds = self.config.seeds if spec.seeded else [None]
            per_seed = [self.evaluation(method, seed) for seed in seeds]
            outcomes[method] = [r for result in per_seed for r in result["results"]]
            pooled = [r["passed"] for r in outcomes[method]]
            methods[method] = {
                "score": sum(r["score"] for r in per_seed) / len(per_seed),
                "ci": list(bootstrap_ci(pooled)),
                "n": len(pooled),
                "seeds": {str(r["seed"]): {"score": r["score"], "ci": r["ci"], "n": r["n"]} for r in per_seed}
                if spec.seeded else {},
            }
            answers = self._answer_counts(outcomes[method])
            if answers:
                methods[method]["answers"] = answers
            kinds = self._outcome_counts(outcomes[method])
            if kinds:
                methods[method]["outcomes"] = kinds
        comparisons = {f"{a} - {b}": paired_difference(outcomes[a], outcomes[b])
                       for a, b in COMPARISONS if a in outcomes and b in outcomes}
        metrics = {"run": self.config.name, "task": self.task.name, "subspace_task": self.subspace_task.name,
                   "model": self.config.model.name, "methods": methods, "comparisons": comparisons,
                   "stage_seconds": self._stage_seconds(),
                   "config_hash": config_hash(self.config.to_dict()), "spd_lens_version": spd_lens.__version__,
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        previous = self.out / "metrics.json"
        if previous.is_file() and (self.out / "report.html").is_file():
            kept = read_json_object(previous, "a run's metrics")
            if canonical({**kept, "finished": None}) == canonical({**metrics, "finished": None}):
                return kept  # nothing changed: the files stay byte for byte as they were
        write_json(self.out / "metrics.json", metrics)
        write_run_report(self.out)
        return metrics

    def _stage_seconds(self) -> dict[str, float]:
        """Wall-clock seconds per stage over every call that did work on this run directory."""
        path = self.out / "stage_seconds.json"
        if path.is_file():
            return read_json_object(path, "seconds per stage")
        previous = self.out / "metrics.json"  # run directories from before stage_seconds.json
        return dict(read_json_object(previous, "a run's metrics").get("stage_seconds", {})) if previous.is_file() else {}

    def _reused(self, method: str, stem: str) -> dict | None:
        """A finished evaluation of `method` from a `reuse` run that shares everything it depends on."""
        spec = METHOD_TABLE[method]
        if spec.subspace is not None:
            return None  # depends on the subspace, which is what runs usually differ in
        sections = ["model", "task", "eval"] + {"plain": ["sampling", "train"], "ssd": ["sampling", "ssd", "train"]}.get(
            spec.sampling, [])
        mine = self.config.to_dict()
        for other in self.reuse:
            theirs = read_json_object(other / "config.json", "a run's resolved config")
            source = other / "eval" / f"{stem}.json"
            if any(canonical(theirs.get(k)) != canonical(mine[k]) for k in sections) or not source.is_file():
                continue
            self.log(f"reusing {stem} from {other}")
            record = {**read_json_object(source, "an evaluation written by spd-lens run"), "reused_from": str(other)}
            (self.out / "eval").mkdir(parents=True, exist_ok=True)
            if (other / "eval" / f"{stem}.jsonl").is_file():
                atomic_write(self.out / "eval" / f"{stem}.jsonl",
                             lambda tmp: shutil.copyfile(other / "eval" / f"{stem}.jsonl", tmp))
            write_json(self.out / "eval" / f"{stem}.json", record)
            return record
        return None

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

    def _claim_directory(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / "config.json"
        resolved = self.config.to_dict()
        if path.is_file():
            # Adding methods to a finished run is fine; changing what they share is not.
            previous = read_json_object(path, "a run's resolved config")
            changed = settings_differences({k: previous.get(k) for k in resolved if k != "methods"},
                                           {k: v for k, v in resolved.items() if k != "methods"}, recorded="run has")
            if changed:
                raise SpdLensError(f"{self.out} holds a run with another config (differs in {'; '.join(changed)}); "
                                   "use another --out or the same config")
        write_json(path, {**resolved, "spd_lens_version": spd_lens.__version__})


def run_experiment(config: ExperimentConfig, out: str | Path, *, progress: Progress = None, log: Callable = None,
                   reuse: Sequence[str | Path] = ()) -> dict:
    """Run every configured method; returns (and writes) the metrics. See the module docstring.

    `reuse`: other run directories whose finished base / psr / ssd evaluations are taken over when
    every setting they depend on (model, task, eval, and sampling / ssd / train for the trained
    ones) is the same here; each such record names the run it came from (`reused_from`).
    """
    return Run(config, out, progress, log, reuse).run()


def format_table(metrics: dict) -> str:
    """Score, pooled 95% CI, n, and each seed's score."""
    rows = [f"{'method':<12} {'score':>7}  {'95% CI':<17} {'n':>5}  per seed"]
    for name, m in metrics["methods"].items():
        seeds = "  ".join(f"{seed}: {s['score']:.3f}" for seed, s in m.get("seeds", {}).items())
        answers = "  answers " + " ".join(f"{a}:{k}" for a, k in m["answers"].items()) if m.get("answers") else ""
        kinds = "  outcomes " + " ".join(f"{k}:{v}" for k, v in m["outcomes"].items()) if m.get("outcomes") else ""
        rows.append(f"{name:<12} {m['score']:>7.3f}  [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]  {m['n']:>5}  {seeds}{answers}{kinds}")
    if metrics.get("comparisons"):
        rows += ["", f"{'paired difference':<24} {'mean':>7}  95% CI (bootstrap over the shared questions)"]
        for name, c in metrics["comparisons"].items():
            rows.append(f"{name:<24} {c['difference']:>+7.3f}  [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]")
    return "\n".join(rows)


def write_run_report(run_dir: str | Path) -> Path:
    """`RUN/report.html`: method scores with CIs, paired differences, the gradient subspaces'
    spectra and, where counted, the kinds of result (code) or the answers chosen (multiple choice)."""
    from spd_lens.viz import comparison_figure, method_scores_figure, outcome_figure, spectrum_figure, write_report

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise SpdLensError(f"{run_dir} has no metrics.json: run `spd-lens run CONFIG --out {run_dir}` first")
    metrics = json.loads(metrics_path.read_text())
    figures = [method_scores_figure(metrics)]
    if metrics.get("comparisons"):
        figures.append(comparison_figure(metrics))
    for directory in sorted((run_dir / "subspaces").glob("gradient-seed*")):
        try:
            subspace = CapabilitySubspace.load(directory)
        except SpdLensError:
            continue
        figures += [spectrum_figure(subspace, "k"), spectrum_figure(subspace, "v")]
        break
    # after the spectra, so that the figures' file numbers stay those of earlier reports
    figures += [outcome_figure(metrics, key) for key in ("outcomes", "answers")
                if any(m.get(key) for m in metrics["methods"].values())]
    path = run_dir / "report.html"
    write_report(path, figures, f"spd_lens run {metrics.get('run')}", format_table(metrics))
    return path
