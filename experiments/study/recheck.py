"""Every test figure RESULTS.md's first screen and "How many comparisons" quote, recomputed from
the committed per-question outcomes under experiments/results/study/ with the project's own
interval functions (spd_lens.evaluate: the hierarchical bootstrap of `seeded_ci` and
`paired_difference`, 2,000 resamples, seed 0, as every run's metrics use).

    .venv/bin/python experiments/study/recheck.py            # prints each figure
    .venv/bin/python experiments/study/recheck.py --json     # the same as JSON (figures only)

Beside each paired difference: a two-sided bootstrap p-value from the same hierarchical bootstrap
(20,000 draws: twice the smaller share of draws on either side of zero; below 1e-4 shown as such),
and the Holm-adjusted p-value over the headline family (`HEADLINE`). With `--cut-off wrong`
every answer that hit the token budget (finish reason "length") counts as wrong, as
`[eval] cut_off = "wrong"` would score it; the gate tables keep outcomes only (no finish
reasons) and are left out of that reading.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from spd_lens.evaluate import _hierarchical_means, _outcome_matrix, paired_difference, per_prompt_scores, seeded_ci

ROOT = Path(__file__).resolve().parents[2] / "experiments" / "results" / "study"
P_DRAWS = 20_000


def evaluation(run: str, method: str, cut_off: str = "score") -> list[dict]:
    """A method's per-question results over its seeds (`seed` set where it has several)."""
    files = sorted((ROOT / run / "eval").glob(f"{method}-seed*.json")) or [ROOT / run / "eval" / f"{method}.json"]
    results = []
    for path in files:
        data = json.loads(path.read_text())
        for r in data["results"]:
            passed = bool(r["passed"]) and not (cut_off == "wrong" and r.get("finish_reason") == "length")
            results.append({"prompt_id": r["prompt_id"], "passed": passed, "seed": data.get("seed"),
                            "finish_reason": r.get("finish_reason", "unknown")})
    return results


def table_rows(gate: str) -> list[dict]:
    """A gate's rows: its ablation.json, or (a gate kept while it still ran) the rows file."""
    path = ROOT / gate / "ablation.json"
    if path.is_file():
        return json.loads(path.read_text())["rows"]
    return [json.loads(line) for line in (ROOT / gate / "ablation.jsonl").read_text().splitlines() if line.strip()]


def gate_rows(gate: str, *, rank: int, kinds: str, subspace: str, layers: str | None = None) -> list[dict]:
    """An ablation cell's rows as results, one "seed" per subspace seed or random draw. In
    gate-test-clean the random rows are the fresh ones (a `random_seed` from the test split's
    stream, >= 1000); its rows file also holds the rows copied from gate-test."""
    fresh = gate == "gate-test-clean"
    rows = [r for r in table_rows(gate) if r["rank"] == rank and r["kinds"] == kinds and r.get("subspace") == subspace
            and (layers is None or r["layers"] == layers) and not (fresh and subspace == "random" and (r.get("random_seed") or 0) < 1000)]
    return [{"prompt_id": p, "passed": v, "seed": f"{subspace} {r['seed'] if subspace == 'gradient' else r['draw']}"}
            for r in rows for p, v in r["outcomes"].items()]


def draws(gate: str, rank: int, kinds: str) -> int:
    """How many random draws a gate's cell has (gate-test-clean: fresh ones) so far."""
    return len({r["seed"] for r in gate_rows(gate, rank=rank, kinds=kinds, subspace="random")})


def p_value(a: list[dict], b: list[dict]) -> float:
    """Two-sided p-value of a - b = 0 from the hierarchical bootstrap paired_difference draws its
    interval from (every test comparison here is crossed: each seed answers the same questions)."""
    shared = sorted(per_prompt_scores(a).keys() & per_prompt_scores(b).keys())
    draws = _hierarchical_means([_outcome_matrix(a, shared), _outcome_matrix(b, shared)], [1.0, -1.0], P_DRAWS, 0)
    return float(min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean())))


