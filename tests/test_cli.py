"""The command line as a user meets it: every option explained, --methods held to the config,
and Ctrl-C / SIGTERM ending any command with one line that says how to go on."""

import argparse
import json
import signal
import subprocess
import sys
import time

import pytest

from spd_lens.cli import build_parser
from spd_lens.cli import main as cli
from spd_lens.cli.stopping import partial_records


def _options(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, argparse._HelpAction):
            yield path, "/".join(action.option_strings) or action.dest, action.help


def test_every_option_of_every_command_has_help_text():
    options = list(_options(build_parser(), "spd-lens"))
    assert len(options) > 100 and any(p == "spd-lens eval" for p, _, _ in options)
    missing = [f"{path} {name}" for path, name, text in options if not text or not text.strip()
               or text == argparse.SUPPRESS]
    assert not missing, f"options without help text: {missing}"


CONFIG = ('methods = ["base", "hook-only"]\n[model]\nname = "tiny"\n[task]\neval_n = 3\n'
          '[subspace]\nn = 2\n[eval]\nmax_new_tokens = 4\n')


def test_methods_outside_the_config_are_refused_by_name(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(CONFIG)
    assert cli(["run", str(config), "--out", str(tmp_path / "run"), "--methods", "base,spd"]) == 2
    err = capsys.readouterr().err
    assert "spd not among the methods of" in err and "(base, hook-only)" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran
    with pytest.raises(SystemExit):
        cli(["run", "--help"])
    assert "does not list is refused" in " ".join(capsys.readouterr().out.split())


def _stderr_lines(text: str) -> list[str]:
    """What a reader sees: progress bars redraw with carriage returns, blank redraws dropped."""
    return [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines() if line.rsplit("\r", 1)[-1].strip()]


def _stop(command: list[str], partial, sig, after: int, timeout: float = 180) -> tuple[int, list[str], str]:
    """Run `command`, send `sig` once `partial` holds more than `after` records; its exit status,
    stderr lines and stdout."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and partial_records(partial)[0] <= after:
        time.sleep(0.02)
    assert process.poll() is None, "the command ended before it could be stopped; make it longer"
    process.send_signal(sig)
    out, err = process.communicate(timeout=timeout)
    return process.returncode, _stderr_lines(err), err


def test_ctrl_c_and_sigterm_end_a_run_with_one_line_and_it_resumes(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('methods = ["base"]\n[model]\nname = "tiny"\n[task]\neval_n = 60\n'
                      '[eval]\nmax_new_tokens = 48\nbatch_size = 2\n')  # long enough to be stopped part way
    run = tmp_path / "run"
    command = [sys.executable, "-m", "spd_lens.cli", "run", str(config), "--out", str(run)]
    resume = f"rerun `spd-lens run {config} --out {run}` to resume"
    generations = run / "eval" / "base.jsonl"

    code, lines, err = _stop(command, generations, signal.SIGINT, after=1)
    assert code == 130 and "Traceback" not in err
    stopped = [line for line in lines if "stopped" in line]
    assert len(stopped) == 1 and stopped[0] == lines[-1], err
    assert stopped[0].startswith("spd-lens run: stopped by Ctrl-C (SIGINT); kept: 0/1 evaluations finished, ")
    first = partial_records(generations)[0]
    assert f"{first}/60 records of eval/base.jsonl" in stopped[0] and stopped[0].endswith(resume)
    kept = open(str(generations) + ".partial").read().splitlines()[:first]

    # Run again: it goes on from the kept records, and SIGTERM ends it the same way.
    code, lines, err = _stop(command, generations, signal.SIGTERM, after=first + 1)
    assert code == 143 and "Traceback" not in err
    assert lines[-1].startswith("spd-lens run: stopped by SIGTERM; kept: 0/1 evaluations finished, ")
    assert sum("stopped" in line for line in lines) == 1 and lines[-1].endswith(resume)
    again = open(str(generations) + ".partial").read().splitlines()
    assert len(again) > first and again[:first] == kept  # resumed, not started over
    assert f"{len(again)}/60 records of eval/base.jsonl" in lines[-1]


def test_a_command_that_keeps_nothing_says_so(monkeypatch, capsys):
    import spd_lens.cli.explore as explore

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(explore, "cmd_tasks", interrupted)
    assert cli(["tasks"]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["spd-lens tasks: stopped by Ctrl-C (SIGINT); nothing was kept; rerun `spd-lens tasks` to start again"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed exception, as shown
def test_a_ctrl_c_that_a_destructor_swallows_still_stops_the_command(monkeypatch, capsys):
    import spd_lens.cli.explore as explore
    from spd_lens.cli import stopping
    from spd_lens.cli.common import progress_labelled

    class Closing:
        def __del__(self):  # Python only prints a KeyboardInterrupt raised here ("Exception ignored")
            signal.raise_signal(signal.SIGINT)

    steps = []

    def command(args):
        for step in progress_labelled("steps")(range(5)):
            steps.append(step)
            if step == 1:
                Closing()  # dropped at once: the signal arrives inside its destructor
        return 0

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(stopping, "_pending", None)
    monkeypatch.setattr(explore, "cmd_tasks", command)
    try:
        stopping.stop_on_signals()  # what the console command installs
        assert cli(["tasks"]) == 130
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert steps == [0, 1]  # ended at the next step, not run to the end
    assert "spd-lens tasks: stopped by Ctrl-C (SIGINT)" in capsys.readouterr().err


def test_summary_prints_and_warns_of_cut_off_answers(tmp_path, capsys):
    run = {"run": "r", "task": "arithmetic", "model": "tiny",
           "methods": {"base": {"score": 0.1, "ci": [0.0, 0.2], "n": 30, "seeds": {}, "seed_spread": 0.0,
                                "finish_reasons": {"length": 3, "stop": 27}},
                       "spd": {"score": 0.2, "ci": [0.1, 0.3], "n": 30, "seeds": {}, "seed_spread": 0.0,
                               "finish_reasons": {"length": 4, "stop": 26},
                               "training_data": {"correct": 0.2, "cut_off": 0.25, "n": 30, "mean_tokens": 9.0}}},
           "comparisons": {}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.json").write_text(json.dumps(run))
    assert cli(["summary", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "| base | 0.100 [0.000, 0.200] |" in out
    warnings = [line for line in out.splitlines() if "cut off at the token budget" in line]
    # base: 10% exactly is not above the line; spd: 13% of its evaluation, 25% of its training data
    assert len(warnings) == 1 and warnings[0].startswith("! r: spd: 13% of the evaluation completions and 25% of "
                                                         "the training data completions")
