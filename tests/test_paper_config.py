"""The paper's GSM8K config, with only its model and sizes shrunk (experiments/paper/smoke.toml),
runs end to end: every method of the paper's run on a local GSM8K-format file, no hub."""

import json
from pathlib import Path

import torch

from spd_lens.cli import main as cli
from spd_lens.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "experiments" / "paper" / "gsm8k.toml"
SMOKE = ROOT / "experiments" / "paper" / "smoke.toml"


def gsm8k_file(path: Path, split: str, n: int) -> Path:
    """Records in GSM8K's public format: question, and an answer ending in '#### N'."""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            a, b = 3 + i, 5 + 2 * i
            handle.write(json.dumps({"question": f"Tom has {a} apples ({split} {i}) and buys {b} more. How many now?",
                                     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}) + "\n")
    return path


def test_the_override_changes_only_the_model_and_the_sizes():
    paper, smoke = load_config(PAPER).to_dict(), load_config(PAPER, overrides=[SMOKE]).to_dict()
    changed = {(section, key) for section, values in paper.items() if isinstance(values, dict)
               for key in values if values[key] != smoke[section][key]}
    changed |= {(key,) for key, value in paper.items() if not isinstance(value, dict) and value != smoke[key]}
    sizes = {("task", "train_n"), ("task", "eval_n"), ("subspace", "n"), ("subspace", "batch_size"),
             ("subspace", "layers"), ("sampling", "max_new_tokens"), ("sampling", "batch_size"), ("train", "epochs"),
             ("train", "batch_size"), ("eval", "max_new_tokens"), ("eval", "batch_size"), ("seeds",), ("name",)}
    assert changed - sizes == {("model", "name")}
    assert smoke["methods"] == paper["methods"] and smoke["train"]["lr"] == 1e-5 and smoke["sampling"]["top_k"] == 20


def test_the_shrunk_paper_config_runs_end_to_end(tmp_path, capsys):
    """On the CPU in float32; benchmarks/gpu_check.py runs it on a GPU in bfloat16 against float32."""
    dtype = "float32"
    data = tmp_path / "data.toml"
    train, test = gsm8k_file(tmp_path / "train.jsonl", "train", 16), gsm8k_file(tmp_path / "test.jsonl", "test", 8)
    data.write_text(f'[task]\ndata = {{ train = "{train}", test = "{test}" }}\n')
    before = torch.get_num_threads()
    try:
        assert cli(["--threads", "1", "run", str(PAPER), "--override", str(SMOKE), "--override", str(data),
                    "--out", str(tmp_path / "run"), "--dtype", dtype]) == 0
    finally:
        torch.set_num_threads(before)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"runtime: device cpu, dtype {dtype}, torch {torch.__version__}") and "CUDA available" in first
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["pending"] == [] and metrics["model"] == "tiny"
    methods = {name.removesuffix("-seed0") for name in metrics["methods"]}
    assert methods == {"base", "psr", "ssd", "spd", "spd-random", "hook-only"}
    assert all(m["n"] == 4 for m in metrics["methods"].values())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"]["name"] == "gsm8k" and config["train"]["lr"] == 1e-5 and config["subspace"]["rank_frac"] == 0.5


def test_plan_takes_the_override_as_run_does(capsys):
    """`spd-lens plan CONFIG --override FILE` plans the config `spd-lens run` would run."""
    cli(["plan", str(PAPER), "--override", str(SMOKE)])
    shrunk = capsys.readouterr().out
    cli(["plan", str(PAPER)])
    full = capsys.readouterr().out
    train_n = load_config(PAPER, overrides=[SMOKE]).task.train_n
    assert f"{train_n} records x" in shrunk and f"{train_n} records x" not in full
    assert f"{load_config(PAPER).task.train_n} records x" in full
