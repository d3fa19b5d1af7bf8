"""Commands around run directories: demo, run, plan, ablate, report, summary, compare."""

from __future__ import annotations

import argparse
import re
import sys

from spd_lens.cli import common, stopping
from spd_lens.errors import SpdLensError
from spd_lens.processes import Processes


def run_and_report(config, out, reuse=(), seeds=None) -> int:
    from spd_lens.experiment import run_experiment
    from spd_lens.report import format_table

    metrics = run_experiment(config, out, progress=common.progress_labelled,
                             log=lambda m: print(f"[spd-lens] {m}", flush=True), reuse=reuse, seeds=seeds)
    if not Processes.current().is_main:
        return 0  # under torchrun the main process reports
    print()
    print(format_table(metrics))
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["stage_seconds"].items()))
    if metrics.get("stage_seconds_interrupted"):
        print("lost to interrupted calls: " + ", ".join(f"{k} {v:.0f}" for k, v in metrics["stage_seconds_interrupted"].items()))
    print(f"metrics: {out}/metrics.json\nreport:  {out}/report.html")
    return 0


def seed_list(text: str) -> list[int]:
    """--seeds 0,2 -> [0, 2]."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integer seeds, e.g. 0,2") from None


def cmd_run(args: argparse.Namespace) -> int:
    """A full experiment from a TOML config."""
    import dataclasses
    from pathlib import Path

    from spd_lens.config import check_methods, load_config

    config = common.with_flags(load_config(args.config, overrides=args.override), args)
    if args.engine is not None:  # both self-generation and evaluation
        config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, engine=args.engine),
                                     eval=dataclasses.replace(config.eval, engine=args.engine))
    common.announce_runtime(config.model.runtime())
    if args.methods is not None:
        check_methods(args.methods)
        outside = [m for m in args.methods if m not in config.methods]
        if outside:
            raise SpdLensError(f"--methods {','.join(args.methods)}: {', '.join(outside)} not among the methods of "
                               f"{args.config} ({', '.join(config.methods)}); add it to the config's `methods` "
                               "list, or run a subset of those")
        config = dataclasses.replace(config, methods=args.methods)
    out = args.out or str(Path("runs") / config.name)
    stopping.keep(lambda: stopping.run_kept(config, out))
    if args.data_only:
        if args.seeds is not None:
            raise SpdLensError(f"--seeds {','.join(map(str, args.seeds))} with --data-only: the data gate compares "
                               "every seed of the config; drop --seeds (or set seeds in the config)")
        return data_gate_report(config, out)
    return run_and_report(config, out, reuse=args.reuse, seeds=args.seeds)


def data_gate_report(config, out) -> int:
    from spd_lens.experiment import Run

    report = Run(config, out, progress=common.progress_labelled,
                 log=lambda m: print(f"[spd-lens] {m}", flush=True)).data_gate()
    if not Processes.current().is_main:
        return 0
    print_data_gate(report)
    print(f"data gate: {out}/data_gate.json")
    return 0


def print_data_gate(report: dict) -> None:
    from spd_lens.evaluate import seeds_differ

    print(f"\ntraining data of {report['train_n']} prompts per seed, seeds {report['seeds']}:")
    print(f"{'method':<14} {'correct':>8} {'cut off':>8} {'tokens':>7}")
    for method, q in report["methods"].items():
        tokens = "" if q["mean_tokens"] is None else f"{q['mean_tokens']:.1f}"
        print(f"{method:<14} {q['correct']:>8.3f} {q['cut_off']:>8.3f} {tokens:>7}")
    for name, c in report["comparisons"].items():
        flag = "  ! seeds differ more than prompts explain" if seeds_differ(c) else ""
        print(f"{name:<22} {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}] (share correct, paired){flag}")


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job: the quick comparison (base, psr, spd, spd-random) on the default model."""
    from importlib.resources import files

    from spd_lens.config import load_config

    config = common.with_runtime(load_config(files("spd_lens") / "configs" / "quick.toml"), args)
    stopping.keep(lambda: stopping.run_kept(config, args.out))
    common.announce_runtime(config.model.runtime())
    return run_and_report(config, args.out)


