"""`spd-lens plan`: config and data checks, the work each stage will do, an estimate of its time."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from spd_lens.cli import main as cli
from spd_lens.config import config_from_dict, load_config
from spd_lens.models import EMBEDDED_MODELS
from spd_lens.plan import REFERENCE, make_plan

ROOT = Path(__file__).resolve().parents[1]


def test_quick_config_counts_every_stage_and_estimates_the_recorded_demo():
    plan = make_plan(load_config(ROOT / "experiments" / "quick.toml"), threads=2)
    assert all(status == "ok" for _, status, _ in plan.checks), plan.checks
    stages = {s.name: s for s in plan.stages}
    # quick: base, psr, spd, spd-random; one seed; 64 prompts of arithmetic (40 tokens); 100 test questions
    assert (stages["extract"].runs, stages["extract"].examples) == (1, 32)
    assert (stages["generate"].runs, stages["generate"].completions, stages["generate"].decode_slots) == (3, 192, 192 * 40)
    assert (stages["train"].runs, stages["train"].examples) == (3, 192)
    assert (stages["eval"].runs, stages["eval"].completions, stages["eval"].decode_slots) == (4, 400, 400 * 40)
    recorded = json.loads((ROOT / "experiments" / "results" / "demo" / "metrics.json").read_text())["stage_seconds"]
    ratio = plan.seconds / sum(recorded.values())
    assert 0.5 < ratio < 2, (plan.seconds, recorded)
    assert "estimate from 2 CPU cores" in plan.estimate_basis


def test_plan_cli_prints_stages_and_refuses_what_would_fail(tmp_path, capsys):
    assert cli(["plan", str(ROOT / "experiments" / "quick.toml")]) == 0
    out = capsys.readouterr().out
    for word in ("extract", "generate", "train", "eval", "total", "est. time", "estimate from"):
        assert word in out
    assert cli(["plan", str(ROOT / "experiments" / "quick.toml"), "--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert "!! runtime" in captured.out and "no usable CUDA device" in captured.err
    config = tmp_path / "few.toml"
    data = tmp_path / "gsm8k_test.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(5)))
    config.write_text(f'[model]\nname = "tiny"\n[task]\nname = "gsm8k"\ndata = {{test = "{data}"}}\neval_n = 5\n')
    assert cli(["plan", str(config)]) == 2
    captured = capsys.readouterr()
    assert "ok data gsm8k test (eval): 5 examples" in captured.out
    assert "no data file is given for the 'train' split" in captured.err


def test_an_ablation_is_planned_row_by_row(capsys):
    """`plan --ablate` counts the grid `spd-lens ablate` runs: baseline + cells x (1 + draws)."""
    from spd_lens.ablate import grid

    config = load_config(ROOT / "experiments" / "study" / "gate-rank.toml")
    plan = make_plan(config, threads=2, ablate=True)
    stages = {s.name: s for s in plan.stages}
    rows = len(grid(config, config.subspace.layers))
    assert rows == 1 + (6 + 4) * (1 + 3)  # 6 ranks and 4 energies, each with 3 random draws
    assert (stages["eval"].runs, stages["eval"].completions, stages["eval"].decode_slots) == (rows, rows * 300,
                                                                                            rows * 300 * 40)
    assert (stages["extract"].runs, stages["extract"].examples) == (1, 64 + 16)
    assert cli(["plan", str(ROOT / "experiments" / "study" / "gate-rank.toml"), "--ablate"]) == 0
    out = capsys.readouterr().out
    assert "plan for spd-lens ablate" in out and f"{rows} rows: the baseline, 10 cells" in out
    sampled = load_config(ROOT / "experiments" / "study" / "gate-sampled.toml")
    evaluate = {s.name: s for s in make_plan(sampled, threads=2, ablate=True).stages}["eval"]
    assert (evaluate.runs, evaluate.examples, evaluate.completions) == (13, 13 * 300, 13 * 300 * 2)
    assert evaluate.decode_slots == 13 * 600 * 40 and "2 sampled completion(s) each" in evaluate.detail[0]
    # Layer sets need the layers they use extracted: refused as `spd-lens ablate` would refuse it.
    bad = config_from_dict({"model": {"name": "tiny"}, "subspace": {"layers": [1]}, "ablate": {"layer_sets": [[2]]}})
    assert any("outside subspace.layers" in e for e in make_plan(bad, ablate=True).errors)


def test_hub_data_offline_is_reported_as_unchecked(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = make_plan(load_config(ROOT / "experiments" / "paper" / "gsm8k.toml"), threads=2)
    unchecked = [message for what, status, message in plan.checks if status == "unchecked"]
    assert len(unchecked) == 4 and all("cannot be checked offline" in m for m in unchecked)
    assert not plan.errors
    assert "published size is used, 494M parameters" in unchecked[0]
    stages = {s.name: s for s in plan.stages}
    # psr, ssd, spd, spd-random x 3 seeds, plus base and hook-only once: 14 evaluations of 1,319 questions
    assert stages["generate"].completions == 4 * 3 * 2000 and stages["eval"].completions == 14 * 1319
    assert plan.seconds > 0 and "x0.27" in plan.estimate_basis


@pytest.mark.parametrize("name", ["gsm8k", "mbpp", "svamp", "mmlu", "bbh"])
def test_paper_configs_hold_the_published_setting(name):
    config = load_config(ROOT / "experiments" / "paper" / f"{name}.toml")
    assert config.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and config.task.name == name
    assert (config.model.device, config.model.dtype) == ("auto", "auto")
    t = config.train
    assert (t.lora, t.lora_r, t.lora_alpha, t.lora_dropout, t.lr, t.weight_decay, t.epochs) == (True, 8, 8, 0.05, 1e-5, 0.01, 5)
    assert tuple(t.target_modules) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert config.subspace.layers == [12, 23] and config.subspace.rank_frac == 0.5  # 24 layers: L/2, L-1; half rank
    assert {"base", "psr", "ssd", "spd"} <= set(config.methods)
    text = (ROOT / "experiments" / "paper" / f"{name}.toml").read_text()
    assert "Published (Qwen2.5-0.5B-Instruct" in text


def test_measured_figures_replace_the_cpu_rates(tmp_path):
    figures = {"device": "NVIDIA H100", "dtype": "bfloat16", "model": "smollm2-135m-instruct",
               "parameters": REFERENCE["parameters"], "sampling_batch": 16,
               "sampling_tokens_per_s": REFERENCE["decode_slots_per_s"] * 10,
               "train_tokens_per_s": REFERENCE["train_tokens_per_s"] * 10,
               "extract_tokens_per_s": REFERENCE["extract_tokens_per_s"] * 10}
    path = tmp_path / "gpu.json"
    path.write_text("some log line\n" + json.dumps(figures) + "\n")
    config = config_from_dict({"seeds": [0], "methods": ["base", "psr"], "task": {"train_n": 16, "eval_n": 20}})
    cpu = make_plan(config, threads=2)
    gpu = make_plan(config, figures=path)
    assert "NVIDIA H100" in gpu.estimate_basis
    for a, b in zip(cpu.stages, gpu.stages):
        if a.runs:
            assert b.seconds == pytest.approx(a.seconds / 10, rel=0.01), a.name
    (tmp_path / "bad.json").write_text('{"device": "x"}\n')
    with pytest.raises(Exception, match="lacks"):
        make_plan(config, figures=tmp_path / "bad.json")


def test_gpu_check_refuses_without_cuda():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 2
    assert "needs a CUDA device" in out.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").rglob("*.toml")), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_plans_without_a_problem(path, monkeypatch):
    # A split that changes under a shipped config (a dev split carved out of train) must show here,
    # not hours into a run. Hub data is unchecked offline, never an error.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(path)
    # An opt-in model (gemma3-270m, `bash run.sh setup --gemma`) that is not installed is the one
    # problem such a config may have, and the plan must name the command that installs it.
    spec = EMBEDDED_MODELS.get(config.model.name)
    expected = []
    if spec is not None and spec.setup_option and importlib.util.find_spec(spec.package) is None:
        expected = [e for e in make_plan(config, threads=2).errors if spec.pip_command in e]
        assert expected, f"a missing {spec.pip_spec} is not reported with its install command"
    assert make_plan(config, threads=2).errors == expected
    if "[ablate]" in path.read_text():
        assert make_plan(config, threads=2, ablate=True).errors == expected


def _stub_spd_lens(tmp_path) -> dict:
    """An environment whose spd-lens records each call in tmp_path/calls instead of running a model,
    and whose kept runs (run.sh `keep`) are tmp_path/kept, not the repository's."""
    import os
    import stat

    stub = tmp_path / "bin" / "spd-lens"
    stub.parent.mkdir()
    stub.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls"}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return {**os.environ, "PATH": f"{stub.parent}:{os.environ['PATH']}", "SPD_LENS_KEPT": str(tmp_path / "kept")}


