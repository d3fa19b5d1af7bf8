"""The `spd-lens` command: parse arguments, call the library, show progress, write results.

Every subcommand is a function taking parsed arguments, so tests call `main([...])` directly.
"""

from __future__ import annotations

import argparse
import re
import sys

from spd_lens.errors import SpdLensError


def cmd_tasks(args: argparse.Namespace) -> int:
    from spd_lens.tasks import TASKS

    width = max(len(name) for name in TASKS)
    for name, cls in TASKS.items():
        print(f"{name:<{width}}  {cls.family:<5}  {cls.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from spd_lens.models import EMBEDDED_MODELS, TINY_MODEL

    for name, spec in EMBEDDED_MODELS.items():
        print(f"{name}  (default) {spec.description}")
    print(f"{TINY_MODEL}  a 4-layer random Llama with a byte tokenizer, for tests")
    print("or any local directory / hub id of a Hugging Face causal LM")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Greedy answer of the model to one question (a quick check that a model loads and speaks)."""
    import torch

    from spd_lens.chat import encode, end_of_turn_ids, render_prompt
    from spd_lens.models import load_hf

    model, tokenizer = load_hf(args.model)
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, args.question))])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 14,29, got {text!r}") from None


def _progress(desc: str):
    from tqdm.auto import tqdm

    return lambda iterable: tqdm(iterable, desc=desc, unit="batch")


def _task_options(args: argparse.Namespace, tokenizer) -> dict:
    """get_task options from --data, --preset, --option and --shots (default: `tasks.default_shots`)."""
    from spd_lens.tasks import TASKS, default_shots

    options = {"path": args.data} if args.data else {}
    if args.preset:
        options["preset"] = args.preset
    for text in args.option or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SpdLensError(f"--option {text!r}: write KEY=VALUE, e.g. --option max_digits=1")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    task_class = TASKS.get(args.task)
    shots = args.shots if args.shots is not None else default_shots(task_class, tokenizer) if task_class else 0
    return {**options, "shots": shots}


def cmd_extract(args: argparse.Namespace) -> int:
    """Capability subspace of a model for a task, saved to --out."""
    import json
    from pathlib import Path

    from spd_lens.extract import extract_subspace
    from spd_lens.models import boot, load_hf

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpdLensError(f"--out {str(out)!r} exists and is not a directory: choose a directory path")
    model, tokenizer = load_hf(args.model)
    target = boot(model, tokenizer) if args.via_bridge else model
    subspace = extract_subspace(
        target, args.task, n=args.n, split=args.split, seed=args.seed, layers=args.layers, rank=args.rank,
        rank_frac=args.rank_frac, energy=args.energy, loss=args.loss, batch_size=args.batch_size, tokenizer=tokenizer,
        task_options=_task_options(args, tokenizer), progress=_progress("gradients"), out=out,
    )  # a directory holding this extraction already is reused; one made with other settings is refused
    print(f"{'layer':>5} {'kv':>2} {'head':>4} {'rank':>4}/{'dim':<4} {'energy':>6}")
    for row in subspace.summary():
        print(f"{row['layer']:>5} {row['kind']:>2} {str(row['head']):>4} {row['rank']:>4}/{row['dim']:<4} "
              f"{row['explained_energy']:>6.3f}")
    print(json.dumps({"out": str(out), "n_rows": subspace.meta["n_rows"], "seconds": subspace.meta["seconds"]}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Self-generation for a task's prompts, optionally with K/V projected onto a subspace."""
    from contextlib import nullcontext

    from spd_lens.models import load_hf
    from spd_lens.projection import Projection, fold_projection, save_folded
    from spd_lens.sampling import SamplingConfig, generate_jsonl
    from spd_lens.subspace import CapabilitySubspace
    from spd_lens.tasks import get_task

    if (args.fold or args.save_folded) and not args.subspace:
        raise SpdLensError("--fold and --save-folded need --subspace DIR")
    model, tokenizer = load_hf(args.model)
    task = get_task(args.task, **_task_options(args, tokenizer))
    config = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                            num_samples=args.num_samples,
                            seed=args.seed, batch_size=args.batch_size)
    examples = task.examples(args.split, n=args.n, seed=args.seed)
    provenance: dict = {"split": args.split}  # the projection is recorded from the model (hooks or folded weights)
    hooks = nullcontext()
    if args.subspace:
        subspace = CapabilitySubspace.load(args.subspace, model)
        projection = Projection.build(subspace, layers=args.layers, kinds=args.kinds, layout=args.layout,
                                      heads=args.heads, alpha=args.alpha)
        if args.fold or args.save_folded:
            folded = fold_projection(model, projection)
            if args.save_folded:
                save_folded(folded, tokenizer, args.save_folded)
            if args.fold:
                folded.config.spd_lens_model_id = model.config.spd_lens_model_id
                model = folded
        if not args.fold:
            hooks = projection.apply(model)
    with hooks:
        path = generate_jsonl(model, tokenizer, examples, args.out, config, task=task.name, provenance=provenance,
                              progress=_progress("generate"))
    print(f"{len(examples) * config.num_samples} completions in {path}")
    return 0


