"""Sampling or training speed by dtype on this machine: bfloat16 (and float16) against float32, default model.

`--stage sample` (default): new tokens/s of batched greedy generation (batch `--batch`, exactly
`--new-tokens` new tokens per prompt, KV cache), the same prompts in every dtype. `--stage train`:
training tokens/s of a LoRA step (the trainer's batches and loss, backward, an AdamW step; no
clipping or schedule) on `--steps` fixed batches of `--batch` arithmetic questions with their
reference answers, the base model in the dtype and the adapter in float32, as the trainer loads them. The dtypes run interleaved, float32 then each
other dtype, `--pairs` times, and each figure is the median of the per-pair ratios (so drift on a
noisy machine does not pose as a speed-up); a float32-vs-float32 control pair shows the noise floor.
The last line is one JSON object with the ratios and the median tokens/s.

    python benchmarks/bench_dtype.py [--device cpu --batch 8 --new-tokens 64 --pairs 3 --dtypes bfloat16,float16]
    python benchmarks/bench_dtype.py --stage train [--batch 8 --steps 4 --pairs 3]
"""

import argparse
import json
import statistics
import time

import torch
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_file  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--dtypes", default="bfloat16", help="compared with float32, comma-separated")
    parser.add_argument("--stage", choices=["sample", "train"], default="sample")
    parser.add_argument("--steps", type=int, default=4, help="--stage train: optimizer steps per timing")
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, batch=2, new_tokens=2, pairs=1, steps=1)

    from spd_lens.chat import encode, render_prompt
    from spd_lens.models import load_hf
    from spd_lens.runtime import Runtime
    from spd_lens.tasks import get_task

    def runner(dtype: str):
        if args.stage == "train":
            return train_runner(dtype)
        runtime = Runtime.resolve(args.device, dtype)
        model, tokenizer = load_hf(args.model, runtime=runtime)
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

    def train_runner(dtype: str):
        from spd_lens.train import TrainConfig, build_features, collate, next_token_loss, wrap_for_training

        runtime = Runtime.resolve(args.device, dtype)
        model, tokenizer = load_hf(args.model, runtime=runtime)
        config = TrainConfig()
        model.config.use_cache = False
        model = wrap_for_training(model, config)
        model.train()
        examples = get_task("arithmetic").examples("train", n=args.batch * args.steps, seed=0)
        features = build_features(tokenizer, [(e.prompt, f"The answer is {e.target}.") for e in examples], config)
        batches = [{k: v.to(runtime.device) for k, v in collate(features[i:i + args.batch], tokenizer.pad_token_id).items()}
                   for i in range(0, len(features), args.batch)]
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=1e-5)
        runner.tokens = sum(len(f["input_ids"]) for f in features)

        def run() -> float:
            start = time.perf_counter()
            for batch in batches:
                next_token_loss(model, batch).backward()
                optimizer.step()
                optimizer.zero_grad()
            if runtime.is_cuda:
                torch.cuda.synchronize(runtime.device)
            return time.perf_counter() - start

        run()  # warm-up
        return run

    others = [d for d in args.dtypes.split(",") if d and d != "float32"]
    runs = {"float32": runner("float32"), **{d: runner(d) for d in others}}
    tokens = runner.tokens if args.stage == "train" else args.batch * args.new_tokens
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
    figures.update(stage=args.stage, batch=args.batch, pairs=args.pairs, threads=torch.get_num_threads(),
                   **({"steps": args.steps} if args.stage == "train" else {"new_tokens": args.new_tokens}))
    results_file.finish("bench_dtype", figures, {
        f"{d}_vs_float32": f"{'LoRA training steps' if args.stage == 'train' else 'sampling'} in {d} vs float32 on {args.device}"
        for d in others} | {"control_float32_vs_float32": "A/A control: float32 vs float32"}, args,
        detail=f"batch {args.batch}, medians of {args.pairs} interleaved pairs")


if __name__ == "__main__":
    main()