def test_the_study_script_runs_beside_math_hard_then_takes_its_base_and_psr(tmp_path):
    """math-hard-chosen runs its own methods at once, and base and psr only once math-hard has
    every one of them (an earlier take would train psr again in the wrong directory)."""
    env = _stub_spd_lens(tmp_path)
    runs = tmp_path / "runs"
    script = str(ROOT / "experiments" / "study" / "run.sh")

    def step(name):
        (tmp_path / "calls").unlink(missing_ok=True)
        result = subprocess.run(["bash", script, str(runs), name], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "calls").read_text().splitlines(), result.stderr

    calls, said = step("math-hard-chosen")
    assert len(calls) == 1 and "--methods spd,spd-random,hook-only" in calls[0] and "--reuse" not in calls[0]
    assert "(base is not finished)" in said
    (runs / "math-hard" / "eval").mkdir(parents=True)
    for stem in ("base", "psr-seed0", "psr-seed1", "psr-seed2"):
        (runs / "math-hard" / "eval" / f"{stem}.json").write_text("{}")
    calls, _ = step("math-hard-chosen")
    assert len(calls) == 2 and calls[1].endswith(f"--reuse {runs / 'math-hard'}") and "--methods" not in calls[1]
    calls, _ = step("ood")
    assert "--methods spd,hook-only" in calls[0] and "rerun/ood.toml" in calls[1]
    # code and math-hard: the main comparison at every seed, then the other baselines (math-hard:
    # spd-fullseq first, ssd being the other lane's).
    calls, _ = step("code")
    assert len(calls) == 2 and all("rerun/code.toml" in c for c in calls)
    assert "--methods base,psr,spd,spd-random,hook-only" in calls[0] and "--methods" not in calls[1]
    calls, _ = step("math-hard")
    assert len(calls) == 3 and all("rerun/math-hard.toml" in c for c in calls)
    assert "--methods base,psr,spd,spd-random,hook-only" in calls[0] and "--methods spd-fullseq" in calls[1]
    assert "--methods" not in calls[2]


