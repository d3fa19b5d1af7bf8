"""Commands that train and score: train, eval, score."""

from __future__ import annotations

import argparse

from spd_lens.cli import common, stopping
from spd_lens.cli.common import DEFAULT_MODEL
from spd_lens.errors import SpdLensError
from spd_lens.processes import Processes


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from accelerate import PartialState

    from spd_lens.train import TrainConfig, train_on_jsonl

    config = TrainConfig(lora=not args.full, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, loss_on=args.loss_on, checkpoint_every=args.checkpoint_every,
                         truncated=args.truncated, seed=args.seed)
    stopping.keep(lambda: stopping.training_kept(args.out))
    warn_missing_finish_reasons(args.data, "trained as finished (taught to end where they stop)")
    out = train_on_jsonl(args.model, args.data, args.out, config, runtime=common.runtime(args),
                         progress=common.progress_labelled("train"))
    if PartialState().is_main_process:  # once, not once per process under torchrun
        record = json.loads((out / "train.json").read_text())
        print(f"trained: {out} ({record['steps']} optimizer steps of a global batch of {record['global_batch_size']}: "
              f"{record['per_process_batch_size']} per process x {config.grad_accum} accumulation x "
              f"{record['processes']} process(es))")
    return 0


def _without_batch_size(settings: dict) -> dict:
    sampling = settings.get("sampling")
    if isinstance(sampling, dict):
        return {**settings, "sampling": {k: v for k, v in sampling.items() if k != "batch_size"}}
    return settings


def warn_missing_finish_reasons(path, consequence: str) -> None:
    """A warning (stderr, main process), with counts, when records of `path` do not say why they
    ended (`finish_reason` at the top level or in `choices[0]`): a cut-off completion among them
    cannot be told from a finished one."""
    import sys

    from accelerate import PartialState

    from spd_lens.train import finish_reason_counts

    counts = finish_reason_counts(path)
    if counts["missing"] and PartialState().is_main_process:
        print(f"warning: {counts['missing']} of {sum(counts.values())} records in {path} give no finish_reason "
              f"(at the top level or in choices[0]); they are {consequence}. Cut-off completions cannot be told "
              "apart: write the engine's finish_reason ('stop' / 'length') into each record", file=sys.stderr)


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
    runtime = common.runtime(args)
    model, tokenizer = (load_trained(args.model, args.adapter, runtime=runtime) if args.adapter
                        else load_hf(args.model, runtime))
    task_options = common.task_options(args, tokenizer)
    task = common.configured_task(args, **task_options)
    if args.mc_loglik and task.family != "mcqa":
        raise SpdLensError(f"--mc-loglik reads option letters: task {task.name!r} is {task.family}, not multiple choice")
    config = SamplingConfig(temperature=args.temperature,
                            max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                            seed=args.seed, batch_size=args.batch_size)
    trained = Path(args.adapter) / DONE_FILE if args.adapter else None
    settings = canonical({
        "model": args.model, "adapter": args.adapter, "task": task.name, "task_options": task_options, "n": args.n,
        "split": args.split, "seed": args.seed, "sampling": asdict(config), "dtype": runtime.describe()["dtype"],
        "engine": args.engine,
        **({"mc_loglik": True} if args.mc_loglik else {}),
        # what the adapter was trained from, so a retrained adapter is not taken for the old one
        "adapter_settings": read_json_object(trained, "a training run's record").get("settings")
        if trained is not None and trained.is_file() else None})
    out = Path(args.out)
    if out.is_file():
        previous = read_json_object(out, "an evaluation written by spd-lens eval")
        if "settings" in previous:  # evaluations written before settings were kept are redone
            # written before the dtype / the engine were kept: float32, the HF decoder
            old = {"dtype": "float32", "engine": "hf", **previous["settings"]}
            # the batch size changes no answer (refill decoding): another one reuses the result
            check_same_settings(_without_batch_size(old), _without_batch_size(settings), str(out),
                                "Use another --out or the same settings")
            print(json.dumps({"task": previous["task"], "score": previous["score"], "ci": previous["ci"],
                              "n": previous["n"]}))
            return 0
    stopping.keep(lambda: stopping.jsonl_kept(out.with_suffix(".generations.jsonl")))
    engine = None
    if args.engine == "vllm":  # the base checkpoint in the model's (evaluation) dtype, the adapter unmerged
        from spd_lens.engines import VLLMEngine, dtype_of, folded_checkpoint

        engine = VLLMEngine(folded_checkpoint(args.model, None, dtype=dtype_of(model)), dtype=dtype_of(model),
                            adapter=args.adapter, seed=args.seed)
    try:
        result = evaluate(model, tokenizer, task, n=args.n, split=args.split, seed=args.seed, config=config,
                          generations=out.with_suffix(".generations.jsonl"), progress=common.progress_labelled("eval"),
                          engine=engine)
    finally:
        if engine is not None:
            engine.close()
    extra = {}
    if args.mc_loglik:  # beside the generated letter: label log-likelihood, as asked and over rotations
        from spd_lens.evaluate import evaluate_mc

        mc = evaluate_mc(model, tokenizer, task, n=args.n, split=args.split, seed=args.seed, rotations=True,
                         loglik=True, batch_size=args.batch_size)
        extra["loglik"] = mc["loglik"]
    if not Processes.current().is_main:
        return 0  # under torchrun each process generated a shard; the main one writes the result
    write_json(out, {**result.as_dict(), **extra, "model": args.model, "adapter": args.adapter, "settings": settings,
                     "runtime": runtime.describe(), "sandbox": summarise_isolation(result.results)})
    summary = {"task": task.name, "score": result.score, "ci": result.ci, "n": result.n}
    if args.mc_loglik:
        loglik = extra["loglik"]
        summary["loglik"] = {"accuracy": loglik["accuracy"], "debiased_accuracy": loglik["debiased"]["accuracy"],
                             "option_average_accuracy": loglik["debiased"]["option_average"]["accuracy"],
                             "choice_rates": loglik["choice_rates"]}
    print(json.dumps(summary))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    """Score completions from a JSONL file (any source) with the task's scorer."""
    import json
    from collections import Counter

    from spd_lens.artifacts import write_json
    from spd_lens.evaluate import score_file
    from spd_lens.sandbox import summarise_isolation

    warn_missing_finish_reasons(args.completions, "scored as finished")
    result = score_file(common.configured_task(args), args.completions, progress=common.progress_labelled("score"))
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


