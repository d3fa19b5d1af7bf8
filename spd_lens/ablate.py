"""`run_ablation`: projected decoding over a grid of rank policies x layer sets x K/V x alphas (x heads)
x modes, each cell beside matched random subspaces (`spd-lens ablate CONFIG`).

Calling this module, `spd_lens.ablate(model, examples, ...)`, runs the grid on your own examples
instead: see `spd_lens.ablate_examples.ablate` for its arguments and table.

Each cell projects K/V onto the task's gradient subspace with that setting while the model
answers `eval_n` examples of `task.eval_split` (hook-only: no training; choose settings on
`eval_split = "dev"`) greedily, or with self-generation's sampling settings and `ablate.samples`
completions per question (`ablate.decoding = "sampling"`: the policy SPD distils from), and
records the task score with its bootstrap CI, each question's outcome, and the correctness-token
loss on `loss_n` calibration examples (drawn with `seeds[0]`, the same for every row). With
`ablate.random_draws = D`, each cell is also run with D random subspaces of the same layers and
ranks (`random_like`, draw k seeded by `control_seed(eval_split, k)`, or `ablate.random_seeds`;
recorded per row as `random_seed`): "the gradient subspace helps" then means it scores above the
random subspaces of its size, not that projecting perturbs the model. The seeds differ between
splits, so a test gate's controls are never the dev gates' (rows written before seeds were recorded
used seed = draw, and are read so). With
`ablate.subspace_seeds = [0, 1, 2]`, each cell runs once per seed's gradient subspace (extracted
from that seed's calibration examples; default `seeds[0]` alone), so that a cell's claim covers
the subspace's own sampling noise, not one extraction. Rows go to `RUN/ablation.jsonl` one by one
(a rerun skips the rows already there, and a directory accepts a grown or changed grid, `GRID`),
and a directory holding only another run's `ablation.json` resumes from its rows: a row is run
again only where its cell, subspace seed or random seed differs), then to `ablation.csv`, `ablation.json` (with `controls`: per cell, gradient minus random, paired
over questions with a bootstrap over the seeds and draws, then the questions) and the figures
`ablation.html`, all three for the grid of this call.

`spd_lens.ablate(model, examples, ...)` (this module, called) runs the keep/remove grid on your own
examples from Python: see `spd_lens.ablate_examples`.

Example:
    >>> from spd_lens.ablate import grid
    >>> from spd_lens.config import config_from_dict
    >>> points = grid(config_from_dict({"task": {"eval_split": "test"}, "ablate": {"ranks": [8], "random_draws": 2}}),
    ...               [15, 29])
    >>> [(p["subspace"], p["draw"], p.get("random_seed", 0) > 999) for p in points
    ...  if p["layers"] == "15"]
    [('gradient', None, False), ('random', 0, True), ('random', 1, True)]
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

from spd_lens.artifacts import atomic_write, read_json_object, write_json
from spd_lens.attribution import correctness_loss
from spd_lens.config import ExperimentConfig
from spd_lens.errors import SpdLensError
from spd_lens.evaluate import bootstrap_ci, paired_difference, per_prompt_scores, score_records
from spd_lens.experiment import Run
from spd_lens.extract import encode_examples
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, sample
from spd_lens.subspace import control_seed, random_like

CELL = ("rank", "layers", "alpha", "head", "kinds", "mode")  # what a cell is; a row adds subspace, seed, draw, random_seed
MODES = ("keep", "remove")


def cell_of(row: dict) -> dict:
    """A row's cell; rows written before `mode` existed kept the subspace (mode "keep")."""
    return {k: row.get(k, "keep") if k == "mode" else row[k] for k in CELL}
# Settings that only choose which rows to run: a directory accepts a grid changed in them (rows are
# kept per cell, so a cell already there is not run again) and holds the rows of every grid run in it.
GRID = ("name", "ablate.ranks", "ablate.energies", "ablate.layer_sets", "ablate.kind_sets", "ablate.alphas",
        "ablate.heads", "ablate.random_draws", "ablate.subspace_seeds", "ablate.random_seeds", "ablate.modes")


