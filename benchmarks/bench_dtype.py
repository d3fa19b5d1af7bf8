"""Sampling speed by dtype on this machine: bfloat16 (and float16) against float32, default model.

New tokens/s of batched greedy generation (batch `--batch`, exactly `--new-tokens` new tokens per
prompt, KV cache), the same prompts in every dtype. The dtypes run interleaved, float32 then each
other dtype, `--pairs` times, and each figure is the median of the per-pair ratios (so drift on a
noisy machine does not pose as a speed-up); a float32-vs-float32 control pair shows the noise floor.
The last line is one JSON object with the ratios and the median tokens/s.

    python benchmarks/bench_dtype.py [--device cpu --batch 8 --new-tokens 64 --pairs 3 --dtypes bfloat16,float16]
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
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16", help="compared with float32, comma-separated")
    args = parser.parse_args()

    from spd_lens.chat import encode, render_prompt
    from spd_lens.models import load_hf
    from spd_lens.runtime import Runtime
    from spd_lens.tasks import get_task

    def runner(dtype: str):
        runtime = Runtime.resolve(args.device, dtype)
        model, tokenizer = load_hf(runtime=runtime)
        prompts = [e.prompt for e in get_task("arithmetic").examples("test", n=args.batch, seed=0)]
        encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
        length = max(map(len, encoded))
        ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded], device=runtime.device)
        mask = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded], device=runtime.device)

        def run() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            if runtime.is_cuda:
                torch.cuda.synchronize(runtime.device)
            assert out.shape[1] == length + args.new_tokens
            return time.perf_counter() - start

        run()  # warm-up
        return run

    others = [d for d in args.dtypes.split(",") if d and d != "float32"]
    runs = {"float32": runner("float32"), **{d: runner(d) for d in others}}
    tokens = args.batch * args.new_tokens
    ratios = {d: [] for d in ["float32 (control)", *others]}
    rates = {d: [] for d in runs}
    for pair in range(args.pairs):
        reference = runs["float32"]()
        rates["float32"].append(tokens / reference)
        control = runs["float32"]()
        ratios["float32 (control)"].append(reference / control)
        for dtype in others:
            seconds = runs[dtype]()
            rates[dtype].append(tokens / seconds)
            ratios[dtype].append(reference / seconds)
        print(f"pair {pair}: " + ", ".join(f"{d} {r[-1]:.2f}x" for d, r in ratios.items()), flush=True)
    figures = {f"{d}_vs_float32": round(statistics.median(r), 3) for d, r in ratios.items() if d in others}
    figures["control_float32_vs_float32"] = round(statistics.median(ratios["float32 (control)"]), 3)
    figures["tokens_per_s"] = {d: round(statistics.median(r), 1) for d, r in rates.items()}
    figures.update(batch=args.batch, new_tokens=args.new_tokens, pairs=args.pairs, threads=torch.get_num_threads())
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
