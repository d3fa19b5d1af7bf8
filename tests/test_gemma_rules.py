"""experiments/study/gemma_rules.py applies the Gemma study's pre-registered rules: the preset from
step 1's scores, and configs sized to what the chosen preset's splits hold."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "experiments" / "study" / "gemma_rules.py"


def rules(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RULES), *map(str, args)], capture_output=True, text=True)


def scores(runs: Path, hard: float, easy: float) -> None:
    for name, score in (("hard", hard), ("easy", easy)):
        (runs / f"gemma-preset-{name}").mkdir(parents=True)
        (runs / f"gemma-preset-{name}" / "metrics.json").write_text(json.dumps({"methods": {"base": {"score": score}}}))


def test_easy_preset_configs_take_every_question_its_splits_hold(tmp_path):
    scores(tmp_path, 0.01, 0.121)
    assert rules("preset", tmp_path).stdout.strip() == "easy"
    gate = Path(rules("config", tmp_path, "gemma-gate").stdout.strip()).read_text()
    assert 'preset = "easy"' in gate and "eval_n = 33" in gate and 'eval_split = "dev"' in gate
    data = Path(rules("config", tmp_path, "gemma-gate-data").stdout.strip()).read_text()
    assert "train_n = 124" in data
    # The test gate from a chosen cell: the test split, all 43 of its questions (not dev's).
    (tmp_path / "gemma-gate").mkdir()
    (tmp_path / "gemma-gate" / "ablation.json").write_text(json.dumps({"controls": [
        {"rank": 8, "layers": "9", "kinds": "v", "difference": 0.1, "ci": [0.02, 0.2]}]}))
    test = Path(rules("config", tmp_path, "gemma-gate-test").stdout.strip()).read_text()
    assert 'eval_split = "test"\neval_n = 43' in test


def test_hard_preset_keeps_the_shipped_configs_and_none_stops_the_study(tmp_path):
    scores(tmp_path / "a", 0.3, 0.9)
    assert rules("config", tmp_path / "a", "gemma-gate").stdout.strip() == str(ROOT / "experiments" / "study" / "gemma-gate.toml")
    scores(tmp_path / "b", 0.01, 0.9)
    done = rules("config", tmp_path / "b", "gemma-gate")
    assert done.returncode != 0 and "stops there" in done.stderr


def test_without_a_chosen_cell_the_test_gate_is_the_papers_cell_and_a_zero_bound_is_not_above_zero(tmp_path):
    scores(tmp_path, 0.01, 0.121)
    (tmp_path / "gemma-gate").mkdir()
    # A bootstrap bound that is zero comes out of float means as +-3e-17: not above zero.
    (tmp_path / "gemma-gate" / "ablation.json").write_text(json.dumps({"controls": [
        {"rank": 32, "layers": "17", "kinds": "v", "difference": 0.015, "ci": [2.8e-17, 0.068]}]}))
    test = Path(rules("config", tmp_path, "gemma-gate-test").stdout.strip()).read_text()
    grid = test[test.index("[ablate]"):]
    assert "ranks = [128]\nlayer_sets = [[9, 17]]\nkind_sets = [[\"k\", \"v\"]]" in grid
    assert 'eval_split = "test"\neval_n = 43' in test
    refused = rules("config", tmp_path, "gemma-main-chosen")
    assert refused.returncode != 0 and "chose no cell" in refused.stderr
