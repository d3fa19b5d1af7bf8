import json

import pytest

from spd_lens import SpdLensError
from spd_lens.cli import main as cli
from spd_lens.config import METHODS, config_from_dict
from spd_lens.experiment import Run, run_experiment

TINY = {"model": {"name": "tiny"}, "seeds": [0, 1], "task": {"name": "arithmetic", "train_n": 6, "eval_n": 5},
        "subspace": {"n": 4}, "sampling": {"max_new_tokens": 8}, "eval": {"max_new_tokens": 8},
        "train": {"epochs": 1, "lr": 1e-3}}


def test_every_method_runs_and_reruns_do_no_work(tmp_path):
    metrics = run_experiment(config_from_dict(TINY), tmp_path)
    assert list(metrics["methods"]) == list(METHODS)
    for name, m in metrics["methods"].items():
        assert 0 <= m["ci"][0] <= m["score"] <= m["ci"][1] <= 1 or m["ci"][0] <= m["score"]
        assert m["n"] == (5 if name in ("base", "hook-only") else 10)
    assert set(metrics["methods"]["spd"]["seeds"]) == {"0", "1"}
    # Training-data quality of every self-generating method, per seed; finish reasons counted.
    data = metrics["methods"]["spd"]["training_data"]
    assert data["n"] == 12 and set(data["seeds"]) == {"0", "1"} and 0 <= data["correct"] <= 1
    assert sum(data["finish_reasons"].values()) == 12
    assert data["cut_off"] == pytest.approx(data["finish_reasons"].get("length", 0) / 12)
    assert "training_data" not in metrics["methods"]["base"] and "training_data" in metrics["methods"]["ssd"]
    assert sum(metrics["methods"]["base"]["finish_reasons"].values()) == 5
    assert (tmp_path / "generations" / "spd-seed0.quality.json").is_file()
    assert metrics["methods"]["spd"]["questions"] == 5 and "seed_spread" in metrics["methods"]["spd"]
    comparisons = metrics["comparisons"]
    assert {"spd - base", "spd - spd-random", "psr - base", "hook-only - base"} <= set(comparisons)
    for name, c in comparisons.items():
        a, b = name.split(" - ")
        expected = metrics["methods"][a]["score"] - metrics["methods"][b]["score"]
        assert c["difference"] == pytest.approx(expected) and c["n"] == 5
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["methods"].keys() == metrics["methods"].keys()
    assert (tmp_path / "report.html").stat().st_size > 10_000
    assert "paired differences" in (tmp_path / "report.html").read_text()
    assert "quality of the self-generated training data" in (tmp_path / "report.html").read_text()
    assert (tmp_path / "subspaces" / "gradient-seed1" / "subspace.json").is_file()
    assert (tmp_path / "adapters" / "spd-seed0" / "train.json").is_file()
    again = run_experiment(config_from_dict(TINY), tmp_path)
    # A rerun does no work: the recorded stage costs stay those of the first call.
    assert set(metrics["stage_seconds"]) == {"extract", "generate", "train", "eval"}
    assert again["stage_seconds"] == metrics["stage_seconds"] and again["methods"] == metrics["methods"]


def test_spd_trains_on_projected_generations(tmp_path):
    run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["psr", "spd"]}), tmp_path)
    spd = [json.loads(line) for line in open(tmp_path / "generations" / "spd-seed0.jsonl")]
    psr = [json.loads(line) for line in open(tmp_path / "generations" / "psr-seed0.jsonl")]
    assert spd[0]["settings"]["projection"]["subspace_task"] == "arithmetic" and psr[0]["settings"]["projection"] is None
    assert [r["prompt_id"] for r in spd] == [r["prompt_id"] for r in psr]


def test_a_run_goes_seed_by_seed_so_a_stopped_one_has_whole_comparisons(tmp_path, monkeypatch):
    import spd_lens.experiment as experiment

    calls = []

    class Stop(Exception):
        pass

    def record(self, method, seed):
        calls.append((method, seed))
        if len(calls) == 6:
            raise Stop

    monkeypatch.setattr(experiment.Run, "evaluation", record)
    monkeypatch.setattr(experiment.Run, "metrics", lambda self: {})
    config = {**TINY, "seeds": [0, 1], "methods": ["base", "psr", "hook-only", "spd"]}
    with pytest.raises(Stop):
        run_experiment(config_from_dict(config), tmp_path)
    # Every method of seed 0 (the unseeded ones once) before any method of seed 1.
    assert calls == [("base", None), ("psr", 0), ("hook-only", None), ("spd", 0), ("psr", 1), ("spd", 1)]


