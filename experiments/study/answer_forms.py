"""How a run's arithmetic answers are written, and how right each form is (reads files, runs no model).

An answer that writes the sum out ("The answer is 59 + 13 = 72.") works the problem as it goes;
one that states a number ("The answer is 4.") does not. This splits each evaluation of a run
directory, and each method's self-generated training data, by that form: the share of answers
written as an equation, and the share right within each form. When methods differ mostly in how
often they write the equation, what distillation changed is the form of the answer, not the
arithmetic inside either form.

    python experiments/study/answer_forms.py runs/study/math-hard [runs/study/math-hard-chosen ...]

Prints markdown: one table of evaluations (eval/*.json), one of training data (generations/*.jsonl
with the verdicts kept beside them in *.quality.json).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

# "a + b = c" (or -, x, *, /): the answer computes its result in the open.
EQUATION = re.compile(r"-?\d+(?:\.\d+)?\s*[-+*/x×]\s*-?\d+(?:\.\d+)?\s*=\s*-?\d+")


def is_equation(completion: str) -> bool:
    """True when the completion writes an operation out with its result ("59 + 13 = 72")."""
    return EQUATION.search(completion) is not None


def split_by_form(pairs: list[tuple[str, bool]]) -> dict:
    """[(completion, right)] -> n, share right, share written as an equation, share right within each form."""
    equation = [right for text, right in pairs if is_equation(text)]
    other = [right for text, right in pairs if not is_equation(text)]

    def share(xs):
        return sum(xs) / len(xs) if xs else None

    return {"n": len(pairs), "right": share([r for _, r in pairs]), "equation_share": len(equation) / len(pairs),
            "right_if_equation": share(equation), "right_otherwise": share(other)}


def evaluation_forms(run: Path) -> dict[str, dict]:
    """Each evaluation of a run directory (eval/STEM.json), split by answer form."""
    forms = {}
    for path in sorted((run / "eval").glob("*.json")):
        results = json.loads(path.read_text())["results"]
        forms[path.stem] = split_by_form([(r["completion"], bool(r["passed"])) for r in results])
    return forms


def training_forms(run: Path) -> dict[str, dict]:
    """Each method's self-generated training data (generations/STEM.jsonl), split by answer form;
    the verdicts are the ones the run kept beside the file (STEM.quality.json, in file order)."""
    forms = {}
    for path in sorted((run / "generations").glob("*.jsonl")):
        verdicts = path.with_name(path.stem + ".quality.json")
        if not verdicts.is_file():
            continue  # a file still being written, or one whose verdicts were never kept
        outcomes = json.loads(verdicts.read_text())["outcomes"]
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [r["prompt_id"] for r in records] != [o["prompt_id"] for o in outcomes]:
            raise SystemExit(f"{path}: its completions and the verdicts in {verdicts.name} are not the same prompts "
                             "in the same order; rerun spd-lens run on the directory to rewrite the verdicts")
        forms[path.stem] = split_by_form([(r["messages"][-1]["content"], bool(o["passed"]))
                                          for r, o in zip(records, outcomes)])
    return forms


def table(title: str, forms: dict[str, dict]) -> list[str]:
    def fmt(x):
        return "" if x is None else f"{x:.3f}"

    lines = [f"| {title} | n | right | written as an equation | right, equation | right, otherwise |",
             "|---|---|---|---|---|---|"]
    for stem, f in forms.items():
        lines.append(f"| {stem} | {f['n']} | {fmt(f['right'])} | {fmt(f['equation_share'])} | "
                     f"{fmt(f['right_if_equation'])} | {fmt(f['right_otherwise'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run directories written by spd-lens run")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "eval").is_dir():
            print(f"{run}: no eval/ directory; pass a run directory written by spd-lens run", file=sys.stderr)
            return 2
        lines = [f"**{run.name}**", ""] + table("evaluation", evaluation_forms(run))
        training = training_forms(run)
        if training:
            lines += [""] + table("training data", training)
        print("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
