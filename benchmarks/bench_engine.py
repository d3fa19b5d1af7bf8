"""vLLM against the project's refill decoder: the same prompts, greedy and sampled, in one run.

Default model, float32, arithmetic prompts rendered with the chat template. Two measures:

- steady state: both engines already loaded (vLLM's worker started once); new tokens/s of
  generating all prompts, in interleaved pairs HF, vLLM, HF, vLLM, ... and an A/A control (the
  HF decoder's second timing of each pair against its first: the noise of the comparison);
- whole command: `spd-lens generate --engine hf` and `--engine vllm` as fresh processes (model
  loading, and for vLLM its environment's imports and engine start), in pairs too.

The last line is one JSON object: tokens/s and ratios vLLM/HF with the A/A ratios beside them.

    python benchmarks/bench_engine.py            # 256 prompts, 40 tokens, 2 pairs (tens of minutes on 2 cores)
    python benchmarks/bench_engine.py --smoke    # 16 prompts, 8 tokens, 1 pair, steady state only
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256, help="prompts")
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="the HF decoder's rows in flight")
    parser.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                        help="also time whole spd-lens generate commands")
    parser.add_argument("--smoke", action="store_true", help="16 prompts, 8 tokens, one pair, no whole commands")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.smoke:
        args.n, args.new_tokens, args.pairs, args.whole = 16, 8, 1, False

    from spd_lens.engines import HFEngine, VLLMEngine, folded_checkpoint
    from spd_lens.models import DEFAULT_MODEL, load_hf
    from spd_lens.runtime import Runtime
    from spd_lens.sampling import SamplingConfig
    from spd_lens.tasks import get_task

    dtype = "float32"
    model, tokenizer = load_hf(DEFAULT_MODEL, Runtime.resolve(args.device, dtype))
    examples = get_task("arithmetic").examples("test", n=args.n, seed=0)
    modes = {"greedy": SamplingConfig(max_new_tokens=args.new_tokens, batch_size=args.batch_size),
             "sampled": SamplingConfig(temperature=1.0, top_k=20, top_p=0.8, max_new_tokens=args.new_tokens,
                                       batch_size=args.batch_size)}
    checkpoint = folded_checkpoint(DEFAULT_MODEL, None, dtype=dtype)
    started = time.perf_counter()
    vllm = VLLMEngine(checkpoint, dtype=dtype).start()
    start_seconds = time.perf_counter() - started
    engines = {"hf": HFEngine(), "vllm": vllm}

    def timed(engine, config) -> tuple[float, int, list]:
        begin = time.perf_counter()
        rows = list(engine.stream(model, tokenizer, examples, config, range(len(examples))))
        seconds = time.perf_counter() - begin
        return seconds, sum(c.tokens for _, _, c in rows), sorted((i, k, c.text) for i, k, c in rows)

    report: dict = {"n": args.n, "new_tokens": args.new_tokens, "pairs": args.pairs,
                    "vllm_start_seconds": round(start_seconds, 1), "vllm_version": vllm.version}
    try:
        timed(engines["hf"], modes["greedy"]) if not args.smoke else None  # warm-up of torch's kernels
        for mode, config in modes.items():
            rates: dict[str, list[float]] = {"hf": [], "vllm": [], "hf_again": []}
            texts = {}
            for _ in range(args.pairs):
                for name in ("hf", "vllm", "hf_again"):  # A B A: the second A is the A/A control
                    seconds, tokens, out = timed(engines[name.removesuffix("_again")], config)
                    rates[name].append(tokens / seconds)
                    texts[name] = out
                    print(f"{mode} {name}: {tokens} new tokens in {seconds:.1f} s ({tokens / seconds:.1f}/s)",
                          file=sys.stderr, flush=True)
            hf, served, again = (statistics.median(rates[k]) for k in ("hf", "vllm", "hf_again"))
            report[mode] = {"hf_tokens_per_s": round(hf, 1), "vllm_tokens_per_s": round(served, 1),
                            "ratio_vllm_hf": round(served / hf, 2), "ratio_aa": round(again / hf, 2)}
            if mode == "greedy":
                same = sum(a == b for a, b in zip(texts["hf"], texts["vllm"]))
                report[mode]["identical"] = f"{same}/{len(texts['hf'])}"
    finally:
        vllm.close()
    if args.whole:
        report["whole_command"] = whole_commands(args, examples)
    if not args.smoke:  # a full run's ratios into benchmarks/results/bench_engine.json (docs/benchmarks.md)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import results_file

        size = f"{args.n} arithmetic prompts, at most {args.new_tokens} new tokens, float32"
        rows = [{"figure": f"{mode} new tokens/s, steady state: vLLM (CPU build) vs the refill decoder ({size})",
                 "ratio": report[mode]["ratio_vllm_hf"],
                 "detail": f"{report[mode]['vllm_tokens_per_s']} vs {report[mode]['hf_tokens_per_s']} tokens/s, median "
                           f"of {args.pairs} interleaved pairs; A/A control {report[mode]['ratio_aa']}"
                           + (f"; identical {report[mode]['identical']}" if "identical" in report[mode] else "")}
                for mode in ("greedy", "sampled")]
        if "whole_command" in report:
            whole = report["whole_command"]
            rows.append({"figure": f"whole `spd-lens generate` command, greedy: --engine hf seconds / --engine vllm ({size})",
                         "ratio": whole["ratio_hf_vllm"],
                         "detail": f"{whole['hf_seconds']} vs {whole['vllm_seconds']} s (vLLM engine start "
                                   f"{report['vllm_start_seconds']} s in its warm process); A/A control {whole['ratio_aa']}"})
        results_file.write("bench_engine", rows)
    print(json.dumps(report))


def whole_commands(args, examples) -> dict:
    """Seconds of fresh `spd-lens generate` processes, greedy, interleaved hf, vllm, hf (A/A)."""
    seconds: dict[str, list[float]] = {"hf": [], "vllm": [], "hf_again": []}
    with tempfile.TemporaryDirectory() as folder:
        for pair in range(args.pairs):
            for name in ("hf", "vllm", "hf_again"):
                out = Path(folder) / f"{name}-{pair}.jsonl"
                command = [sys.executable, "-m", "spd_lens.cli", "generate", "--task", "arithmetic", "--split", "test",
                           "--n", str(args.n), "--max-new-tokens", str(args.new_tokens), "--batch-size",
                           str(args.batch_size), "--device", args.device, "--dtype", "float32",
                           "--engine", name.removesuffix("_again"), "--out", str(out)]
                begin = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - begin)
                print(f"whole command {name}: {seconds[name][-1]:.1f} s", file=sys.stderr, flush=True)
    hf, served, again = (statistics.median(seconds[k]) for k in ("hf", "vllm", "hf_again"))
    return {"hf_seconds": round(hf, 1), "vllm_seconds": round(served, 1), "ratio_hf_vllm": round(hf / served, 2),
            "ratio_aa": round(hf / again, 2)}


if __name__ == "__main__":  # vLLM's engine starts its workers by spawn
    main()