def test_math_hards_ssd_runs_in_its_own_directory_and_math_hard_takes_its_finished_seeds(tmp_path):
    env = _stub_spd_lens(tmp_path)
    runs = tmp_path / "runs"
    script = str(ROOT / "experiments" / "study" / "run.sh")
    subprocess.run(["bash", script, str(runs), "math-hard-ssd"], env=env, check=True)
    assert (tmp_path / "calls").read_text().split()[-4:] == ["--methods", "ssd", "--out", str(runs / "math-hard-ssd")]
    other = runs / "math-hard-ssd"
    finished = {"eval/ssd-seed0.json": "{}", "generations/ssd-seed0.jsonl": "{}\n",
                "generations/ssd-seed0.quality.json": "{}"}
    unfinished = {"generations/ssd-seed1.jsonl": "{}\n", "generations/ssd-seed1.quality.json": "{}",
                  "eval/ssd-seed1.jsonl": "{}\n"}  # trained, still being evaluated
    for name, text in {**finished, **unfinished}.items():
        (other / name).parent.mkdir(parents=True, exist_ok=True)
        (other / name).write_text(text)
    subprocess.run(["bash", script, str(runs), "math-hard"], env=env, check=True)
    taken = sorted(str(p.relative_to(runs / "math-hard")) for p in (runs / "math-hard").rglob("*") if p.is_file())
    assert taken == sorted(finished)  # the unfinished seed is math-hard's own to run (or take later)