def fmt(x: float) -> str:
    return f"{x:+.3f}"


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input order."""
    order = np.argsort(ps)
    adjusted, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def comparisons(cut_off: str) -> list[tuple[str, str, list[dict], list[dict]]]:
    """(name, status, a, b): the test comparisons the findings rest on. status: "planned"
    (named by a config or RESULTS.md before the test split was read) or "post hoc"."""
    e = lambda run, method: evaluation(run, method, cut_off)  # noqa: E731
    chosen_arith = gate_rows("gate-test", rank=8, kinds="v", subspace="gradient")
    out = [
        ("gate-test V rank 8: gradient - random (first confirmation; dev's draws)", "planned",
         chosen_arith, gate_rows("gate-test", rank=8, kinds="v", subspace="random")),
        ("gate-test K+V rank 96 (paper's): gradient - random", "planned",
         gate_rows("gate-test", rank=96, kinds="k,v", subspace="gradient"),
         gate_rows("gate-test", rank=96, kinds="k,v", subspace="random")),
        ("hook-only at the chosen cell - base", "planned", e("math-hard-chosen", "hook-only"), e("math-hard", "base")),
        ("math-hard psr - base", "planned", e("math-hard", "psr"), e("math-hard", "base")),
        ("math-hard spd - base", "planned", e("math-hard", "spd"), e("math-hard", "base")),
        ("math-hard spd - psr", "planned", e("math-hard", "spd"), e("math-hard", "psr")),
        ("math-hard spd - spd-random", "planned", e("math-hard", "spd"), e("math-hard", "spd-random")),
        ("chosen cell spd - psr", "planned", e("math-hard-chosen", "spd"), e("math-hard", "psr")),
        ("chosen cell spd - spd-random", "planned", e("math-hard-chosen", "spd"), e("math-hard-chosen", "spd-random")),
        ("ood (code subspace) spd - psr", "planned", e("ood", "spd"), e("math-hard", "psr")),
        ("code subspace hook-only - arithmetic subspace hook-only, 3 seeds (gate-test)", "post hoc",
         e("ood", "hook-only"), chosen_arith),
        ("code subspace hook-only - arithmetic subspace hook-only, seed 0 (as first reported)", "post hoc",
         e("ood", "hook-only"), e("math-hard-chosen", "hook-only")),
        ("chosen cell spd - paper's spd (3 seeds both)", "post hoc", e("math-hard-chosen", "spd"), e("math-hard", "spd")),
        ("math-hard spd - spd-fullseq", "post hoc", e("math-hard", "spd"), e("math-hard", "spd-fullseq")),
        ("math-hard psr - spd-fullseq", "post hoc", e("math-hard", "psr"), e("math-hard", "spd-fullseq")),
        ("ood spd - chosen cell spd (arithmetic subspace, same cell)", "post hoc", e("ood", "spd"), e("math-hard-chosen", "spd")),
    ]
    if (ROOT / "gate-test-code" / "ablation.json").is_file():  # the code subspace at three seeds (post hoc)
        out.append(("code subspace (3 seeds, gate-test-code) - arithmetic subspace (3 seeds, gate-test), chosen cell",
                    "post hoc", gate_rows("gate-test-code", rank=8, kinds="v", subspace="gradient"), chosen_arith))
    clean = ROOT / "gate-test-clean"
    if clean.is_dir() and draws("gate-test-clean", 8, "v") == 4:
        out.insert(1, ("gate-test-clean V rank 8: gradient - random (fresh test draws)", "planned",
                       gate_rows("gate-test-clean", rank=8, kinds="v", subspace="gradient"),
                       gate_rows("gate-test-clean", rank=8, kinds="v", subspace="random")))
    return out


# The family Holm's adjustment runs over: the pre-registered test comparisons above (the
# confirmation of the dev choice, the distillation comparisons, the chosen cell at decoding).
HEADLINE = "planned"


def count_test_intervals() -> dict:
    """How many intervals the test split produced: paired differences in the committed test runs'
    metrics (distinct pairs of evaluation sets), the gate-test controls, and methods' own."""
    pairs, methods = set(), set()
    runs = ["math-hard", "math-hard-chosen", "ood", "math-easy", "code", "mc"]
    for run in runs:
        metrics = json.loads((ROOT / run / "metrics.json").read_text())
        # base and psr of math-hard-chosen and ood are math-hard's evaluations: counted once.
        owner = lambda m: ("math-hard" if run in ("math-hard-chosen", "ood") and m in ("base", "psr") else run)  # noqa: E731
        for name in metrics["comparisons"]:
            a, b = name.split(" - ")
            pairs.add((owner(a), a, owner(b), b))
        for m in metrics["methods"]:
            methods.add((owner(m), m))
    controls = {}
    controls["gate-test"] = len(json.loads((ROOT / "gate-test" / "ablation.json").read_text())["controls"])
    if (ROOT / "gate-test-clean").is_dir():  # its cells with all four fresh draws
        controls["gate-test-clean"] = sum(draws("gate-test-clean", r, k) == 4 for r in (8, 96) for k in ("v", "k,v"))
    # Computed for RESULTS.md from the evaluations, in no metrics.json: the code subspace's
    # hook-only against the arithmetic one's, ood spd against the chosen cell's spd, the chosen
    # cell's spd against the paper's, and math-hard's psr against spd-fullseq.
    cross_run = 4 + (ROOT / "gate-test-code" / "ablation.json").is_file()  # + the code subspace's three seeds
    return {"paired_in_metrics": len(pairs), "gate_controls": controls, "across_runs": cross_run,
            "paired_total": len(pairs) + sum(controls.values()) + cross_run, "method_intervals": len(methods)}


