"""How to spend a small CPU on generation: batch size, and one job with all threads vs two jobs
with one thread each.

Measures new tokens/s of batched greedy generation on the default model (exactly `--new-tokens`
new tokens per prompt, KV cache, `--prompts` arithmetic prompts in all), all in this run:

  (a) batches of 8, all cores' threads (the reference)
  (b) batches of 16 and 32, all threads
  (c) two processes at once, one thread each, batches of 8: the same prompts split between them

and prints each as a ratio to (a). The last line is one JSON object with the ratios.

    python benchmarks/bench_batching.py [--prompts 32 --new-tokens 48]
"""

import argparse
import json
import multiprocessing as mp
import os
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def _generate(prompts: list[str], batch: int, new_tokens: int, threads: int, barrier=None, result=None,
              model_name: str = "smollm2-135m-instruct") -> float:
    """Seconds to generate `new_tokens` for every prompt in batches of `batch`."""
    import torch

    from spd_lens.chat import encode, render_prompt
    from spd_lens.models import load_hf

    torch.set_num_threads(threads)
    model, tokenizer = load_hf(model_name)

    def run(chunk: list[str], n: int) -> None:
        encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in chunk]
        length = max(map(len, encoded))
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded])
        mask = (torch.arange(length)[None, :] >= torch.tensor([length - len(e) for e in encoded])[:, None]).long()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id)

    run(prompts[:batch], 2)  # warm-up: first calls allocate and pick kernels
    if barrier is not None:
        barrier.wait()  # both processes start generating together
    started = time.perf_counter()
    for i in range(0, len(prompts), batch):
        run(prompts[i:i + batch], new_tokens)
    seconds = time.perf_counter() - started
    if result is not None:
        result.put(seconds)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, prompts=4, new_tokens=2)

    from spd_lens.tasks import get_task

    prompts = [e.prompt for e in get_task("arithmetic").examples("test", n=args.prompts, seed=0)]
    tokens = len(prompts) * args.new_tokens
    cores = os.cpu_count() or 1
    rates = {}
    for batch in (8, 16, 32):
        rates[f"batch {batch}, {cores} threads"] = tokens / _generate(prompts, batch, args.new_tokens, cores, model_name=args.model)

    context = mp.get_context("spawn")
    barrier, result = context.Barrier(2), context.Queue()
    halves = [prompts[: len(prompts) // 2], prompts[len(prompts) // 2:]]
    workers = [context.Process(target=_generate, args=(half, 8, args.new_tokens, 1, barrier, result, args.model)) for half in halves]
    for worker in workers:
        worker.start()
    seconds = max(result.get() for _ in workers)
    for worker in workers:
        worker.join()
    rates["two processes x 1 thread, batch 8"] = tokens / seconds

    reference = rates[f"batch 8, {cores} threads"]
    for name, rate in rates.items():
        print(f"{name:<36} {rate:7.1f} new tokens/s   {rate / reference:5.2f}x")
    summary = {name: round(rate / reference, 3) for name, rate in rates.items()}
    results_file.finish("bench_batching", summary, {
        f"batch 16, {cores} threads": f"generation, batches of 16 vs 8 ({args.prompts} prompts, {args.new_tokens} new tokens)",
        f"batch 32, {cores} threads": "generation, batches of 32 vs 8",
        "two processes x 1 thread, batch 8": f"generation, two processes x 1 thread vs one process x {cores} threads (batches of 8)"},
        args, detail="one timing each")


if __name__ == "__main__":
    main()