def test_seeds_split_across_directories_join_into_one_run(tmp_path, capsys):
    """--seeds runs a subset of the config's seeds (one process or machine per seed, each with its
    own directory); the finished evaluations copied into one directory make the whole run."""
    import shutil

    config = tmp_path / "c.toml"
    config.write_text('seeds = [0, 1]\nmethods = ["base", "psr"]\n[model]\nname = "tiny"\n'
                      '[task]\ntrain_n = 4\neval_n = 3\n[sampling]\nmax_new_tokens = 4\n'
                      '[eval]\nmax_new_tokens = 4\n[train]\nepochs = 1\n')
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli(["run", str(config), "--out", str(first), "--seeds", "1"]) == 0
    assert sorted(p.name for p in (first / "eval").glob("*.json")) == ["base.json", "psr-seed1.json"]
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["methods"]["psr"]["missing_seeds"] == [0] and list(metrics["methods"]["psr"]["seeds"]) == ["1"]
    assert json.loads((first / "config.json").read_text())["seeds"] == [0, 1]  # the config is not narrowed
    assert cli(["run", str(config), "--out", str(second), "--seeds", "0", "--methods", "psr"]) == 0
    assert sorted(p.name for p in (second / "eval").glob("*.json")) == ["psr-seed0.json"]
    shutil.copy(second / "eval" / "psr-seed0.json", first / "eval" / "psr-seed0.json")
    capsys.readouterr()
    assert cli(["run", str(config), "--out", str(first)]) == 0
    assert "training psr" not in capsys.readouterr().out  # every seed was found finished
    metrics = json.loads((first / "metrics.json").read_text())
    assert sorted(metrics["methods"]["psr"]["seeds"]) == ["0", "1"] and "missing_seeds" not in metrics["methods"]["psr"]
    assert metrics["methods"]["psr"]["n"] == 6
    # Seeds the config lacks, a malformed list and a data gate split by seed are refused by name.
    assert cli(["run", str(config), "--out", str(first), "--seeds", "0,7"]) == 2
    assert "unknown: [7]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["run", str(config), "--seeds", "0,x"])
    assert "'0,x' is not a comma-separated list" in capsys.readouterr().err
    assert cli(["run", str(config), "--out", str(tmp_path / "gate"), "--seeds", "0", "--data-only"]) == 2
    assert "--data-only" in capsys.readouterr().err and not (tmp_path / "gate").exists()