def _run_and_report(config, out, reuse=()) -> int:
    from spd_lens.experiment import format_table, run_experiment

    metrics = run_experiment(config, out, progress=_progress_labelled, log=lambda m: print(f"[spd-lens] {m}", flush=True),
                             reuse=reuse)
    print()
    print(format_table(metrics))
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["stage_seconds"].items()))
    if metrics.get("stage_seconds_interrupted"):
        print("lost to interrupted calls: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["stage_seconds_interrupted"].items()))
    print(f"metrics: {out}/metrics.json\nreport:  {out}/report.html")
    return 0


def _sandbox_options(args: argparse.Namespace):
    from spd_lens.sandbox import SandboxOptions

    return SandboxOptions(strict=args.strict_sandbox, unsafe=args.unsafe_sandbox,
                          backend=args.sandbox_backend or "builtin")


def _configured_task(args: argparse.Namespace, **options):
    """The task named on the command line, its code sandbox set from the flags and checked."""
    from spd_lens.tasks import get_task
    from spd_lens.tasks.code import configure_sandbox

    return configure_sandbox(get_task(args.task, **options), _sandbox_options(args))


def _with_sandbox_flags(config, args: argparse.Namespace):
    """A config whose [sandbox] settings include the command line's flags."""
    import dataclasses

    s = config.sandbox
    return dataclasses.replace(config, sandbox=dataclasses.replace(
        s, strict=s.strict or args.strict_sandbox, unsafe=s.unsafe or args.unsafe_sandbox,
        backend=args.sandbox_backend or s.backend))


def _progress_labelled(label: str):
    from tqdm.auto import tqdm

    return lambda iterable: tqdm(iterable, desc=label, leave=False)


def cmd_run(args: argparse.Namespace) -> int:
    """A full experiment from a TOML config."""
    from pathlib import Path

    from spd_lens.config import load_config

    config = _with_sandbox_flags(load_config(args.config), args)
    if args.methods is not None:
        import dataclasses

        from spd_lens.config import check_methods

        check_methods(args.methods)
        config = dataclasses.replace(config, methods=args.methods)
    return _run_and_report(config, args.out or str(Path("runs") / config.name), reuse=args.reuse)


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the quick comparison (base, psr, spd, spd-random) on the default model."""
    from importlib.resources import files

    from spd_lens.config import load_config

    config = load_config(files("spd_lens") / "configs" / "quick.toml")
    return _run_and_report(config, args.out)


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from spd_lens.train import TrainConfig, train_on_jsonl

    config = TrainConfig(lora=not args.full, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, loss_on=args.loss_on, checkpoint_every=args.checkpoint_every,
                         truncated=args.truncated, seed=args.seed)
    out = train_on_jsonl(args.model, args.data, args.out, config, progress=_progress_labelled("train"))
    from accelerate import PartialState

    if PartialState().is_main_process:  # once, not once per process under torchrun
        record = json.loads((out / "train.json").read_text())
        print(f"trained: {out} ({record['steps']} optimizer steps of a global batch of {record['global_batch_size']}: "
              f"{record['per_process_batch_size']} per process x {config.grad_accum} accumulation x "
              f"{record['processes']} process(es))")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict
    from pathlib import Path

    from spd_lens.artifacts import canonical, check_same_settings, read_json_object, write_json
    from spd_lens.evaluate import evaluate
    from spd_lens.models import load_hf
    from spd_lens.sampling import SamplingConfig
    from spd_lens.sandbox import summarise_isolation
    from spd_lens.train import DONE_FILE, load_trained

    # The model first: a task's default shots depend on whether its tokenizer has a chat template.
    model, tokenizer = load_trained(args.model, args.adapter) if args.adapter else load_hf(args.model)
    task_options = _task_options(args, tokenizer)
    task = _configured_task(args, **task_options)
    config = SamplingConfig(temperature=args.temperature,
                            max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                            seed=args.seed, batch_size=args.batch_size)
    trained = Path(args.adapter) / DONE_FILE if args.adapter else None
    settings = canonical({
        "model": args.model, "adapter": args.adapter, "task": task.name, "task_options": task_options, "n": args.n,
        "split": args.split, "seed": args.seed, "sampling": asdict(config),
        # what the adapter was trained from, so a retrained adapter is not taken for the old one
        "adapter_settings": read_json_object(trained, "a training run's record").get("settings")
        if trained is not None and trained.is_file() else None})
    out = Path(args.out)
    if out.is_file():
        previous = read_json_object(out, "an evaluation written by spd-lens eval")
        if "settings" in previous:  # evaluations written before settings were kept are redone
            check_same_settings(previous["settings"], settings, str(out), "Use another --out or the same settings")
            print(json.dumps({"task": previous["task"], "score": previous["score"], "ci": previous["ci"],
                              "n": previous["n"]}))
            return 0
    result = evaluate(model, tokenizer, task, n=args.n, split=args.split, seed=args.seed, config=config,
                      generations=out.with_suffix(".generations.jsonl"), progress=_progress_labelled("eval"))
    write_json(out, {**result.as_dict(), "model": args.model, "adapter": args.adapter, "settings": settings,
                     "sandbox": summarise_isolation(result.results)})
    print(json.dumps({"task": task.name, "score": result.score, "ci": result.ci, "n": result.n}))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score completions from a JSONL file (any source) with the task's scorer."""
    import json
    from collections import Counter

    from spd_lens.artifacts import write_json
    from spd_lens.evaluate import score_file
    from spd_lens.sandbox import summarise_isolation

    result = score_file(_configured_task(args), args.completions, progress=_progress_labelled("score"))
    write_json(args.out, {"task": result.task, "score": result.score, "ci": list(result.ci), "n": result.n,
                          "sandbox": summarise_isolation(result.results),
                          "results": [{"prompt_id": r["prompt_id"], "passed": r["passed"], "status": r["status"]}
                                      for r in result.results]})
    summary = {"task": result.task, "score": result.score, "ci": list(result.ci), "n": result.n}
    reasons = Counter(r["finish_reason"] for r in result.results if "finish_reason" in r)
    if reasons:  # files from spd-lens generate say why each completion ended
        summary["finish_reasons"] = dict(sorted(reasons.items()))
    print(json.dumps(summary))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Projected decoding over ranks x layers x alphas (x heads), resumable, one tidy table."""
    from pathlib import Path

    from spd_lens.ablate import run_ablation
    from spd_lens.config import load_config

    config = _with_sandbox_flags(load_config(args.config), args)
    out = Path(args.out or Path("runs") / f"{config.name}-ablation")
    rows = run_ablation(config, out, progress=_progress_labelled("ablation"))
    print(f"{'rank':>5} {'layers':>8} {'alpha':>5} {'head':>4} {'score':>6}  {'loss':>7}")
    for r in rows:
        print(f"{str(r['rank']):>5} {r['layers']:>8} {r['alpha']:>5} {str(r['head']):>4} {r['score']:>6.3f}  {r['loss']:>7.4f}")
    print(f"table: {out}/ablation.csv\nfigure: {out}/ablation.html")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    """Head attribution across layers: table (CSV/JSON) and figures (HTML)."""
    import csv
    from pathlib import Path

    from spd_lens.artifacts import write_json
    from spd_lens.attribution import head_attribution, write_heads_report
    from spd_lens.models import load_hf

    task = _configured_task(args)
    model, tokenizer = load_hf(args.model)
    rows = head_attribution(model, task, n=args.n, seed=args.seed, layers=args.layers, score_top=args.score_top,
                            score_n=args.score_n, tokenizer=tokenizer, progress=_progress_labelled("heads"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "heads.json", {"model": args.model, "task": args.task, "n": args.n, "seed": args.seed, "rows": rows})
    with open(out / "heads.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_heads_report(out)
    top = sorted(rows, key=lambda r: -abs(r["delta_loss"]))[:5]
    print("heads whose one-head projection changes the correctness loss most:")
    for r in top:
        score = "" if r["delta_score"] is None else f"  score change {r['delta_score']:+.3f}"
        print(f"  layer {r['layer']:>2} head {r['head']}: loss {r['delta_loss']:+.4f}, "
              f"K energy {r['energy_share_k']:.2f}, V energy {r['energy_share_v']:.2f}{score}")
    print(f"table: {out}/heads.csv\nfigures: {out}/heads.html")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from spd_lens.ablate import write_ablation_report
    from spd_lens.attribution import write_heads_report
    from spd_lens.experiment import format_table, write_run_report

    run_dir = Path(args.run_dir)
    if (run_dir / "ablation.json").is_file():
        path = write_ablation_report(run_dir)
    elif (run_dir / "heads.json").is_file():
        path = write_heads_report(run_dir)
    else:
        path = write_run_report(run_dir)
        print(format_table(json.loads((run_dir / "metrics.json").read_text())))
    print(f"report: {path}")
    return 0


def _evaluation_results(spec: str) -> list[dict]:
    """Per-example results of `RUN_DIR:METHOD` (every seed's evaluation of it)."""
    from pathlib import Path

    from spd_lens.artifacts import read_json_object

    run_dir, _, method = spec.rpartition(":")
    if not run_dir or not method:
        raise SpdLensError(f"{spec!r}: write RUN_DIR:METHOD, e.g. runs/math:spd")
    files = sorted(Path(run_dir, "eval").glob(f"{method}.json")) + sorted(Path(run_dir, "eval").glob(f"{method}-seed*.json"))
    if not files:
        raise SpdLensError(f"{spec!r}: no evaluation of {method!r} in {run_dir}/eval (run it with spd-lens run first)")
    results = []
    for f in files:
        record = read_json_object(f, "an evaluation written by spd-lens run")
        if not isinstance(record.get("results"), list):
            raise SpdLensError(f"{f} has no per-example 'results': rerun the evaluation with spd-lens run")
        results += [{**r, "seed": record.get("seed")} for r in record["results"]]
    return results


def cmd_compare(args: argparse.Namespace) -> int:
    """Paired difference of two evaluations (possibly from different runs) on their shared questions."""
    from spd_lens.evaluate import paired_difference, per_prompt_scores

    first, second = _evaluation_results(args.first), _evaluation_results(args.second)
    c = paired_difference(first, second)
    print(f"{args.first} - {args.second}: {c['difference']:+.3f}  95% CI [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  "
          f"({c['n']} shared questions; interval over seeds, then questions)")
    if c["seed_spread_exceeds_ci"]:
        print(f"! the per-seed differences spread over {c['seed_spread']:.3f}, more than the interval is wide: "
              "run more seeds before reading this difference")
    a, b = per_prompt_scores(first), per_prompt_scores(second)
    shared = sorted(a.keys() & b.keys(), key=_natural_key)
    for name, better in ((args.first, [k for k in shared if a[k] > b[k]]), (args.second, [k for k in shared if b[k] > a[k]])):
        print(f"better in {name} ({len(better)}): {', '.join(better) or '-'}")
    print(f"solved by both (score 1 in each): {sum(a[k] == b[k] == 1 for k in shared)}")
    return 0


def _natural_key(text: str) -> list:
    """HumanEval/9 before HumanEval/10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def cmd_overlap(args: argparse.Namespace) -> int:
    """How much two saved subspaces share, beside a random subspace of the first one's ranks."""
    from spd_lens.subspace import CapabilitySubspace, random_like

    first, second = CapabilitySubspace.load(args.first), CapabilitySubspace.load(args.second)
    overlap, control = first.overlap(second), random_like(first, seed=0).overlap(second)
    print("mean cos² of principal angles (1 = same subspace); random control of the same ranks beside")
    for (layer, kind), value in sorted(overlap.items()):
        print(f"layer {layer:>2} {kind.upper()}: {value:.3f}   random: {control[(layer, kind)]:.3f}")
    return 0


def _set_threads(threads: int) -> None:
    import os

    import torch

    cores = os.cpu_count() or 1
    if not 1 <= threads <= 4 * cores:
        raise SpdLensError(f"--threads must be between 1 and {4 * cores} (this machine has {cores} cores), got {threads}")
    torch.set_num_threads(threads)


def _add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="difficulty preset of a procedural task (arithmetic, family-mc: easy, hard)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a task option, e.g. max_digits=1 or num_options=3 (repeatable)")
    parser.add_argument("--shots", type=int, help="demonstrations from the train split before each question "
                        "(default: 0 with a chat template, the task's base_shots without one)")


def _add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("code sandbox (tasks that run model-written code)")
    group.add_argument("--unsafe-sandbox", action="store_true",
                       help="where neither root nor user namespaces are available, run the code anyway with only "
                            "resource limits (recorded in the output as unsafe); use only inside a throwaway VM")
    group.add_argument("--strict-sandbox", action="store_true",
                       help="show programs only the interpreter's installation and their working directory "
                            "(nothing of $HOME, /etc, /var, ...)")
    group.add_argument("--sandbox-backend", choices=["builtin", "bwrap"],
                       help="bwrap: build the sandbox with bubblewrap where installed (non-root runs); default builtin")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spd-lens",
        description="Self-Policy Distillation on TransformerLens: capability subspaces from correctness-token "
                    "gradients, projected self-generation, distillation and evaluation against baselines.",
        epilog="Start with `spd-lens demo`; `spd-lens COMMAND --help` for each command.",
    )
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: all cores); see the README on running two jobs with 1 thread each")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("tasks", help="list the tasks").set_defaults(func=cmd_tasks)
    commands.add_parser("models", help="list the built-in model names").set_defaults(func=cmd_models)

    ask = commands.add_parser("ask", help="greedy answer of a model to one question")
    ask.add_argument("question")
    ask.add_argument("--model", default="smollm2-135m-instruct")
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.set_defaults(func=cmd_ask)

    extract = commands.add_parser("extract", help="capability subspace from correctness-token gradients")
    extract.add_argument("--model", default="smollm2-135m-instruct")
    extract.add_argument("--task", required=True)
    extract.add_argument("--data", help="local JSONL (or directory) for hub tasks such as gsm8k, mbpp, mmlu")
    _add_task_arguments(extract)
    extract.add_argument("--n", type=int, required=True, help="number of calibration examples")
    extract.add_argument("--split", default="train", choices=["train", "test"])
    extract.add_argument("--seed", type=int, default=0)
    extract.add_argument("--layers", type=_int_list, help="comma-separated layer indices (default: L//2 and L-1)")
    policy = extract.add_mutually_exclusive_group()
    policy.add_argument("--rank", type=int, help="fixed rank of every basis")
    policy.add_argument("--rank-frac", type=float, help="fraction of each basis's numerical rank (default 0.5)")
    policy.add_argument("--energy", type=float, help="smallest rank keeping this fraction of gradient energy")
    extract.add_argument("--loss", default="correctness", choices=["correctness", "full"])
    extract.add_argument("--batch-size", type=int, default=4)
    extract.add_argument("--via-bridge", action="store_true",
                         help="capture through the TransformerBridge's hook_k/hook_v (same result, slower)")
    extract.add_argument("--out", required=True, help="directory for subspace.safetensors + subspace.json")
    extract.set_defaults(func=cmd_extract)

    generate = commands.add_parser("generate", help="self-generation (optionally projected) exported as JSONL")
    generate.add_argument("--model", default="smollm2-135m-instruct")
    generate.add_argument("--task", required=True)
    generate.add_argument("--data", help="local JSONL (or directory) for hub tasks")
    _add_task_arguments(generate)
    generate.add_argument("--n", type=int, required=True, help="number of prompts")
    generate.add_argument("--split", default="train", choices=["train", "test"])
    generate.add_argument("--subspace", help="directory of a saved subspace: project K/V onto it")
    generate.add_argument("--fold", action="store_true", help="fold the projection into the weights (no hooks)")
    generate.add_argument("--save-folded", help="also save the folded model as a Hugging Face checkpoint here")
    generate.add_argument("--alpha", type=float, default=1.0,
                          help="projection strength: 0 = none, 1 = K·P; outside [0, 1] extrapolates")
    generate.add_argument("--layout", default="flat", choices=["flat", "head"])
    generate.add_argument("--heads", type=_int_list, help="KV heads to project (layout head)")
    generate.add_argument("--layers", type=_int_list, help="subset of the subspace's layers to project")
    generate.add_argument("--kinds", type=lambda t: [k for k in t.split(",") if k], default=["k", "v"],
                          help="k, v or k,v (default)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--max-new-tokens", type=int, help="default: the task's budget")
    generate.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--out", required=True, help="JSONL file (resumed if it exists with the same settings)")
    generate.set_defaults(func=cmd_generate)

    demo = commands.add_parser("demo", help="the main job: the quick SPD comparison on the default model")
    demo.add_argument("--out", default="runs/demo")
    demo.set_defaults(func=cmd_demo)

    run = commands.add_parser("run", help="a full experiment from a TOML config (resumable)")
    run.add_argument("config")
    run.add_argument("--out", help="run directory (default runs/<config name>)")
    run.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m],
                     help="comma-separated subset of the config's methods to run now (a run directory accepts "
                          "more methods later)")
    run.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                     help="take finished evaluations of methods that do not depend on the subspace (base, psr, "
                          "ssd) from another run whose settings for them are the same; repeatable")
    _add_sandbox_flags(run)
    run.set_defaults(func=cmd_run)

    train = commands.add_parser("train", help="fine-tune on an exported JSONL (LoRA by default)")
    train.add_argument("--model", default="smollm2-135m-instruct")
    train.add_argument("--data", required=True, help="JSONL from spd-lens generate")
    train.add_argument("--out", required=True)
    train.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    train.add_argument("--lr", type=float, default=1e-5)
    train.add_argument("--epochs", type=int, default=5)
    train.add_argument("--batch-size", type=int, default=4,
                       help="examples per process per micro-batch; the global batch of one optimizer step is "
                            "batch-size x grad-accum x processes (torchrun --nproc_per_node N)")
    train.add_argument("--grad-accum", type=int, default=1)
    train.add_argument("--truncated", default="keep", choices=["keep", "drop"],
                       help="completions cut off at their token budget: train on them without an end-of-turn "
                            "marker (keep, default) or leave them out (drop)")
    train.add_argument("--loss-on", default="completion", choices=["completion", "all"])
    train.add_argument("--checkpoint-every", type=int, default=50)
    train.add_argument("--seed", type=int, default=0)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="score a model (optionally with a trained adapter) on a task")
    evaluate.add_argument("--model", default="smollm2-135m-instruct")
    evaluate.add_argument("--adapter", help="directory written by spd-lens train")
    evaluate.add_argument("--task", required=True)
    evaluate.add_argument("--data")
    _add_task_arguments(evaluate)
    evaluate.add_argument("--n", type=int)
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--temperature", type=float, default=0.0)
    evaluate.add_argument("--max-new-tokens", type=int)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--out", required=True, help="JSON file for the score, CI and per-example results")
    _add_sandbox_flags(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    score = commands.add_parser("score", help="score completions from a JSONL file (spd-lens generate, vLLM, ...)")
    score.add_argument("--task", required=True)
    score.add_argument("--completions", required=True, help="JSONL: generate export or {prompt_id, completion}")
    score.add_argument("--out", required=True)
    _add_sandbox_flags(score)
    score.set_defaults(func=cmd_score)

    ablate = commands.add_parser("ablate", help="sweep ranks x layers x alphas (x heads) of projected decoding")
    ablate.add_argument("config")
    ablate.add_argument("--out", help="run directory (default runs/<config name>-ablation)")
    _add_sandbox_flags(ablate)
    ablate.set_defaults(func=cmd_ablate)

    heads = commands.add_parser("heads", help="which KV heads carry a capability (all layers)")
    heads.add_argument("--model", default="smollm2-135m-instruct")
    heads.add_argument("--task", required=True)
    heads.add_argument("--n", type=int, default=16)
    heads.add_argument("--seed", type=int, default=0)
    heads.add_argument("--layers", type=_int_list, help="default: every layer")
    heads.add_argument("--score-top", type=int, default=5, help="heads whose task-score change is measured")
    heads.add_argument("--score-n", type=int, default=32)
    heads.add_argument("--out", required=True)
    _add_sandbox_flags(heads)
    heads.set_defaults(func=cmd_heads)

    compare = commands.add_parser("compare", help="paired difference of two evaluations, e.g. runs/ood:spd runs/math:spd")
    compare.add_argument("first", help="RUN_DIR:METHOD")
    compare.add_argument("second", help="RUN_DIR:METHOD")
    compare.set_defaults(func=cmd_compare)

    overlap = commands.add_parser("overlap", help="how much two saved subspaces share (mean cos² of principal angles)")
    overlap.add_argument("first", help="subspace directory (spd-lens extract --out, or RUN/subspaces/gradient-seed0)")
    overlap.add_argument("second")
    overlap.set_defaults(func=cmd_overlap)

    report = commands.add_parser("report", help="figures again from a directory's tables: a run (metrics.json -> "
                                                "report.html), an ablation (ablation.json) or head attribution (heads.json)")
    report.add_argument("run_dir")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads is not None:
            _set_threads(args.threads)
        return args.func(args)
    except SpdLensError as err:
        print(f"spd-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
