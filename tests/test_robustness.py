"""Malformed input at every boundary a user touches gets a clear SpdLensError (or argparse's usage
error), never a traceback from deep inside a library."""

import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from spd_lens import SpdLensError
from spd_lens.cli import main as cli
from spd_lens.config import config_from_dict
from spd_lens.evaluate import read_completions
from spd_lens.subspace import CapabilitySubspace
from spd_lens.tasks.records import read_jsonl
from spd_lens.train import load_trained, read_training_records

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=10)
KNOWN = ["name", "seeds", "methods", "model", "task", "subspace", "projection", "sampling", "ssd", "train", "eval",
         "train_n", "eval_n", "alpha", "layers", "rank", "lr", "epochs", "temperature", "top_p", "heads", "kinds"]
keys = st.one_of(st.sampled_from(KNOWN), st.text(max_size=10))
configs = st.dictionaries(keys, st.one_of(values, st.dictionaries(keys, values, max_size=5)), max_size=6)


@SETTINGS
@given(configs)
def test_any_config_is_accepted_or_refused_clearly(values):
    try:
        config_from_dict(values)
    except SpdLensError as err:
        assert str(err)


@SETTINGS
@given(st.binary(max_size=400))
def test_any_jsonl_bytes_are_read_or_refused_clearly(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("jsonl") / "x.jsonl"
    path.write_bytes(data)
    for reader in (read_jsonl, read_training_records, read_completions):
        try:
            reader(path)
        except SpdLensError as err:
            assert str(err)
        except UnicodeDecodeError:
            pytest.fail(f"{reader.__name__} let a UnicodeDecodeError through")


@SETTINGS
@given(st.lists(st.one_of(st.text(max_size=30), st.dictionaries(st.text(max_size=8), scalars, max_size=3)),
                min_size=1, max_size=5))
def test_jsonl_records_of_the_wrong_shape_are_refused_clearly(tmp_path_factory, records):
    path = tmp_path_factory.mktemp("records") / "x.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for reader in (read_training_records, read_completions):
        try:
            reader(path)
        except SpdLensError as err:
            assert str(err)


@SETTINGS
@given(st.binary(max_size=300), st.text(max_size=200))
def test_corrupt_subspace_and_checkpoint_directories_are_refused(tmp_path_factory, tensors, meta):
    directory = tmp_path_factory.mktemp("artifact")
    (directory / "subspace.safetensors").write_bytes(tensors)
    (directory / "subspace.json").write_text(meta)
    with pytest.raises(SpdLensError):
        CapabilitySubspace.load(directory)
    (directory / "train.json").write_text(meta)
    (directory / "adapter").mkdir()
    (directory / "adapter" / "adapter_model.safetensors").write_bytes(tensors)
    with pytest.raises(SpdLensError):
        load_trained("tiny", directory)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(-2, 3), layers=st.text(alphabet="0123456789,-x", max_size=6),
       rank=st.one_of(st.none(), st.integers(-3, 40)), frac=st.one_of(st.none(), st.floats(-1, 2)),
       task=st.sampled_from(["arithmetic", "family-mc", "nope"]))
def test_cli_flags_get_clear_errors(tmp_path_factory, n, layers, rank, frac, task):
    args = ["extract", "--model", "tiny", "--task", task, f"--n={n}", "--out", str(tmp_path_factory.mktemp("o") / "s")]
    if layers:
        args.append(f"--layers={layers}")
    if rank is not None:
        args.append(f"--rank={rank}")
    elif frac is not None:
        args.append(f"--rank-frac={frac}")
    try:
        code = cli(args)
    except SystemExit as exit_:  # argparse's own usage errors (exit status 2, message on stderr)
        assert exit_.code == 2
        return
    assert code in (0, 2)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@example(temperature=1.36e-104, top_p=1.0, top_k=0, alpha=0.0, tokens=0)  # once overflowed the sampler
@given(temperature=st.floats(-2, 3), top_p=st.floats(-1, 2), top_k=st.integers(-3, 50),
       alpha=st.floats(-1, 2), tokens=st.integers(-1, 3))
def test_generate_flags_get_clear_errors(tmp_path_factory, temperature, top_p, top_k, alpha, tokens):
    out = tmp_path_factory.mktemp("g") / "g.jsonl"
    args = ["generate", "--model", "tiny", "--task", "arithmetic", "--n", "1", f"--temperature={temperature}",
            f"--top-p={top_p}", f"--top-k={top_k}", f"--alpha={alpha}", f"--max-new-tokens={tokens}", "--out", str(out)]
    code = cli(args)
    assert code in (0, 2)
    if code == 2:
        assert not out.exists()
