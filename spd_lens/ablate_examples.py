"""`spd_lens.ablate(model, examples, ...)`: the ablation grid on any capability, from Python.

The grid is policies (fixed ranks and/or energy shares) x layer sets x K/V sets x heads x modes,
where `keep` projects K/V onto the capability's gradient subspace (P) and `remove` projects it out
(I − P). Each cell runs with the gradient subspace and with `random_draws` random subspaces of
the same layers and per-basis ranks (`random_like`); every row scores every example three ways:

- `loss`: the correctness-token NLL (`correctness_loss(..., reduction="none")`);
- `span_accuracy`: teacher-forced, every span token the model's top prediction (`span_accuracy`);
- `greedy_accuracy`: greedy completions (`max_new_tokens`) scored by the task's scorer (for your
  own `Example`s: the span text in the completion's final answer, `tasks.custom.span_match`).

Per cell and metric, `controls` holds gradient minus random, paired over the examples with a
bootstrap over the draws, then the examples (as `spd-lens ablate`'s controls). Random seeds are
fresh per call (a new stream of `control_seed`) unless `random_seeds` gives them; they are recorded
per row, and a call resumed in the same `out` directory reuses them.

With `out=`, rows go to `OUT/ablate.jsonl` one by one (a rerun runs only the missing rows; a
directory made from other examples, another subspace, model or settings is refused, naming what
differs), then `OUT/ablate.csv`, `OUT/ablate.json` (rows with per-example values, controls, seeds)
and `OUT/ablate.html` with a PNG per metric (`ablate-loss.png`, ...): gradient vs random per cell.

The examples are scored as they are given; `subspace=None` extracts one from them (for a `Task`:
from `extract_n` of its train examples, scored on `split`), so pass a subspace extracted from
other examples for a held-out reading.

Example:
    >>> import spd_lens
    >>> from spd_lens.tasks import Example
    >>> model = spd_lens.load_model("tiny")
    >>> examples = [Example(f"add/{i}", f"What is {i} + 2?", str(i + 2), [[0, len(str(i + 2))]]) for i in range(4)]
    >>> sub = spd_lens.extract_subspace(model, examples, layers=[3])
    >>> table = spd_lens.ablate(model, examples, subspace=sub, ranks=[1, 2], random_draws=3, max_new_tokens=4)
    >>> sorted(set(table["source"])), sorted(set(table["mode"]))
    (['gradient', 'none', 'random'], ['keep', 'none', 'remove'])
    >>> len(table), list(table.columns[:4])   # the baseline, then 4 cells x (gradient + 3 draws)
    (17, ['cell', 'mode', 'source', 'draw'])
    >>> len(table.attrs["controls"]) == 4 * 3   # per cell and metric
    True
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from spd_lens.artifacts import atomic_write, read_json_object, write_json
from spd_lens.attribution import _modes, correctness_values, hooks_on, unbooted
from spd_lens.errors import SpdLensError
from spd_lens.evaluate import paired_difference
from spd_lens.extract import encode_examples, extract_subspace
from spd_lens.models import hf_model_of, model_id
from spd_lens.projection import Projection
from spd_lens.sampling import SamplingConfig, sample
from spd_lens.subspace import CapabilitySubspace, control_seed, random_like
from spd_lens.tasks import Example, Task, get_task

METRICS = ("loss", "span_accuracy", "greedy_accuracy")
COLUMNS = ("cell", "mode", "source", "draw", "random_seed", "rank", "layers", "kinds", "head", "alpha", "loss",
           "span_accuracy", "greedy_accuracy", "n", "seconds")


class Rows(list):
    """The table without pandas: a list of row dicts with `columns`, `attrs` and `to_csv(path)`."""

    def __init__(self, rows=(), attrs: dict | None = None):
        super().__init__(rows)
        self.attrs = attrs or {}

    @property
    def columns(self) -> list[str]:
        return list(COLUMNS)

    def __getitem__(self, key):
        if isinstance(key, str):  # a column, as a DataFrame gives it
            return [row.get(key) for row in self]
        return super().__getitem__(key)

    def to_csv(self, path) -> None:
        def write(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
                writer.writeheader()
                writer.writerows(self)

        atomic_write(Path(path), write)


def _table(rows: list[dict], attrs: dict):
    plain = [{k: r.get(k) for k in COLUMNS} for r in rows]
    try:
        import pandas as pd
    except ImportError:
        return Rows(plain, attrs)
    frame = pd.DataFrame(plain, columns=list(COLUMNS))
    for column in ("draw", "random_seed"):  # whole numbers with gaps: a float column would round the seeds
        frame[column] = pd.array([r[column] for r in plain], dtype="Int64")
    frame.attrs.update(attrs)
    return frame


def _examples(examples, split: str, n: int | None) -> tuple[Task, list[Example], str]:
    """(the scoring task, the examples scored, a label for the seed stream)."""
    if isinstance(examples, (str, Task)):
        task = get_task(examples) if isinstance(examples, str) else examples
        return task, task.examples(split, n=n, seed=0), f"{task.name}/{split}"
    examples = list(examples)
    if not examples or not all(isinstance(e, Example) for e in examples):
        raise SpdLensError("examples must be a task (name or Task) or a non-empty list of spd_lens.Example")
    from spd_lens.tasks.custom import capability

    chosen = examples[:n] if n is not None else examples
    return capability(chosen, name="examples"), chosen, "examples"


def _examples_hash(examples: Sequence[Example]) -> str:
    data = [[e.id, e.prompt, e.reference, [list(s) for s in e.spans], e.system] for e in examples]
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()[:16]


def _cells(subspace: CapabilitySubspace, ranks, energies, layer_sets, kind_sets, heads, modes, alpha) -> list[dict]:
    layer_sets = [[layer] for layer in subspace.layers] if layer_sets is None else [list(s) for s in layer_sets]
    missing = sorted({layer for s in layer_sets for layer in s} - set(subspace.layers))
    if missing or not layer_sets or not all(layer_sets):
        raise SpdLensError(f"layer_sets {layer_sets}: give non-empty sets of the subspace's layers {subspace.layers}")
    kind_sets = [[k] if isinstance(k, str) else list(k) for k in kind_sets]
    if not kind_sets or any(not s or any(k not in ("k", "v") for k in s) for s in kind_sets):
        raise SpdLensError(f"kind_sets {kind_sets}: each set holds 'k' and/or 'v', e.g. [['k'], ['v'], ['k', 'v']]")
    if any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise SpdLensError(f"ranks {list(ranks)}: each a whole number >= 1")
    if any(not 0 < e <= 1 for e in energies):
        raise SpdLensError(f"energies {list(energies)}: each a share of gradient energy in (0, 1]")
    policies = [*ranks, *(f"energy={e}" for e in energies)]
    if not policies:
        raise SpdLensError("give ranks=[...] and/or energies=[...]: the grid has no cell")
    cells = []
    for policy, layers, kinds, head, mode in itertools.product(policies, layer_sets, kind_sets, heads or [None], modes):
        cell = {"rank": policy, "layers": ",".join(map(str, layers)), "kinds": ",".join(kinds),
                "head": "all" if head is None else head, "mode": mode, "alpha": float(alpha)}
        cell["cell"] = f"r {policy} L {cell['layers']} {cell['kinds']}" + ("" if head is None else f" h {head}")
        cells.append(cell)
    return cells


def _projection(subspace: CapabilitySubspace, cell: dict, random_seed: int | None) -> Projection:
    rank = cell["rank"]
    chosen = (subspace.with_rank(energy=float(rank.split("=")[1])) if isinstance(rank, str)
              else subspace.with_rank(rank=rank))
    if random_seed is not None:
        chosen = random_like(chosen, seed=random_seed)
    heads = None if cell["head"] == "all" else [cell["head"]]
    return Projection.build(chosen, layers=[int(x) for x in cell["layers"].split(",")], kinds=cell["kinds"].split(","),
                            layout="flat" if heads is None else "head", heads=heads, alpha=cell["alpha"],
                            complement=cell["mode"] == "remove")


def _key(row: dict) -> str:
    return json.dumps({k: row.get(k) for k in ("rank", "layers", "kinds", "head", "mode", "alpha", "source", "draw",
                                               "random_seed")}, sort_keys=True, default=str)


def ablate(model, examples, *, subspace: CapabilitySubspace | None = None, ranks: Sequence[int] = (4, 16),
           energies: Sequence[float] = (), layer_sets: Sequence[Sequence[int]] | None = None,
           kind_sets: Sequence[Sequence[str]] = (("k", "v"),), heads: Sequence[int] | None = None,
           modes: Sequence[str] = ("keep", "remove"), random_draws: int = 3, random_seeds: Sequence[int] | None = None,
           alpha: float = 1.0, max_new_tokens: int | None = None, split: str = "dev", n: int | None = None,
           extract_n: int = 16, layers: Sequence[int] | None = None, tokenizer=None, batch_size: int = 16,
           out: str | Path | None = None, progress: Callable | None = None):
    """The ablation grid on `examples` (a list of `Example`s, a `Capability`, or a task); see the
    module docstring. Returns a pandas DataFrame (a `Rows` list without pandas) with one row per
    baseline / cell x source: `cell`, `mode`, `source` (`none`, `gradient`, `random`), `draw`,
    `random_seed`, the cell's settings, and the metrics `loss`, `span_accuracy`,
    `greedy_accuracy`. `table.attrs` holds `controls` (per cell and metric: gradient, random
    mean, each draw, difference, 95% interval), `per_example` (per row key: {id: [loss, span,
    greedy]}), `random_seeds` and `baseline`.

    `subspace`: the gradient subspace (default: extracted from the examples, at `layers` or
    {L/2, L-1}). `ranks` / `energies`: rank policies; `layer_sets` (default each subspace layer
    alone), `kind_sets`, `heads` (per-head layout, each head alone; default all heads, flattened),
    `modes` (`keep` = P, `remove` = I − P), `alpha` (1 = full projection). `random_draws`
    matched random subspaces per cell (>= 3 for an interval that means something), seeded by
    `random_seeds` or a fresh `control_seed` stream. `max_new_tokens`: greedy budget (default
    the task's).
    """
    modes = _modes(modes)
    if isinstance(random_draws, bool) or not isinstance(random_draws, int) or random_draws < 0:
        raise SpdLensError(f"random_draws must be a whole number >= 0, got {random_draws!r}")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SpdLensError("pass tokenizer= (an HF model carries none; a bridge from load_model does)")
    task, scored, label = _examples(examples, split, n)
    runner = model if hooks_on(model) else unbooted(model)  # your hooks apply; else the plain, faster path
    if subspace is None:
        source = task if isinstance(examples, (str, Task)) else scored
        try:
            subspace = extract_subspace(runner, source, n=extract_n if isinstance(examples, (str, Task)) else None,
                                        layers=layers, tokenizer=tokenizer)
        except SpdLensError as err:
            if "were asked for" not in str(err):
                raise
            raise SpdLensError(f"{err}: the subspace is extracted from extract_n={extract_n} train examples; pass a "
                               "smaller extract_n (--extract-n on the command line), a subspace of your own "
                               "(subspace= / --subspace DIR), or your examples as a plain list (--split all), "
                               "which are then both extracted from and scored") from err
    subspace.check_compatible(model)
    cells = _cells(subspace, list(ranks), list(energies), layer_sets, kind_sets, heads, modes, alpha)
    budget = max_new_tokens or task.max_new_tokens
    out = Path(out) if out is not None else None
    context = {"model": model_id(model), "dtype": str(hf_model_of(model).dtype).removeprefix("torch."),
               "examples": _examples_hash(scored), "n_examples": len(scored),
               "subspace": subspace.meta.get("config_hash"), "max_new_tokens": budget, "task": task.name,
               "scorer": getattr(task, "scorer_spec", None) or task.name}
    done, recorded = _resume(out, context) if out is not None else ({}, {})
    seeds = _seeds(random_draws, random_seeds, recorded, label)
    _, encoded = encode_examples(runner, scored, n=None, split="train", seed=0, tokenizer=tokenizer)
    config = SamplingConfig(max_new_tokens=budget, batch_size=batch_size)
    points = [{"cell": "baseline", "rank": "none", "layers": "none", "kinds": "none", "head": "all", "mode": "none",
               "alpha": 0.0, "source": "none", "draw": None, "random_seed": None}]
    for cell in cells:
        points.append({**cell, "source": "gradient", "draw": None, "random_seed": None})
        points += [{**cell, "source": "random", "draw": k, "random_seed": seed} for k, seed in enumerate(seeds["seeds"])]
    todo = [p for p in points if _key(p) not in done]
    handle_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "ablate_context.json", {**context, "seed_stream": seeds["stream"], "label": label})
        handle_file = open(out / "ablate.jsonl", "a", encoding="utf-8")
    try:
        for point in progress(todo) if progress else todo:
            started = time.perf_counter()
            handle = (_projection(subspace, point, point["random_seed"]).attach(runner)
                      if point["source"] != "none" else None)
            try:
                losses, spans = correctness_values(runner, encoded, pad_id=tokenizer.pad_token_id)
                completions = [c[0] for c in sample(runner, tokenizer, scored, config)]
            finally:
                if handle:
                    handle.remove()
            greedy = [float(bool(task.score(e, c).passed)) for e, c in zip(scored, completions)]
            row = {**point, "loss": sum(losses) / len(losses), "span_accuracy": sum(spans) / len(spans),
                   "greedy_accuracy": sum(greedy) / len(greedy), "n": len(scored),
                   "seconds": round(time.perf_counter() - started, 2),
                   "per_example": {e.id: [loss, span, g] for e, loss, span, g in zip(scored, losses, spans, greedy)}}
            done[_key(point)] = row
            if handle_file:
                handle_file.write(json.dumps(row) + "\n")
                handle_file.flush()
    finally:
        if handle_file:
            handle_file.close()
    rows = [done[_key(p)] for p in points]
    controls = ablation_controls(rows)
    attrs = {"controls": controls, "random_seeds": seeds["seeds"], "seed_stream": seeds["stream"],
             "baseline": {m: rows[0][m] for m in METRICS}, "context": context,
             "per_example": {_key(r): r["per_example"] for r in rows}}
    table = _table(rows, attrs)
    if out is not None:
        _write(out, rows, controls, attrs)
    return table


def _resume(out: Path, context: dict) -> tuple[dict, dict]:
    """Rows already in `out` (keyed) and its recorded context; a directory of another grid's
    inputs is refused, naming what differs."""
    recorded_path = out / "ablate_context.json"
    if not recorded_path.is_file():
        return {}, {}
    recorded = read_json_object(recorded_path, "an ablation's inputs (spd_lens.ablate)")
    changed = [f"{k}: directory has {recorded.get(k)!r}, now {v!r}" for k, v in context.items() if recorded.get(k) != v]
    if changed:
        raise SpdLensError(f"{out} holds an ablation of other inputs ({'; '.join(changed)}): use another out= "
                           "or the same examples, subspace, model and budget")
    done = {}
    table = out / "ablate.jsonl"
    if table.is_file():
        for line in table.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of an interrupted call
            done[_key(row)] = row
        atomic_write(table, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in done.values())))
    return done, recorded


def _seeds(draws: int, given, recorded: dict, label: str) -> dict:
    """The draws' seeds: `random_seeds` as given (they set the number of draws), else the
    directory's recorded stream (resumed: each draw keeps its seed), else a fresh stream."""
    if given is not None:
        given = list(given)
        if len(set(given)) != len(given) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                    for s in given):
            raise SpdLensError(f"random_seeds {given}: give distinct whole numbers >= 0, one per random draw")
        return {"seeds": given, "stream": None}
    stream = recorded.get("seed_stream") or secrets.token_hex(6)
    return {"seeds": [control_seed(label, k, stream) for k in range(draws)], "stream": stream}


