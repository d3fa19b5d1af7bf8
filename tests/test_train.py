import json
import os
import subprocess
import sys

import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.models import load_hf
from spd_lens.train import TrainConfig, build_features, load_trained, read_training_records, train_on_jsonl
from tests.helpers import adapter_tensors


def test_completion_only_labels(tiny_tokenizer):
    features = build_features(tiny_tokenizer, [("What is 2+2?", "4")], TrainConfig())
    labelled = [i for i in features[0]["labels"] if i != -100]
    assert tiny_tokenizer.decode(labelled).startswith("4<|im_end|>")
    everything = build_features(tiny_tokenizer, [("What is 2+2?", "4")], TrainConfig(loss_on="all"))
    assert sum(i != -100 for i in everything[0]["labels"]) == len(everything[0]["input_ids"]) - 1


def test_bad_training_data_is_named(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SpdLensError, match="holds no records"):
        read_training_records(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                   + "\n{oops\n")
    with pytest.raises(SpdLensError, match="line 2 is not valid JSON"):
        read_training_records(bad)
    shapeless = tmp_path / "shapeless.jsonl"
    shapeless.write_text(json.dumps({"prompt": "q"}) + "\n")
    with pytest.raises(SpdLensError, match="record 1 has no user and assistant"):
        read_training_records(shapeless)
    with pytest.raises(SpdLensError, match="loss_on must be"):
        TrainConfig(loss_on="prompt")


def test_lora_training_lowers_the_loss_and_loads_back(tmp_path, data):
    out = train_on_jsonl("tiny", data, tmp_path / "run", TrainConfig(lr=5e-3, epochs=4, batch_size=4))
    meta = json.loads((out / "train.json").read_text())
    assert meta["steps"] == 12 and meta["base_model"] == "tiny" and meta["config"]["lora_r"] == 8
    assert len(meta["loss_history"]) == 12 and meta["final_losses"] == meta["loss_history"][-5:]
    assert meta["global_batch_size"] == 4 and meta["n_unfinished"] + (meta["n_records"] - meta["n_unfinished"]) == 12
    adapter = adapter_tensors(out)
    assert any("lora_A" in k for k in adapter) and any("v_proj" in k for k in adapter)
    trained, tokenizer = load_trained("tiny", out)
    base, _ = load_hf("tiny")
    pairs = read_training_records(data)
    batch = build_features(tokenizer, pairs, TrainConfig())
    from spd_lens.train import collate

    inputs = collate(batch, tokenizer.pad_token_id)
    with torch.no_grad():
        assert trained(**inputs).loss < base(**inputs).loss - 0.05
    with pytest.raises(SpdLensError, match="trained on 'tiny'"):
        load_trained("smollm2-135m-instruct", out)
    # A finished run is not redone.
    before = (out / "train.json").stat().st_mtime
    train_on_jsonl("tiny", data, tmp_path / "run", TrainConfig(lr=5e-3, epochs=4, batch_size=4))
    assert (out / "train.json").stat().st_mtime == before


