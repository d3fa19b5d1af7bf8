"""RESULTS.md's first-screen figure: the headline test comparisons with their 95% intervals, and
Gemma-3-270M's two gates (dotted), recomputed from the committed outcomes (experiments/study/recheck.py).

    .venv/bin/python experiments/study/headline_figure.py    # writes experiments/results/study/headline.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recheck import ROOT, comparisons, gemma  # noqa: E402

from spd_lens.evaluate import paired_difference  # noqa: E402

# Labels on the figure, in the order drawn (top first); names as in recheck.comparisons.
SHOWN = {
    "gate-test V rank 8: gradient - random (first confirmation; dev's draws)": "decoding, chosen cell: gradient - random (dev's draws)",
    "gate-test-clean V rank 8: gradient - random (fresh test draws)": "decoding, chosen cell: gradient - random (fresh test draws)",
    "hook-only at the chosen cell - base": "decoding, chosen cell: projected - unprojected",
    "code subspace (3 seeds, gate-test-code) - arithmetic subspace (3 seeds, gate-test), chosen cell":
        "decoding, chosen cell: code subspaces - arithmetic's (post hoc)",
    "gate-test K+V rank 96 (paper's): gradient - random": "decoding, paper's projection: gradient - random",
    "math-hard spd - psr": "distilled, paper's projection: spd - psr",
    "math-hard spd - spd-random": "distilled, paper's projection: spd - spd-random",
    "chosen cell spd - psr": "distilled, chosen cell: spd - psr",
    "ood (code subspace) spd - psr": "distilled, code subspace: spd - psr",
}


def main() -> None:
    found = {name: (a, b) for name, _, a, b in comparisons("score") if name in SHOWN}
    rows = [(label, paired_difference(*found[name])) for name, label in SHOWN.items() if name in found]
    # Gemma-3-270M's gates (no gate passed, nothing distilled): below the SmolLM2 rows, marked.
    g = gemma()
    if "dev_paper_cell" in g:
        rows.append(("Gemma-3-270M, dev (33 q.): paper's projection, gradient - random", g["dev_paper_cell"]))
    if "test_paper_cell" in g:
        rows.append(("Gemma-3-270M, test (43 q.): paper's projection, gradient - random", g["test_paper_cell"]))
    if "data_gate" in g:
        rows.append(("Gemma-3-270M, training data (124 x 3): spd - spd-random", g["data_gate"]["spd - spd-random"]))
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.1))
    for y, (label, d) in enumerate(reversed(rows)):
        low, high = d["ci"]
        colour = "#54a24b" if low > 0 else "#e45756" if high < 0 else "#4c78a8"
        ax.plot([low, high], [y, y], color=colour, lw=2, ls=":" if label.startswith("Gemma") else "-")
        ax.plot(d["difference"], y, "o", color=colour)
    ax.axvline(0, color="#888", lw=1, ls="--")
    ax.xaxis.set_major_locator(matplotlib.ticker.MultipleLocator(0.05))
    ax.xaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:+.2f}"))
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    ax.set_xlabel("difference in share correct (95% interval); SmolLM2: 500 test questions")
    ax.set_title("Where the gradient subspace helps: SmolLM2-135M-Instruct on test, Gemma-3-270M's gates",
                 fontsize=10, loc="right")
    fig.tight_layout()
    out = ROOT / "headline.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the title is wider than the axes
    print(out)


if __name__ == "__main__":
    main()
