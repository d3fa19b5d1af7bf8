"""The run report: `RUN/report.html` and the plain-text table the CLI prints.

Moved out of `spd_lens.experiment` (which still re-exports both functions).
"""

from __future__ import annotations

import json
from pathlib import Path

from spd_lens.errors import SpdLensError
from spd_lens.evaluate import seeds_differ
from spd_lens.sandbox import describe_isolation
from spd_lens.subspace import CapabilitySubspace

SPREAD_FLAG = "  ! seeds differ more than questions alone explain: more seeds needed"


def format_table(metrics: dict) -> str:
    """Score, 95% CI (seeds, then questions), n, each seed's score; the training data's quality;
    paired differences. `!` marks a result whose seed spread exceeds its interval."""
    rows = [f"{'method':<12} {'score':>7}  {'95% CI':<17} {'n':>5}  per seed"]
    for name, m in metrics["methods"].items():
        seeds = "  ".join(f"{seed}: {s['score']:.3f}" for seed, s in m.get("seeds", {}).items())
        answers = "  answers " + " ".join(f"{a}:{k}" for a, k in m["answers"].items()) if m.get("answers") else ""
        kinds = "  outcomes " + " ".join(f"{k}:{v}" for k, v in m["outcomes"].items()) if m.get("outcomes") else ""
        flag = SPREAD_FLAG if seeds_differ(m) else ""
        rows.append(f"{name:<12} {m['score']:>7.3f}  [{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]  {m['n']:>5}  {seeds}{answers}{kinds}{flag}")
    scored = {name: m["loglik"] for name, m in metrics["methods"].items() if m.get("loglik")}
    if scored:
        rows += ["", f"{'log-likelihood':<14} {'as asked':>8}  {'rotated':>7}  {'opt.avg':>7}  choice rates as asked"]
        for name, q in scored.items():
            rates = " ".join(f"{label}:{rate:.2f}" for label, rate in q["choice_rates"].items())
            rows.append(f"{name:<14} {q['accuracy']:>8.3f}  {q['debiased_accuracy']:>7.3f}  "
                        f"{q['option_average_accuracy']:>7.3f}  {rates}")
    trained = {name: m["training_data"] for name, m in metrics["methods"].items() if m.get("training_data")}
    if trained:
        rows += ["", f"{'training data':<12} {'correct':>7}  {'cut off':>7}  {'tokens':>6}  {'n':>5}  correct per seed"]
        for name, q in trained.items():
            seeds = "  ".join(f"{seed}: {s['correct']:.3f}" for seed, s in q.get("seeds", {}).items())
            tokens = f"{q['mean_tokens']:>6.1f}" if q.get("mean_tokens") is not None else f"{'-':>6}"
            rows.append(f"{name:<12} {q['correct']:>7.3f}  {q['cut_off']:>7.3f}  {tokens}  {q['n']:>5}  {seeds}")
    if metrics.get("comparisons"):
        rows += ["", f"{'paired difference':<24} {'mean':>7}  95% CI (bootstrap over seeds, then the shared questions)"]
        for name, c in metrics["comparisons"].items():
            flag = SPREAD_FLAG if seeds_differ(c) else ""
            rows.append(f"{name:<24} {c['difference']:>+7.3f}  [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]{flag}")
    if metrics.get("sandbox"):
        rows += ["", describe_isolation(metrics["sandbox"])]
    if metrics.get("pending"):
        rows += ["", f"not finished: {', '.join(metrics['pending'])}"]
    return "\n".join(rows)


def write_run_report(run_dir: str | Path) -> Path:
    """`RUN/report.html`: method scores with CIs, paired differences, the gradient subspaces'
    spectra and, where counted, the kinds of result (code) or the answers chosen (multiple choice)."""
    from spd_lens.viz import (comparison_figure, method_scores_figure, outcome_figure, spectrum_figure,
                              training_data_figure, write_report)

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise SpdLensError(f"{run_dir} has no metrics.json: run `spd-lens run CONFIG --out {run_dir}` first")
    metrics = json.loads(metrics_path.read_text())
    figures = [method_scores_figure(metrics)]
    if metrics.get("comparisons"):
        figures.append(comparison_figure(metrics))
    for directory in sorted((run_dir / "subspaces").glob("gradient-seed*")):
        try:
            subspace = CapabilitySubspace.load(directory)
        except SpdLensError:
            continue
        figures += [spectrum_figure(subspace, "k"), spectrum_figure(subspace, "v")]
        break
    # after the spectra, so that the figures' file numbers stay those of earlier reports
    figures += [outcome_figure(metrics, key) for key in ("outcomes", "answers")
                if any(m.get(key) for m in metrics["methods"].values())]
    if any(m.get("training_data") for m in metrics["methods"].values()):
        figures.append(training_data_figure(metrics))
    path = run_dir / "report.html"
    write_report(path, figures, f"spd_lens run {metrics.get('run')}", format_table(metrics))
    return path