def draw_correlation() -> tuple[int, float]:
    """How alike gate-test's random draws are to the dev gates' draws of the same cells (both were
    seeded by the draw index): the correlation of their scores, draw by draw, over the four cells."""
    def draws(gate: str, rank: int, kinds: str) -> dict:
        rows = json.loads((ROOT / gate / "ablation.json").read_text())["rows"]
        return {r["draw"]: r["score"] for r in rows if r["subspace"] == "random" and r["rank"] == rank
                and r["kinds"] == kinds and r.get("alpha", 1.0) == 1.0 and r.get("head", "all") == "all"
                and r["layers"] == "15,29"}
    pairs = []
    # On dev, the rank-8 cells' draws are stage B2's (gate-kinds), the rank-96 cells' gate-ood's.
    for rank, kinds, dev in ((8, "v", "gate-kinds"), (8, "k,v", "gate-kinds"), (96, "v", "gate-ood"), (96, "k,v", "gate-ood")):
        on_dev, on_test = draws(dev, rank, kinds), draws("gate-test", rank, kinds)
        pairs += [(on_dev[d], on_test[d]) for d in on_test]
    values = np.array(pairs)
    return len(pairs), float(np.corrcoef(values.T)[0, 1])


def cut_off_shares() -> dict:
    """Per run and method (every seed): answers cut off at the token budget, how many of those the
    scorer passed (what `cut_off = "wrong"` would turn to wrong), and all answers."""
    shares = {}
    for run in ["math-hard", "math-hard-chosen", "ood", "math-easy", "code", "mc"]:
        metrics = json.loads((ROOT / run / "metrics.json").read_text())
        for method, m in metrics["methods"].items():
            reasons = m.get("finish_reasons", {})
            # mc's per-question files were lost with a machine (RESULTS.md "What was lost"): unknown.
            results = evaluation(run, method) if (ROOT / run / "eval").is_dir() else None
            passed = None if results is None else sum(r["passed"] and r["finish_reason"] == "length" for r in results)
            shares[f"{run}:{method}"] = {"cut_off": reasons.get("length", 0), "cut_off_passed": passed,
                                         "answers": sum(reasons.values())}
    return shares


