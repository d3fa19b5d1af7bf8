"""Refill decoding with the chat template's opening prefilled once against prefilling every prompt whole.

Greedy generation of `--n` arithmetic test prompts (the task's 40-token budget, `--batch` rows)
with `spd_lens.decode.MIN_SHARED_PREFIX` at its default (the template prefix is shared) and set out
of reach (no sharing), interleaved A B, B A, ... `--pairs` times; the figure is the median of
per-pair ratios (whole / shared). How many completions are equal is reported: all of them in
float32 on the CPU; in bfloat16 the prefix's separate pass can flip a near-tie.

    python benchmarks/bench_prefix.py [--n 128 --batch 16 --pairs 2]

The last line is one JSON object with `speedup`.
"""

import argparse
import json
import statistics
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=2)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, n=4, batch=2, pairs=1)

    import spd_lens.decode as decoding
    from spd_lens.chat import template_prefix
    from spd_lens.models import load_hf
    from spd_lens.sampling import SamplingConfig, sample_completions
    from spd_lens.tasks import get_task

    model, tokenizer = load_hf(args.model)
    task = get_task("arithmetic")
    prompts = [e.prompt for e in task.examples("test", n=args.n, seed=0)]
    config = SamplingConfig(temperature=0.0, max_new_tokens=4 if args.smoke else task.max_new_tokens, batch_size=args.batch)
    default = decoding.MIN_SHARED_PREFIX

    def timed(shared: bool):
        decoding.MIN_SHARED_PREFIX = default if shared else 10**9
        start = time.perf_counter()
        out = sample_completions(model, tokenizer, prompts, config)
        return time.perf_counter() - start, out

    ratios = []
    for pair in range(args.pairs):
        order = (True, False) if pair % 2 == 0 else (False, True)
        results = {shared: timed(shared) for shared in order}
        same = sum(a == b for a, b in zip(results[True][1], results[False][1]))
        ratios.append(results[False][0] / results[True][0])
        print(f"pair {pair}: whole prompts {results[False][0]:.1f} s, shared prefix {results[True][0]:.1f} s, "
              f"ratio {ratios[-1]:.2f}, same completions {same}/{len(prompts)}", flush=True)
    results_file.finish("bench_prefix", {"speedup": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                                          "prefix_tokens": len(template_prefix(tokenizer)), "n": args.n, "batch": args.batch}, {
        "speedup": f"refill decoding of {args.n} arithmetic prompts (greedy, {args.batch} rows) with the chat template's "
                   "opening prefilled once / every prompt prefilled whole"}, args,
        detail=f"median of {args.pairs} interleaved pairs: " + ", ".join(f"{r:.2f}" for r in ratios))


if __name__ == "__main__":
    main()
