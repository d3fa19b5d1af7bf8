from pathlib import Path

import pytest

from spd_lens import SpdLensError
from spd_lens.config import config_from_dict, load_config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def test_defaults_follow_the_paper():
    config = config_from_dict({})
    assert (config.train.lora_r, config.train.lora_alpha, config.train.lora_dropout) == (8, 8, 0.05)
    assert config.train.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (config.train.lr, config.train.weight_decay, config.train.epochs) == (1e-5, 0.01, 5)
    assert config.projection.alpha == 1.0 and config.subspace.layers is None


@pytest.mark.parametrize("values, message", [
    ({"tsak": {}}, "unknown config key 'tsak'; did you mean 'task'"),
    ({"train": {"learning_rate": 1e-4}}, "unknown config key 'train.learning_rate'"),
    ({"task": {"train_n": "64"}}, "task.train_n must be an integer"),
    ({"subspace": {"layers": [1, "x"]}}, r"subspace.layers\[1\] must be an integer"),
    ({"projection": {"alpha": True}}, "projection.alpha must be a number"),
    ({"methods": ["spd", "sdp"]}, r"unknown method\(s\) \['sdp'\]"),
    ({"task": {"name": "gsm9k"}}, "task.name = 'gsm9k' is not a task"),
    ({"train": "fast"}, "train must be a table"),
])
def test_bad_configs_are_named(values, message):
    with pytest.raises(SpdLensError, match=message):
        config_from_dict(values)


def test_invalid_toml_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[task\nname = 1")
    with pytest.raises(SpdLensError, match="not valid TOML"):
        load_config(path)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_config_loads(path):
    config = load_config(path)
    assert config.methods and config.seeds