def grid(config: ExperimentConfig, subspace_layers: list[int]) -> list[dict]:
    """Every row to run: the unprojected baseline, then each cell with the gradient subspace and
    its random draws. `rank` is a fixed rank or `"energy=E"`."""
    a = config.ablate
    layer_sets = a.layer_sets or [[layer] for layer in subspace_layers]
    missing = sorted({layer for s in layer_sets for layer in s} - set(subspace_layers))
    if missing:
        raise SpdLensError(f"ablate.layer_sets use layer(s) {missing} outside subspace.layers {subspace_layers}")
    kind_sets = a.kind_sets or [a.kinds]
    bad = [k for s in kind_sets for k in s if k not in ("k", "v")] + [s for s in kind_sets if not s]
    if bad:
        raise SpdLensError(f"ablate.kind_sets {kind_sets}: each set holds 'k' and/or 'v', e.g. [['k'], ['v'], ['k', 'v']]")
    if not a.modes or any(m not in MODES for m in a.modes):
        raise SpdLensError(f"ablate.modes {a.modes}: use \"keep\" (project onto the subspace, P) and/or \"remove\" "
                           f"(take it out, I - P), e.g. modes = [\"keep\", \"remove\"]")
    if any(not 0 < e <= 1 for e in a.energies):
        raise SpdLensError(f"ablate.energies {a.energies}: each is a share of gradient energy in (0, 1]")
    heads = a.heads if a.heads else [None]
    policies = [*a.ranks, *(f"energy={e}" for e in a.energies)]
    seeds = subspace_seeds(config)
    draw_seeds = random_seeds(config)
    points = [{"rank": "none", "layers": "none", "alpha": 0.0, "head": "all", "kinds": ",".join(a.kinds),
               "subspace": "none", "draw": None, "seed": None}]
    for rank, layers, kinds, alpha, head, mode in itertools.product(policies, layer_sets, kind_sets, a.alphas, heads,
                                                                    a.modes):
        cell = {"rank": rank, "layers": ",".join(map(str, layers)), "alpha": alpha,
                "head": "all" if head is None else head, "kinds": ",".join(kinds), "mode": mode}
        points += [{**cell, "subspace": "gradient", "draw": None, "seed": s} for s in seeds]
        # A random draw only takes its ranks from the gradient subspace: at a fixed rank it is the
        # same whatever the extraction seed, so it runs once (seed None); an energy policy's ranks
        # vary by seed, so its draws run per seed.
        matched = seeds if isinstance(rank, str) else [None]
        points += [{**cell, "subspace": "random", "draw": d, "seed": s, "random_seed": r} for s in matched
                   for d, r in enumerate(draw_seeds)]
    return points


def random_seeds(config: ExperimentConfig) -> list[int]:
    """Each random draw's `random_like` seed: `[ablate] random_seeds`, or `control_seed(split, k)`
    for draw k on `task.eval_split` (so dev and test gates never share a random subspace)."""
    a = config.ablate
    if not (isinstance(a.random_draws, int) and a.random_draws >= 0):
        raise SpdLensError(f"ablate.random_draws must be a whole number >= 0, got {a.random_draws!r}")
    if a.random_seeds is None:
        return [control_seed(config.task.eval_split, d) for d in range(a.random_draws)]
    given = list(a.random_seeds)
    if len(set(given)) != len(given) or not all(isinstance(s, int) and s >= 0 for s in given):
        raise SpdLensError(f"ablate.random_seeds = {given}: give distinct whole numbers >= 0, one per random draw")
    if a.random_draws not in (0, len(given)):
        raise SpdLensError(f"ablate.random_seeds gives {len(given)} seed(s) but ablate.random_draws = {a.random_draws}: "
                           "give one seed per draw, or leave random_draws out")
    return given


