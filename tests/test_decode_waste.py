import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "decode_waste.py"


@pytest.fixture(scope="module")
def decode_waste():
    spec = importlib.util.spec_from_file_location("decode_waste", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_waste_counts_steps_of_rows_that_already_finished(decode_waste):
    # batch [1, 3]: 6 row-steps, 4 used; batch [2, 2]: 4 row-steps, all used
    assert decode_waste.waste([1, 3, 2, 2], batch=2) == pytest.approx(1 - 8 / 10)
    assert decode_waste.waste([5, 5, 5], batch=3) == 0


def test_decode_waste_reads_a_run_directory(decode_waste, tmp_path, monkeypatch, capsys):
    (tmp_path / "eval").mkdir()
    (tmp_path / "config.json").write_text(json.dumps(
        {"model": {"name": "tiny"}, "task": {"name": "humaneval"}, "eval": {"max_new_tokens": None, "batch_size": 2}}))
    completions = ["```python\ndef f():\n    return 1\n```\nThis returns one, as asked.", "def g(): pass"]
    (tmp_path / "eval" / "base.json").write_text(json.dumps({"results": [{"completion": c} for c in completions]}))
    monkeypatch.setattr(sys, "argv", ["decode_waste.py", str(tmp_path)])
    decode_waste.main()
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["base"]
    assert 0 < figures["finished_row_steps"] < 1  # the short row waits for the long one
    assert 0 < figures["after_fence_tokens"] < 1  # the prose after the block