def test_a_running_run_keeps_partial_metrics_that_summary_reads(tmp_path, monkeypatch, capsys):
    import spd_lens.experiment as experiment

    real = experiment.Run.evaluation

    def stop_at_hook_only(self, method, seed):
        if method == "hook-only":
            raise KeyboardInterrupt
        return real(self, method, seed)

    monkeypatch.setattr(experiment.Run, "evaluation", stop_at_hook_only)
    config = config_from_dict({**TINY, "seeds": [0], "methods": ["base", "hook-only"]})
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path / "run")
    partial = metrics_of(tmp_path / "run")
    assert list(partial["methods"]) == ["base"] and partial["pending"] == ["hook-only"]
    assert cli(["summary", f"now={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    assert "| method | now |" in out and "not finished: now (hook-only)" in out
    monkeypatch.undo()
    full = run_experiment(config, tmp_path / "run")
    assert full["pending"] == [] and list(full["methods"]) == ["base", "hook-only"]
    # Two columns (the same run under two labels): one row per method, one per paired difference.
    assert cli(["summary", f"a={tmp_path / 'run'}", f"b={tmp_path / 'run'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    base = full["methods"]["base"]
    cell = f"{base['score']:.3f} [{base['ci'][0]:.3f}, {base['ci'][1]:.3f}]"
    assert lines[0] == "| method | a | b |" and f"| base | {cell} | {cell} |" in lines
    difference = full["comparisons"]["hook-only - base"]["difference"]
    assert any(line.startswith(f"| hook-only - base | {difference:+.3f} [") for line in lines)
    assert not any("not finished" in line for line in lines)
    assert not any("before seed-aware intervals" in line for line in lines)
    older = tmp_path / "older"  # metrics written before intervals resampled seeds: said so
    older.mkdir()
    stripped = {**full, "methods": {k: {f: v for f, v in m.items() if f != "seed_spread"} for k, m in full["methods"].items()}}
    (older / "metrics.json").write_text(json.dumps(stripped))
    assert cli(["summary", str(older)]) == 0
    assert "older: metrics from before seed-aware intervals" in capsys.readouterr().out
    assert cli(["summary", str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    assert cli(["summary", f"a={tmp_path / 'run'}", f"a={tmp_path / 'run'}"]) == 2
    assert "two runs are labelled 'a'" in capsys.readouterr().err
    (tmp_path / "x=y").mkdir()  # a path holding "=" is a path, not a label
    assert cli(["summary", str(tmp_path / "x=y")]) == 2
    assert f"{tmp_path / 'x=y'}: no metrics.json" in capsys.readouterr().err
    (tmp_path / "gate").mkdir()  # a data gate (or an ablation) has no methods' metrics: report prints it
    (tmp_path / "gate" / "data_gate.json").write_text("{}")
    assert cli(["summary", str(tmp_path / "gate")]) == 2
    assert f"holds a data gate, which has no methods' metrics to tabulate: `spd-lens report {tmp_path / 'gate'}`" in \
        capsys.readouterr().err
    # Where the time went: the stages this run recorded.
    assert json.loads((tmp_path / "run" / "stage_seconds.json").read_text())["completed"]["eval"] > 0
    assert cli(["summary", "--time", f"r={tmp_path / 'run'}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| run | extract |") and lines[0].endswith("| eval | stopped calls | total (h) |")
    assert lines[2].startswith("| r |") and lines[3].startswith("| **total** |")


def test_time_table_counts_ablation_cells_and_each_run_of_a_sweep(tmp_path, capsys):
    from spd_lens.summary import stage_hours, time_table, timed_directories

    gate = tmp_path / "gate"
    gate.mkdir()
    (gate / "stage_seconds.json").write_text(json.dumps({"completed": {"extract": 360}, "interrupted": {}}))
    cells = [{"rank": 8, "seconds": 1800.0}, {"rank": 16, "seconds": 1800.0}, {"rank": 32}]  # the last from before timing
    (gate / "ablation.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cells) + '{"rank": 6')  # a torn line
    assert stage_hours(gate) == {"seconds": {"extract": 360.0, "ablate": 3600.0}, "interrupted": 0.0, "untimed_cells": 1,
                                 "copied_cells": 0}
    grown = tmp_path / "grown"  # a copy of the gate grown by one cell: only that cell is its own
    grown.mkdir()
    (grown / "ablation.jsonl").write_text((gate / "ablation.jsonl").read_text().rsplit("\n", 1)[0] + "\n"
                                          + json.dumps({"rank": 64, "seconds": 720.0}) + "\n")
    lines = time_table({"gate": gate, "grown": grown}).splitlines()
    assert lines[3] == "| grown (3 cells counted above) | 0.00 | 0.20 | 0.00 | 0.20 |"
    for lr, train in (("1e-3", 7200), ("1e-5", 3600)):
        run = tmp_path / "lr" / f"psr-lr{lr}"
        run.mkdir(parents=True)
        (run / "stage_seconds.json").write_text(json.dumps({"completed": {"train": train}, "interrupted": {"train": 900}}))
    (tmp_path / "lr" / "notes").mkdir()  # no record: not a row
    found = timed_directories([str(gate), f"sweep={tmp_path / 'lr'}"])
    assert list(found) == ["gate", "sweep/psr-lr1e-3", "sweep/psr-lr1e-5"]
    lines = time_table(found).splitlines()
    assert lines[0] == "| run | extract | train | ablate | stopped calls | total (h) |"
    assert lines[2] == "| gate (1 cell untimed) | 0.10 | 0.00 | 1.00 | 0.00 | 1.10 |"
    assert lines[3] == "| sweep/psr-lr1e-3 | 0.00 | 2.00 | 0.00 | 0.25 | 2.25 |"
    assert lines[5] == "| **total** | 0.10 | 3.00 | 1.00 | 0.50 | 4.60 |"
    assert "Untimed cells" in lines[-1]
    assert cli(["summary", "--time", str(tmp_path / "lr" / "notes")]) == 2
    assert "records no time" in capsys.readouterr().err


def test_a_run_directory_refuses_another_config(tmp_path):
    run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["base"]}), tmp_path)
    changed = {**TINY, "seeds": [0], "methods": ["base"], "task": {**TINY["task"], "eval_n": 6}}
    with pytest.raises(SpdLensError, match=r"another config \(differs in task.eval_n: run has 5, now 6\)"):
        run_experiment(config_from_dict(changed), tmp_path)


def test_run_cli_prints_the_table(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('methods = ["base", "hook-only"]\n[model]\nname = "tiny"\n[task]\neval_n = 3\n'
                      '[subspace]\nn = 2\n[eval]\nmax_new_tokens = 4\n')
    assert cli(["run", str(config), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "hook-only" in out and "report.html" in out
    assert cli(["run", str(tmp_path / "missing.toml")]) == 2
    # --methods runs a subset now; the same directory takes the rest later.
    assert cli(["run", str(config), "--out", str(tmp_path / "part"), "--methods", "base"]) == 0
    assert list(json.loads((tmp_path / "part" / "metrics.json").read_text())["methods"]) == ["base"]
    assert cli(["run", str(config), "--out", str(tmp_path / "part")]) == 0
    assert list(json.loads((tmp_path / "part" / "metrics.json").read_text())["methods"]) == ["base", "hook-only"]
    assert cli(["run", str(config), "--out", str(tmp_path / "part"), "--methods", "base,spd-magic"]) == 2
    assert "spd-magic" in capsys.readouterr().err
    assert cli(["run", str(config), "--out", str(tmp_path / "part"), "--methods", ","]) == 2
    assert "(none given)" in capsys.readouterr().err


def test_threads_option_sets_torch_threads_and_refuses_nonsense(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert cli(["--threads", "1", "tasks"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert cli(["--threads", "0", "tasks"]) == 2
    assert "--threads must be between 1" in capsys.readouterr().err


def test_multiple_choice_runs_count_each_answer(tmp_path, capsys):
    from spd_lens.experiment import format_table
    from spd_lens.tasks import get_task

    config = {**TINY, "seeds": [0], "methods": ["base"], "task": {"name": "family-mc", "train_n": 4, "eval_n": 6}}
    metrics = run_experiment(config_from_dict(config), tmp_path)
    answers = metrics["methods"]["base"]["answers"]
    assert sum(answers.values()) == 6 and set(answers) <= {"A", "B", "C", "D", "none"}
    # the counts agree with the task's own reading of each stored completion
    task = get_task("family-mc")
    examples = {e.id: e for e in task.examples("test", n=6, seed=0)}
    stored = json.loads((tmp_path / "eval" / "base.json").read_text())["results"]
    expected = {}
    for r in stored:
        letter = task.answer(examples[r["prompt_id"]], r["completion"]) or "none"
        expected[letter] = expected.get(letter, 0) + 1
    assert answers == expected
    assert "answers " in format_table(metrics)
    assert "share of each answer chosen" in (tmp_path / "report.html").read_text()
    assert "outcomes" not in metrics["methods"]["base"]  # multiple-choice failures are all of one kind
    # Label log-likelihood beside the generated letter, as asked and over rotated options.
    loglik = metrics["methods"]["base"]["loglik"]
    assert 0 <= loglik["accuracy"] <= 1 and 0 <= loglik["debiased_accuracy"] <= 1
    assert sum(loglik["choice_rates"].values()) == pytest.approx(1.0) and "log-likelihood" in format_table(metrics)
    math = run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["base"]}), tmp_path / "math")
    assert "answers" not in math["methods"]["base"] and "outcomes" not in math["methods"]["base"]


def test_code_runs_count_how_completions_fail(tmp_path):
    from spd_lens.experiment import format_table
    from spd_lens.tasks import get_task

    config = {**TINY, "seeds": [0], "methods": ["base"], "task": {"name": "humaneval", "train_n": 3, "eval_n": 3}}
    metrics = run_experiment(config_from_dict(config), tmp_path)
    kinds = metrics["methods"]["base"]["outcomes"]
    assert sum(kinds.values()) == 3 and kinds.get("passed", 0) == round(3 * metrics["methods"]["base"]["score"])
    task = get_task("humaneval")
    stored = json.loads((tmp_path / "eval" / "base.json").read_text())["results"]
    assert sorted(task.outcome(r["status"], r["detail"]) for r in stored) == sorted(
        k for k, v in kinds.items() for _ in range(v))
    assert "outcomes " in format_table(metrics)
    assert "share of each kind of result" in (tmp_path / "report.html").read_text()
    assert metrics["sandbox"]["runs"] == 3 and metrics["sandbox"]["unsafe_runs"] == 0  # how the code was isolated
    assert "code sandbox: " in format_table(metrics) and stored[0]["sandbox"]["read_only_root"]


def test_mc_answer_is_the_chosen_letter():
    from spd_lens.tasks import get_task

    task = get_task("family-mc")
    example = task.examples("test", n=1, seed=0)[0]
    assert task.answer(example, "The answer is C.") == "C"
    assert task.answer(example, "no idea") is None
    assert get_task("arithmetic").answer(example, "The answer is C.") is None


def metrics_of(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


def test_reuse_takes_only_evaluations_whose_settings_match(tmp_path, capsys):
    first = tmp_path / "first"
    run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["base", "psr"]}), first)
    # Another subspace task, same everything else: base and psr are taken over, spd is computed.
    other = {**TINY, "seeds": [0], "methods": ["base", "psr", "spd"], "subspace": {"n": 4, "task": "gsm-symbolic"}}
    second = run_experiment(config_from_dict(other), tmp_path / "second", reuse=[first])
    for stem in ("base", "psr-seed0"):
        record = json.loads((tmp_path / "second" / "eval" / f"{stem}.json").read_text())
        assert record["reused_from"] == str(first)
        assert record["results"] == json.loads((first / "eval" / f"{stem}.json").read_text())["results"]
    assert not (tmp_path / "second" / "adapters" / "psr-seed0").exists()
    assert (tmp_path / "second" / "adapters" / "spd-seed0").is_dir()
    assert "reused_from" not in json.loads((tmp_path / "second" / "eval" / "spd-seed0.json").read_text())
    # Another learning rate changes what psr is, not what base is.
    changed = {**TINY, "seeds": [0], "methods": ["base", "psr"], "train": {**TINY["train"], "lr": 5e-4}}
    run_experiment(config_from_dict(changed), tmp_path / "third", reuse=[first])
    assert "reused_from" in json.loads((tmp_path / "third" / "eval" / "base.json").read_text())
    assert "reused_from" not in json.loads((tmp_path / "third" / "eval" / "psr-seed0.json").read_text())
    assert cli(["compare", f"{tmp_path / 'second'}:spd", f"{first}:psr"]) == 0
    expected = metrics_of(tmp_path / "second")["methods"]["spd"]["score"] - metrics_of(first)["methods"]["psr"]["score"]
    assert f"{expected:+.3f}" in capsys.readouterr().out
    assert cli(["compare", f"{first}:spd", f"{first}:psr"]) == 2
    assert "no evaluation of 'spd'" in capsys.readouterr().err
    assert cli(["compare", "spd", f"{first}:psr"]) == 2
    with pytest.raises(SpdLensError, match="not a run directory"):
        run_experiment(config_from_dict(changed), tmp_path / "fourth", reuse=[tmp_path / "nowhere"])
    assert second["methods"]["base"]["score"] == json.loads((first / "metrics.json").read_text())["methods"]["base"]["score"]


def test_compare_names_the_questions_each_side_gets_right(tmp_path, capsys):
    def evaluation(run, stem, passed):
        (tmp_path / run / "eval").mkdir(parents=True, exist_ok=True)
        results = [{"prompt_id": f"Q/{i}", "passed": p} for i, p in enumerate(passed)]
        (tmp_path / run / "eval" / f"{stem}.json").write_text(json.dumps({"results": results}))

    evaluation("a", "spd-seed0", [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    evaluation("a", "spd-seed1", [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    evaluation("b", "base", [1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    assert cli(["compare", f"{tmp_path / 'a'}:spd", f"{tmp_path / 'b'}:base"]) == 0
    out = capsys.readouterr().out.splitlines()
    # Q/1 is right in one spd seed of two: still better than base's 0; numbers sort naturally
    assert out[1] == f"better in {tmp_path / 'a'}:spd (2): Q/1, Q/10"
    assert out[2] == f"better in {tmp_path / 'b'}:base (1): Q/2"
    assert out[3] == "solved by both (score 1 in each): 1"


def test_subset_runs_keep_every_method_in_the_metrics(tmp_path):
    config = {**TINY, "seeds": [0]}
    run_experiment(config_from_dict({**config, "methods": ["base", "psr"]}), tmp_path)
    later = run_experiment(config_from_dict({**config, "methods": ["hook-only"]}), tmp_path)
    assert list(later["methods"]) == ["base", "psr", "hook-only"]
    assert {"psr - base", "hook-only - base"} <= set(later["comparisons"])
    assert later["methods"]["psr"]["training_data"]["n"] == 6
    assert list(metrics_of(tmp_path)["methods"]) == ["base", "psr", "hook-only"]
    assert "hook-only" in (tmp_path / "report.html").read_text()


def test_reuse_decisions_are_logged_and_ignore_settings_without_effect(tmp_path):
    first = tmp_path / "first"
    run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["base", "psr"]}), first)
    logged = []
    # Checkpointing cannot change a result: psr is still reused. A changed eval budget blocks both.
    same = {**TINY, "seeds": [0], "methods": ["base", "psr"], "train": {**TINY["train"], "checkpoint_every": 7}}
    metrics = run_experiment(config_from_dict(same), tmp_path / "same", reuse=[first], log=logged.append)
    assert metrics["reuse"]["psr-seed0"] == {"reused": True, "from": str(first)}
    assert any(m == f"reusing psr-seed0 from {first}" for m in logged)
    other = {**TINY, "seeds": [0], "methods": ["base"], "eval": {"max_new_tokens": 6}}
    logged.clear()
    metrics = run_experiment(config_from_dict(other), tmp_path / "other", reuse=[first], log=logged.append)
    why = metrics["reuse"]["base"]["why"][str(first)]
    assert metrics["reuse"]["base"]["reused"] is False and why == ["eval.max_new_tokens: run has 8, now 6"]
    assert any("not reusing base" in m and "eval.max_new_tokens: run has 8, now 6" in m for m in logged)


def test_interrupted_stage_time_is_kept_apart(tmp_path, monkeypatch):
    import spd_lens.experiment as experiment

    config = config_from_dict({**TINY, "seeds": [0], "methods": ["base"]})

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment, "evaluate", broken)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, tmp_path)
    monkeypatch.undo()
    metrics = run_experiment(config, tmp_path)
    assert set(metrics["stage_seconds"]) == {"eval"} and set(metrics["stage_seconds_interrupted"]) == {"eval"}
    saved = json.loads((tmp_path / "stage_seconds.json").read_text())
    assert set(saved) == {"completed", "interrupted"}


def test_the_data_gate_generates_and_scores_training_data_and_trains_nothing(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('methods = ["base", "psr", "spd", "spd-random"]\nseeds = [0, 1]\n[model]\nname = "tiny"\n'
                      '[task]\ntrain_n = 5\n[subspace]\nn = 2\n[sampling]\nmax_new_tokens = 6\n')
    out = tmp_path / "run"
    assert cli(["run", str(config), "--out", str(out), "--data-only"]) == 0
    printed = capsys.readouterr().out
    assert "spd - psr" in printed and "data_gate.json" in printed
    gate = json.loads((out / "data_gate.json").read_text())
    assert list(gate["methods"]) == ["psr", "spd", "spd-random"]  # base trains nothing: not in the gate
    for method, quality in gate["methods"].items():
        assert quality["n"] == 10 and set(quality["seeds"]) == {"0", "1"}
        records = [json.loads(line) for seed in (0, 1)
                   for line in (out / "generations" / f"{method}-seed{seed}.jsonl").read_text().splitlines()]
        assert len(records) == 10
    assert set(gate["comparisons"]) == {"spd - psr", "spd - spd-random"}
    assert gate["comparisons"]["spd - psr"]["n"] == 10  # paired over the prompts both sampled (5 per seed)
    assert not (out / "adapters").exists() and not (out / "eval").exists()
    # A second call does no work and writes the same gate.
    before = {p: p.stat().st_mtime_ns for p in (out / "generations").iterdir()}
    assert cli(["run", str(config), "--out", str(out), "--data-only"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "generations").iterdir()} == before
    assert json.loads((out / "data_gate.json").read_text()) == gate
    # report recomputes the comparisons from the verdicts kept beside the data, generating nothing.
    (out / "data_gate.json").write_text(json.dumps({**gate, "comparisons": {}}))
    capsys.readouterr()
    assert cli(["report", str(out)]) == 0
    assert json.loads((out / "data_gate.json").read_text())["comparisons"] == gate["comparisons"]
    assert "spd - spd-random" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "generations").iterdir()} == before
    (out / "generations" / "spd-seed1.quality.json").unlink()
    assert cli(["report", str(out)]) == 2
    assert "spd-seed1.quality.json is missing" in capsys.readouterr().err


def test_the_data_gate_does_not_read_the_evaluation_split(tmp_path):
    # A preset whose test split holds fewer questions than eval_n (Gemma's easy arithmetic: 43) can
    # still have its training data sampled; only evaluating it asks for eval_n questions.
    config = config_from_dict({**TINY, "seeds": [0], "methods": ["psr"],
                               "task": {**TINY["task"], "preset": "easy", "eval_n": 44}})
    assert Run(config, tmp_path).data_gate()["methods"]["psr"]["n"] == 6
    assert "eval" not in json.loads((tmp_path / "inputs.json").read_text())["data"]
    with pytest.raises(SpdLensError, match="only 43 test examples, but n=44 were asked for"):
        run_experiment(config, tmp_path)  # evaluating still needs the questions
    # The same directory then takes a size the split holds: only an evaluation reads it, and
    # nothing here was evaluated; the gate's samples are reused, not drawn again.
    before = (tmp_path / "generations" / "psr-seed0.jsonl").read_bytes()
    fixed = config_from_dict({**TINY, "seeds": [0], "methods": ["psr"],
                              "task": {**TINY["task"], "preset": "easy", "eval_n": 43}})
    assert run_experiment(fixed, tmp_path)["pending"] == []
    assert (tmp_path / "generations" / "psr-seed0.jsonl").read_bytes() == before
    # Once evaluated, the evaluation's size is part of the run again.
    with pytest.raises(SpdLensError, match="differs in task.eval_n: run has 43, now 40"):
        run_experiment(config_from_dict({**TINY, "seeds": [0], "methods": ["psr"],
                                         "task": {**TINY["task"], "preset": "easy", "eval_n": 40}}), tmp_path)


def test_a_directory_being_written_refuses_a_second_run_at_once(tmp_path):
    from spd_lens.ablate import run_ablation
    from spd_lens.artifacts import exclusive

    config = config_from_dict({**TINY, "seeds": [0], "methods": ["base"]})
    with exclusive(tmp_path / "run", "run"):  # another process writing there (a second lock holder alike)
        with pytest.raises(SpdLensError, match=r"being written by another spd-lens process \(run on the same directory\)"):
            run_experiment(config, tmp_path / "run")
        with pytest.raises(SpdLensError, match="being written by another"):
            Run(config_from_dict({**TINY, "seeds": [0], "methods": ["psr"]}), tmp_path / "run").data_gate()
        ablation = config_from_dict({**TINY, "seeds": [0], "ablate": {"ranks": [2], "layer_sets": [[1]]}})
        with pytest.raises(SpdLensError, match="being written by another"):
            run_ablation(ablation, tmp_path / "run")
    assert not (tmp_path / "run" / "config.json").exists()  # refused before anything was written
    assert run_experiment(config, tmp_path / "run")["pending"] == []  # released: the run goes on
    assert run_experiment(config, tmp_path / "run")["pending"] == []  # and is released again after it
