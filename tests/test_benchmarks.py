"""The benchmark scripts cannot rot: each runs in its smoke mode (the tiny random model, tiny
sizes) in the suite, and docs/benchmarks.md's tables are what benchmarks/results/*.json say."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import smoke  # noqa: E402
import tables  # noqa: E402


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert scripts - set(smoke.SMOKE) - set(smoke.NOT_SMOKED) == set(), "a benchmark script without a smoke run"


def run_smoke(names: list[str], tmp_path: Path, lanes: int = 1) -> None:
    # One process per lane (torch is imported once in each); a script that fails names itself. Two
    # lanes overlap the scripts' process start-ups (smoke runs assert no timings).
    results = ROOT / "benchmarks" / "results"
    before = {p.name: p.read_bytes() for p in results.glob("*.json")}
    groups = [names[i::lanes] for i in range(lanes)]
    running = [subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "smoke.py"), *group], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for group in groups]
    for group, process in zip(groups, running):
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, out[-3000:] + err[-5000:]
        assert f"{len(group)} passed, 0 failed" in out
    assert {p.name: p.read_bytes() for p in results.glob("*.json")} == before, "a smoke run wrote results"


def test_benchmarks_run_in_smoke_mode(tmp_path):
    run_smoke(sorted(set(smoke.SMOKE) - smoke.SPAWNING), tmp_path)


@pytest.mark.slow
def test_benchmarks_that_start_processes_run_in_smoke_mode(tmp_path):
    run_smoke(sorted(smoke.SPAWNING), tmp_path, lanes=2)


def test_benchmarks_page_matches_the_results():
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert tables.updated_page(page) == page, "docs/benchmarks.md differs from benchmarks/results/*.json: run python benchmarks/tables.py"


def test_table_rows_come_from_the_json(tmp_path):
    (tmp_path / "bench_x.json").write_text(json.dumps({
        "benchmark": "bench_x", "command": "python benchmarks/bench_x.py", "measured": "2026-12-07", "machine": "2 CPU cores",
        "source": "this script's run", "rows": [{"figure": "x vs y", "ratio": 1.234, "detail": "a | b"}],
        "earlier": [{"measured": "2026-11-01", "machine": "m", "source": "s", "rows": [{"figure": "x vs y", "ratio": 0.9}]}]}))
    text = tables.render(tmp_path)
    assert "| `bench_x` | x vs y | 1.23x | a \\| b |" in text
    assert "earlier, measured 2026-11-01" in text and "x vs y: 0.90x" in text
    page = f"intro\n{tables.BEGIN}\nold table\n{tables.END}\nafter\n"
    assert tables.updated_page(page, tmp_path) == f"intro\n{text}\nafter\n"
