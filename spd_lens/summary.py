"""Several runs side by side: one markdown table of every method's score, one of the paired
differences, one of the self-generated training data's quality; and where a study's time went
(`time_table`: hours per stage of any run directory, ablations and data gates included).

Each cell is what the run's `metrics.json` holds (means over seeds; 95% intervals from the
hierarchical bootstrap over seeds, then questions), so a results page can quote the table next to
the command that prints it:

    >>> from spd_lens.summary import summary_tables
    >>> run = {"methods": {"base": {"score": 0.078, "ci": [0.056, 0.102], "n": 500, "seeds": {},
    ...                             "seed_spread": 0.0}}, "comparisons": {}}
    >>> print(summary_tables({"math-hard": run}).splitlines()[2])
    | base | 0.078 [0.056, 0.102] |
"""

from __future__ import annotations

import json
from pathlib import Path

from spd_lens.artifacts import read_json_object, read_stage_seconds
from spd_lens.errors import SpdLensError
from spd_lens.evaluate import seeds_differ
from spd_lens.methods import METHOD_TABLE
from spd_lens.report import cut_off_warnings

# Marks a result whose seeds differ more than its questions explain (`evaluate.seeds_differ`).
SPREAD_MARK = " !"


def _label_and_path(spec: str) -> tuple[str, str]:
    """`LABEL=DIR` -> (LABEL, DIR); a bare `DIR` (even one whose path holds "=") is labelled by its name."""
    label, sep, path = spec.partition("=")
    if not (sep and label and path and "/" not in label):
        return Path(spec).name, spec
    return label, path


def load_runs(specs: list[str]) -> dict[str, dict]:
    """`RUN_DIR` or `LABEL=RUN_DIR` -> {label: metrics}; the label defaults to the directory's name."""
    runs = {}
    for spec in specs:
        label, path = _label_and_path(spec)
        if "|" in label:
            raise SpdLensError(f"label {label!r} holds '|', which would break the table: name the run LABEL={path}")
        metrics = Path(path) / "metrics.json"
        if not metrics.is_file():
            kind = ("an ablation" if (Path(path) / "ablation.json").is_file() or (Path(path) / "ablation.jsonl").is_file()
                    else "a data gate" if (Path(path) / "data_gate.json").is_file() else None)
            if kind:
                raise SpdLensError(f"{path} holds {kind}, which has no methods' metrics to tabulate: "
                                   f"`spd-lens report {path}` prints its table")
            raise SpdLensError(f"{path}: no metrics.json (not a run directory, or no method finished yet); "
                               "pass directories written by spd-lens run")
        if label in runs:
            raise SpdLensError(f"two runs are labelled {label!r}: name them, e.g. {label}-a={path}")
        runs[label] = read_json_object(metrics, "a run's metrics")
        if not isinstance(runs[label].get("methods"), dict):
            raise SpdLensError(f"{metrics} has no 'methods': not the metrics of spd-lens run (an ablation's "
                               "table is ablation.json; see spd-lens report)")
    if not runs:
        raise SpdLensError("no run directories given")
    return runs


def _interval(value: float, ci: list[float], signed: bool = False) -> str:
    fmt = "{:+.3f}" if signed else "{:.3f}"
    return f"{fmt.format(value)} [{fmt.format(ci[0])}, {fmt.format(ci[1])}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _score_cell(m: dict | None) -> str:
    if m is None:
        return ""
    cell = _interval(m["score"], m["ci"])
    seeds = m.get("seeds") or {}
    if len(seeds) > 1:
        cell += " (" + " / ".join(f"{s['score']:.3f}" for s in seeds.values()) + ")"
    if m.get("missing_seeds"):
        cell += f" (seeds {', '.join(map(str, m['missing_seeds']))} missing)"
    return cell + (SPREAD_MARK if seeds_differ(m) else "")


def summary_tables(runs: dict[str, dict]) -> str:
    """Markdown: scores (methods x runs, each seed's score in parentheses), paired differences and the
    training data's share correct, in the project's method order; an empty cell is a method the
    run does not hold. A line starting `!` names each method with more than 10% of its evaluation
    or training completions cut off at the token budget."""
    labels = list(runs)
    methods = [m for m in METHOD_TABLE if any(m in r["methods"] for r in runs.values())]
    lines = _table(["method"] + labels,
                   [[m] + [_score_cell(runs[label]["methods"].get(m)) for label in labels] for m in methods])
    names = []
    for r in runs.values():
        names += [name for name in r.get("comparisons", {}) if name not in names]
    if names:
        rows = []
        for name in names:
            cells = []
            for label in labels:
                c = runs[label].get("comparisons", {}).get(name)
                cells.append("" if c is None else _interval(c["difference"], c["ci"], signed=True)
                             + (SPREAD_MARK if seeds_differ(c) else ""))
            rows.append([name] + cells)
        lines += [""] + _table(["paired difference"] + labels, rows)
    trained = [m for m in methods if any(r["methods"].get(m, {}).get("training_data") for r in runs.values())]
    if trained:
        rows = []
        for m in trained:
            cells = []
            for label in labels:
                data = runs[label]["methods"].get(m, {}).get("training_data")
                cells.append("" if not data else f"{data['correct']:.3f} (cut off {data['cut_off']:.3f}, n {data['n']})")
            rows.append([m] + cells)
        lines += [""] + _table(["training data: share correct"] + labels, rows)
    older = [label for label, r in runs.items() if any("seed_spread" not in m for m in r["methods"].values())]
    if older:
        lines += ["", f"{', '.join(older)}: metrics from before seed-aware intervals (the interval resamples "
                      "questions only, seeds held fixed)"]
    unfinished = [f"{label} ({', '.join(r['pending'])})" for label, r in runs.items() if r.get("pending")]
    if unfinished:
        lines += ["", "not finished: " + "; ".join(unfinished)]
    cut_off = [f"! {label}: {line}" for label, r in runs.items() for line in cut_off_warnings(r)]
    if cut_off:
        lines += [""] + cut_off
    lines += ["", "Scores: mean over seeds [95% interval over seeds, then questions] (each seed's score); "
                  f"{SPREAD_MARK.strip()} = the seeds differ more than the questions explain (p < 0.05)."]
    return "\n".join(lines)


