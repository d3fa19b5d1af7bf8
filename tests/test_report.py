"""The run report (`RUN/report.html`): what ran, a plain verdict per comparison, the table as HTML
with cut-off warnings, example completions, figures that draw in a real browser, a small page."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch

from spd_lens.report import comparison_sentence, format_table, write_run_report

WEIGHTS = "smollm2-135m-instruct:9f0c2e5a"


def _method(score, n=30, length=0, seeds=None, **extra):
    return {"score": score, "ci": [max(0.0, score - 0.1), min(1.0, score + 0.1)], "n": n, "questions": 30,
            "seeds": seeds or {}, "seed_spread": 0.0, "finish_reasons": {"length": length, "stop": n - length}, **extra}


def make_run(directory):
    """A finished run's files as `spd-lens run` writes them: metrics, config, evaluations with their
    completions, one gradient subspace."""
    from spd_lens.subspace import CapabilitySubspace

    directory.mkdir(parents=True, exist_ok=True)
    training = {"correct": 0.2, "cut_off": 0.3, "n": 30, "mean_tokens": 20.5, "finish_reasons": {"length": 9, "stop": 21}}
    metrics = {
        "run": "demo-like", "task": "arithmetic", "subspace_task": "arithmetic", "model": "tiny",
        "runtime": {"device": "cpu", "dtype": "float32"},
        "methods": {"base": _method(0.1), "psr": _method(0.2, length=1, seeds={"0": {"score": 0.2, "ci": [0.1, 0.3], "n": 30}},
                                                       training_data={**training, "cut_off": 0.05}),
                    "spd": _method(1 / 3 + 0.2, length=5, seeds={"0": {"score": 0.533, "ci": [0.4, 0.7], "n": 30}},
                                   training_data=training, outcomes={"passed": 16, "wrong": 14})},
        "comparisons": {"spd - psr": {"difference": 1 / 30, "ci": [0.0, 0.1], "n": 30, "seed_spread": 0.0},
                        "spd - base": {"difference": 13 / 30, "ci": [0.3, 0.55], "n": 30, "seed_spread": 0.0},
                        "psr - base": {"difference": 0.1, "ci": [-0.05, 0.2], "n": 30, "seed_spread": 0.0}},
        "pending": [], "stage_seconds": {"extract": 4.0, "generate": 50.0, "train": 230.0, "eval": 70.0},
        "config_hash": "91a0cfd208f3", "spd_lens_version": "0.1.0", "finished": "2026-12-07T16:18:41Z"}
    (directory / "metrics.json").write_text(json.dumps(metrics))
    (directory / "inputs.json").write_text(json.dumps({
        "runtime": {"device": "cpu", "dtype": "float32"}, "evaluation_runtime": {"device": "cpu", "dtype": "float32"},
        "weights": WEIGHTS, "data": {"eval": "5a3e2fb681ecb2e6", "train": {"0": "79051ceab8dec70a"}}}))
    (directory / "config.json").write_text(json.dumps({"seeds": [0], "task": {"name": "arithmetic", "data": None,
                                                                             "train_n": 30, "eval_n": 30},
                                                         "eval": {"temperature": 0.0, "max_new_tokens": 64,
                                                                  "batch_size": 16}}))
    (directory / "eval").mkdir(exist_ok=True)
    for stem, rows in {"base": [(True, "stop"), (False, "stop")],
                       "spd-seed0": [(False, "length"), (True, "stop"), (False, "stop")]}.items():
        results, records = [], []
        for i, (passed, reason) in enumerate(rows):
            prompt_id = f"arithmetic/test/0/{i}"
            completion = f"{stem} <b>answer</b> {i}" + (" and on and on" if reason == "length" else "")
            results.append({"prompt_id": prompt_id, "passed": passed, "status": "passed" if passed else "failed",
                            "completion": completion, "detail": "" if passed else "wrong number", "finish_reason": reason})
            records.append({"prompt_id": prompt_id, "finish_reason": reason,
                            "messages": [{"role": "user", "content": f"What is {i} + 1?"},
                                         {"role": "assistant", "content": completion}],
                            "settings": {"prompts_sha256": "7f15fb2e4cc7d9f0", "n_prompts": 3, "num_samples": 1}})
        (directory / "eval" / f"{stem}.json").write_text(json.dumps({"results": results}))
        (directory / "eval" / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    generator = torch.Generator().manual_seed(0)
    grams = {}
    for kind in ("k", "v"):
        a = torch.randn(16, 40, generator=generator, dtype=torch.float64)
        grams[(3, kind)] = a @ a.T
    CapabilitySubspace.from_grams(grams, {"n_kv_heads": 2, "model_id": "tiny", "layers": [3]}).save(
        directory / "subspaces" / "gradient-seed0")
    return directory


def test_a_one_question_difference_reads_as_unresolved():
    sentence = comparison_sentence("spd - psr", {"difference": 1 / 30, "ci": [0.0, 0.1], "n": 30})
    assert sentence == ("spd scored 0.033 above psr, not resolved: the 95% interval [+0.000, +0.100] includes no "
                        "difference (1 question of 30)")
    assert comparison_sentence("spd - base", {"difference": -0.2, "ci": [-0.3, -0.1], "n": 50}) == (
        "spd scored 0.200 below base, resolved: the 95% interval [-0.300, -0.100] lies below zero (10 questions of 50)")
    several = comparison_sentence("spd - psr", {"difference": 0.05, "ci": [0.01, 0.09], "n": 100, "seeds_differ": True,
                                                "seed_p": 0.001}, seeds=3)
    assert "lies above zero (5.0 questions of 100 on average over 3 seeds)" in several
    assert several.endswith("more seeds are needed before reading it")
    # A bootstrap bound a rounding error above zero is no resolution.
    assert "not resolved" in comparison_sentence("a - b", {"difference": 0.0, "ci": [1e-17, 0.1], "n": 10})


def test_report_says_what_ran_and_what_it_found(tmp_path):
    run = make_run(tmp_path / "run")
    logged = []
    path = write_run_report(run, images=True, log=logged.append)
    page = path.read_text()
    assert path.stat().st_size < 1_000_000 and (run / "plotly.min.js").stat().st_size > 1_000_000
    assert page.count("<script src='plotly.min.js'") == 1 and "cdn.plot.ly" not in page
    # what ran: model and its weights id, task and data with the recorded hashes, methods, seeds, runtime
    ran = page[page.index("What ran"):page.index("Verdicts")]
    for text in ("tiny; weights smollm2-135m-instruct:9f0c2e5a (inputs.json)", "arithmetic (train 30, eval 30",
                 "examples sha256: eval 5a3e2fb681ecb2e6; train seed 0 79051ceab8dec70a",
                 "temperature 0.0, max_new_tokens 64, cut_off score", "prompts_sha256 7f15fb2e4cc7d9f0",
                 "tensors_sha256", "base, psr, spd", "device cpu, dtype float32", "5.9 min of stage time",
                 "config_hash 91a0cfd208f3"):
        assert text in ran, text
    # one sentence per comparison, the one-question difference unresolved
    verdicts = re.findall(r"<li class='(\w+)'>([^<]*)</li>", page[page.index("Verdicts"):page.index("Per method")])
    assert len(verdicts) == 3
    assert verdicts[0] == ("unresolved", "spd scored 0.033 above psr, not resolved: the 95% interval [+0.000, +0.100] "
                                         "includes no difference (1 question of 30).")
    assert verdicts[1][0] == "resolved" and "13 questions of 30" in verdicts[1][1]
    # the table is HTML, with both cut-off shares, and a warning above it for the methods above 10%
    warning = page[page.index("id='cut-off-warning'"):page.index("<table id='methods'")]
    assert "spd: 17% of the evaluation completions and 30% of the training data completions" in warning
    assert "psr" not in warning and "base" not in warning
    row = re.search(r"<tr><th>spd</th>(.*?)</tr>", page).group(1)
    assert "<td class='num cut'>17%</td>" in row and "<td class='num cut'>30%</td>" in row and ">20%<" in row
    assert "<pre>method" not in page and "install" not in page.lower() and "kaleido" not in page
    # examples: right, wrong and cut off, escaped, with their prompts
    assert re.findall(r"data-kind='([^']+)'", page) == ["right", "wrong", "right", "wrong", "cut off"]
    assert "spd-seed0 &lt;b&gt;answer&lt;/b&gt; 0 and on and on" in page and "What is 0 + 1?" in page
    assert "No completion of this evaluation was cut off." in page  # base
    assert "No evaluation records of psr kept in RUN/eval/" in page  # psr keeps none here
    # figures: scores from zero, comparisons, the spectra, outcomes, training data; none taller than a screen
    assert len(re.findall(r"<div id=\"figure-\d+\"", page)) == 6
    assert all(int(h) <= 900 for h in re.findall(r'style="height:(\d+)px', page))
    assert len(logged) == 1  # what the image export did is logged, never written into the page
    # plotly.js is written once: a second report leaves the file as it was
    before = (run / "plotly.min.js").stat().st_mtime_ns
    time.sleep(0.01)
    write_run_report(run, log=logged.append)
    assert (run / "plotly.min.js").stat().st_mtime_ns == before
    assert len(logged) == 1  # images only when asked for: a run rewrites its report after each evaluation
    cdn = write_run_report(run, plotly="cdn", images=False).read_text()
    assert re.search(r"<script src='https://cdn.plot.ly/plotly-[\d.]+\.min\.js'", cdn)
    assert write_run_report(run, plotly="inline", images=False).stat().st_size > 3_000_000
    from spd_lens import SpdLensError

    with pytest.raises(SpdLensError, match="plotly='svg': use one of file, cdn, inline"):
        write_run_report(run, plotly="svg")


def test_run_table_warns_of_cut_off_answers():
    metrics = json.loads(json.dumps({"methods": {"a": _method(0.5, n=10, length=2), "b": _method(0.5, n=10, length=1)}}))
    lines = [line for line in format_table(metrics).splitlines() if line.startswith("!")]
    assert lines == ["! a: 20% of the evaluation completions cut off at the token budget (above 10%): raise "
                     "max_new_tokens or read its scores with care"]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("no Chromium on this CI machine: `bash run.sh test` installs it (apt-get install chromium); "
                    "the report's browser check needs it")
    pytest.skip("no Chromium here (apt-get install chromium, or bash run.sh test, which installs it)")


def load_in_chromium(page, timeout: float = 90) -> tuple[str, list[str]]:
    """The page's DOM after its scripts ran, in a headless Chromium, and the console messages it logged."""
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=15000",
         f"--user-data-dir={page.parent / '.chromium'}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


def test_report_loads_without_errors_and_every_figure_draws_in_a_browser(tmp_path):
    run = make_run(tmp_path / "run")
    page = write_run_report(run, images=False)
    started = time.time()
    dom, console = load_in_chromium(page)
    assert not console, f"console messages while loading the report: {console}"
    figures = re.split(r'<div class="figure">', dom)[1:]
    assert len(figures) == 6
    for i, figure in enumerate(figures, start=1):
        assert 'class="main-svg"' in figure, f"figure {i} did not draw"
        drawn = re.findall(r'class="(?:trace|point|bars|scatterlayer|barlayer)[^"]*"', figure)
        assert len(drawn) >= 2, f"figure {i} has no traces drawn"
    assert "What ran" in dom and time.time() - started < 90
    # The same check catches a page whose plotly.js is missing: a console error, no figure drawn.
    (run / "plotly.min.js").unlink()
    dom, console = load_in_chromium(page)
    assert any("Plotly is not defined" in line for line in console) and 'class="main-svg"' not in dom