def cmd_plan(args: argparse.Namespace) -> int:
    """Validate a config and its data, count every stage's work and estimate its time; no model runs."""
    from spd_lens.config import load_config
    from spd_lens.plan import format_plan, make_plan

    plan = make_plan(common.with_runtime(load_config(args.config, overrides=args.override), args), figures=args.figures,
                     ablate=args.ablate, data_only=args.data_only)
    command = "spd-lens ablate" if args.ablate else "spd-lens run --data-only" if args.data_only else "spd-lens run"
    print(f"plan for {command} {args.config} (run name {plan.config.name!r}; nothing is run)")
    print(format_plan(plan))
    if plan.errors:
        print(f"\n{len(plan.errors)} problem(s) would stop `{command}`:", *plan.errors, sep="\n  ", file=sys.stderr)
        return 2
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Projected decoding over ranks x layers x alphas (x heads), resumable, one tidy table."""
    from pathlib import Path

    from spd_lens.ablate import run_ablation
    from spd_lens.config import load_config

    if args.examples:
        return _ablate_examples(args)
    if not args.config:
        from spd_lens.errors import SpdLensError

        raise SpdLensError("spd-lens ablate takes a CONFIG (its [ablate] grid) or --examples FILE.jsonl "
                           "(your own capability: the keep/remove grid with random controls)")
    config = common.with_flags(load_config(args.config), args)
    common.announce_runtime(config.model.runtime())
    out = Path(args.out or Path("runs") / f"{config.name}-ablation")
    stopping.keep(lambda: stopping.ablation_kept(out))
    rows = run_ablation(config, out, progress=common.progress_labelled("ablation"))
    print(f"{'rank':>10} {'layers':>8} {'kinds':>5} {'alpha':>5} {'head':>4} {'mode':>6} {'subspace':>8} {'seed':>4} "
          f"{'draw':>4} {'score':>6}  {'loss':>7}")
    for r in rows:
        mode = "" if r["rank"] == "none" else r.get("mode", "keep")
        seed, draw = ("" if r.get(k) is None else r[k] for k in ("seed", "draw"))
        print(f"{str(r['rank']):>10} {r['layers']:>8} {r['kinds']:>5} {r['alpha']:>5} {str(r['head']):>4} {mode:>6} "
              f"{r['subspace']:>8} {seed:>4} {draw:>4} {r['score']:>6.3f}  {r['loss']:>7.4f}")
    from spd_lens.ablate import controls

    cells = controls(rows)
    if cells:
        print("\ngradient - random per cell, share correct (95% interval over seeds, draws and questions):")
        for c in cells:
            print(f"  rank {c['rank']} layers {c['layers']} {c['kinds']} alpha {c['alpha']} head {c['head']} {c['mode']}: "
                  f"{c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]")
    print(f"table: {out}/ablation.csv\nfigure: {out}/ablation.html")
    return 0


def _ablate_examples(args: argparse.Namespace) -> int:
    """`spd-lens ablate --examples FILE.jsonl`: spd_lens.ablate on your own capability."""
    from pathlib import Path

    import spd_lens
    from spd_lens.errors import SpdLensError
    from spd_lens.subspace import CapabilitySubspace

    if args.config:
        raise SpdLensError("give a CONFIG or --examples, not both: a config's [ablate] grid runs on its [task]")
    capability = spd_lens.capability(args.examples, scorer=args.scorer)
    resolved = common.runtime(args)
    model = spd_lens.load_model(args.model or spd_lens.DEFAULT_MODEL, resolved)
    examples = capability.all_examples() if args.split == "all" else capability
    subspace = CapabilitySubspace.load(args.subspace) if args.subspace else None

    def numbers(text, kind=int):
        return [kind(x) for x in text.split(",") if x] if text else []

    out = Path(args.out or Path("runs") / f"{capability.name}-ablate")
    table = spd_lens.ablate(
        model, examples, subspace=subspace, ranks=numbers(args.ranks), energies=numbers(args.energies, float),
        layer_sets=[numbers(s) for s in args.layer_sets] if args.layer_sets else None,
        kind_sets=[s.split(",") for s in args.kind_sets], heads=numbers(args.heads) or None,
        modes=args.modes.split(","), random_draws=args.draws, random_seeds=numbers(args.random_seeds) or None,
        max_new_tokens=args.max_new_tokens, split=args.split if args.split != "all" else "dev", n=args.n,
        extract_n=args.extract_n, layers=numbers(args.layers) or None, out=out,
        progress=common.progress_labelled("ablate"))
    print(table.to_string(index=False, columns=["cell", "mode", "source", "draw", "loss", "span_accuracy",
                                                "greedy_accuracy"], float_format=lambda v: f"{v:.3f}")
          if hasattr(table, "to_string") else "\n".join(map(str, table)))
    print("\ngradient - random per cell (95% interval):")
    for c in table.attrs["controls"]:
        print(f"  {c['cell']} {c['mode']:>6} {c['metric']:>15}: {c['difference']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]")
    print(f"table: {out}/ablate.csv\nfigures: {out}/ablate.html, {out}/ablate-*.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from spd_lens.ablate import refresh_controls, write_ablation_report
    from spd_lens.attribution import write_heads_report
    from spd_lens.report import format_table, write_run_report

    run_dir = Path(args.run_dir)
    if (run_dir / "ablation.json").is_file():
        refresh_controls(run_dir)  # the controls by this version's intervals and seed test
        path = write_ablation_report(run_dir)
    elif (run_dir / "heads.json").is_file():
        path = write_heads_report(run_dir)
    elif (run_dir / "data_gate.json").is_file() and not (run_dir / "metrics.json").is_file():
        from spd_lens.experiment import recompute_data_gate

        print_data_gate(recompute_data_gate(run_dir))
        print(f"data gate: {run_dir / 'data_gate.json'} (comparisons recomputed from the kept verdicts)")
        return 0
    else:
        path = write_run_report(run_dir, plotly=args.plotly, images=True, log=print)
        print(format_table(json.loads((run_dir / "metrics.json").read_text())))
    print(f"report: {path}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    """Several runs side by side, as markdown tables (scores, paired differences, training data)."""
    from spd_lens.summary import load_runs, summary_tables, time_table, timed_directories

    print(time_table(timed_directories(args.runs)) if args.time else summary_tables(load_runs(args.runs)))
    return 0


def evaluation_results(spec: str) -> list[dict]:
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
    from spd_lens.evaluate import paired_difference, per_prompt_scores, seeds_differ

    first, second = evaluation_results(args.first), evaluation_results(args.second)
    c = paired_difference(first, second)
    print(f"{args.first} - {args.second}: {c['difference']:+.3f}  95% CI [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]  "
          f"({c['n']} shared questions; interval over seeds, then questions)")
    if seeds_differ(c):
        print(f"! the per-seed differences (spread {c['seed_spread']:.3f}) differ more than question noise explains "
              f"(p = {c['seed_p']:.3g}): run more seeds before reading this difference")
    a, b = per_prompt_scores(first), per_prompt_scores(second)
    shared = sorted(a.keys() & b.keys(), key=natural_key)
    for name, better in ((args.first, [k for k in shared if a[k] > b[k]]), (args.second, [k for k in shared if b[k] > a[k]])):
        print(f"better in {name} ({len(better)}): {', '.join(better) or '-'}")
    print(f"solved by both (score 1 in each): {sum(a[k] == b[k] == 1 for k in shared)}")
    return 0


def natural_key(text: str) -> list:
    """HumanEval/9 before HumanEval/10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def register(commands) -> None:
    demo = commands.add_parser("demo", help="the main job: the quick SPD comparison on the default model")
    demo.add_argument("--out", default="runs/demo", help="run directory (default %(default)s; resumed when it exists)")
    common.add_runtime_args(demo, config=True)
    demo.set_defaults(func=cmd_demo)

    run = commands.add_parser("run", help="a full experiment from a TOML config (resumable)")
    run.add_argument("config", help="TOML config (spd_lens/configs/*.toml, experiments/**/*.toml; see docs/runs.md)")
    run.add_argument("--out", help="run directory (default runs/<config name>)")
    run.add_argument("--engine", choices=["hf", "vllm"],
                     help="what generates, for self-generation and evaluation alike (overrides the config's "
                          "[sampling] engine and [eval] engine; vllm: `bash run.sh setup-vllm`, docs/engines.md)")
    run.add_argument("--override", action="append", default=[], metavar="TOML",
                     help="a TOML file merged on top of the config, key by key (repeatable, later files win), e.g. "
                          "experiments/paper/smoke.toml: the paper's config with only its model and sizes shrunk")
    run.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m],
                     help="comma-separated subset of the config's methods to run now; a method the config "
                          "does not list is refused (a run directory accepts the others later)")
    run.add_argument("--seeds", type=seed_list,
                     help="comma-separated subset of the config's seeds to run now, e.g. one seed per process "
                          "or machine, each with its own --out (a directory holds one process at a time)")
    run.add_argument("--data-only", action="store_true",
                     help="the gate before training: generate and score every trained method's training data, "
                          "write RUN/data_gate.json, train and evaluate nothing")
    run.add_argument("--reuse", action="append", default=[], metavar="RUN_DIR",
                     help="take finished evaluations of methods that do not depend on the subspace (base, psr, "
                          "ssd) from another run whose settings for them are the same; repeatable")
    common.add_sandbox_flags(run)
    common.add_runtime_args(run, config=True)
    run.set_defaults(func=cmd_run)

    plan = commands.add_parser("plan", help="check a config and its data, count each stage's work and estimate "
                                            "its time, without running a model")
    plan.add_argument("config", help="TOML config to check and plan")
    plan.add_argument("--override", action="append", default=[], metavar="TOML",
                      help="a TOML file merged on top of the config, key by key (repeatable, later files win), "
                           "as `spd-lens run --override` takes it")
    which = plan.add_mutually_exclusive_group()
    which.add_argument("--ablate", action="store_true", help="plan `spd-lens ablate CONFIG` (the [ablate] grid) "
                                                              "instead of `spd-lens run CONFIG`")
    which.add_argument("--data-only", action="store_true", help="plan `spd-lens run CONFIG --data-only` (the data "
                                                                 "gate: extraction and self-generation only)")
    plan.add_argument("--figures", help="throughput JSON from benchmarks/gpu_check.py (its last line) to estimate "
                                        "with instead of the recorded CPU runs")
    common.add_runtime_args(plan, config=True)
    plan.set_defaults(func=cmd_plan)

    ablate = commands.add_parser("ablate", help="sweep ranks x layers x alphas (x heads) of projected decoding, "
                                                "from a config or on your own examples (--examples)")
    ablate.add_argument("config", nargs="?", help="TOML config whose [ablate] section gives the grid")
    ablate.add_argument("--out", help="run directory (default runs/<config name>-ablation, with --examples "
                                      "runs/<file name>-ablate)")
    mine = ablate.add_argument_group("your own capability (spd_lens.ablate: keep/remove x random controls)")
    mine.add_argument("--examples", help="JSONL of {id, prompt, answer, span(s)} (see docs/own-capability.md)")
    mine.add_argument("--scorer", help="module:function scoring (example, completion) (default: span match)")
    mine.add_argument("--model", default=None, help="model name or directory (default: the embedded model)")
    mine.add_argument("--subspace", help="a saved subspace directory (default: extracted from the train split)")
    mine.add_argument("--split", default="dev", help="examples scored: dev (default), test, train or all "
                                                       "(all: the subspace is extracted from them too)")
    mine.add_argument("--n", type=int, help="score at most this many examples")
    mine.add_argument("--extract-n", type=int, default=16, help="train examples the subspace is extracted from")
    mine.add_argument("--layers", help="layers to extract at, e.g. 15,29 (default L/2 and L-1)")
    mine.add_argument("--ranks", default="4,16", help="fixed ranks, e.g. 1,2,4 (default 4,16)")
    mine.add_argument("--energies", help="energy shares, e.g. 0.5,0.9")
    mine.add_argument("--layer-sets", nargs="+", help="layer sets, each comma-separated, e.g. 15 29 15,29 "
                                                      "(default each subspace layer alone)")
    mine.add_argument("--kind-sets", nargs="+", default=["k,v"], help="K/V sets, e.g. k v k,v (default k,v)")
    mine.add_argument("--heads", help="KV heads, each alone, e.g. 0,1,2 (default all heads together)")
    mine.add_argument("--modes", default="keep,remove", help="keep (P) and/or remove (I - P)")
    mine.add_argument("--draws", type=int, default=3, help="random subspaces per cell (default 3)")
    mine.add_argument("--random-seeds", help="the draws' seeds, comma-separated (default: fresh, recorded)")
    mine.add_argument("--max-new-tokens", type=int, help="greedy budget (default the capability's)")
    common.add_sandbox_flags(ablate)
    common.add_runtime_args(ablate, config=True)
    ablate.set_defaults(func=cmd_ablate)

    summary = commands.add_parser("summary", help="several runs side by side as markdown tables: scores with "
                                                  "seed-aware intervals, paired differences, training data")
    summary.add_argument("runs", nargs="+", metavar="[LABEL=]RUN_DIR",
                         help="run directories written by spd-lens run (a column each; LABEL defaults to the "
                              "directory's name)")
    summary.add_argument("--time", action="store_true",
                         help="instead: hours per stage (extract, generate, train, eval, ablate) of each directory, "
                              "ablations and data gates too; a directory of runs (an lr sweep) counts each")
    summary.set_defaults(func=cmd_summary)

    compare = commands.add_parser("compare", help="paired difference of two evaluations, e.g. runs/ood:spd runs/math:spd")
    compare.add_argument("first", help="RUN_DIR:METHOD")
    compare.add_argument("second", help="RUN_DIR:METHOD")
    compare.set_defaults(func=cmd_compare)

    report = commands.add_parser("report", help="figures again from a directory's tables: a run (metrics.json -> "
                                                "report.html), an ablation (ablation.json; its controls recomputed), head "
                                                "attribution (heads.json) "
                                                "or a data gate (data_gate.json: its comparisons recomputed from the kept "
                                                "verdicts)")
    report.add_argument("run_dir", help="a directory written by spd-lens run, ablate, or run --data-only")
    report.add_argument("--plotly", choices=["file", "cdn", "inline"], default="file",
                        help="how a run's report.html gets plotly.js: file (default: one plotly.min.js written "
                             "beside it, the page stays small), cdn (linked from cdn.plot.ly: needs the network to "
                             "view) or inline (embedded: one self-contained file of about 5 MB)")
    report.set_defaults(func=cmd_report)
