"""`run_ablation`: projected decoding over a grid of ranks x layer sets x alphas (x heads).

Each grid point projects K/V onto the task's gradient subspace with that setting while the model
answers `eval_n` held-out examples greedily (hook-only: no training), and records the task score
with its bootstrap CI and the correctness-token loss on `loss_n` calibration examples. Rows go to
`RUN/ablation.jsonl` one by one (a rerun skips the points already there), then to
`ablation.csv`, `ablation.json` and the figure `ablation.html`.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable
from pathlib import Path

from spd_lens.artifacts import atomic_write, read_json_object, write_json
from spd_lens.attribution import correctness_loss
from spd_lens.config import ExperimentConfig
from spd_lens.errors import SpdLensError
from spd_lens.evaluate import score_records
from spd_lens.experiment import Run
from spd_lens.extract import encode_examples
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, sample


def grid(config: ExperimentConfig, subspace_layers: list[int]) -> list[dict]:
    a = config.ablate
    layer_sets = a.layer_sets or [[layer] for layer in subspace_layers]
    missing = sorted({layer for s in layer_sets for layer in s} - set(subspace_layers))
    if missing:
        raise SpdLensError(f"ablate.layer_sets use layer(s) {missing} outside subspace.layers {subspace_layers}")
    heads = a.heads if a.heads else [None]
    points = [{"rank": "none", "layers": "none", "alpha": 0.0, "head": "all", "kinds": ",".join(a.kinds)}]
    for rank, layers, alpha, head in itertools.product(a.ranks, layer_sets, a.alphas, heads):
        points.append({"rank": rank, "layers": ",".join(map(str, layers)), "alpha": alpha,
                       "head": "all" if head is None else head, "kinds": ",".join(a.kinds)})
    return points


def _key(point: dict) -> str:
    return json.dumps({k: point[k] for k in ("rank", "layers", "alpha", "head", "kinds")}, sort_keys=True)


def run_ablation(config: ExperimentConfig, out: str | Path, *, progress: Callable | None = None) -> list[dict]:
    out = Path(out)
    run = Run(config, out)
    run._claim_directory()
    model, tokenizer = run.base_model()
    subspace = run.subspace("gradient", config.seeds[0])
    points = grid(config, subspace.layers)
    table_path = out / "ablation.jsonl"
    done = {}
    if table_path.exists():
        for line in table_path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[_key(row)] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from an interrupted run
        # Keep only complete rows, so appending starts on a fresh line.
        atomic_write(table_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values())))
    task = run.task
    examples = task.examples(config.task.eval_split, n=config.task.eval_n, seed=0)
    _, calibration = encode_examples(model, run.subspace_task, n=config.ablate.loss_n, split="train",
                                     seed=config.seeds[0], tokenizer=tokenizer)
    sampling = SamplingConfig(max_new_tokens=task.max_new_tokens if config.eval.max_new_tokens is None else config.eval.max_new_tokens,
                              batch_size=config.eval.batch_size)
    with open(table_path, "a", encoding="utf-8") as table:
        for point in progress(points) if progress else points:
            if _key(point) in done:
                continue
            if point["rank"] == "none":
                projection = None
            else:
                layers = [int(x) for x in point["layers"].split(",")]
                heads = None if point["head"] == "all" else [point["head"]]
                projection = Projection.build(subspace.with_rank(rank=point["rank"]), layers=layers,
                                              kinds=config.ablate.kinds, layout="flat" if heads is None else "head",
                                              heads=heads, alpha=point["alpha"])
            handle = projection.attach(model) if projection else None
            try:
                loss = correctness_loss(model, calibration, pad_id=tokenizer.pad_token_id)
                # One call: refill decoding keeps batch_size rows in flight across all the examples.
                completions = [c[0] for c in sample(model, tokenizer, [e.prompt for e in examples], sampling)]
            finally:
                if handle:
                    handle.remove()
            result = score_records(task, {e.id: e for e in examples},
                                   [{"prompt_id": e.id, "completion": c} for e, c in zip(examples, completions)])
            row = {**point, "score": result.score, "ci": list(result.ci), "n": result.n, "loss": loss}
            table.write(json.dumps(row) + "\n")
            table.flush()
            done[_key(point)] = row
    rows = [done[_key(p)] for p in points]
    baseline_loss = rows[0]["loss"]
    for row in rows:
        row["delta_loss"] = row["loss"] - baseline_loss
    write_json(out / "ablation.json", {"rows": rows, "task": task.name, "model": config.model.name})
    fields = ["rank", "layers", "alpha", "head", "kinds", "score", "ci_low", "ci_high", "n", "loss", "delta_loss"]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                writer.writerow({**{k: r[k] for k in fields if k in r}, "ci_low": r["ci"][0], "ci_high": r["ci"][1]})

    atomic_write(out / "ablation.csv", write_csv)
    write_ablation_report(out, f"spd_lens ablation {config.name}")
    return rows


def write_ablation_report(out: str | Path, title: str | None = None) -> Path:
    """`OUT/ablation.html` (score and loss-change grids) from `OUT/ablation.json`."""
    from spd_lens.viz import ablation_figure, write_report

    out = Path(out)
    table = read_json_object(out / "ablation.json", "an ablation table (spd-lens ablate)")
    rows = table["rows"]
    grid_rows = [r for r in rows if r["rank"] != "none"]
    figures = [ablation_figure(grid_rows, x="rank", y="layers", value="score"),
               ablation_figure(grid_rows, x="rank", y="layers", value="delta_loss")]
    notes = f"baseline (no projection): score {rows[0]['score']:.3f}, correctness loss {rows[0]['loss']:.4f}"
    write_report(out / "ablation.html", figures, title or f"spd_lens ablation on {table.get('task')}", notes)
    return out / "ablation.html"
