"""The main job, `spd-lens demo`: capability subspaces of the real default model, end to end.

For two capabilities (arithmetic and a multiple-choice kinship task) it extracts the gradient
subspace at the default layers, saves each, and writes `summary.json` into the run directory:
per layer, K/V and head, the rank, the explained energy and each KV head's share of the
gradient energy, plus the overlap of the two capabilities' subspaces against a random control.
A finished stage (a subspace that loads) is not redone when the demo is run again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import spd_lens
from spd_lens.errors import SpdLensError
from spd_lens.extract import extract_subspace
from spd_lens.models import DEFAULT_MODEL, load_hf
from spd_lens.subspace import CapabilitySubspace, random_like

DEMO_TASKS = ("arithmetic", "family-mc")


def run_demo(out: str | Path, *, model: str = DEFAULT_MODEL, n: int = 32, seed: int = 0,
             progress: Callable | None = None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf, tokenizer = load_hf(model)
    subspaces: dict[str, CapabilitySubspace] = {}
    for task in DEMO_TASKS:
        directory = out / f"subspace-{task}"
        try:
            subspaces[task] = CapabilitySubspace.load(directory, hf)
            if (subspaces[task].meta["n"], subspaces[task].meta["seed"]) != (n, seed):
                raise SpdLensError("different settings")
        except SpdLensError:
            subspaces[task] = extract_subspace(hf, task, n=n, seed=seed, tokenizer=tokenizer,
                                               progress=progress(task) if progress else None)
            subspaces[task].save(directory)
    first, second = (subspaces[t] for t in DEMO_TASKS)
    control = random_like(first, seed=seed)
    summary = {
        "model": model,
        "n": n,
        "seed": seed,
        "spd_lens_version": spd_lens.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tasks": {
            task: {
                "extraction_seconds": s.meta["seconds"],
                "gradient_rows": s.meta["n_rows"],
                "bases": s.summary(),
                "head_energy_share": {f"layer{layer}.{kind}": s.head_energy(layer, kind)
                                      for layer in s.layers for kind in ("k", "v")},
            }
            for task, s in subspaces.items()
        },
        "overlap": {
            f"layer{layer}.{kind}": {"between_tasks": value, "with_random": control.overlap(second)[(layer, kind)]}
            for (layer, kind), value in first.overlap(second).items()
        },
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / "summary.json")
    return summary
