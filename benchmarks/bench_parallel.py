"""Generation on two processes (torchrun, one thread each) against one process on every core.

`spd-lens generate` of `--n` arithmetic training prompts with the shared sampling setting
(temperature 1.0, top-k 20, top-p 0.8, the task's 40-token budget, `--batch` rows in flight),
once as one process and once as `torchrun --nproc_per_node 2` (each process takes every other
prompt; the main one merges). Whole commands are timed, model loading included, since that is what
a user waits for. The two run interleaved, A B, B A, ..., `--pairs` times; the figure is the median
of the per-pair ratios (one / two). The outputs must be equal byte for byte (checked): per-row
seeding makes the split invisible.

    python benchmarks/bench_parallel.py [--n 256 --batch 16 --pairs 4]

The last line is one JSON object with `speedup`.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=4)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, n=4, batch=2, pairs=1)

    tmp = Path(tempfile.mkdtemp(prefix="bench_parallel-"))
    generate = ["generate", "--model", args.model, "--task", "arithmetic", "--n", str(args.n), "--temperature", "1.0", "--top-k", "20",
                "--top-p", "0.8", "--batch-size", str(args.batch)]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launchers = {"one": [sys.executable, "-m", "spd_lens.cli"],
                 "two": [torchrun, "--nproc_per_node", "2", "-m", "spd_lens.cli", "--"]}
    runs = iter(range(10**6))

    def timed(kind: str) -> tuple[float, bytes]:
        out = tmp / f"{kind}-{next(runs)}.jsonl"
        start = time.perf_counter()
        subprocess.run([*launchers[kind], *generate, "--out", str(out)], check=True, capture_output=True)
        return time.perf_counter() - start, out.read_bytes()

    ratios, seconds = [], {"one": [], "two": []}
    for pair in range(args.pairs):
        order = ("one", "two") if pair % 2 == 0 else ("two", "one")
        results = {kind: timed(kind) for kind in order}
        assert results["one"][1] == results["two"][1], "two processes generated other records than one"
        for kind in results:
            seconds[kind].append(round(results[kind][0], 2))
        ratios.append(results["one"][0] / results["two"][0])
        print(f"pair {pair}: one process {results['one'][0]:6.1f} s, two processes {results['two'][0]:6.1f} s, "
              f"ratio {ratios[-1]:.2f}, outputs equal", flush=True)
    results_file.finish("bench_parallel", {"speedup": round(statistics.median(ratios), 3), "seconds": seconds, "n": args.n,
                      "batch": args.batch, "pairs": args.pairs, "cores": os.cpu_count()}, {
        "speedup": f"`spd-lens generate` of {args.n} sampled arithmetic prompts, one process / two processes under torchrun "
                   "(1 thread each), whole commands"}, args,
        detail=f"median of {args.pairs} interleaved pairs: " + ", ".join(f"{r:.2f}" for r in ratios) + "; outputs equal byte for byte")


if __name__ == "__main__":
    main()
