"""Commands for exploring a model: tasks, models, ask, extract, generate, heads, overlap."""

from __future__ import annotations

import argparse

from spd_lens.cli import common, stopping
from spd_lens.cli.common import DEFAULT_MODEL, int_list
from spd_lens.errors import SpdLensError
from spd_lens.processes import Processes

MAX_MEMORY_HELP = ("memory budget of a gradient pass, e.g. 4GB (default: half the available memory, batches aiming "
                   "at 3 GiB on the CPU); batches shrink to fit, an example that cannot fit is refused")


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

    model, tokenizer = load_hf(args.model, common.runtime(args))
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, args.question))], device=model.device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Capability subspace of a model for a task, saved to --out."""
    import json
    from pathlib import Path

    from spd_lens.extract import extract_subspace
    from spd_lens.models import boot, load_hf

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SpdLensError(f"--out {str(out)!r} exists and is not a directory: choose a directory path")
    model, tokenizer = load_hf(args.model, common.runtime(args))
    target = boot(model, tokenizer) if args.via_bridge else model
    subspace = extract_subspace(
        target, args.task, n=args.n, split=args.split, seed=args.seed, layers=args.layers, rank=args.rank,
        rank_frac=args.rank_frac, energy=args.energy, loss=args.loss, batch_size=args.batch_size, tokenizer=tokenizer,
        task_options=common.task_options(args, tokenizer), progress=common.progress("gradients"), out=out,
        max_memory=args.max_memory, capture="bridge" if args.via_bridge else "auto",
    )  # a directory holding this extraction already is reused; one made with other settings is refused
    if not Processes.current().is_main:
        return 0  # under torchrun each process took a shard of the batches; the main one reports
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
    model, tokenizer = load_hf(args.model, common.runtime(args))
    task = get_task(args.task, **common.task_options(args, tokenizer))
    config = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=task.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens,
                            num_samples=args.num_samples,
                            seed=args.seed, batch_size=args.batch_size)
    examples = task.examples(args.split, n=args.n, seed=args.seed)
    stopping.keep(lambda: stopping.jsonl_kept(args.out))
    provenance: dict = {"split": args.split}  # the projection is recorded from the model (hooks or folded weights)
    hooks = nullcontext()
    if args.subspace:
        subspace = CapabilitySubspace.load(args.subspace, model)
        projection = Projection.build(subspace, layers=args.layers, kinds=args.kinds, layout=args.layout,
                                      heads=args.heads, alpha=args.alpha)
        if args.fold or args.save_folded or args.engine == "vllm":
            folded = fold_projection(model, projection)
            if args.save_folded and args.engine != "vllm":
                save_folded(folded, tokenizer, args.save_folded)
            if args.fold or args.engine == "vllm":
                folded.config.spd_lens_model_id = model.config.spd_lens_model_id
                model = folded
        if not args.fold and args.engine != "vllm":
            hooks = projection.apply(model)
    engine = None
    if args.engine == "vllm":  # vLLM has no hooks: it generates from the folded checkpoint
        from spd_lens.engines import VLLMEngine, dtype_of, folded_checkpoint

        dtype = dtype_of(model)
        checkpoint = folded_checkpoint(args.model, projection if args.subspace else None, args.save_folded,
                                       dtype=dtype)
        print(f"vLLM generates from {checkpoint} ({dtype})", flush=True)
        engine = VLLMEngine(checkpoint, dtype=dtype, seed=args.seed)
    try:
        with hooks:
            path = generate_jsonl(model, tokenizer, examples, args.out, config, task=task.name, provenance=provenance,
                                  progress=common.progress("generate"), engine=engine)
    finally:
        if engine is not None:
            engine.close()
    if Processes.current().is_main:  # once, not once per process under torchrun
        print(f"{len(examples) * config.num_samples} completions in {path}")
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    """Head attribution across layers: table (CSV/JSON) and figures (HTML)."""
    import csv
    from pathlib import Path

    from spd_lens.artifacts import write_json
    from spd_lens.attribution import head_attribution, write_heads_report
    from spd_lens.models import load_hf

    task = common.configured_task(args)
    model, tokenizer = load_hf(args.model, common.runtime(args))
    rows = head_attribution(model, task, n=args.n, seed=args.seed, layers=args.layers, score_top=args.score_top,
                            score_n=args.score_n, tokenizer=tokenizer, progress=common.progress_labelled("heads"),
                            max_memory=args.max_memory)
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


def cmd_overlap(args: argparse.Namespace) -> int:
    """How much two saved subspaces share, beside a random subspace of the first one's ranks."""
    from spd_lens.subspace import CapabilitySubspace, random_like

    first, second = CapabilitySubspace.load(args.first), CapabilitySubspace.load(args.second)
    overlap, control = first.overlap(second), random_like(first, seed=0).overlap(second)
    print("mean cos² of principal angles (1 = same subspace); random control of the same ranks beside")
    for (layer, kind), value in sorted(overlap.items()):
        print(f"layer {layer:>2} {kind.upper()}: {value:.3f}   random: {control[(layer, kind)]:.3f}")
    return 0


