"""The work rates `spd-lens plan` estimates with, fitted to the project's recorded runs.

For each run in experiments/results/ (its resolved config.json and the stage seconds in its
metrics.json), count the work of every stage exactly as `spd_lens.plan` counts it (no model is
loaded), then divide the summed work by the summed seconds, stage by stage. Prints each run's
recorded seconds beside what the fitted rates predict for it, and ends with one JSON line: the
rates to put into `spd_lens.plan.REFERENCE`.

    python benchmarks/plan_rates.py [experiments/results] [--smoke]

It loads no model and takes seconds, so `--smoke` (what the test suite runs) is the whole thing.
"""

import json
import sys
from pathlib import Path

# Runs whose recorded seconds leave out part of the work they count (RESULTS.md, "Cost of each
# stage"): shown, not fitted.
INCOMPLETE = {"ood": "base and psr were reused from the math run", "mcqa": "base and psr seed 0 ran untimed"}


def main() -> None:
    from spd_lens.config import comparable, config_from_dict
    from spd_lens.plan import batch_speedup, check_data, count_work

    paths = [a for a in sys.argv[1:] if a != "--smoke"]
    root = Path(paths[0] if paths else "experiments/results")
    runs = []
    for metrics_path in sorted(root.glob("*/metrics.json")):
        config_path = metrics_path.with_name("config.json")
        metrics = json.loads(metrics_path.read_text())
        seconds = metrics.get("stage_seconds", {})
        if not seconds or metrics.get("pending"):
            continue  # no timings, or a run not finished (its stage seconds cover part of its work)
        if config_path.is_file():
            values = comparable(json.loads(config_path.read_text()))
        else:  # the demo keeps only its metrics: its config is the packaged quick.toml
            from spd_lens.config import load_config

            values = load_config(Path("spd_lens/configs/quick.toml")).to_dict()
        values.pop("spd_lens_version", None)
        # resolved configs hold null for unset settings; TOML (and so config_from_dict) has none
        values = {k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
                  for k, v in values.items() if v is not None}
        values.setdefault("ssd", {})["own_truncation"] = True  # older runs: the counts do not depend on it
        config = config_from_dict(values)
        _, lengths, eval_size = check_data(config)
        stages = {s.name: s for s in count_work(config, lengths=lengths, eval_size=eval_size)}
        work = {
            "extract": stages["extract"].tokens,
            "train": stages["train"].tokens,
            # decoding slots in units of batches of 16
            "generate": stages["generate"].decode_slots * batch_speedup(16) / batch_speedup(config.sampling.batch_size),
            "eval": stages["eval"].decode_slots * batch_speedup(16) / batch_speedup(config.eval.batch_size),
        }
        runs.append((metrics_path.parent.name, work, seconds))
    fitted = [run for run in runs if run[0] not in INCOMPLETE]
    totals = {stage: (sum(w[stage] for _, w, _ in fitted), sum(s.get(stage, 0) for _, _, s in fitted))
              for stage in ("extract", "generate", "train", "eval")}
    rates = {stage: work / seconds for stage, (work, seconds) in totals.items()}
    # generation and evaluation are the same kind of work (batched decoding): one rate for both
    decode = (totals["generate"][0] + totals["eval"][0]) / (totals["generate"][1] + totals["eval"][1])
    print(f"{'run':<8} " + "  ".join(f"{stage:>18}" for stage in totals) + f"  {'total':>18}")
    for name, work, seconds in runs:
        predicted = {"extract": work["extract"] / rates["extract"], "train": work["train"] / rates["train"],
                     "generate": work["generate"] / decode, "eval": work["eval"] / decode}
        cells = [f"{seconds.get(stage, 0):>7.0f} s vs {predicted[stage]:>5.0f} s" for stage in totals]
        print(f"{name:<8} " + "  ".join(cells) +
              f"  {sum(seconds.values()):>7.0f} s vs {sum(predicted.values()):>5.0f} s"
              + (f"  (not fitted: {INCOMPLETE[name]})" if name in INCOMPLETE else ""))
    print("(recorded vs predicted by the rates pooled over the fitted runs)")
    print(json.dumps({"decode_slots_per_s": round(decode, 1), "train_tokens_per_s": round(rates["train"], 1),
                      "extract_tokens_per_s": round(rates["extract"], 1),
                      "runs": [name for name, _, _ in fitted]}))


if __name__ == "__main__":
    main()