def subspace_seeds(config: ExperimentConfig) -> list[int]:
    """The extraction seeds each cell runs with: `[ablate] subspace_seeds`, or `seeds[0]` alone."""
    seeds = config.ablate.subspace_seeds
    if seeds is None:
        return [config.seeds[0]]
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise SpdLensError(f"ablate.subspace_seeds = {seeds}: give distinct whole numbers >= 0, e.g. [0, 1, 2]")
    return list(seeds)


def check_decoding(config: ExperimentConfig) -> None:
    """Refuses `[ablate] decoding` / `samples` settings that cannot run (also from `spd-lens plan`)."""
    a = config.ablate
    if a.decoding not in ("greedy", "sampling"):
        raise SpdLensError(f"ablate.decoding must be 'greedy' or 'sampling', got {a.decoding!r}")
    if not (isinstance(a.samples, int) and a.samples >= 1):
        raise SpdLensError(f"ablate.samples must be a whole number >= 1, got {a.samples!r}")
    if a.decoding == "greedy" and a.samples != 1:
        raise SpdLensError(f"ablate.samples = {a.samples} needs sampled cells: set [ablate] decoding = \"sampling\" "
                           "(self-generation's [sampling] settings), or samples = 1 for greedy cells")
    if a.decoding == "greedy" and config.eval.temperature != 0:
        raise SpdLensError(f"[eval] temperature = {config.eval.temperature}, but the ablation decodes greedily: set it "
                           "to 0, or sample each cell with [ablate] decoding = \"sampling\" (which uses [sampling]'s "
                           "temperature, top-k and top-p, not [eval]'s)")


def decoding_config(config: ExperimentConfig, run: Run) -> SamplingConfig:
    """How each cell answers. Greedy: the task's budget (or `[eval] max_new_tokens`). Sampled
    (`[ablate] decoding = "sampling"`): self-generation's own settings for psr, that is
    `[sampling]`'s temperature, top-k, top-p and token budget and the seed `seeds[0]`, with
    `[ablate] samples` completions per question in place of `[sampling] num_samples`, so that the
    gate sees the policy SPD distils from. Rows in flight: `[eval] batch_size` either way."""
    check_decoding(config)
    if config.ablate.decoding == "greedy":
        return SamplingConfig(max_new_tokens=run.task.max_new_tokens if config.eval.max_new_tokens is None
                              else config.eval.max_new_tokens, batch_size=config.eval.batch_size)
    return dataclasses.replace(run.sampling_config("psr", config.seeds[0]), num_samples=config.ablate.samples,
                               batch_size=config.eval.batch_size)


def _subspace(point: dict) -> str:
    # Rows written before random controls name no subspace: they hold the gradient (or no) projection.
    return point.get("subspace") or ("none" if point["rank"] == "none" else "gradient")


def _seed(point: dict, first_seed: int) -> int | None:
    """The extraction seed a row's projection depends on: none for the baseline and for a
    fixed-rank random draw; rows written before several seeds name none: they used the first's."""
    subspace = _subspace(point)
    if subspace == "none" or (subspace == "random" and not isinstance(point["rank"], str)):
        return None
    return point.get("seed", first_seed)


def _random_seed(point: dict) -> int | None:
    """A random draw's `random_like` seed; rows written before seeds were recorded used the draw."""
    if _subspace(point) != "random":
        return None
    return point.get("random_seed", point.get("draw"))


def _key(point: dict, first_seed: int) -> str:
    return json.dumps({**cell_of(point), "subspace": _subspace(point), "draw": point.get("draw"),
                       "seed": _seed(point, first_seed), "random_seed": _random_seed(point)}, sort_keys=True)


def _projection(subspace, point: dict, config: ExperimentConfig) -> Projection | None:
    if point["rank"] == "none":
        return None
    rank = point["rank"]
    chosen = (subspace.with_rank(energy=float(rank.split("=")[1])) if isinstance(rank, str)
              else subspace.with_rank(rank=rank))
    if point.get("subspace") == "random":
        chosen = random_like(chosen, seed=_random_seed(point))  # the same layers and per-basis ranks
    heads = None if point["head"] == "all" else [point["head"]]
    return Projection.build(chosen, layers=[int(x) for x in point["layers"].split(",")],
                            kinds=point["kinds"].split(","), layout="flat" if heads is None else "head", heads=heads,
                            alpha=point["alpha"], complement=point.get("mode") == "remove")