def test_spd_fullseqs_last_seed_runs_in_its_own_directory_and_math_hard_takes_it(tmp_path):
    env = _stub_spd_lens(tmp_path)
    runs = tmp_path / "runs"
    script = str(ROOT / "experiments" / "study" / "run.sh")
    subprocess.run(["bash", script, str(runs), "math-hard-seed2"], env=env, check=True)
    assert (tmp_path / "calls").read_text().split()[-6:] == ["--methods", "spd-fullseq", "--seeds", "2", "--out",
                                                             str(runs / "math-hard-seed2")]
    finished = {"eval/spd-fullseq-seed2.json": "{}", "generations/spd-fullseq-seed2.jsonl": "{}\n",
                "generations/spd-fullseq-seed2.quality.json": "{}", "subspaces/fullseq-seed2/basis.pt": "x"}
    for name, text in finished.items():
        (runs / "math-hard-seed2" / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / "math-hard-seed2" / name).write_text(text)
    (tmp_path / "calls").unlink()
    subprocess.run(["bash", script, str(runs), "math-hard"], env=env, check=True)
    taken = sorted(str(p.relative_to(runs / "math-hard")) for p in (runs / "math-hard").rglob("*") if p.is_file())
    assert taken == sorted(finished)
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "--methods spd-fullseq" in calls[1]  # taken before math-hard runs its own seeds of it


