"""Numerical guards: NaN/inf in gradients or loss stop the stage with an error naming the layer or
step, instead of writing a poisoned subspace or adapter."""

import math

import pytest
import torch

from spd_lens import SpdLensError, get_task
from spd_lens.extract import GramAccumulator, extract_subspace
from spd_lens.models import load_hf
from spd_lens.train import TrainConfig, train_on_jsonl


@pytest.fixture(scope="module")
def encoded():
    _, tokenizer = load_hf("tiny")
    task = get_task("arithmetic")
    return [task.locate(tokenizer, e) for e in task.examples("train", n=4, seed=0)]


def test_zero_and_non_finite_gradients_stop_with_the_layer_named(encoded):
    accumulator = GramAccumulator()
    accumulator.grams = {(3, "v"): torch.zeros(16, 16, dtype=torch.float64)}
    with pytest.raises(SpdLensError, match="layer 3 V are all zero"):
        accumulator.check()
    model, tokenizer = load_hf("tiny")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(SpdLensError, match="non-finite gradient at layer"):
        extract_subspace(model, encoded, layers=[1, 3], tokenizer=tokenizer)



def test_non_finite_training_loss_stops_with_the_step_named(tmp_path, tiny_hf):
    from spd_lens import get_task
    from spd_lens.sampling import SamplingConfig, generate_jsonl

    model, tokenizer = tiny_hf
    data = generate_jsonl(model, tokenizer, get_task("arithmetic").examples("train", n=8, seed=0), tmp_path / "g.jsonl",
                          SamplingConfig(max_new_tokens=4), task="arithmetic")
    with pytest.raises(SpdLensError, match=r"training loss is (nan|inf) at step \d+"):
        train_on_jsonl("tiny", data, tmp_path / "run", TrainConfig(lr=1e30, epochs=3, batch_size=2, max_grad_norm=math.inf))
    assert not (tmp_path / "run" / "train.json").exists()
    assert torch.isfinite(next(model.parameters())).all()


def test_non_finite_gradients_stop_training_before_the_step(tmp_path, tiny_hf, monkeypatch):
    """A finite loss whose backward pass gives NaN (as a faulty attention kernel's does) must stop
    training before the optimizer writes NaN into the adapter."""
    import spd_lens.train as train_module
    from spd_lens.sampling import SamplingConfig, generate_jsonl

    model, tokenizer = tiny_hf
    data = generate_jsonl(model, tokenizer, get_task("arithmetic").examples("train", n=8, seed=0), tmp_path / "g.jsonl",
                          SamplingConfig(max_new_tokens=4), task="arithmetic")
    plain_loss = train_module.next_token_loss

    def loss_with_nan_gradients(m, batch, **kwargs):
        loss = plain_loss(m, batch, **kwargs)
        trained = next(p for p in m.parameters() if p.requires_grad)
        return loss + torch.sqrt(trained.sum() * 0)  # adds 0; its gradient is inf * 0 = NaN

    monkeypatch.setattr(train_module, "next_token_loss", loss_with_nan_gradients)
    with pytest.raises(SpdLensError, match=r"gradient norm is nan at step 0 \(epoch 0\)"):
        train_on_jsonl("tiny", data, tmp_path / "run", TrainConfig(epochs=1, batch_size=2, checkpoint_every=1))
    assert not (tmp_path / "run" / "train.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cudnn_attention_is_left_out_only_on_cuda(monkeypatch):
    from spd_lens.runtime import avoid_cudnn_attention

    calls = []
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    avoid_cudnn_attention("cpu")
    assert calls == []
    avoid_cudnn_attention("cuda:1")
    assert calls == [False]
