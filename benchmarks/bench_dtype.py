"""Sampling speed by dtype on this machine: float32 vs bfloat16 (and float16) on the default model.

New tokens/s of batched greedy generation (batch `--batch`, exactly `--new-tokens` new tokens per
prompt, KV cache), the same prompts for each dtype, all in this run, median of `--repeats`. The
last line is one JSON object with each rate and its ratio to float32.

    python benchmarks/bench_dtype.py [--device cpu --batch 8 --new-tokens 64 --repeats 3 --dtypes float32,bfloat16]
"""

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()

    from spd_lens.chat import encode, render_prompt
    from spd_lens.models import load_hf
    from spd_lens.runtime import Runtime
    from spd_lens.tasks import get_task

    rates = {}
    for dtype in args.dtypes.split(","):
        runtime = Runtime.resolve(args.device, dtype)
        model, tokenizer = load_hf(runtime=runtime)
        prompts = [e.prompt for e in get_task("arithmetic").examples("test", n=args.batch, seed=0)]
        encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
        length = max(map(len, encoded))
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded], device=runtime.device)
        mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded], device=runtime.device)

        def run():
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            if runtime.is_cuda:
                torch.cuda.synchronize(runtime.device)
            assert out.shape[1] == length + args.new_tokens

        run()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        rates[dtype] = args.batch * args.new_tokens / statistics.median(times)
        print(f"{runtime}: {rates[dtype]:8.1f} new tokens/s (batch {args.batch}, {args.new_tokens} new tokens, "
              f"torch threads {torch.get_num_threads()})", flush=True)
        del model
    base = rates.get("float32")
    print(json.dumps({"tokens_per_s": {k: round(v, 1) for k, v in rates.items()},
                      **({f"{k}_vs_float32": round(v / base, 3) for k, v in rates.items() if k != "float32"} if base else {})}))


if __name__ == "__main__":
    main()