def run_ablation(config: ExperimentConfig, out: str | Path, *, progress: Callable | None = None) -> list[dict]:
    out = Path(out)
    run = Run(config, out)
    sampling = decoding_config(config, run)  # refused before the directory is claimed
    seeds = subspace_seeds(config)
    with run._exclusive("ablate"):
        return _run_cells(config, out, run, sampling, seeds, progress)


def _run_cells(config: ExperimentConfig, out: Path, run: Run, sampling, seeds: list[int],
               progress: Callable | None) -> list[dict]:
    run._claim_directory(free=GRID)
    model, tokenizer = run.base_model()
    first = config.seeds[0]  # rows that name no seed used this one's subspace
    subspaces = {seeds[0]: run.subspace("gradient", seeds[0])}  # the others' are extracted when a row needs them
    points = grid(config, subspaces[seeds[0]].layers)
    table_path = out / "ablation.jsonl"
    done = {}
    summary_path = out / "ablation.json"
    sampling_record = {k: v for k, v in dataclasses.asdict(sampling).items() if k not in ("batch_size", "batching")}
    if summary_path.is_file():
        # Rows of another run copied in (its ablation.json alone): reused where their key matches
        # and they were made from the same model, evaluation and subspaces; marked, so that their
        # seconds are not counted as this directory's time.
        copied = read_json_object(summary_path, "an ablation table (spd-lens ablate)")
        stale = _stale_seeds(copied, config, run, sampling_record, subspaces, seeds)
        for row in copied.get("rows", []):
            row = {k: v for k, v in row.items() if k != "delta_loss"}
            if _seed(row, first) in stale:
                continue  # made from another subspace: runs again
            done[_key(row, first)] = {**row, "copied": True}
    if table_path.exists():
        for line in table_path.read_text().splitlines():
            try:
                row = json.loads(line)
                done[_key(row, first)] = row
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line from an interrupted run
    if done:
        # Keep only complete rows (and the copied ones), so appending starts on a fresh line.
        atomic_write(table_path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values())))
    task = run.task
    examples = task.examples(config.task.eval_split, n=config.task.eval_n, seed=0)
    _, calibration = encode_examples(model, run.subspace_task, n=config.ablate.loss_n, split="train",
                                     seed=config.seeds[0], tokenizer=tokenizer)
    todo = [p for p in points if _key(p, first) not in done]
    with open(table_path, "a", encoding="utf-8") as table:
        for point in progress(todo) if progress else todo:
            started = time.perf_counter()
            seed = point["seed"] if point["seed"] is not None else seeds[0]
            if seed not in subspaces:
                subspaces[seed] = run.subspace("gradient", seed)
            projection = _projection(subspaces[seed], point, config)
            handle = projection.attach(model) if projection else None
            try:
                loss = correctness_loss(model, calibration, pad_id=tokenizer.pad_token_id)
                # One call: refill decoding keeps batch_size rows in flight across all the examples.
                completions = sample(model, tokenizer, examples, sampling)  # each with its own system prompt
            finally:
                if handle:
                    handle.remove()
            result = score_records(task, {e.id: e for e in examples},
                                   [{"prompt_id": e.id, "completion": c, "sample": j}
                                    for e, row_completions in zip(examples, completions) for j, c in enumerate(row_completions)])
            # A question's outcome is the mean over its samples (0 or 1 when greedy); the interval
            # resamples questions, not samples, which are not independent draws of questions.
            outcomes = per_prompt_scores(result.results)
            score = sum(outcomes.values()) / len(outcomes)
            row = {**point, "score": score, "ci": list(bootstrap_ci(list(outcomes.values()))), "n": len(outcomes), "loss": loss,
                   "split": config.task.eval_split,
                   "outcomes": {p: (int(v) if sampling.num_samples == 1 else v) for p, v in outcomes.items()},
                   "seconds": round(time.perf_counter() - started, 1)}  # loss, decoding and scoring of this row
            table.write(json.dumps(row) + "\n")
            table.flush()
            done[_key(point, first)] = row
    rows = [done[_key(p, first)] for p in points]
    baseline_loss = rows[0]["loss"]
    for row in rows:
        row["delta_loss"] = row["loss"] - baseline_loss
        row["subspace"], row["seed"] = _subspace(row), _seed(row, first)
        row["random_seed"] = _random_seed(row)
        row.setdefault("draw", None)
    write_json(out / "ablation.json", {"rows": rows, "controls": controls(rows), "task": task.name,
                                       "split": config.task.eval_split, "model": config.model.name,
                                       "decoding": sampling_record, "eval_n": config.task.eval_n,
                                       "subspace_ids": {str(k): v.meta.get("config_hash") for k, v in subspaces.items()}})
    fields = ["rank", "layers", "alpha", "head", "kinds", "mode", "subspace", "seed", "draw", "random_seed", "score", "ci_low", "ci_high", "n",
              "loss", "delta_loss"]

    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                mode = "" if r["rank"] == "none" else r.get("mode", "keep")  # tables before modes kept the subspace
                writer.writerow({**{k: r[k] for k in fields if k in r}, "mode": mode, "ci_low": r["ci"][0],
                                 "ci_high": r["ci"][1]})

    atomic_write(out / "ablation.csv", write_csv)
    write_ablation_report(out, f"spd_lens ablation {config.name}")
    return rows