def test_full_fine_tuning_saves_a_model(tmp_path, data):
    out = train_on_jsonl("tiny", data, tmp_path / "full", TrainConfig(lora=False, lr=1e-3, epochs=1, batch_size=6))
    assert (out / "model" / "config.json").is_file()
    model, _ = load_trained("tiny", out)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_global_batch_takes_the_same_steps_on_one_or_two_processes(tmp_path, data):
    from spd_lens.cli import main as cli

    # Full fine-tuning: no dropout, so the split of a batch cannot change the result.
    train = ["train", "--model", "tiny", "--data", str(data), "--lr", "1e-3", "--epochs", "1", "--batch-size", "4", "--full"]
    assert cli([*train, "--out", str(tmp_path / "one")]) == 0
    # Accumulation over 3 micro-batches that do not divide the batch of 4 keeps it too.
    assert cli([*train, "--grad-accum", "3", "--out", str(tmp_path / "accum")]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    command = [torchrun, "--nproc_per_node", "2", "-m", "spd_lens.cli", *train, "--out", str(tmp_path / "ddp")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one, accum, two = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("one", "accum", "ddp"))
    assert one["steps"] == accum["steps"] == two["steps"] == 3  # 12 records / a global batch of 4
    assert two["processes"] == 2 and two["global_batch_size"] == 4 and two["per_process_batch_size"] == 2
    # Float tolerance: the rows meet in other batch shapes (padding) and sums in another order.
    assert two["loss_history"] == pytest.approx(one["loss_history"], rel=1e-4)
    assert accum["loss_history"] == pytest.approx(one["loss_history"], rel=1e-4)
    assert one["loss_history"][0] != pytest.approx(one["loss_history"][-1], rel=1e-3)  # the steps did train
    # Said once, by the main process, with the global batch.
    assert result.stdout.count("trained:") == 1 and "global batch of 4" in result.stdout


def test_loss_on_kept_columns_equals_the_full_logits_loss(tiny_hf, data):
    from spd_lens.train import collate, next_token_loss

    model, tokenizer = tiny_hf
    for loss_on in ("completion", "all"):
        features = build_features(tokenizer, read_training_records(data)[:5], TrainConfig(loss_on=loss_on))
        batch = collate(features, tokenizer.pad_token_id)
        with torch.no_grad():
            ours = next_token_loss(model, batch)
            reference = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], labels=batch["labels"]).loss
        assert torch.allclose(ours, reference, atol=1e-5), loss_on


def test_epoch_batches_cover_every_record_once_and_group_lengths():
    from spd_lens.train import epoch_batches

    lengths = [(i * 37) % 100 for i in range(200)]
    batches = epoch_batches(lengths, 8, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert batches == epoch_batches(lengths, 8, seed=3) and batches != epoch_batches(lengths, 8, seed=4)
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 20  # random batches of 8 would spread about 75


def test_trained_adapter_boots_into_a_bridge(tmp_path, data):
    from spd_lens.models import boot

    out = train_on_jsonl("tiny", data, tmp_path / "run", TrainConfig(lr=5e-3, epochs=1, batch_size=4))
    model, tokenizer = load_trained("tiny", out)
    ids = torch.tensor([tokenizer("12+3=", add_special_tokens=False).input_ids])
    with torch.no_grad():
        expected = model(ids).logits
        bridge = boot(model, tokenizer)
        assert torch.allclose(bridge(ids), expected, atol=1e-4)
    assert "blocks.0.attn.hook_k" in bridge.hook_dict


def test_outside_generations_say_why_they_ended(tmp_path, tiny_tokenizer, capsys):
    from spd_lens.cli.training import warn_missing_finish_reasons
    from spd_lens.train import finish_reason_counts

    def record(answer, **why):
        return {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": answer}],
                **why}

    # Another engine's output: messages only, OpenAI-style choices, the project's own field.
    rows = [record("4"), record("4 and then", choices=[{"finish_reason": "length"}]), record("4", finish_reason="stop")]
    path = tmp_path / "outside.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = read_training_records(path)
    assert [r.finished for r in records] == [True, False, True]
    assert finish_reason_counts(path) == {"stop": 1, "length": 1, "missing": 1}
    cut, whole = build_features(tiny_tokenizer, records[1:3], TrainConfig())
    assert not tiny_tokenizer.decode(cut["input_ids"]).endswith("<|im_end|>\n")  # not taught to end there
    assert "<|im_end|>" in tiny_tokenizer.decode(whole["input_ids"][-3:])
    # `spd-lens train` and `score` warn first, with counts (the warning alone: training is tested above).
    warn_missing_finish_reasons(path, "trained as finished")
    err = capsys.readouterr().err
    assert "warning: 1 of 3 records" in err and "give no finish_reason" in err
