"""What two processes can gain over one on this machine, measured on decoding steps alone.

One refilled decoding step of the default model (`--rows` rows in flight, no model loading in the
timing; a 1-token run's time, the prefill, is subtracted from a `--steps`-token run's and the rest
divided by `steps - 1`) is timed three ways, in fresh processes: one process on 2 threads, one
process on 1 thread, and two 1-thread processes that start timing together (each loads and warms
up, then waits for the signal). The rounds repeat `--pairs` times, in alternating order; figures
are medians of per-round ratios.

- `thread_scaling`: 1-thread step time / 2-thread step time (what a second thread buys one process);
- `concurrent_slowdown`: a 1-thread step with another 1-thread process running / alone (1.00 means
  the two processes do not compete for memory bandwidth or caches);
- `two_processes_vs_one`: rows per second of two 1-thread processes together / of one 2-thread
  process: the ceiling of data-parallel generation's speed-up here, before model loading, prefill
  and each process's tail of long rows (see `bench_parallel.py` for whole commands).

    python benchmarks/bench_threads.py [--rows 16 --steps 120 --pairs 2]

The last line is one JSON object with those keys.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402

STEP = """
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from spd_lens.decode import decode
from spd_lens.models import load_hf
model, tokenizer = load_hf(sys.argv[4])
rows, steps = int(sys.argv[2]), int(sys.argv[3])
prompts = [[1] + [100 + i] * 40 for i in range(rows)]
options = dict(slots=rows, stop_ids=[], pad_id=tokenizer.pad_token_id)
decode(model, prompts[:2], max_new_tokens=4, **options)  # warm-up
print("ready", flush=True)
sys.stdin.readline()  # the signal: concurrent processes time the same interval
start = time.perf_counter()
decode(model, prompts, max_new_tokens=1, **options)
prefill = time.perf_counter() - start
start = time.perf_counter()
decode(model, prompts, max_new_tokens=steps, **options)
print((time.perf_counter() - start - prefill) / (steps - 1), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--pairs", type=int, default=2)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, rows=2, steps=3, pairs=1)

    def launch(threads: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", STEP, str(threads), str(args.rows), str(args.steps), args.model],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def seconds(*processes: subprocess.Popen) -> list[float]:
        for p in processes:  # every process loaded and warmed up
            assert p.stdout.readline().strip() == "ready"
        for p in processes:  # then all start at once
            p.stdin.write("go\n")
            p.stdin.flush()
        return [float(p.communicate()[0].strip().splitlines()[-1]) for p in processes]

    rounds = []
    for pair in range(args.pairs):
        kinds = ["two_threads", "one_thread", "concurrent"]
        measured = {}
        for kind in kinds if pair % 2 == 0 else kinds[::-1]:
            if kind == "concurrent":
                measured[kind] = statistics.mean(seconds(launch(1), launch(1)))
            else:
                (measured[kind],) = seconds(launch(2 if kind == "two_threads" else 1))
        rounds.append(measured)
        print(f"round {pair}: step on 2 threads {measured['two_threads'] * 1e3:.1f} ms, on 1 thread "
              f"{measured['one_thread'] * 1e3:.1f} ms, on 1 thread beside another process "
              f"{measured['concurrent'] * 1e3:.1f} ms", flush=True)

    def median(fn) -> float:
        return round(statistics.median(fn(r) for r in rounds), 3)

    results_file.finish("bench_threads", {
        "thread_scaling": median(lambda r: r["one_thread"] / r["two_threads"]),
        "concurrent_slowdown": median(lambda r: r["concurrent"] / r["one_thread"]),
        "two_processes_vs_one": median(lambda r: 2 * r["two_threads"] / r["concurrent"]),
        "step_ms": {k: [round(r[k] * 1e3, 1) for r in rounds] for k in ("two_threads", "one_thread", "concurrent")},
        "rows": args.rows, "steps": args.steps, "pairs": args.pairs,
    }, {"concurrent_slowdown": f"a decoding step on 1 thread beside a second 1-thread process vs alone ({args.rows} rows, prefill subtracted)",
        "thread_scaling": "a decoding step on 1 thread vs 2 threads",
        "two_processes_vs_one": "rows per second, two 1-thread processes vs one 2-thread process (the ceiling)"}, args,
        detail=f"medians of {args.pairs} rounds")


if __name__ == "__main__":
    main()