def _stale_seeds(copied: dict, config: ExperimentConfig, run: Run, decoding: dict, subspaces: dict,
                 seeds: list[int]) -> set:
    """The subspace seeds whose copied rows were made from another subspace than this run's (they
    run again). A table of another model, task, split, question count or decoding is refused:
    none of its rows could be reused."""
    mine = {"model": config.model.name, "task": run.task.name, "split": config.task.eval_split,
            "eval_n": config.task.eval_n, "decoding": decoding}
    for key, value in mine.items():
        if key in copied and copied[key] != value:
            raise SpdLensError(f"the ablation.json copied into {run.out} was made with {key} {copied[key]!r}, this "
                               f"config has {value!r}: none of its rows can be reused here; remove that file or use "
                               f"another --out")
    recorded = copied.get("subspace_ids")
    if recorded is None:  # tables written before subspace ids were recorded
        print(f"{run.out / 'ablation.json'}: copied rows that do not record their subspaces; their gradient rows "
              "are taken as this config's (same cell and seed)", file=sys.stderr)
        return set()
    stale = set()
    for seed in seeds:
        if str(seed) in recorded:
            if seed not in subspaces:
                subspaces[seed] = run.subspace("gradient", seed)
            if subspaces[seed].meta.get("config_hash") != recorded[str(seed)]:
                stale.add(seed)
    if stale:
        print(f"{run.out / 'ablation.json'}: copied rows of subspace seed(s) {sorted(stale)} were made from other "
              "subspaces: they run again", file=sys.stderr)
    return stale