def register(commands) -> None:
    train = commands.add_parser("train", help="fine-tune on an exported JSONL (LoRA by default)")
    train.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    train.add_argument("--data", required=True, help="JSONL from spd-lens generate")
    train.add_argument("--out", required=True, help="directory for the adapter (or model), its checkpoints and train.json; resumed from its last checkpoint when the settings are the same")
    train.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    train.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate, cosine schedule (default %(default)s)")
    train.add_argument("--epochs", type=int, default=5, help="passes over the data (default %(default)s)")
    train.add_argument("--batch-size", type=int, default=4,
                       help="the global batch: examples per optimizer step over all processes together "
                            "(torchrun --nproc_per_node N gives each process its share; default %(default)s)")
    train.add_argument("--grad-accum", type=int, default=1,
                       help="micro-batches each process's share is split into, to save memory; the batch and "
                            "the result stay the same (default %(default)s)")
    train.add_argument("--truncated", default="keep", choices=["keep", "drop"],
                       help="completions cut off at their token budget: train on them without an end-of-turn "
                            "marker (keep, default) or leave them out (drop)")
    train.add_argument("--loss-on", default="completion", choices=["completion", "all"],
                       help="tokens the loss is taken on: the completion only (default) or the prompt too")
    train.add_argument("--checkpoint-every", type=int, default=50,
                       help="optimizer steps between checkpoints a stopped call resumes from (default %(default)s)")
    train.add_argument("--seed", type=int, default=0, help="seed of the data order, LoRA init and dropout (default %(default)s)")
    common.add_runtime_args(train)
    train.set_defaults(func=cmd_train)

    evaluate = commands.add_parser("eval", help="score a model (optionally with a trained adapter) on a task")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    evaluate.add_argument("--adapter", help="directory written by spd-lens train")
    evaluate.add_argument("--task", required=True, help="the task scored (spd-lens tasks), or a JSONL file of your own "
                          "examples")
    common.add_task_arguments(evaluate)
    evaluate.add_argument("--n", type=int, help="questions scored (default: every question of the split)")
    evaluate.add_argument("--split", default="test", choices=["train", "dev", "test"],
                          help="split the questions come from (default %(default)s)")
    evaluate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    evaluate.add_argument("--max-new-tokens", type=int, help="token budget per answer (default: the task's)")
    evaluate.add_argument("--batch-size", type=int, default=16,
                          help="questions generated at once: memory and speed (default %(default)s)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the questions' draw and of sampling (default %(default)s)")
    evaluate.add_argument("--out", required=True, help="JSON file for the score, CI and per-example results")
    evaluate.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                          help="what generates the answers: hf, the project's decoder (default), or vllm (its own "
                               "environment, `bash run.sh setup-vllm`; an adapter applied by its LoRA support)")
    evaluate.add_argument("--mc-loglik", action="store_true",
                          help="multiple choice: also score by the label's log-likelihood at the answer position, as "
                               "asked, over cyclically rotated options and option-averaged (kept under 'loglik')")
    common.add_sandbox_flags(evaluate)
    common.add_runtime_args(evaluate)
    evaluate.set_defaults(func=cmd_eval)

    score = commands.add_parser("score", help="score completions from a JSONL file (spd-lens generate, vLLM, ...)")
    score.add_argument("--task", required=True, help="the task whose scorer reads the completions (spd-lens tasks), "
                       "or a JSONL file of your own examples")
    common.add_scorer_argument(score)
    score.add_argument("--completions", required=True, help="JSONL: generate export or {prompt_id, completion}")
    score.add_argument("--out", required=True, help="JSON file for the score, CI and per-example verdicts")
    common.add_sandbox_flags(score)
    score.set_defaults(func=cmd_score)
