"""How the self-generation setting moves training-data quality (no projection, no training).

For each sampling setting, the default model answers the same training prompts once; the task's
scorer measures the share correct and the share cut off at the token budget. This is the check
behind the default `[sampling]` truncation (top-k 20, top-p 0.8) that every self-generating method
shares.

    python experiments/sampling_check.py --task arithmetic --n 64 --out experiments/results/sampling_check

Resumable: each setting's generations are kept in OUT and reused on a rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from spd_lens.artifacts import write_json
from spd_lens.evaluate import training_data_quality
from spd_lens.models import load_hf
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.tasks import get_task

# (name, temperature, top_p, top_k): greedy for reference, untruncated sampling (the old default),
# the shared default, and SSD's shifted temperature.
SETTINGS = [
    ("greedy", 0.0, 1.0, 0),
    ("t1.0-untruncated", 1.0, 1.0, 0),
    ("t1.0-k20-p0.8", 1.0, 0.8, 20),
    ("t1.5-k20-p0.8", 1.5, 0.8, 20),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="experiments/results/sampling_check")
    args = parser.parse_args()

    out = Path(args.out)
    task = get_task(args.task)
    model, tokenizer = load_hf(args.model)
    examples = task.examples("train", n=args.n, seed=args.seed)
    rows = []
    for name, temperature, top_p, top_k in SETTINGS:
        config = SamplingConfig(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=task.max_new_tokens,
                                seed=args.seed, batch_size=args.batch_size)
        path = generate_jsonl(model, tokenizer, examples, out / f"{name}.jsonl", config, task=task.name,
                              progress=lambda xs, name=name: tqdm(xs, desc=name))
        quality = training_data_quality(task, path, examples)
        rows.append({"setting": name, "temperature": temperature, "top_p": top_p, "top_k": top_k, **quality})
        print(json.dumps(rows[-1]), flush=True)
    write_json(out / "quality.json", {"model": args.model, "task": task.name, "n": args.n, "seed": args.seed,
                                      "max_new_tokens": task.max_new_tokens, "settings": rows})
    print(f"{'setting':<18} {'correct':>7} {'cut off':>7} {'tokens':>6}")
    for r in rows:
        print(f"{r['setting']:<18} {r['correct']:>7.3f} {r['cut_off']:>7.3f} {r['mean_tokens']:>6.1f}")


if __name__ == "__main__":
    main()
