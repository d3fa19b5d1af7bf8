"""Where batched decoding spends its steps, read from a finished run's evaluations.

A batch decodes until its longest completion stops (end of turn or the token cap), so rows that
finished early ride along. For each `RUN/eval/*.json` this prints the mean completion length,
the share of batch decoding steps spent on rows that had already finished, and, for code, the
share of tokens written after the closing code fence (which scoring never reads). It needs no
model run: it re-tokenises the stored completions with the run model's tokenizer.

    python benchmarks/decode_waste.py runs/code

The last line is one JSON object with the figures per evaluation.
"""

import argparse
import json
from pathlib import Path


def waste(lengths: list[int], batch: int) -> float:
    """Share of decoding steps (rows x steps, batches in evaluation order) on finished rows."""
    steps = sum(max(lengths[i:i + batch]) * len(lengths[i:i + batch]) for i in range(0, len(lengths), batch))
    return 1 - sum(lengths) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--smoke", action="store_true", help="the run's first evaluation only (seconds)")
    args = parser.parse_args()

    from spd_lens.artifacts import read_json_object
    from spd_lens.errors import SpdLensError
    from spd_lens.models import load_hf
    from spd_lens.tasks import get_task
    from spd_lens.tasks.code import _FENCE  # the first code block, to its closing fence (or the end)

    run = Path(args.run_dir)
    config = read_json_object(run / "config.json", "a run's resolved config")
    files = sorted((run / "eval").glob("*.json"))[:1 if args.smoke else None]
    if not files:
        raise SpdLensError(f"{run}/eval has no evaluations: run `spd-lens run CONFIG --out {run}` first")
    task = get_task(config["task"]["name"])
    cap = config["eval"].get("max_new_tokens") or task.max_new_tokens
    batch = config["eval"]["batch_size"]
    _, tokenizer = load_hf(config["model"]["name"])
    figures = {}
    for path in files:
        completions = [r["completion"] for r in read_json_object(path, "an evaluation")["results"]]
        lengths = [min(cap, len(tokenizer(c)["input_ids"])) for c in completions]
        row = {"mean_tokens": sum(lengths) / len(lengths), "finished_row_steps": waste(lengths, batch)}
        if task.family == "code":
            ends = [m.end() if (m := _FENCE.search(c)) else len(c) for c in completions]
            kept = sum(min(cap, len(tokenizer(c[:end])["input_ids"])) for c, end in zip(completions, ends))
            row["after_fence_tokens"] = 1 - kept / sum(lengths)
        figures[path.stem] = row
        extra = f"  after the closing fence {row['after_fence_tokens']:.0%}" if "after_fence_tokens" in row else ""
        print(f"{path.stem:<22} mean {row['mean_tokens']:6.1f} tokens (cap {cap}, batch {batch})  "
              f"steps on finished rows {row['finished_row_steps']:.0%}{extra}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
