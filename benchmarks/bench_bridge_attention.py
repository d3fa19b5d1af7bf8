"""Gradient passes on a booted bridge with no hooks on: the model's own SDPA attention standing in
for the bridge's eager attention (what `spd_lens.gradients` does) against the bridge's attention
kept (the reference: scores and pattern kept for backward at every layer from the first target).

    python benchmarks/bench_bridge_attention.py [--task humaneval --n 8 --pairs 5]

Speed: `extract_subspace(bridge, task, n)` at the default layers, both paths with the same batches
(`max_memory` lifted, `batch_size` fixed), interleaved A B, B A, ... in one process; the median of
the per-pair ratios (reference seconds / SDPA seconds), with an A/A control pair series that must
read 1.00. Memory: each path's peak resident memory in a fresh process. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402

MEMORY = r'''
import resource, sys
import spd_lens
import spd_lens.gradients as gradients
if sys.argv[1] == "bridge":
    gradients._unwrap_attention = lambda hf, swapped: None  # keep the bridge's own attention
model = spd_lens.load_model(sys.argv[5])
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
spd_lens.extract_subspace(model, sys.argv[2], n=int(sys.argv[3]), batch_size=int(sys.argv[4]), max_memory="100GB")
print(loaded, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
'''


def peak_gb(path: str, task: str, n: int, batch_size: int, model: str) -> tuple[float, float]:
    done = subprocess.run([sys.executable, "-c", MEMORY, path, task, str(n), str(batch_size), model], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    loaded, peak = map(float, done.stdout.split()[-2:])
    return loaded, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="humaneval")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=5)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, task="arithmetic", n=2, batch_size=2, pairs=1)

    # Fresh processes first: a child's peak starts at its parent's resident size when it is spawned.
    memory = {path: peak_gb(path, args.task, args.n, args.batch_size, args.model) for path in ("bridge", "sdpa")}

    import torch

    import spd_lens
    import spd_lens.gradients as gradients

    model = spd_lens.load_model(args.model)
    task = spd_lens.get_task(args.task)
    encoded = [task.locate(model.tokenizer, e) for e in task.examples("train", n=args.n, seed=0)]
    lengths = sorted(len(e.input_ids) for e in encoded)
    print(f"{args.task}: {args.n} examples of {lengths[0]}-{lengths[-1]} tokens, batch {args.batch_size}, "
          f"torch threads {torch.get_num_threads()}")
    unwrap = gradients._unwrap_attention

    def seconds(path: str) -> float:
        gradients._unwrap_attention = unwrap if path == "sdpa" else (lambda hf, swapped: None)
        start = time.perf_counter()
        spd_lens.extract_subspace(model, encoded, batch_size=args.batch_size, max_memory="100GB")
        gradients._unwrap_attention = unwrap
        return time.perf_counter() - start

    seconds("sdpa")  # warm-up
    ratios, control = [], []
    for pair in range(args.pairs):
        order = ("bridge", "sdpa") if pair % 2 == 0 else ("sdpa", "bridge")
        took = {path: seconds(path) for path in order}
        ratios.append(took["bridge"] / took["sdpa"])
        first, second = seconds("sdpa"), seconds("sdpa")
        control.append(first / second)
        print(f"pair {pair}: bridge attention {took['bridge']:.1f} s, sdpa {took['sdpa']:.1f} s, "
              f"ratio {ratios[-1]:.2f}; sdpa/sdpa {control[-1]:.2f}", flush=True)
    speedup, same = statistics.median(ratios), statistics.median(control)
    print(f"speed-up (bridge attention / sdpa, median of {args.pairs} pairs): {speedup:.2f}; A/A control {same:.2f}")
    for path, (loaded, peak) in memory.items():
        print(f"peak resident memory, {path}: {peak:.2f} GB (model loaded: {loaded:.2f} GB)")
    results_file.finish("bench_bridge_attention", {
        "speedup": round(speedup, 3), "control": round(same, 3), "pairs": [round(r, 3) for r in ratios],
        "peak_gb": {path: round(peak, 2) for path, (_, peak) in memory.items()}}, {
        "speedup": f"extraction on a booted bridge with no hooks on: the model's own SDPA attention vs the bridge's eager "
                   f"attention ({args.n} {args.task} examples, batches of {args.batch_size})"}, args,
        detail=f"median of {args.pairs} interleaved pairs; A/A control {same:.2f}; peak " +
               ", ".join(f"{path} {peak:.2f} GB" for path, (_, peak) in memory.items()))


if __name__ == "__main__":
    main()