def ablation_controls(rows: list[dict]) -> list[dict]:
    """Per cell and metric: the gradient subspace's value minus its random draws', paired over the
    examples, the interval resampling the draws and then the examples."""
    cells: dict[str, dict] = {}
    for row in rows:
        if row["source"] in ("gradient", "random"):
            key = json.dumps({k: row[k] for k in ("cell", "mode", "alpha")}, sort_keys=True)
            cells.setdefault(key, {"rows": {"gradient": [], "random": []}, "first": row})
            cells[key]["rows"][row["source"]].append(row)
    out = []
    for cell in cells.values():
        gradient, random = cell["rows"]["gradient"], cell["rows"]["random"]
        if not gradient or not random:
            continue
        first = cell["first"]
        for i, metric in enumerate(METRICS):
            a = [{"prompt_id": p, "passed": v[i], "seed": "gradient"} for r in gradient for p, v in r["per_example"].items()]
            b = [{"prompt_id": p, "passed": v[i], "seed": f"random {r['draw']}"} for r in random
                 for p, v in r["per_example"].items()]
            c = paired_difference(a, b)
            out.append({**{k: first[k] for k in ("cell", "mode", "rank", "layers", "kinds", "head", "alpha")},
                        "metric": metric, "gradient": sum(r[metric] for r in gradient) / len(gradient),
                        "random": sum(r[metric] for r in random) / len(random),
                        "random_draws": [r[metric] for r in random], "random_seeds": [r["random_seed"] for r in random],
                        "difference": c["difference"], "ci": c["ci"], "n": c["n"]})
    return out


