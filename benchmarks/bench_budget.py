"""What the CPU's default gradient-pass budget costs in speed and buys in memory: extraction on
the booted default model at two budgets (`max_memory`), the batches each forms, its peak resident
memory (a fresh process each) and its speed, interleaved A B, B A, ... in one process with an A/A
control; the speed ratio is the median of per-pair ratios (larger budget's seconds / smaller's).

    python benchmarks/bench_budget.py [--task humaneval --n 28 --budgets 3GiB,2.5GiB --pairs 5]

The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MEMORY = r'''
import resource, sys
import spd_lens
model = spd_lens.load_model()
spd_lens.extract_subspace(model, sys.argv[1], n=int(sys.argv[2]), max_memory=sys.argv[3])
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
'''


def peak_gb(task: str, n: int, budget: str) -> float:
    done = subprocess.run([sys.executable, "-c", MEMORY, task, str(n), budget], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="humaneval")
    parser.add_argument("--n", type=int, default=28)
    parser.add_argument("--budgets", default="3GiB,2.5GiB", help="two max_memory values, larger first")
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    large, small = args.budgets.split(",")
    # Fresh processes first: a child's peak starts at its parent's resident size when it is spawned.
    peaks = {budget: peak_gb(args.task, args.n, budget) for budget in (large, small)}

    import torch

    import spd_lens
    from spd_lens.gradients import gradient_batches

    model = spd_lens.load_model()
    task = spd_lens.get_task(args.task)
    encoded = [task.locate(model.tokenizer, e) for e in task.examples("train", n=args.n, seed=0)]
    layers = sorted({model.cfg.n_layers // 2, model.cfg.n_layers - 1})
    for budget in (large, small):
        sizes = [len(b) for b in gradient_batches(model, encoded, layers=layers, loss="correctness", batch_size=4,
                                                  max_memory=budget)]
        print(f"max_memory={budget}: {len(sizes)} batches of {sizes}; peak resident memory {peaks[budget]:.2f} GB")
    print(f"torch threads {torch.get_num_threads()}")

    def seconds(budget: str) -> float:
        start = time.perf_counter()
        spd_lens.extract_subspace(model, encoded, max_memory=budget)
        return time.perf_counter() - start

    seconds(small)  # warm-up
    ratios, control = [], []
    for pair in range(args.pairs):
        order = (large, small) if pair % 2 == 0 else (small, large)
        took = {budget: seconds(budget) for budget in order}
        ratios.append(took[large] / took[small])
        first, second = seconds(small), seconds(small)
        control.append(first / second if pair % 2 == 0 else second / first)
        print(f"pair {pair}: {large} {took[large]:.1f} s, {small} {took[small]:.1f} s, ratio {ratios[-1]:.2f}; "
              f"A/A {control[-1]:.2f}", flush=True)
    ratio, same = statistics.median(ratios), statistics.median(control)
    print(f"{large} / {small} seconds, median of {args.pairs} pairs: {ratio:.2f}; A/A control {same:.2f}")
    print(json.dumps({"ratio": round(ratio, 3), "control": round(same, 3), "pairs": [round(r, 3) for r in ratios],
                      "peak_gb": {budget: round(peak, 2) for budget, peak in peaks.items()}}))


if __name__ == "__main__":
    main()