def controls(rows: list[dict]) -> list[dict]:
    """Per cell with random draws: the gradient subspace's score minus the random subspaces',
    paired over the questions, the interval resampling the gradient subspace's seeds and the
    draws, then the questions. `gradient` is the mean over seeds (`gradient_seeds` each one's)."""
    cells: dict[str, dict] = {}
    for row in rows:
        if row.get("subspace") in ("gradient", "random") and "outcomes" in row:
            cell = cells.setdefault(json.dumps(cell_of(row), sort_keys=True),
                                    {"cell": cell_of(row), "gradient": [], "random": []})
            cell[row["subspace"]].append(row)
    out = []
    for cell in cells.values():
        if not cell["gradient"] or not cell["random"]:
            continue
        # Each row is one "seed" of its side for the hierarchical bootstrap (a subspace seed, a
        # draw); the labels never match across sides, so no gradient seed is paired with a draw.
        gradient = [{"prompt_id": p, "passed": v, "seed": f"gradient {i}"} for i, r in enumerate(cell["gradient"])
                    for p, v in r["outcomes"].items()]
        random = [{"prompt_id": p, "passed": v, "seed": f"random {i}"} for i, r in enumerate(cell["random"])
                  for p, v in r["outcomes"].items()]
        c = paired_difference(gradient, random)
        out.append({**cell["cell"], "gradient": sum(r["score"] for r in cell["gradient"]) / len(cell["gradient"]),
                    "gradient_seeds": [r.get("seed") for r in cell["gradient"]],
                    "gradient_scores": [r["score"] for r in cell["gradient"]],
                    "random": sum(r["score"] for r in cell["random"]) / len(cell["random"]),
                    "random_draws": [r["score"] for r in cell["random"]],
                    "random_seeds": [_random_seed(r) for r in cell["random"]], "difference": c["difference"], "ci": c["ci"],
                    "n": c["n"], "seed_spread": c["seed_spread"], "seed_p": c["seed_p"], "seeds_differ": c["seeds_differ"]})
    return out


def refresh_controls(out: str | Path) -> list[dict]:
    """`OUT/ablation.json`'s gradient-vs-random controls computed again from its rows by this
    version (no model runs); the file is rewritten only when they changed."""
    path = Path(out) / "ablation.json"
    table = read_json_object(path, "an ablation table (spd-lens ablate)")
    fresh = controls(table["rows"])
    if fresh != table.get("controls", []):
        write_json(path, {**table, "controls": fresh})
    return fresh


def write_ablation_report(out: str | Path, title: str | None = None) -> Path:
    """`OUT/ablation.html` from `OUT/ablation.json`: gradient vs random per cell (where the table
    has controls), and score and loss-change grids over rank x layers."""
    from spd_lens.viz import ablation_figure, control_figure, write_report

    out = Path(out)
    table = read_json_object(out / "ablation.json", "an ablation table (spd-lens ablate)")
    rows = table["rows"]
    cells: dict[str, list[dict]] = {}
    for r in rows:
        if r["rank"] != "none" and r.get("subspace", "gradient") == "gradient":
            cells.setdefault(json.dumps({k: r.get(k) for k in CELL}), []).append(r)  # old tables lack some keys
    # With several seeds, a grid cell shows the mean over its gradient subspaces.
    grid_rows = [{**group[0], **{v: sum(r[v] for r in group) / len(group) for v in ("score", "delta_loss")}}
                 for group in cells.values()]
    # One rank x layers grid per setting of the other cell keys (K/V, alpha, head): drawn together,
    # cells that differ only in those would overwrite each other. A grid of one cell says nothing
    # the per-cell figure does not.
    grids: dict[str, list[dict]] = {}
    for r in grid_rows:
        where = ", ".join(f"{k} {r.get(k)}" for k in CELL if k not in ("rank", "layers") and r.get(k) is not None)
        grids.setdefault(where, []).append(r)
    figures = [ablation_figure(group, x="rank", y="layers", value=value, where=where if len(grids) > 1 else "")
               for value in ("score", "delta_loss") for where, group in grids.items() if len(group) > 1]
    if table.get("controls"):
        figures.insert(0, control_figure(table["controls"], baseline=rows[0]["score"]))
    notes = f"baseline (no projection): score {rows[0]['score']:.3f}, correctness loss {rows[0]['loss']:.4f}"
    write_report(out / "ablation.html", figures, title or f"spd_lens ablation on {table.get('task')}", notes)
    return out / "ablation.html"


class _CallableModule(types.ModuleType):
    """`spd_lens.ablate(model, examples, ...)` calls the grid on your own examples
    (`spd_lens.ablate_examples.ablate`) while `spd_lens.ablate` stays this module."""

    def __call__(self, *args, **kwargs):
        from spd_lens.ablate_examples import ablate

        return ablate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