def ablate_figures(controls: list[dict], baseline: dict | None = None) -> list:
    """One figure per metric: per cell (and mode), the gradient subspace beside its random draws
    and gradient minus random with its 95% interval."""
    from spd_lens.viz import control_figure

    figures = []
    for metric in METRICS:
        chosen = [c for c in controls if c["metric"] == metric]
        if chosen:
            figures.append(control_figure(chosen, baseline=(baseline or {}).get(metric), metric=metric))
    return figures


def _write(out: Path, rows: list[dict], controls: list[dict], attrs: dict) -> None:
    from spd_lens.figure_files import write_image
    from spd_lens.viz import write_report

    Rows([{k: r.get(k) for k in COLUMNS} for r in rows]).to_csv(out / "ablate.csv")
    write_json(out / "ablate.json", {"rows": rows, "controls": controls, "random_seeds": attrs["random_seeds"],
                                     "seed_stream": attrs["seed_stream"], "context": attrs["context"]})
    figures = ablate_figures(controls, attrs["baseline"])
    if figures:
        write_report(out / "ablate.html", figures, f"ablation on {attrs['context']['task']}",
                     "baseline (no projection): " + ", ".join(f"{m} {v:.3f}" for m, v in attrs["baseline"].items()),
                     images=False)
        for figure, metric in zip(figures, [m for m in METRICS if any(c["metric"] == m for c in controls)]):
            write_image(figure, out / f"ablate-{metric}.png")
