"""RESULTS.md's first-screen figure: the headline test comparisons with their 95% intervals,
recomputed from the committed outcomes (experiments/study/recheck.py's comparisons).

    .venv/bin/python experiments/study/headline_figure.py    # writes experiments/results/study/headline.png
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recheck import ROOT, comparisons  # noqa: E402

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
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.1))
    for y, (label, d) in enumerate(reversed(rows)):
        low, high = d["ci"]
        colour = "#54a24b" if low > 0 else "#e45756" if high < 0 else "#4c78a8"
        ax.plot([low, high], [y, y], color=colour, lw=2)
        ax.plot(d["difference"], y, "o", color=colour)
    ax.axvline(0, color="#888", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [label for label, _ in reversed(rows)], fontsize=8)
    ax.set_xlabel("difference in share correct, 500 test questions (95% interval)")
    ax.set_title("SmolLM2-135M-Instruct: where the gradient subspace helps (test)", fontsize=10, loc="right")
    fig.tight_layout()
    out = ROOT / "headline.png"
    fig.savefig(out, dpi=110, bbox_inches="tight")  # the title is wider than the axes
    print(out)


if __name__ == "__main__":
    main()
