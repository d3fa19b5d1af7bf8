"""Where refill decoding's time goes: prefill, decoding steps, cache rebuilds, and rows per step.

Greedy generation on `--n` test problems of `--task` (the task's token budget, `--batch` rows),
with `spd_lens.decode`'s prefill, merge and select and the model's one-token steps timed from
outside. The figures behind README's account of the decoding changes (cache written in place,
longest prompts first, the template prefix shared) came from this, run before and after each.

    python benchmarks/decode_profile.py [--task humaneval --n 64 --batch 16]

The last line is one JSON object: total, prefill and step seconds, prefill tokens (real and as
padded), steps, and how many steps ran with each number of rows.
"""

import argparse
import collections
import json
import time
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", default="humaneval")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, n=2, batch=2, task="arithmetic")

    import spd_lens.decode as decoding
    from spd_lens.models import hf_model_of, load_hf
    from spd_lens.sampling import SamplingConfig, sample_completions
    from spd_lens.tasks import get_task

    model, tokenizer = load_hf(args.model)
    task = get_task(args.task)
    prompts = [e.prompt for e in task.examples("test", n=args.n, seed=0)]
    seconds, counts, rows = collections.Counter(), collections.Counter(), collections.Counter()

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            seconds[name] += time.perf_counter() - start
            return result
        return wrapper

    prefill = decoding._prefill

    def counted_prefill(hf, batch, pad_id, prefix=None):
        shared = len(prefix.tokens) if prefix is not None else 0
        counts["prefill_tokens"] += sum(len(p) - shared for p in batch)
        counts["prefill_padded"] += len(batch) * max(len(p) - shared for p in batch)
        return prefill(hf, batch, pad_id, prefix)

    decoding._prefill = timed("prefill", counted_prefill)
    decoding._merge = timed("merge", decoding._merge)
    decoding._select = timed("select", decoding._select)
    hf = hf_model_of(model)
    forward = hf.forward

    def step(*a, **k):
        if k["input_ids"].shape[1] != 1:
            return forward(*a, **k)
        rows[k["input_ids"].shape[0]] += 1
        return timed("step", forward)(*a, **k)

    hf.forward = step
    start = time.perf_counter()
    sample_completions(model, tokenizer, prompts, SamplingConfig(temperature=0.0, max_new_tokens=4 if args.smoke else task.max_new_tokens,
                                                                 batch_size=args.batch))
    total = time.perf_counter() - start
    results_file.finish("decode_profile", {"task": args.task, "n": args.n, "batch": args.batch, "total_s": round(total, 1),
                      **{f"{k}_s": round(v, 1) for k, v in seconds.items()}, **counts, "steps": sum(rows.values()),
                      "rows_per_step": dict(sorted(rows.items()))}, {}, args)


if __name__ == "__main__":
    main()
