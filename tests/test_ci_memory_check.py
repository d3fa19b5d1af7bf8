"""The CI wrapper that fails a run whose processes peak above a memory limit."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / ".ci" / "peak_memory.py"
ALLOCATE = [sys.executable, "-c", "block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096])"]


def _run(limit, command):
    return subprocess.run([sys.executable, str(SCRIPT), "--limit-gb", str(limit), "--", *command],
                          capture_output=True, text=True)


def test_a_process_over_the_limit_fails_the_run():
    over = _run(0.2, ALLOCATE)
    assert over.returncode == 1 and "over the 0.2 GB limit" in over.stderr
    peak = float(over.stdout.split("`: ")[1].split(" GB")[0])
    assert 0.29 <= peak <= 1.0  # the 300 MB block was seen, and the wrapper's own memory is not counted


def test_under_the_limit_passes_and_a_failing_command_keeps_its_status():
    assert _run(2, ALLOCATE).returncode == 0
    assert _run(2, [sys.executable, "-c", "raise SystemExit(3)"]).returncode == 3
