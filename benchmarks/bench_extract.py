"""Extraction speed and memory on the default model, against a plain forward+backward.

Throughput: examples/s of `extract_subspace` (plain HF model, and a booted TransformerBridge with no
hooks on, which takes the same plain path)
versus a plain forward+backward of the same batches with no hooks (unbooted sdpa model, the same
correctness-token loss on full logits, `loss.backward()`), all measured in this run, median of
`--repeats`. Memory: peak RSS of a fresh process extracting n=16 and n=128 examples.
The last line is one JSON object with the ratios.

    python benchmarks/bench_extract.py [--task arithmetic --n 32 --repeats 3]
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402


def plain_forward_backward(hf, batches) -> None:
    from spd_lens.gradients import _loss_from_logits

    for ids, attention, mask in batches:
        logits = hf(input_ids=ids, attention_mask=attention.long()).logits
        _loss_from_logits(logits, ids, mask).backward()
        hf.zero_grad(set_to_none=True)


def peak_rss_mb(task: str, n: int, model: str) -> float:
    code = (
        "import resource; from spd_lens.models import load_hf; from spd_lens.extract import extract_subspace\n"
        f"hf, tok = load_hf({model!r}); extract_subspace(hf, {task!r}, n={n}, tokenizer=tok)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-task", default="arithmetic")
    parser.add_argument("--memory-n", default="16,128", help="the two sizes whose peak memory is compared")
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, n=4, batch_size=2, repeats=1, memory_n="2,4")
    small, large = map(int, args.memory_n.split(","))

    from spd_lens.extract import extract_subspace
    from spd_lens.gradients import pad_batch, target_mask
    from spd_lens.models import boot, load_hf
    from spd_lens.tasks import get_task

    hf, tok = load_hf(args.model)
    task = get_task(args.task)
    encoded = sorted((task.locate(tok, e) for e in task.examples("train", n=args.n, seed=0)), key=lambda e: len(e.input_ids))
    batches = []
    for start in range(0, len(encoded), args.batch_size):
        ids, attention, correct = pad_batch(encoded[start:start + args.batch_size], tok.pad_token_id)
        batches.append((ids, attention, target_mask(attention, correct, "correctness")))
    tokens = sum(len(e.input_ids) for e in encoded)
    print(f"{args.task}: {args.n} examples, {tokens} tokens, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    def timed(fn) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    plain = timed(lambda: plain_forward_backward(hf, batches))
    fast = timed(lambda: extract_subspace(hf, encoded, batch_size=args.batch_size, tokenizer=tok))
    bridge = boot(*load_hf(args.model))
    via_bridge = timed(lambda: extract_subspace(bridge, encoded, batch_size=args.batch_size))
    for name, seconds in (("plain forward+backward", plain), ("extract (HF path)", fast), ("extract (booted bridge)", via_bridge)):
        print(f"{name:<24} {seconds:7.2f} s  {args.n / seconds:6.2f} examples/s")

    rss16, rss128 = peak_rss_mb(args.memory_task, small, args.model), peak_rss_mb(args.memory_task, large, args.model)
    print(f"peak RSS extracting {args.memory_task}: n={small} {rss16:.0f} MB, n={large} {rss128:.0f} MB")
    summary = {
        "extract_vs_plain": round(plain / fast, 3),
        "bridge_extract_vs_plain": round(plain / via_bridge, 3),
        "peak_memory_128_vs_16": round(rss128 / rss16, 3),
        "examples_per_s": {"plain": round(args.n / plain, 3), "extract": round(args.n / fast, 3),
                           "bridge": round(args.n / via_bridge, 3)},
        "peak_rss_mb": {f"n{small}": round(rss16), f"n{large}": round(rss128)},
    }
    results_file.write_ratios("bench_extract", summary, {
        "extract_vs_plain": f"extraction (plain-model path) vs plain forward+backward, {args.n} {args.task} examples",
        "bridge_extract_vs_plain": "extraction through bridge hooks vs plain forward+backward",
        "peak_memory_128_vs_16": f"peak memory extracting {large} vs {small} examples"}, args,
        detail=f"medians of {args.repeats}; peak RSS {round(rss128)} vs {round(rss16)} MB")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
