"""Sampling speed on the default model: unhooked vs projection hooks vs folded weights.

New tokens/s of batched greedy generation (batch `--batch`, exactly `--new-tokens` new tokens
per prompt, KV cache) for (a) plain `generate` on the unbooted model, (b) the same model with
the K/V projection hooks on k_proj/v_proj, (c) the projection folded into the weights, and for
reference (d) hooks on a booted TransformerBridge; all in this run, median of `--repeats`.
The last line is one JSON object with the ratios b/a, c/a, d/a.

    python benchmarks/bench_sampling.py [--batch 8 --new-tokens 64 --repeats 3]
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
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    results_file.add_arguments(parser)
    args = parser.parse_args()
    results_file.smoke_sizes(args, batch=2, new_tokens=4, repeats=1)

    from spd_lens.chat import encode, render_prompt
    from spd_lens.extract import extract_subspace
    from spd_lens.models import boot, load_hf
    from spd_lens.projection import Projection, fold_projection
    from spd_lens.tasks import get_task

    model, tokenizer = load_hf(args.model)
    subspace = extract_subspace(model, "arithmetic", n=4 if args.smoke else 16, tokenizer=tokenizer)
    projection = Projection.build(subspace)
    folded = fold_projection(model, projection)
    prompts = [e.prompt for e in get_task("arithmetic").examples("test", n=args.batch, seed=0)]
    encoded = [encode(tokenizer, render_prompt(tokenizer, p)) for p in prompts]
    length = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(e)) + e for e in encoded])
    mask = (torch.arange(length)[None] >= torch.tensor([length - len(e) for e in encoded])[:, None]).long()

    def run(m):
        with torch.no_grad():
            out = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert out.shape[1] == length + args.new_tokens

    def tokens_per_s(m) -> float:
        run(m)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run(m)
            times.append(time.perf_counter() - start)
        return args.batch * args.new_tokens / statistics.median(times)

    plain = tokens_per_s(model)
    with projection.apply(model):
        hooked = tokens_per_s(model)
    folded_rate = tokens_per_s(folded)
    bridge_model, _ = load_hf(args.model)
    bridge = boot(bridge_model, tokenizer)
    with projection.apply(bridge):
        bridged = tokens_per_s(bridge.original_model)
    print(f"batch {args.batch}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    for name, rate in (("(a) unhooked generate", plain), ("(b) projection hooks", hooked), ("(c) folded weights", folded_rate),
                       ("(d) bridge + hooks", bridged)):
        print(f"{name:<24} {rate:8.1f} new tokens/s  {rate / plain:5.2f}x")
    results_file.finish("bench_sampling", {
        "hooked_vs_plain": round(hooked / plain, 3), "folded_vs_plain": round(folded_rate / plain, 3),
        "bridge_hooked_vs_plain": round(bridged / plain, 3),
        "tokens_per_s": {"plain": round(plain, 1), "hooked": round(hooked, 1), "folded": round(folded_rate, 1),
                         "bridge": round(bridged, 1)}}, {
        "hooked_vs_plain": "sampling with projection hooks vs plain `generate`",
        "folded_vs_plain": "sampling with folded weights vs plain `generate`",
        "bridge_hooked_vs_plain": "sampling through a booted bridge + hooks vs plain `generate`"}, args,
        detail=f"batch {args.batch}, {args.new_tokens} new tokens, medians of {args.repeats}")


if __name__ == "__main__":
    main()