def register(commands) -> None:
    commands.add_parser("tasks", help="list the tasks").set_defaults(func=cmd_tasks)
    commands.add_parser("models", help="list the built-in model names").set_defaults(func=cmd_models)

    ask = commands.add_parser("ask", help="greedy answer of a model to one question")
    ask.add_argument("question", help="the question, sent as one user turn in the model's chat template")
    ask.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    ask.add_argument("--max-new-tokens", type=int, default=48, help="longest answer in tokens (default %(default)s)")
    common.add_runtime_args(ask)
    ask.set_defaults(func=cmd_ask)

    extract = commands.add_parser("extract", help="capability subspace from correctness-token gradients")
    extract.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    extract.add_argument("--task", required=True, help="the capability's task (spd-lens tasks lists them), or a JSONL "
                         "file of your own examples ({id, prompt, answer, span} a line)")
    common.add_task_arguments(extract)
    extract.add_argument("--n", type=int, required=True, help="number of calibration examples")
    extract.add_argument("--split", default="train", choices=["train", "dev", "test"],
                         help="split the calibration examples are drawn from (default %(default)s)")
    extract.add_argument("--seed", type=int, default=0, help="seed of the examples' draw (default %(default)s)")
    extract.add_argument("--layers", type=int_list, help="comma-separated layer indices (default: L//2 and L-1)")
    policy = extract.add_mutually_exclusive_group()
    policy.add_argument("--rank", type=int, help="fixed rank of every basis")
    policy.add_argument("--rank-frac", type=float, help="fraction of each basis's numerical rank (default 0.5)")
    policy.add_argument("--energy", type=float, help="smallest rank keeping this fraction of gradient energy")
    extract.add_argument("--loss", default="correctness", choices=["correctness", "full"],
                         help="correctness: the loss on the tokens that decide the answer (the method); full: on the whole completion (the paper's ablation)")
    extract.add_argument("--batch-size", type=int, default=4, help="most examples a batch holds")
    extract.add_argument("--max-memory", help=MAX_MEMORY_HELP)
    extract.add_argument("--via-bridge", action="store_true",
                         help="capture through the TransformerBridge's hook_k/hook_v (same result, slower)")
    extract.add_argument("--out", required=True, help="directory for subspace.safetensors + subspace.json")
    common.add_runtime_args(extract)
    extract.set_defaults(func=cmd_extract)

    generate = commands.add_parser("generate", help="self-generation (optionally projected) exported as JSONL")
    generate.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    generate.add_argument("--task", required=True, help="the task whose prompts are answered (spd-lens tasks), or a "
                          "JSONL file of your own examples")
    common.add_task_arguments(generate)
    generate.add_argument("--n", type=int, required=True, help="number of prompts")
    generate.add_argument("--split", default="train", choices=["train", "dev", "test"],
                          help="split the prompts are drawn from (default %(default)s)")
    generate.add_argument("--subspace", help="directory of a saved subspace: project K/V onto it")
    generate.add_argument("--fold", action="store_true", help="fold the projection into the weights (no hooks)")
    generate.add_argument("--save-folded", help="also save the folded model as a Hugging Face checkpoint here")
    generate.add_argument("--alpha", type=float, default=1.0,
                          help="projection strength: 0 = none, 1 = K·P; outside [0, 1] extrapolates")
    generate.add_argument("--layout", default="flat", choices=["flat", "head"],
                          help="project each layer's K/V as one flattened vector (flat) or per KV head (head)")
    generate.add_argument("--heads", type=int_list, help="KV heads to project (layout head)")
    generate.add_argument("--layers", type=int_list, help="subset of the subspace's layers to project")
    generate.add_argument("--kinds", type=lambda t: [k for k in t.split(",") if k], default=["k", "v"],
                          help="k, v or k,v (default)")
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    generate.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = off)")
    generate.add_argument("--max-new-tokens", type=int, help="default: the task's budget")
    generate.add_argument("--num-samples", type=int, default=1, help="completions per prompt")
    generate.add_argument("--seed", type=int, default=0, help="seed of the prompts' draw and of sampling (default %(default)s)")
    generate.add_argument("--batch-size", type=int, default=8,
                          help="prompts generated at once: memory and speed (default %(default)s)")
    generate.add_argument("--out", required=True, help="JSONL file (resumed if it exists with the same settings)")
    generate.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                          help="what generates: hf, the project's decoder (default), or vllm (its own environment, "
                               "`bash run.sh setup-vllm`; a projection reaches it folded into the weights)")
    common.add_runtime_args(generate)
    generate.set_defaults(func=cmd_generate)

    heads = commands.add_parser("heads", help="which KV heads carry a capability (all layers)")
    heads.add_argument("--model", default=DEFAULT_MODEL, help="model: a built-in name (spd-lens models), a Hugging Face directory or hub id (default %(default)s)")
    heads.add_argument("--task", required=True, help="the capability's task (spd-lens tasks), or a JSONL file of your own examples")
    common.add_scorer_argument(heads)
    heads.add_argument("--n", type=int, default=16, help="calibration examples for the gradients (default %(default)s)")
    heads.add_argument("--seed", type=int, default=0, help="seed of the examples' draw (default %(default)s)")
    heads.add_argument("--layers", type=int_list, help="default: every layer")
    heads.add_argument("--score-top", type=int, default=5, help="heads whose task-score change is measured")
    heads.add_argument("--score-n", type=int, default=32,
                       help="test questions each of the --score-top heads is scored on (default %(default)s)")
    heads.add_argument("--max-memory", help=MAX_MEMORY_HELP)
    heads.add_argument("--out", required=True, help="directory for heads.json, heads.csv and heads.html")
    common.add_sandbox_flags(heads)
    common.add_runtime_args(heads)
    heads.set_defaults(func=cmd_heads)

    overlap = commands.add_parser("overlap", help="how much two saved subspaces share (mean cos² of principal angles)")
    overlap.add_argument("first", help="subspace directory (spd-lens extract --out, or RUN/subspaces/gradient-seed0)")
    overlap.add_argument("second", help="the subspace directory to compare it with")
    overlap.set_defaults(func=cmd_overlap)
