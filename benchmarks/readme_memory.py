"""Peak resident memory of the README's Python examples, run as a user would paste them.

    python benchmarks/readme_memory.py                 # every block, in order, in one fresh process
    python benchmarks/readme_memory.py --blocks 1-3    # the first three; also "1-4,6"
    python benchmarks/readme_memory.py --page docs/explore.md   # a docs page's blocks (the earlier README's tour)

Every ```python block of README.md runs in order in one fresh Python process (a notebook kernel's
situation: the model loaded by the first block stays loaded), in a temporary working directory.
After each block the process's peak resident memory so far (`ru_maxrss`) and the block's wall time
are recorded, and what stays resident after it. Two edits make the text runnable, both printed: the placeholder `, ...]` in a list
of your own examples is dropped, and `run_experiment(...)` (the whole main job, hours) is skipped:
its memory is the demo's, measured by `/usr/bin/time -v bash run.sh demo`.
The last line is JSON: {"blocks": [{"block", "first_line", "seconds", "peak_gb"}], "peak_gb"}.
Goal: every block under 4 GB (a 16 GB laptop with other things open).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOAL_GB = 4.0

RUNNER = r'''
import json, resource, sys, time, traceback
blocks = json.load(open(sys.argv[1]))
namespace = {"__name__": "__readme__"}
for number, source in blocks:
    started = time.time()
    try:
        exec(compile(source, f"README block {number}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        print(json.dumps({"block": number, "error": True}), flush=True)
        sys.exit(1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    resident = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 2**30
    print(json.dumps({"block": number, "seconds": round(time.time() - started, 1), "peak_gb": round(peak, 2),
                      "resident_gb": round(resident, 2)}), flush=True)
'''


def readme_blocks(readme: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme.read_text(), flags=re.S)


def runnable(source: str) -> tuple[str, list[str]]:
    """The block with the two documented edits, and what was edited."""
    edits = []
    lines = []
    for line in source.splitlines():
        if "run_experiment(" in line and "import" not in line:
            edits.append(f"skipped: {line.strip()[:70]}")
            continue
        if ", ...]" in line:
            edits.append("dropped the placeholder ', ...]' of a list of examples")
            line = line.replace(", ...]", "]")
        lines.append(line)
    return "\n".join(lines) + "\n", edits


def parse_range(text: str, count: int) -> list[int]:
    """"1-4,6" -> [1, 2, 3, 4, 6]; empty: every block."""
    if not text:
        return list(range(1, count + 1))
    chosen = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        chosen += range(int(first), int(last or first) + 1)
    bad = [b for b in chosen if not 1 <= b <= count]
    if bad:
        raise SystemExit(f"README has {count} python blocks: no block {bad[0]}")
    return chosen


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", default="", help="e.g. 1-3 or 1-4,6 (default: all)")
    parser.add_argument("--page", default="README.md", help="the markdown file whose blocks run, e.g. docs/explore.md")
    parser.add_argument("--smoke", action="store_true", help="one small block instead of the page's (seconds)")
    args = parser.parse_args()
    blocks = (["import spd_lens\nexamples = spd_lens.get_task('arithmetic').examples('train', n=2)\n"] if args.smoke
              else readme_blocks(ROOT / args.page))
    chosen = parse_range(args.blocks, len(blocks))
    prepared = []
    for number in chosen:
        source, edits = runnable(blocks[number - 1])
        for edit in edits:
            print(f"block {number}: {edit}")
        prepared.append((number, source))
    rows = []
    with tempfile.TemporaryDirectory() as work:
        blocks_file = Path(work) / "blocks.json"
        blocks_file.write_text(json.dumps(prepared))
        process = subprocess.Popen([sys.executable, "-c", RUNNER, str(blocks_file)], cwd=work, stdout=subprocess.PIPE,
                                   text=True)
        for line in process.stdout:
            if line.startswith("{"):
                row = json.loads(line)
                first = blocks[row["block"] - 1].strip().splitlines()[0][:60]
                row["first_line"] = first
                rows.append(row)
                status = ("FAILED" if row.get("error") else
                          f"{row['seconds']:>7.1f} s  peak {row['peak_gb']:.2f} GB  after it {row['resident_gb']:.2f} GB")
                print(f"block {row['block']}: {status}  {first}", flush=True)
        failed = process.wait() != 0
    peak = max((r.get("peak_gb", 0) for r in rows), default=0)
    print(f"peak over the blocks run: {peak:.2f} GB (goal: under {GOAL_GB} GB)")
    print(json.dumps({"blocks": rows, "peak_gb": peak, "goal_gb": GOAL_GB, "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
