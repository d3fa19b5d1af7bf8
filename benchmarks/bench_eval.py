"""Evaluation wall time with refill decoding (no step on finished rows) against static batches.

For the code task (HumanEval, `--code-n` test problems, 384-token budget) and arithmetic
(`--math-n` test questions), the default model is evaluated greedily end to end (generation and
scoring, a fresh generations file each time) with `batching="refill"` and with
`batching="static"` (transformers' batched `generate`, the path before refill decoding), both at
`--batch` rows. The two paths run interleaved, A B, B A, A B ..., `--pairs` times, and the figure is the
median of the per-pair time ratios (static / refill), so drift on a noisy machine does not pose as a
speed-up. An A/A control (refill against refill on arithmetic) shows the noise floor. Both paths
must score the same and, greedy, generate the same completions (checked).

    python benchmarks/bench_eval.py [--code-n 64 --math-n 128 --batch 16 --pairs 4 --code-pairs 2]

The last line is one JSON object: speedup_code, speedup_math, control_same (the A/A ratio).
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--code-n", type=int, default=64)
    parser.add_argument("--math-n", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--code-pairs", type=int, default=2)
    parser.add_argument("--skip-code", action="store_true")
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, code_n=2, math_n=4, batch=2, pairs=1, code_pairs=1)

    from spd_lens.evaluate import evaluate
    from spd_lens.models import load_hf
    from spd_lens.sampling import SamplingConfig
    from spd_lens.tasks import get_task

    model, tokenizer = load_hf(args.model)
    tmp = Path(tempfile.mkdtemp(prefix="bench_eval-"))
    runs = iter(range(10**6))

    def timed(task, n, batching):
        config = SamplingConfig(max_new_tokens=4 if args.smoke else task.max_new_tokens, batch_size=args.batch, batching=batching)
        start = time.perf_counter()
        result = evaluate(model, tokenizer, task, n=n, config=config, generations=tmp / f"{next(runs)}.jsonl")
        return time.perf_counter() - start, result

    def compare(name, task, n, a="static", b="refill", pairs=args.pairs):
        ratios, seconds = [], {a: [], b: []}
        for pair in range(pairs):
            # A B, then B A, ...: a position effect (the second run of a pair slower) cancels out.
            if pair % 2 == 0:
                ta, ra = timed(task, n, a)
                tb, rb = timed(task, n, b)
            else:
                tb, rb = timed(task, n, b)
                ta, ra = timed(task, n, a)
            texts = ([r["completion"] for r in ra.results], [r["completion"] for r in rb.results])
            same = sum(x == y for x, y in zip(*texts))
            seconds[a].append(ta)
            seconds[b].append(tb)
            ratios.append(ta / tb)
            print(f"{name} pair {pair}: {a} {ta:7.1f} s (score {ra.score:.3f}), {b} {tb:7.1f} s (score {rb.score:.3f}), "
                  f"ratio {ta / tb:.2f}, same completions {same}/{len(texts[0])}", flush=True)
        return statistics.median(ratios), seconds

    figures = {"batch": args.batch, "pairs": args.pairs, "code_pairs": args.code_pairs}
    math = get_task("arithmetic")
    figures["control_same"], _ = compare("arithmetic A/A", math, args.math_n, "refill", "refill")
    figures["speedup_math"], figures["seconds_math"] = compare("arithmetic", math, args.math_n)
    if not args.skip_code:
        code = get_task("humaneval")
        figures["speedup_code"], figures["seconds_code"] = compare("humaneval", code, args.code_n, pairs=args.code_pairs)
    figures.update(code_n=args.code_n, math_n=args.math_n)
    results_file.finish("bench_eval", figures, {
        "speedup_code": f"evaluation wall time, HumanEval ({args.code_n} test problems, greedy, {args.batch} rows), static / refill decoding",
        "speedup_math": f"evaluation wall time, arithmetic ({args.math_n} questions, {args.batch} rows), static / refill",
        "control_same": "A/A control: refill / refill, arithmetic"}, args,
        detail=f"medians of {args.pairs} (HumanEval {args.code_pairs}) interleaved pairs")


if __name__ == "__main__":
    sys.exit(main())
