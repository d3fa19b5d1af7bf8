"""The JSON a benchmark's full run writes to benchmarks/results/NAME.json, from which
docs/benchmarks.md's tables are generated (`python benchmarks/tables.py`).

    {"benchmark": NAME, "command": "...", "measured": "2026-12-07", "machine": "...",
     "source": "this script's run", "rows": [{"figure": "...", "ratio": 1.04, "detail": "..."}],
     "earlier": [the records this run replaced]}

A smoke run (`--smoke`: tiny model and sizes, seconds) checks that the script still runs and
writes nothing here.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{cores} CPU cores ({platform.machine()})"
    return f"{device}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write(name: str, rows: list[dict], *, argv: list[str] | None = None) -> Path:
    """Write NAME.json atomically (temp file, then rename); each row needs "figure" and "ratio"."""
    for row in rows:
        if not {"figure", "ratio"} <= set(row):
            raise ValueError(f"a result row needs 'figure' and 'ratio': {row}")
    record = {"benchmark": name, "command": " ".join(["python", f"benchmarks/{name}.py", *(argv or sys.argv[1:])]),
              "measured": datetime.date.today().isoformat(), "machine": machine(), "source": "this script's run",
              "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    if path.is_file():  # what was measured before stays beside the new figures, with its own source
        previous = json.loads(path.read_text())
        record["earlier"] = [{k: v for k, v in previous.items() if k != "earlier"}, *previous.get("earlier", [])]
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(record, indent=1) + "\n")
    temp.replace(path)
    return path


def smoke_sizes(args, **sizes) -> None:
    """`--smoke`: the tiny random model and the given sizes (seconds, not a measurement)."""
    if getattr(args, "smoke", False):
        args.model = "tiny"
        for key, value in sizes.items():
            setattr(args, key, value)


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a model name load_hf accepts")
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny random model and tiny sizes: checks that the script runs; writes no results")


def write_ratios(name: str, summary: dict, figures: dict[str, str], args, *, detail: str = "") -> Path | None:
    """A full run's ratios (summary[key] for each key of `figures`, described by its value) into
    benchmarks/results/NAME.json; a smoke run writes nothing."""
    if getattr(args, "smoke", False):
        return None
    rows = [{"figure": text, "ratio": summary[key], "detail": detail} for key, text in figures.items()
            if summary.get(key) is not None]
    return write(name, rows)


def finish(name: str, summary: dict, figures: dict[str, str], args, *, detail: str = "") -> None:
    """The script's last line (its summary as JSON); a full run also writes its ratios (write_ratios)."""
    write_ratios(name, summary, figures, args, detail=detail)
    print(json.dumps(summary))