# The stages a run directory records (`Run._timed`), in pipeline order; an ablation's cells are "ablate".
STAGES = ("extract", "generate", "train", "eval", "ablate")


def stage_hours(directory: str | Path, seen: set[str] | None = None) -> dict:
    """Seconds per stage that a run directory records: `stage_seconds.json` (completed calls, and
    apart from them calls that stopped part way) and, for an ablation, each cell's `seconds`
    (cells written before cells were timed are counted in `untimed_cells`). A cell whose line is in
    `seen` (a directory grown from a copy of another, counted already) is counted in `copied_cells`
    only; the lines read here are added to `seen`."""
    directory = Path(directory)
    untimed, copied = 0, 0
    seen = set() if seen is None else seen
    recorded = read_stage_seconds(directory)
    seconds, interrupted = recorded["completed"], sum(recorded["interrupted"].values())
    cells = directory / "ablation.jsonl"
    if cells.is_file():
        for line in cells.read_text().splitlines():
            try:
                cell = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line of a stopped ablation
            if line in seen or (isinstance(cell, dict) and cell.get("copied")):  # copied: another run's row
                copied += 1
                continue
            seen.add(line)
            if cell.get("seconds") is None:
                untimed += 1
            else:
                seconds["ablate"] = seconds.get("ablate", 0.0) + cell["seconds"]
    return {"seconds": seconds, "interrupted": interrupted, "untimed_cells": untimed, "copied_cells": copied}


def timed_directories(specs: list[str]) -> dict[str, Path]:
    """`DIR` or `LABEL=DIR` -> {label: directory}; a directory that records no time itself but
    holds run directories (an lr sweep's) stands for each of them, labelled `DIR/NAME`."""
    found = {}
    for spec in specs:
        label, path = _label_and_path(spec)
        directory = Path(path)
        if not directory.is_dir():
            raise SpdLensError(f"{path}: not a directory; pass run, ablation or data-gate directories")
        if _records_time(directory):
            found[label] = directory
            continue
        inner = sorted(d for d in directory.iterdir() if d.is_dir() and _records_time(d))
        if not inner:
            kept = (directory / "ablation.json").is_file() or (directory / "metrics.json").is_file()
            raise SpdLensError(f"{path}: records no time (no stage_seconds.json or ablation.jsonl, nor a "
                               "directory inside that has one); pass directories written by spd-lens run or ablate"
                               + ("; this one holds finished results without their time records (a kept copy?)"
                                  if kept else ""))
        found.update({f"{label}/{d.name}": d for d in inner})
    return found


def _records_time(directory: Path) -> bool:
    return (directory / "stage_seconds.json").is_file() or (directory / "ablation.jsonl").is_file()


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def time_table(directories: dict[str, Path]) -> str:
    """Markdown: hours per stage and directory, a total row and column; time spent by calls that
    stopped part way is a column of its own (work they did that was kept is in no other column).
    An ablation cell found in a directory listed earlier (the copy another grew from) counts once."""
    seen: set[str] = set()  # an ablation grown from a copy of another counts only its own cells
    records = {label: stage_hours(d, seen) for label, d in directories.items()}
    stages = [s for s in STAGES if any(s in r["seconds"] for r in records.values())]
    stages += sorted({s for r in records.values() for s in r["seconds"]} - set(stages))
    header = ["run"] + stages + ["stopped calls", "total (h)"]

    def hours(x: float) -> str:
        return f"{x / 3600:.2f}"

    rows, totals = [], dict.fromkeys(stages + ["stopped calls"], 0.0)
    for label, r in records.items():
        cells = [r["seconds"].get(s, 0.0) for s in stages] + [r["interrupted"]]
        for key, value in zip(totals, cells):
            totals[key] += value
        notes = [f"{_cells(r['untimed_cells'])} untimed"] if r["untimed_cells"] else []
        notes += [f"{_cells(r['copied_cells'])} counted above"] if r["copied_cells"] else []
        name = label + (f" ({', '.join(notes)})" if notes else "")
        rows.append([name] + [hours(c) for c in cells] + [hours(sum(cells))])
    rows.append(["**total**"] + [hours(v) for v in totals.values()] + [hours(sum(totals.values()))])
    lines = _table(header, rows)
    if any(r["untimed_cells"] for r in records.values()):
        lines += ["", "Untimed cells were written before ablation cells recorded their seconds: "
                      "their time is in no column."]
    return "\n".join(lines)
