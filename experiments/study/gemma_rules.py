"""The Gemma-3-270M study's pre-registered rules (RESULTS.md "Gemma-3-270M: pre-registered"),
applied mechanically to finished run directories, so that no choice is made by hand:

    python experiments/study/gemma_rules.py preset RUNS      # hard | easy | none (step 1)
    python experiments/study/gemma_rules.py config RUNS NAME # the config to run for step NAME
    python experiments/study/gemma_rules.py passed RUNS      # which gates passed (step 5 runs if any)

`config` prints experiments/study/NAME.toml when step 1 chose "hard", else writes the same file
with the chosen preset under RUNS/gemma-configs/ and prints that path; `gemma-gate-test` holds the
hook-only gate's chosen cell and the paper's (the paper's alone when the dev gate chose none), and
`gemma-gate-data-chosen` and `gemma-main-chosen` are written from the chosen cell (and fail while
there is none).

"Above zero" is a lower bound above ABOVE: a bootstrap percentile that is exactly zero comes out
of floating-point means as +-3e-17, and zero is not above zero.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STUDY = Path(__file__).resolve().parent
LOW, HIGH = 0.1, 0.5  # the k-shot base score on dev a preset must have
ABOVE = 1e-9  # an interval's lower bound must exceed this to be above zero (rounding, not a margin)


def preset(runs: Path) -> str:
    for name in ("hard", "easy"):
        metrics = runs / f"gemma-preset-{name}" / "metrics.json"
        if not metrics.is_file():
            raise SystemExit(f"step 1 has not run for preset {name!r} ({metrics} is missing): run "
                             f"`experiments/study/run.sh {runs} gemma-presets` first (about 3 min; the kept results "
                             "are in experiments/results/study/gemma-preset-*)")
        if LOW <= json.loads(metrics.read_text())["methods"]["base"]["score"] <= HIGH:
            return name
    return "none"


def chosen_cell(runs: Path) -> dict | None:
    """The dev gate's cell with the largest gradient - random difference whose interval is above zero."""
    table = runs / "gemma-gate" / "ablation.json"
    if not table.is_file():
        raise SystemExit(f"the hook-only gate has not finished ({table} is missing)")
    above = [c for c in json.loads(table.read_text())["controls"] if c["ci"][0] > ABOVE]
    return max(above, key=lambda c: c["difference"]) if above else None


# Amended 2026-12-07, after step 1 and before any gate ran (RESULTS.md, "Gemma-3-270M: pre-registered"):
# the easy preset holds 200 distinct problems, 124 train, 33 dev and 43 test questions, fewer than
# the protocol's 500/1,000 prompts, 300 dev and 500 test questions; on easy every step takes all
# its split holds.
EASY_SIZES = {"eval_n = 300": "eval_n = 33", "eval_n = 500": "eval_n = 43", "train_n = 500": "train_n = 124",
              "train_n = 1000": "train_n = 124"}


def _swap(text: str, old: str, new: str) -> str:
    if old not in text:
        raise SystemExit(f"gemma_rules: {old!r} is not in the config text: the configs changed, update this script")
    return text.replace(old, new)


def _text(name: str, runs: Path) -> str:
    text = (STUDY / f"{name}.toml").read_text()
    choice = preset(runs)
    if choice == "none":
        raise SystemExit("step 1 found no preset with a base score in [0.1, 0.5]: the Gemma study stops there")
    if choice == "easy":
        for old, new in EASY_SIZES.items():
            text = text.replace(old, new)
    return _swap(text, 'preset = "hard"', f'preset = "{choice}"')


def _cell_lines(cell: dict) -> tuple[list[int], str]:
    layers = [int(x) for x in str(cell["layers"]).split(",")]
    kinds = ", ".join(f'"{k}"' for k in str(cell["kinds"]).split(","))
    return layers, kinds


def config(runs: Path, name: str) -> Path:
    out = runs / "gemma-configs" / f"{name}.toml"
    if name in ("gemma-gate-test", "gemma-gate-data-chosen", "gemma-main-chosen"):
        cell = chosen_cell(runs)
        if cell is None and name != "gemma-gate-test":
            raise SystemExit("the hook-only gate chose no cell (no interval above zero): nothing to confirm or train at it")
        # Without a chosen cell the test gate is the paper's cell alone (step 3 names both cells).
        cell = cell or {"rank": 128, "layers": "9,17", "kinds": "k,v"}
        layers, kinds = _cell_lines(cell)
        if name == "gemma-gate-test":
            # The chosen cell and the paper's, on test, fresh test-split draws, the 3 subspace seeds.
            text = _text("gemma-gate", runs).replace("study-gemma-gate", "study-gemma-gate-test")
            sizes = ("33", "43") if preset(runs) == "easy" else ("300", "500")
            text = _swap(text, f'eval_split = "dev"\neval_n = {sizes[0]}', f'eval_split = "test"\neval_n = {sizes[1]}')
            # ablate runs the product of ranks, layer sets and kinds: the two cells' values, each
            # once (as gate-test did: up to 8 cells, the chosen and the paper's among them).
            unique = lambda *values: [v for i, v in enumerate(values) if v not in values[:i]]  # noqa: E731
            grid = text[text.index("[ablate]"):]
            text = text.replace(grid, "[ablate]\nranks = %s\nlayer_sets = %s\nkind_sets = %s\n"
                                "random_draws = 4\nsubspace_seeds = [0, 1, 2]\nloss_n = 16\n"
                                % (unique(int(cell["rank"]), 128), unique(layers, [9, 17]),
                                   "[" + ", ".join(f"[{k}]" for k in unique(kinds, '"k", "v"')) + "]"))
        else:
            base = "gemma-gate-data" if name == "gemma-gate-data-chosen" else "gemma-main"
            text = _text(base, runs).replace(f"study-{base}", f"study-{name}")
            text = text.replace("layers = [9, 17]\nrank_frac = 0.5", f"layers = {layers}\nrank = {cell['rank']}")
            text = text.replace("[sampling]", f"[projection]\nkinds = [{kinds}]\n\n[sampling]")
    else:
        text = _text(name, runs)
        if 'preset = "hard"' in text:
            return STUDY / f"{name}.toml"
        text = text.replace(f'name = "study-{name}"', f'name = "study-{name}-easy"')
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def passed(runs: Path) -> list[str]:
    """The gates whose gradient - random interval is above zero (pre-registered condition of step 5)."""
    gates = []
    test = runs / "gemma-gate-test" / "ablation.json"
    if test.is_file():
        gates += [f"hook-only on test: rank {c['rank']}, layers {c['layers']}, {c['kinds']}"
                  for c in json.loads(test.read_text())["controls"] if c["ci"][0] > ABOVE]
    for name in ("gemma-gate-data", "gemma-gate-data-chosen"):
        gate = runs / name / "data_gate.json"
        if gate.is_file() and json.loads(gate.read_text())["comparisons"]["spd - spd-random"]["ci"][0] > ABOVE:
            gates.append(f"data gate {name}")
    return gates


if __name__ == "__main__":
    command, runs = sys.argv[1], Path(sys.argv[2])
    if command == "preset":
        print(preset(runs))
    elif command == "config":
        print(config(runs, sys.argv[3]))
    elif command == "passed":
        print("\n".join(passed(runs)))
    else:
        raise SystemExit(__doc__)
