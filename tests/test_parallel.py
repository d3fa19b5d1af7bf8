"""Data-parallel generation, evaluation and extraction: two CPU processes (torchrun, gloo) give
record for record what one process gives, and the Gram matrices they sum equal one process's."""

import json
import os
import subprocess
import sys

import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.cli import main as cli
from spd_lens.processes import Processes
from spd_lens.subspace import CapabilitySubspace
from spd_lens.tasks.records import read_jsonl

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def _twice(arguments: list[str]) -> subprocess.CompletedProcess:
    # "--": torchrun would otherwise take --n for an abbreviation of one of its own options
    command = [TORCHRUN, "--nproc_per_node", "2", "-m", "spd_lens.cli", "--", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode:
        # Each rank's own last lines: the one that crashed first is not the one whose error ends stderr.
        ranks = {}
        for line in result.stderr.splitlines():
            if line.startswith("[rank"):
                ranks.setdefault(line.split("]")[0] + "]", []).append(line)
        # A rank that failed with spd-lens's own error message prints it without the prefix.
        plain = [line for line in result.stderr.splitlines() if not line.startswith("[rank") and "it/s]" not in line]
        report = "\n".join("\n".join(lines[-25:]) for lines in ranks.values()) + "\n--- other stderr ---\n" + \
            "\n".join(plain[-30:])
        raise AssertionError(f"torchrun exited with {result.returncode}:\n{report}\n--- stdout ---\n{result.stdout[-1500:]}")
    return result


def test_two_processes_generate_and_evaluate_what_one_does(tmp_path):
    generate = ["generate", "--model", "tiny", "--task", "arithmetic", "--n", "7", "--max-new-tokens", "6",
                "--temperature", "1.0", "--top-k", "20", "--top-p", "0.8", "--num-samples", "2", "--batch-size", "2"]
    assert cli([*generate, "--out", str(tmp_path / "one.jsonl")]) == 0
    result = _twice([*generate, "--out", str(tmp_path / "two.jsonl")])
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert result.stdout.count("completions in") == 1  # said once, by the main process
    assert not list(tmp_path.glob("two.jsonl.*"))  # no part left behind
    evaluate = ["eval", "--model", "tiny", "--task", "arithmetic", "--n", "5", "--max-new-tokens", "6", "--batch-size", "2"]
    assert cli([*evaluate, "--out", str(tmp_path / "one.json")]) == 0
    _twice([*evaluate, "--out", str(tmp_path / "two.json")])
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert one["results"] == two["results"] and one["score"] == two["score"]


def test_two_processes_resume_the_parts_of_an_interrupted_run(tmp_path):
    generate = ["generate", "--model", "tiny", "--task", "arithmetic", "--n", "6", "--max-new-tokens", "5",
                "--batch-size", "2"]
    assert cli([*generate, "--out", str(tmp_path / "one.jsonl")]) == 0
    records = read_jsonl(tmp_path / "one.jsonl")
    # A one-process run stopped after three prompts, then a part of a three-process run
    (tmp_path / "two.jsonl.partial").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    (tmp_path / "two.jsonl.rank2.partial").write_text(json.dumps(records[5]) + "\n")
    _twice([*generate, "--out", str(tmp_path / "two.jsonl")])
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.jsonl", "two.jsonl"]


def test_two_processes_sum_the_gram_matrices_of_one(tmp_path):
    extract = ["extract", "--model", "tiny", "--task", "arithmetic", "--n", "10", "--batch-size", "3",
               "--layers", "1,3", "--rank", "4"]
    threads = torch.get_num_threads()
    try:  # one thread, as torchrun gives each process: the same float32 gradients batch for batch
        assert cli(["--threads", "1", *extract, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    result = _twice([*extract, "--out", str(tmp_path / "two")])
    assert result.stdout.count('"n_rows"') == 1
    one, two = CapabilitySubspace.load(tmp_path / "one"), CapabilitySubspace.load(tmp_path / "two")
    assert one.meta["n_rows"] == two.meta["n_rows"] and two.meta["processes"] == 2
    # The same batches on one thread each: only the order of the float64 sums differs.
    for key, gram in one.grams.items():
        assert torch.allclose(gram, two.grams[key], rtol=1e-12, atol=1e-15 * float(gram.abs().max())), key


def test_a_place_among_processes_is_checked():
    assert Processes(rank=1, world=3).shard(7) == [1, 4]
    with pytest.raises(SpdLensError, match="process rank 2 of 2 is not a valid place"):
        Processes(rank=2, world=2)


def test_a_whole_run_on_two_processes(tmp_path):
    config = tmp_path / "two.toml"
    config.write_text("""name = "two"
seeds = [0]
methods = ["base", "psr", "spd"]
[model]
name = "tiny"
[task]
name = "arithmetic"
train_n = 6
eval_n = 5
[subspace]
n = 8
batch_size = 2
[sampling]
max_new_tokens = 6
batch_size = 2
[eval]
max_new_tokens = 6
batch_size = 2
[train]
epochs = 1
batch_size = 2
""")
    assert cli(["run", str(config), "--out", str(tmp_path / "one")]) == 0
    result = _twice(["run", str(config), "--out", str(tmp_path / "two")])
    assert result.stdout.count("metrics:") == 1  # the table and paths, once
    one, two = tmp_path / "one", tmp_path / "two"
    # What depends only on the base model is what one process makes; training shares the global
    # batch out over two processes, whose LoRA dropout masks differ, so what follows it may differ.
    for name in ("generations/psr-seed0.jsonl", "generations/spd-seed0.jsonl", "eval/base.jsonl"):
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    metrics = json.loads((two / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"base", "psr", "spd"}
    assert json.loads((two / "adapters" / "spd-seed0" / "train.json").read_text())["processes"] == 2
    assert not [p for p in two.rglob("*") if p.name.endswith((".partial", ".tmp"))]


def test_scoring_is_divided_between_processes(monkeypatch):
    """Two processes (threads here, with all_gather played by a barrier) each score every other
    record, and both return the whole result, equal to one process's."""
    import threading

    from spd_lens.evaluate import score_records
    from spd_lens.tasks import get_task

    task = get_task("arithmetic")
    examples = task.examples("test", n=7, seed=0)
    records = [{"prompt_id": e.id, "completion": e.reference if i % 2 else "The answer is 0."}
               for i, e in enumerate(examples)]
    one = score_records(task, {e.id: e for e in examples}, records)
    box, barrier, scored_by = {}, threading.Barrier(2), {}
    real_score = task.score

    def gather(self, value):
        box[self.rank] = value
        barrier.wait()
        return [box[0], box[1]]

    def score(example, completion):
        scored_by.setdefault(threading.current_thread().name, []).append(example.id)
        return real_score(example, completion)

    monkeypatch.setattr(Processes, "gather", gather)
    monkeypatch.setattr(task, "score", score)
    results = {}

    def run(rank):
        results[rank] = score_records(task, {e.id: e for e in examples}, records, processes=Processes(rank, 2))

    threads = [threading.Thread(target=run, args=(rank,), name=f"rank{rank}") for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scored_by == {"rank0": [records[i]["prompt_id"] for i in (0, 2, 4, 6)],
                         "rank1": [records[i]["prompt_id"] for i in (1, 3, 5)]}
    for rank in (0, 1):
        assert results[rank].results == one.results and results[rank].score == one.score


def test_every_process_reaches_the_last_barrier_of_a_finished_run(tmp_path, monkeypatch):
    """The main process writes metrics.json and waits at the end; a second process that arrives
    later and finds that fresh file unchanged must still wait there (it returned early, leaving the
    main process waiting for it: the two-process launch failed at random, when timing allowed)."""
    from spd_lens.config import config_from_dict
    from spd_lens.experiment import run_experiment

    config = config_from_dict({"name": "t", "seeds": [0], "methods": ["base"], "model": {"name": "tiny"},
                               "task": {"name": "arithmetic", "eval_n": 3}, "eval": {"max_new_tokens": 4}})
    first = run_experiment(config, tmp_path)  # one process: the evaluation is stored
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "report.html").unlink()
    barriers = {0: 0, 1: 0}

    def barrier(self):
        barriers[self.rank] += 1

    monkeypatch.setattr(Processes, "barrier", barrier)
    for rank in (0, 1):  # the main process finishes first and writes metrics.json; the second arrives later
        monkeypatch.setattr(Processes, "current", classmethod(lambda cls, rank=rank: Processes(rank, 2)))
        written = {p.name: p.read_bytes() for p in tmp_path.glob("*.json")}
        assert run_experiment(config, tmp_path)["methods"] == first["methods"]
    assert (tmp_path / "metrics.json").is_file()
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.json")} == written  # the second process wrote nothing
    assert barriers[1] == barriers[0] >= 1  # the same barriers, so neither waits for the other forever


def test_every_process_passes_the_same_barriers_when_training_data_quality_is_cached(tmp_path, monkeypatch):
    """The main process measures the training data's quality and caches it; a second process that
    arrives after the file exists must pass the same barriers (it skipped one: the two-process
    run then failed at random, the main process waiting at a barrier the other never reached)."""
    from spd_lens.config import config_from_dict
    from spd_lens.experiment import run_experiment

    config = config_from_dict({"name": "t", "seeds": [0], "methods": ["base", "psr"], "model": {"name": "tiny"},
                               "task": {"name": "arithmetic", "train_n": 4, "eval_n": 3},
                               "sampling": {"max_new_tokens": 4}, "eval": {"max_new_tokens": 4},
                               "train": {"epochs": 1, "batch_size": 2}})
    first = run_experiment(config, tmp_path)
    for name in ("metrics.json", "report.html", "generations/psr-seed0.quality.json"):
        (tmp_path / name).unlink()
    barriers = {0: 0, 1: 0}

    def barrier(self):
        barriers[self.rank] += 1

    monkeypatch.setattr(Processes, "barrier", barrier)
    for rank in (0, 1):  # the main process measures and writes the quality file; the second finds it
        monkeypatch.setattr(Processes, "current", classmethod(lambda cls, rank=rank: Processes(rank, 2)))
        assert run_experiment(config, tmp_path)["methods"] == first["methods"]
    assert (tmp_path / "generations" / "psr-seed0.quality.json").is_file()
    assert barriers[1] == barriers[0] >= 2