def test_the_study_script_keeps_finished_files_and_a_new_machine_starts_from_them(tmp_path):
    """`keep` copies what a rerun finished (not adapters, unfinished .partial files, HTML, or the
    checkpoint of a finished evaluation) into the committed results; the step on a machine without
    the run directory starts from that copy."""
    env = _stub_spd_lens(tmp_path)
    script = str(ROOT / "experiments" / "study" / "run.sh")
    run = tmp_path / "runs" / "math-easy"
    for name, text in {"config.json": "{}", "metrics.json": "{}", "report.html": "<html>", "plotly.min.js": "x",
                       ".spd-lens.lock": "",
                       "eval/base.json": "{}", "eval/base.jsonl": "{}\n", "eval/psr-seed0.jsonl.partial": "{}\n",
                       "eval/hook-only.jsonl": "{}\n",  # generated, not yet scored: kept
                       "generations/psr-seed0.jsonl": "{}\n", "generations/psr-seed0.quality.json": "{}",
                       "generations/spd-seed0.jsonl.partial": "", "subspaces/gradient-seed0/basis.pt": "x",
                       "adapters/psr-seed0/adapter_model.safetensors": "weights"}.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    kept = subprocess.run(["bash", script, str(tmp_path / "runs"), "keep"], capture_output=True, text=True, env=env)
    assert kept.returncode == 0, kept.stderr
    copy = tmp_path / "kept" / "math-easy"
    assert sorted(str(p.relative_to(copy)) for p in copy.rglob("*") if p.is_file()) == [
        "config.json", "eval/base.json", "eval/hook-only.jsonl", "generations/psr-seed0.jsonl",
        "generations/psr-seed0.quality.json", "metrics.json", "subspaces/gradient-seed0/basis.pt"]
    assert not (tmp_path / "kept" / "code").exists()  # a rerun not started is not kept
    fresh = tmp_path / "new-machine"
    result = subprocess.run(["bash", script, str(fresh), "math-easy"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert (fresh / "math-easy" / "eval" / "base.json").is_file() and not (fresh / "math-easy" / "adapters").exists()
    assert f"--out {fresh / 'math-easy'}" in (tmp_path / "calls").read_text()
    # A run directory that exists is never overwritten by the kept copy.
    (copy / "eval" / "base.json").write_text('{"older": true}')
    subprocess.run(["bash", script, str(fresh), "math-easy"], capture_output=True, text=True, env=env, check=True)
    assert (fresh / "math-easy" / "eval" / "base.json").read_text() == "{}"


def test_the_study_script_names_only_configs_that_exist():
    import re

    script = (ROOT / "experiments" / "study" / "run.sh").read_text()
    named = set(re.findall(r'\$STUDY/([\w./-]+\.toml)', script))
    named |= {f"{step}.toml" for step in re.search(r"(gate-rank \| [^)]*)\)", script).group(1).split(" | ")}
    named |= {f"rerun/{step}.toml" for step in ("math-easy", "code", "math-hard")}
    named |= {f"rerun/{name}.toml" for name in re.findall(r"beside_math_hard ([\w-]+) ", script)}
    assert {"rerun/math-hard-chosen.toml", "rerun/ood.toml"} <= named
    assert len(named) > 10
    missing = sorted(n for n in named if "$" not in n and not (ROOT / "experiments" / "study" / n).is_file())
    assert not missing
    result = subprocess.run(["bash", str(ROOT / "experiments" / "study" / "run.sh"), "/tmp/unused", "no-such-step"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "unknown step 'no-such-step'" in result.stderr


def test_answer_forms_splits_evaluations_and_training_data_by_how_the_answer_is_written(tmp_path, capsys):
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("answer_forms", ROOT / "experiments" / "study" / "answer_forms.py")
    forms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(forms)
    assert forms.is_equation("The answer is 59 + 13 = 72.") and forms.is_equation("2 - 0 = 2")
    assert not forms.is_equation("The answer to this arithmetic problem is 4.") and not forms.is_equation("= 5")
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    results = [{"completion": "1 + 5 = 6", "passed": True}, {"completion": "8 + 7 = 14", "passed": False},
               {"completion": "It is 3.", "passed": True}, {"completion": "It is 9.", "passed": False},
               {"completion": "It is 2.", "passed": False}]
    (run / "eval" / "spd-seed0.json").write_text(json.dumps({"results": results}))
    (run / "generations").mkdir()
    records = [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]}
               for i, c in enumerate(["4 - 1 = 3", "It is 3.", "2 + 2 = 5"])]
    (run / "generations" / "psr-seed0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    verdicts = [{"prompt_id": f"p{i}", "passed": p} for i, p in enumerate([True, False, False])]
    (run / "generations" / "psr-seed0.quality.json").write_text(json.dumps({"outcomes": verdicts}))
    (run / "generations" / "spd-seed0.jsonl").write_text("")  # still being written: no verdicts yet, no row
    assert forms.main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "| spd-seed0 | 5 | 0.400 | 0.400 | 0.500 | 0.333 |" in out
    assert "| psr-seed0 | 3 | 0.333 | 0.667 | 0.500 | 0.000 |" in out and "| spd-seed0 | 0 |" not in out
    verdicts.reverse()  # verdicts of other prompts (or another order) are refused, not paired wrongly
    (run / "generations" / "psr-seed0.quality.json").write_text(json.dumps({"outcomes": verdicts}))
    with pytest.raises(SystemExit, match="not the same prompts"):
        forms.main([str(run)])
    assert forms.main([str(tmp_path)]) == 2


def test_the_study_lanes_run_both_lanes_then_take_math_hards_evaluations(tmp_path):
    import time

    env = {**_stub_spd_lens(tmp_path), "LANES_POLL_S": "0.2"}
    runs = tmp_path / "runs"
    started = subprocess.run(["bash", str(ROOT / "experiments" / "study" / "lanes.sh"), str(runs)],
                             capture_output=True, text=True, env=env, timeout=60)
    assert started.returncode == 0 and "lanes started" in started.stdout
    deadline = time.time() + 60
    while time.time() < deadline and "== tables" not in ((runs / "lanes.log").read_text() if (runs / "lanes.log").exists() else ""):
        time.sleep(0.2)
    time.sleep(0.5)
    calls = (tmp_path / "calls").read_text().splitlines()
    for config in ("math-hard", "math-easy", "math-hard-chosen", "ood", "code"):
        assert any(f"rerun/{config}.toml" in c for c in calls), config
    assert not any("rerun/mc.toml" in c for c in calls)  # finished; not run again
    assert all("--threads 1" in c for c in calls)
    last = {name: max(i for i, c in enumerate(calls) if f"rerun/{name}.toml" in c) for name in ("math-easy", "code", "ood")}
    assert last["ood"] == len(calls) - 1 and last["ood"] > max(last["math-easy"], last["code"])  # after both lanes
    log = (runs / "lanes.log").read_text()
    assert "== math-hard-chosen" in log and "== ood" in log and "== tables" in log
    assert "== math-easy\n== math-hard\n" in (runs / "lane1.log").read_text()
    lane2 = (runs / "lane2.log").read_text()
    assert "== code\n== math-hard-chosen\n" in lane2 and lane2.index("== ood") < lane2.index("== math-hard-ssd")
    assert "== math-hard-ssd\n== math-hard-seed2\n" in lane2
    assert "== math-hard\n== math-hard-chosen\n" in log  # math-hard takes ssd's seeds after both lanes


def test_an_ablation_plan_checks_the_data_an_ablation_reads_not_training_prompts(tmp_path):
    """`spd-lens plan --ablate` on a small capability file: the ablation draws no training prompts
    (train_n), so a file too small for a run's training data is no problem for it."""
    from spd_lens.config import config_from_dict
    from spd_lens.plan import make_plan

    lines = [json.dumps({"id": f"p/{w}", "prompt": f"Plural of {w}?", "answer": f"{w}s", "span": f"{w}s"})
             for w in ("cat", "dog", "cup", "pen", "hat", "map", "bag")]
    (tmp_path / "plurals.jsonl").write_text("\n".join(lines) + "\n")
    raw = {"name": "p", "model": {"name": "tiny"}, "task": {"examples": str(tmp_path / "plurals.jsonl"), "eval_n": 1},
           "subspace": {"n": 3}, "ablate": {"ranks": [1], "random_draws": 3, "loss_n": 3}}
    assert make_plan(config_from_dict(raw), ablate=True).errors == []
    run_plan = make_plan(config_from_dict(raw))
    assert any("train" in e and "n=64" in e for e in run_plan.errors)  # a run's training prompts are checked
    too_few = {**raw, "ablate": {**raw["ablate"], "loss_n": 40}}
    assert any("calibration" in e for e in make_plan(config_from_dict(too_few), ablate=True).errors)


def test_plan_checks_the_configured_presets_data_and_plans_a_data_gate(capsys):
    """The easy arithmetic preset holds 43 test questions: plan reads the preset the run reads (it
    checked the default one, and said "ok" to 100), and `--data-only` plans what the data gate does."""
    from spd_lens.config import config_from_dict
    from spd_lens.plan import format_plan, make_plan

    raw = {"name": "g", "model": {"name": "tiny"}, "seeds": [0, 1], "methods": ["psr", "spd", "spd-random"],
           "task": {"name": "arithmetic", "preset": "easy", "train_n": 124, "eval_n": 100}, "subspace": {"n": 8}}
    full = make_plan(config_from_dict(raw))
    assert any("only 43 test examples, but n=100" in e for e in full.errors)
    gate = make_plan(config_from_dict(raw), data_only=True)
    assert gate.errors == [] and [s.name for s in gate.stages] == ["extract", "generate"]
    assert "ok data arithmetic train (prompt): 124 examples" in format_plan(gate)
    untrained = make_plan(config_from_dict({**raw, "methods": ["base"]}), data_only=True)
    assert any("train nothing: the data gate compares" in e for e in untrained.errors)  # as run --data-only refuses
    config = ROOT / "experiments" / "study" / "gate-data-paper.toml"  # a data gate of the study
    assert cli(["plan", str(config), "--data-only"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"plan for spd-lens run --data-only {config}")
    assert "\ngenerate " in out and "\ntrain " not in out and "\neval " not in out and "(eval)" not in out