def gemma() -> dict:
    """Gemma-3-270M's gates (RESULTS.md, pre-registered): the dev gate's cells above random, the
    paper's cell (K and V, rank 128, layers 9 and 17) on dev and on test, and the data gate's comparisons
    recomputed from the verdicts kept beside its training data. Empty before they ran."""
    from gemma_rules import ABOVE  # the pre-registered rule's "above zero", beside this script

    from spd_lens.experiment import recompute_data_gate

    out, cell = {}, dict(rank=128, kinds="k,v", layers="9,17")
    if (ROOT / "gemma-gate" / "ablation.json").is_file():
        controls = json.loads((ROOT / "gemma-gate" / "ablation.json").read_text())["controls"]
        out["dev_cells_above_random"] = sum(c["ci"][0] > ABOVE for c in controls)
        out["dev_cells"] = len(controls)
        out["dev_paper_cell"] = paired_difference(gate_rows("gemma-gate", subspace="gradient", **cell),
                                                  gate_rows("gemma-gate", subspace="random", **cell))
    if (ROOT / "gemma-gate-test" / "ablation.json").is_file():  # the paper's cell alone: no cell was chosen
        out["test_paper_cell"] = paired_difference(gate_rows("gemma-gate-test", subspace="gradient", **cell),
                                                   gate_rows("gemma-gate-test", subspace="random", **cell))
    if (ROOT / "gemma-gate-data" / "data_gate.json").is_file():
        out["data_gate"] = recompute_data_gate(ROOT / "gemma-gate-data", write=False)["comparisons"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cut-off", choices=["score", "wrong"], default="score")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    figures = {}
    rows = comparisons(args.cut_off)
    for name, status, a, b in rows:
        d = paired_difference(a, b)
        figures[name] = {"status": status, "difference": d["difference"], "ci": d["ci"], "seeds_differ": d["seeds_differ"],
                         "p": p_value(a, b), "a": seeded_ci(a)["score"], "b": seeded_ci(b)["score"]}
    family = [n for n, f in figures.items() if f["status"] == HEADLINE]
    for name, adjusted in zip(family, holm([figures[n]["p"] for n in family])):
        figures[name]["p_holm"] = adjusted
    extra = {"test_intervals": count_test_intervals(), "cut_off": cut_off_shares(), "draw_correlation": draw_correlation(),
             "arithmetic_three_seed_mean": seeded_ci(gate_rows("gate-test", rank=8, kinds="v", subspace="gradient")),
             "code_subspace_hook_only": seeded_ci(evaluation("ood", "hook-only", args.cut_off)), "gemma": gemma()}
    if args.json:
        print(json.dumps({"cut_off_policy": args.cut_off, "comparisons": figures, **extra}, indent=1))
        return
    print(f"cut-off answers scored as: {args.cut_off}")
    print(f"{'comparison':<84} {'a':>6} {'b':>6} {'a - b':>7} {'95% interval':>17} {'p':>7} {'Holm':>7}")
    for name, f in figures.items():
        p = "<1e-4" if f["p"] < 1e-4 else f"{f['p']:.4f}"
        holm_p = ("<1e-4" if f["p_holm"] < 1e-4 else f"{f['p_holm']:.4f}") if "p_holm" in f else "(post hoc)"
        flag = " !" if f["seeds_differ"] else ""
        print(f"{name:<84} {f['a']:6.3f} {f['b']:6.3f} {fmt(f['difference']):>7} "
              f"[{fmt(f['ci'][0])}, {fmt(f['ci'][1])}]{flag:2} {p:>7} {holm_p:>10}")
    a3 = extra["arithmetic_three_seed_mean"]
    print(f"arithmetic subspace at the chosen cell, 3 seeds (gate-test): {a3['score']:.3f} "
          f"[{a3['ci'][0]:.3f}, {a3['ci'][1]:.3f}]; code subspace (one extraction): "
          f"{extra['code_subspace_hook_only']['score']:.3f}")
    print("intervals on test:", json.dumps(extra["test_intervals"]))
    n, r = extra["draw_correlation"]
    print(f"gate-test's random draws against the dev gates' same draws: r = {r:.2f} over {n} draws")
    g = extra["gemma"]
    if g:
        print(f"Gemma-3-270M dev gate: {g['dev_cells_above_random']} of {g['dev_cells']} cells above random; paper's cell "
              f"on dev {fmt(g['dev_paper_cell']['difference'])} [{fmt(g['dev_paper_cell']['ci'][0])}, "
              f"{fmt(g['dev_paper_cell']['ci'][1])}]")
        if "test_paper_cell" in g:
            t = g["test_paper_cell"]
            print(f"Gemma-3-270M test gate, paper's cell: {fmt(t['difference'])} [{fmt(t['ci'][0])}, {fmt(t['ci'][1])}]")
        for name, c in g.get("data_gate", {}).items():
            print(f"Gemma-3-270M data gate {name}: {fmt(c['difference'])} [{fmt(c['ci'][0])}, {fmt(c['ci'][1])}]")
    print("answers cut off at the token budget: cut off / answers (share), of them scored right")
    for key, c in extra["cut_off"].items():
        print(f"  {key:<28} {c['cut_off']:>4} / {c['answers']:<5} ({c['cut_off'] / c['answers']:.3f})  "
              f"{'?' if c['cut_off_passed'] is None else c['cut_off_passed']:>3} right")


if __name__ == "__main__":
    main()
