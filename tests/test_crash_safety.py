"""Crash safety: runs killed with SIGKILL (or torn mid-write) and started again finish with the
results of an uninterrupted run, with no duplicated or missing records."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from spd_lens import get_task
from spd_lens.cli import main as cli
from spd_lens.models import load_hf
from spd_lens.sampling import SamplingConfig, generate_jsonl
from tests.helpers import adapter_tensors, kill_when, read_records


def tiny():
    return load_hf("tiny")


def _train_command(data, out, *extra):
    return [sys.executable, "-m", "spd_lens.cli", "train", "--model", "tiny", "--data", str(data), "--out", str(out),
            "--lr", "5e-3", "--epochs", "6", "--batch-size", "2", "--checkpoint-every", "2", *extra]


def test_resume_after_a_torn_write_gives_the_uninterrupted_result(tmp_path):
    model, tokenizer = tiny()
    examples = get_task("arithmetic").examples("train", n=7, seed=0)
    config = SamplingConfig(temperature=1.0, max_new_tokens=6, num_samples=2, seed=1, batch_size=2)
    full = read_records(generate_jsonl(model, tokenizer, examples, tmp_path / "full.jsonl", config, task="arithmetic"))
    # A run killed while writing its third batch: two whole batches, then half a line.
    text = open(tmp_path / "full.jsonl").read()
    lines = text.splitlines(keepends=True)
    (tmp_path / "cut.jsonl.partial").write_text("".join(lines[:9]) + lines[9][: len(lines[9]) // 2])
    resumed = read_records(generate_jsonl(model, tokenizer, examples, tmp_path / "cut.jsonl", config, task="arithmetic"))
    assert resumed == full
    # Running again over a finished file changes nothing.
    again = read_records(generate_jsonl(model, tokenizer, examples, tmp_path / "cut.jsonl", config, task="arithmetic"))
    assert again == full


def test_killed_cli_run_resumes_to_exactly_nread_records(tmp_path):
    out = tmp_path / "k.jsonl"
    command = [sys.executable, "-m", "spd_lens.cli", "generate", "--model", "tiny", "--task", "arithmetic", "--n", "40",
               "--batch-size", "2", "--max-new-tokens", "48", "--temperature", "0.8", "--out", str(out)]
    partial = tmp_path / "k.jsonl.partial"
    killed = kill_when(command, lambda: partial.exists() and partial.stat().st_size > 0)
    assert killed, "the run finished before it could be killed; make it longer"
    assert not out.exists()  # an interrupted run is never presented as complete
    assert cli(command[3:]) == 0
    records = read_records(out)
    keys = [(r["prompt_id"], r["sample_index"]) for r in records]
    assert len(records) == 40 and len(set(keys)) == 40
    uninterrupted = tmp_path / "u.jsonl"
    assert cli([*command[3:-1], str(uninterrupted)]) == 0
    assert [r["messages"] for r in records] == [r["messages"] for r in read_records(uninterrupted)]


def test_sigterm_ends_a_run_as_ctrl_c_would_and_it_resumes(tmp_path):
    """kill (or a scheduler's preemption) sends SIGTERM: the stopped call's time is recorded as
    stopped, the evaluation it was making is not presented as finished, and running again finishes it."""
    config = tmp_path / "c.toml"
    config.write_text('methods = ["base"]\n[model]\nname = "tiny"\n[task]\neval_n = 60\n'
                      '[eval]\nmax_new_tokens = 48\nbatch_size = 2\n')
    run = tmp_path / "run"
    status = []
    stopped = kill_when([sys.executable, "-m", "spd_lens.cli", "run", str(config), "--out", str(run)],
                        lambda: any((run / "eval").glob("*partial*")), sig=signal.SIGTERM, returncode=status)
    assert stopped, "the run finished before it could be stopped; make it longer"
    assert status == [128 + signal.SIGTERM]
    recorded = json.loads((run / "stage_seconds.json").read_text())
    assert recorded["interrupted"]["eval"] > 0 and "eval" not in recorded["completed"]
    assert not (run / "eval" / "base.json").exists()
    assert cli(["run", str(config), "--out", str(run)]) == 0
    assert (run / "eval" / "base.json").is_file()


# MKL's matrix products may round differently with the arrays' alignment in memory, which differs
# from process to process; Adam magnifies such 1e-7 gradient differences on near-zero gradients into
# 1e-5 weight differences (measured: 3-5e-5 between MKL code paths). Its reproducible mode takes
# alignment out, so the runs compare bit for bit on one machine.
REPRODUCIBLE_BLAS = {**os.environ, "MKL_CBWR": "AUTO,STRICT"}


def test_killed_training_resumes_to_the_same_adapter_tensors(tmp_path, data):
    train = lambda out: subprocess.run(_train_command(data, out), capture_output=True, env=REPRODUCIBLE_BLAS)
    assert train(tmp_path / "straight").returncode == 0
    checkpoints = tmp_path / "killed" / "checkpoints"
    was_running = kill_when(_train_command(data, tmp_path / "killed"),
                            lambda: any((c / "complete").exists() for c in checkpoints.glob("step-*")),
                            env=REPRODUCIBLE_BLAS)
    assert was_running, "training finished before it could be killed"
    assert not (tmp_path / "killed" / "train.json").exists()
    assert train(tmp_path / "killed").returncode == 0
    straight, resumed = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    # Rounding noise stays under 1e-4 even where the reproducible mode does not reach; a resume that
    # lost the RNG state (other dropout masks) differs by 1e-2.
    for key in straight:
        assert torch.allclose(straight[key], resumed[key], rtol=0, atol=2e-4), key
    # The loss history spans the resume: one loss per optimizer step, equal to the uninterrupted run's.
    straight_meta = json.loads((tmp_path / "straight" / "train.json").read_text())
    resumed_meta = json.loads((tmp_path / "killed" / "train.json").read_text())
    assert resumed_meta["resumed_at_step"] > 0 and len(resumed_meta["loss_history"]) == resumed_meta["steps"]
    assert resumed_meta["loss_history"] == pytest.approx(straight_meta["loss_history"], abs=1e-5)


