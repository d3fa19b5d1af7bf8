"""Provenance and reruns: every writer records what made its output (the projection attached to
the model included), a rerun of finished work does nothing and changes no byte, a run killed part
way resumes to exactly what an uninterrupted run writes, and a rerun with one setting changed is
refused naming that setting. Over the CLI and the library, on the tiny model."""

import json
import re
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spd_lens import SpdLensError, cache_gradients, extract_subspace, get_task
from spd_lens.artifacts import canonical, settings_differences
from spd_lens.cli import main as cli
from spd_lens.evaluate import evaluate
from spd_lens.gradients import iterate_gradients
from spd_lens.models import boot, load_hf
from spd_lens.projection import Projection, active_projections, fold_projection, project, projection_provenance
from spd_lens.sampling import SamplingConfig, generate_jsonl
from spd_lens.subspace import CapabilitySubspace, random_like
from spd_lens.tasks import Example
from tests.helpers import adapter_tensors, read_records


class Interrupted(Exception):
    """Stands for the process being killed at that point."""


class Interrupt:
    """A progress callback that lets `after` batches (or training steps) through, then raises."""

    def __init__(self, after: int = 1):
        self.after, self.count = after, 0

    def __call__(self, iterable):
        self.iterable = iterable
        return self

    def __iter__(self):
        for item in self.iterable:
            if self.count == self.after:
                raise Interrupted
            self.count += 1
            yield item

    def update(self, n=1):
        self.count += n
        if self.count > self.after:
            raise Interrupted

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


@contextmanager
def killed_in(label: str = "", after: int = 1):
    """The CLI command run inside is killed once the progress bar whose label starts with
    `label` has passed `after` items."""
    def bar(desc):
        return Interrupt(after) if desc.startswith(label) else (lambda iterable: iterable)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("spd_lens.cli.common.progress", bar)
        patch.setattr("spd_lens.cli.common.progress_labelled", bar)
        with pytest.raises(Interrupted):
            yield


@contextmanager
def no_new_work():
    """Fails the test if anything generates, takes gradients, trains or scores inside."""
    def refuse(*args, **kwargs):
        raise AssertionError("a rerun of finished work did new work")

    with pytest.MonkeyPatch.context() as patch:
        for target in ("spd_lens.sampling.decode_stream", "spd_lens.sampling._sample_static",
                       "spd_lens.extract.iterate_gradients",
                       "spd_lens.train.next_token_loss", "spd_lens.evaluate.score_records"):
            patch.setattr(target, refuse)
        yield


def snapshot(root) -> dict[str, bytes]:
    root = Path(root)
    if root.is_file():
        return {root.name: root.read_bytes()}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def tear(finished: Path, partial: Path, keep_lines: int) -> None:
    """What a run killed while writing leaves: `keep_lines` whole records, then half a line."""
    lines = finished.read_text().splitlines(keepends=True)
    partial.write_text("".join(lines[:keep_lines]) + lines[keep_lines][: len(lines[keep_lines]) // 2])


@pytest.fixture(scope="module")
def tiny():
    return load_hf("tiny")


@pytest.fixture(scope="module")
def subspace_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sub") / "sub"
    assert cli(["extract", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def subspace(subspace_dir):
    return CapabilitySubspace.load(subspace_dir)


# --- one canonical form -----------------------------------------------------------------------

json_leaves = st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2, allow_nan=False) | st.text(max_size=3)
settings_values = st.recursive(json_leaves, lambda inner: st.lists(inner, max_size=3).map(tuple) | st.lists(inner, max_size=3)
                               | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)


@given(st.dictionaries(st.text(max_size=4), settings_values, max_size=4))
def test_settings_read_back_from_json_are_the_same_settings(value):
    read_back = json.loads(json.dumps(value))
    assert canonical(value) == canonical(read_back) == read_back
    assert settings_differences(read_back, value) == []


@given(st.dictionaries(st.text(min_size=1, max_size=4), settings_values, min_size=1, max_size=4), st.data())
def test_a_changed_setting_is_named_with_its_path(value, data):
    key = data.draw(st.sampled_from(sorted(value)))
    changed = {**value, key: {"inner": ("changed",)}}
    differences = settings_differences(value, changed)
    assert differences and all(d.startswith((f"{key}:", f"{key}.")) for d in differences)
    assert any(d.startswith(f"{key}.inner: file has ") for d in differences) or \
        differences == [f"{key}: file has {canonical(value[key])!r}, now {{'inner': ['changed']}}"]


def test_a_key_ending_in_a_dot_keeps_its_name():
    # found by the property test above: the separator was stripped with the key's own dot
    assert settings_differences({".": None}, {".": 1}) == [".: file has None, now 1"]
    assert settings_differences({"a.": {"b": 1}}, {"a.": {"b": 2}}) == ["a..b: file has 1, now 2"]


# --- projections known to the model -----------------------------------------------------------

def test_the_model_knows_its_projections_and_only_a_full_reset_ends_them(tiny, subspace):
    model, tokenizer = tiny
    assert active_projections(model) == [] and projection_provenance(model) is None
    with project(model, subspace, alpha=0.5) as handle:
        assert active_projections(model) == [handle]
        assert handle.provenance() == Projection.build(subspace, alpha=0.5).provenance()
        assert projection_provenance(model) == handle.provenance()
    assert active_projections(model) == [] and not handle.active
    bridge = boot(*load_hf("tiny"))
    with project(bridge, subspace, layout="head", heads=[1]) as handle:
        # the bridge wraps the HF modules in place: both views see the projection
        assert active_projections(bridge) == active_projections(bridge.original_model) == [handle]
        bridge.reset_hooks()  # the TransformerLens habit keeps the projection on
        assert active_projections(bridge) == [handle] and handle.active
    with pytest.raises(SpdLensError, match="taken off the model"):
        with project(bridge, subspace, layout="head", heads=[1]) as handle:
            bridge.reset_hooks(including_permanent=True)
            assert active_projections(bridge) == [] and not handle.active and projection_provenance(bridge) is None
    other = Projection.build(subspace).attach(bridge)
    bridge.hook_dict["blocks.2.attn.hook_k"].remove_hooks(including_permanent=True)  # one hook point cleared by hand
    with pytest.raises(SpdLensError, match="lost 1 of its 4 hooks"):
        active_projections(bridge)
    other.remove()
    assert active_projections(bridge) == []


def test_folding_is_recorded_and_refused_with_hooks_attached(tiny, subspace):
    model, _ = tiny
    projection = Projection.build(subspace, kinds=["k"])
    folded = fold_projection(model, projection)
    assert projection_provenance(folded) == {**projection.provenance(), "folded": True}
    assert projection_provenance(model) is None
    twice = fold_projection(folded, Projection.build(subspace, kinds=["v"]))
    assert [p["kinds"] for p in projection_provenance(twice)] == [("k",), ("v",)]
    with project(model, subspace), pytest.raises(SpdLensError, match="hooks attached"):
        fold_projection(model, projection)


def test_generation_under_a_projection_never_reuses_unprojected_output(tmp_path, tiny, subspace):
    """The library path of the README: the same path with and without `project()`."""
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=2, seed=0)
    config = SamplingConfig(max_new_tokens=2)
    out = generate_jsonl(model, tokenizer, examples, tmp_path / "gen.jsonl", config, task="arithmetic")
    before = out.read_bytes()
    with project(model, subspace) as handle:
        with pytest.raises(SpdLensError, match=r"refusing to mix \(projection: file has None, now \{'subspace_id'"):
            generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic")
        projected = generate_jsonl(model, tokenizer, examples, tmp_path / "projected.jsonl", config, task="arithmetic")
        with pytest.raises(SpdLensError, match="the projection is read from the model"):
            generate_jsonl(model, tokenizer, examples, tmp_path / "x.jsonl", config, task="arithmetic",
                           provenance={"projection": None})
    assert out.read_bytes() == before
    record = read_records(projected)[0]["settings"]["projection"]
    assert record == canonical(handle.provenance())
    assert {"subspace_id", "layers", "ranks", "alpha", "kinds", "layout"} <= set(record)
    with pytest.raises(SpdLensError, match=r"projection: file has \{.*\}, now None"):
        generate_jsonl(model, tokenizer, examples, projected, config, task="arithmetic")
    # projected evaluation (hook-only) records its projection too
    with project(model, subspace):
        evaluate(model, tokenizer, "arithmetic", n=2, config=config, generations=tmp_path / "eval.jsonl")
    with pytest.raises(SpdLensError, match="projection: file has"):
        evaluate(model, tokenizer, "arithmetic", n=2, config=config, generations=tmp_path / "eval.jsonl")


def test_gradients_taken_under_a_projection_record_it(tmp_path, tiny, subspace):
    model, tokenizer = tiny
    plain = extract_subspace(model, "arithmetic", n=2, tokenizer=tokenizer, out=tmp_path / "s")
    assert plain.meta["projection"] is None
    with project(model, subspace) as handle:
        with pytest.raises(SpdLensError, match=r"projection: directory has None, now \{"):
            extract_subspace(model, "arithmetic", n=2, tokenizer=tokenizer, out=tmp_path / "s")
        cache = cache_gradients(model, "arithmetic", n=2, layers=[3], tokenizer=tokenizer)
    assert cache.meta["projection"] == handle.provenance()


# --- derived subspaces have their own ids -----------------------------------------------------

def test_every_derived_subspace_has_its_own_id_naming_its_parent(tmp_path, tiny, subspace):
    model, tokenizer = tiny
    parent = subspace.meta["config_hash"]
    derived = {"with_rank": subspace.with_rank(rank=2), "random_like": random_like(subspace, seed=3)}
    for name, child in derived.items():
        assert child.meta["parent_id"] == parent and child.meta["derivation"].startswith(name)
        assert child.meta["config_hash"] not in (parent, None)
    assert derived["random_like"].meta["derivation"] == "random_like(seed=3)"
    assert random_like(subspace, seed=4).meta["config_hash"] != derived["random_like"].meta["config_hash"]
    assert subspace.with_rank(rank=3).meta["config_hash"] != derived["with_rank"].meta["config_hash"]
    ids = {Projection.build(s).provenance()["subspace_id"] for s in [subspace, *derived.values()]}
    assert len(ids) == 3
    heads = Projection.build(subspace, layout="head", heads=[1]).provenance()
    assert heads["subspace_parent"] == parent and heads["subspace_derivation"] == "heads([1])"
    assert heads["subspace_id"] not in ids | {Projection.build(subspace, layout="head", heads=[0]).provenance()["subspace_id"]}
    assert Projection.build(subspace, layout="head").provenance()["subspace_id"] == parent  # all heads: no selection
    cache = cache_gradients(model, "arithmetic", n=2, layers=[2, 3], tokenizer=tokenizer)
    a, b = CapabilitySubspace.from_cache(cache, rank=2), CapabilitySubspace.from_cache(cache, rank=3)
    assert a.meta["parent_id"] == cache.meta["config_hash"] and a.meta["config_hash"] != b.meta["config_hash"]
    # saved and loaded, a derived subspace keeps its id and parent
    reloaded = CapabilitySubspace.load(derived["with_rank"].save(tmp_path / "derived"))
    assert reloaded.meta["config_hash"] == derived["with_rank"].meta["config_hash"] and reloaded.meta["parent_id"] == parent


# --- repeated example ids ---------------------------------------------------------------------

def test_repeated_example_ids_are_an_error_naming_the_id(tmp_path, tiny):
    model, tokenizer = tiny
    first = get_task("arithmetic").examples("train", n=3, seed=0)
    twice = [first[0], first[1], Example(first[0].id, first[2].prompt, first[2].reference, first[2].spans, first[2].target)]
    named = re.escape(f"repeat the id '{first[0].id}'")
    with pytest.raises(SpdLensError, match=named):
        cache_gradients(model, twice, layers=[3], tokenizer=tokenizer)
    with pytest.raises(SpdLensError, match=named):
        extract_subspace(model, twice, tokenizer=tokenizer)
    with pytest.raises(SpdLensError, match=named):
        generate_jsonl(model, tokenizer, twice, tmp_path / "g.jsonl", SamplingConfig(max_new_tokens=1), task="arithmetic")
    encoded = [get_task("arithmetic").locate(tokenizer, e) for e in twice]
    with pytest.raises(SpdLensError, match=named):
        next(iterate_gradients(model, encoded, layers=[3], pad_id=tokenizer.pad_token_id))


def test_greedy_decoding_with_several_samples_is_a_clear_error():
    with pytest.raises(SpdLensError, match="num_samples=2 needs sampling"):
        SamplingConfig(num_samples=2)


# --- the matrix: generate over the CLI ----------------------------------------------------------

# variant -> (extra arguments, one changed setting: (arguments after the change, the setting named))
GENERATE_VARIANTS = {
    "plain": ([], (["--subspace", "SUB"], "projection: file has None, now {")),
    "subspace": (["--subspace", "SUB"], ([], "projection: file has {")),
    "fold": (["--subspace", "SUB", "--fold"], (["--subspace", "SUB"], "projection.folded: file has True, now None")),
    "heads": (["--subspace", "SUB", "--layout", "head", "--heads", "0"],
              (["--subspace", "SUB", "--layout", "head", "--heads", "1"], "projection.heads: file has [0], now [1]")),
    "kinds": (["--subspace", "SUB", "--kinds", "k"],
              (["--subspace", "SUB", "--kinds", "v"], "projection.kinds: file has ['k'], now ['v']")),
    "alpha": (["--subspace", "SUB", "--alpha", "0.5"],
              (["--subspace", "SUB", "--alpha", "0.25"], "projection.alpha: file has 0.5, now 0.25")),
    "num-samples": (["--num-samples", "2", "--temperature", "0.7"],
                    (["--num-samples", "3", "--temperature", "0.7"], "num_samples: file has 2, now 3")),
}


@pytest.mark.parametrize("variant", list(GENERATE_VARIANTS))
def test_generate_reruns_resumes_and_refuses(variant, tmp_path, subspace_dir, capsys):
    extra, (changed, named) = GENERATE_VARIANTS[variant]

    def command(out, arguments=extra):
        arguments = [str(subspace_dir) if a == "SUB" else a for a in arguments]
        return ["generate", "--model", "tiny", "--task", "arithmetic", "--n", "3", "--batch-size", "2",
                "--max-new-tokens", "2", *arguments, "--out", str(out)]

    straight = tmp_path / "straight.jsonl"
    assert cli(command(straight)) == 0
    records = read_records(straight)
    samples = 2 if variant == "num-samples" else 1
    assert len(records) == 3 * samples and len({(r["prompt_id"], r["sample_index"]) for r in records}) == 3 * samples
    assert (records[0]["settings"]["projection"] is None) == ("--subspace" not in extra)
    # (a) finished, then rerun: no new work, not a byte changed
    with no_new_work():
        assert cli(command(straight)) == 0
    assert straight.read_bytes() == snapshot(straight)["straight.jsonl"]
    # (b) killed after its first prompt, then rerun: every record once, as the uninterrupted run wrote it
    killed = tmp_path / "killed.jsonl"
    with killed_in("generate"):
        cli(command(killed))
    assert not killed.exists() and len(read_records(tmp_path / "killed.jsonl.partial")) == samples
    assert cli(command(killed)) == 0
    assert killed.read_bytes() == straight.read_bytes()
    # ... or killed while writing a record (a torn last line)
    torn = tmp_path / "torn.jsonl"
    tear(straight, tmp_path / "torn.jsonl.partial", keep_lines=2 * samples)
    assert cli(command(torn)) == 0
    assert torn.read_bytes() == straight.read_bytes()
    # (c) one setting changed: refused, naming it; the file stays as it was
    capsys.readouterr()
    assert cli(command(straight, changed)) == 2
    error = capsys.readouterr().err
    assert "refusing to mix" in error and named in error, error
    assert straight.read_bytes() == killed.read_bytes()


# --- the matrix: generate through the library, property-based ----------------------------------

PROJECTION_VALUES = {"layers": [None, [2], [3]], "kinds": [["k", "v"], ["k"], ["v"]], "heads": [None, [0], [1], [0, 1]],
                     "alpha": [1.0, 0.5], "folded": [False, True]}
GENERATION_VALUES = {"temperature": [0.0, 0.7], "top_p": [1.0, 0.9], "top_k": [0, 5], "max_new_tokens": [1, 2],
                     "num_samples": [1, 2], "seed": [0, 1], "batch_size": [1, 2], "n": [2, 3]}
PROJECTIONS = st.none() | st.fixed_dictionaries({k: st.sampled_from(v) for k, v in PROJECTION_VALUES.items()})


def valid(s: dict) -> bool:
    return s["num_samples"] == 1 or s["temperature"] > 0  # greedy decoding gives one completion


GENERATION = st.fixed_dictionaries({**{k: st.sampled_from(v) for k, v in GENERATION_VALUES.items()},
                                    "projection": PROJECTIONS}).filter(valid)
# what the refusal names when a setting changes
NAMED = {"n": "n_prompts", **{k: f"projection.{k}" for k in PROJECTION_VALUES}}


def one_setting_changed(s: dict, data) -> tuple[dict, str]:
    """`s` with one setting changed (a sampling setting, a projection setting, or the projection
    added or dropped), and the name the refusal must give."""
    # batch_size is not among them: refill decoding's output does not depend on it (test_stages)
    changes = [({**s, k: v}, NAMED.get(k, k)) for k, values in GENERATION_VALUES.items() for v in values
               if v != s[k] and valid({**s, k: v}) and k != "batch_size"]
    if s["projection"] is None:
        changes.append(({**s, "projection": {k: v[0] for k, v in PROJECTION_VALUES.items()}}, "projection: file has None"))
    else:
        changes.append(({**s, "projection": None}, "projection: file has {"))
        changes += [({**s, "projection": {**s["projection"], k: v}}, NAMED[k]) for k, values in PROJECTION_VALUES.items()
                    for v in values if v != s["projection"][k]]
    return data.draw(st.sampled_from(changes), label="changed")


def _generate(tiny, subspace, s: dict, out: Path, progress=None) -> Path:
    model, tokenizer = tiny
    examples = get_task("arithmetic").examples("train", n=s["n"], seed=0)
    config = SamplingConfig(**{k: s[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "num_samples",
                                                 "seed", "batch_size")})
    p = s["projection"]
    if p is None:
        return generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic", progress=progress)
    projection = Projection.build(subspace, layers=p["layers"], kinds=p["kinds"], alpha=p["alpha"], heads=p["heads"],
                                  layout="flat" if p["heads"] is None else "head")
    if p["folded"]:
        model = fold_projection(model, projection)
        return generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic", progress=progress)
    with projection.apply(model):
        return generate_jsonl(model, tokenizer, examples, out, config, task="arithmetic", progress=progress)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=GENERATION, data=st.data())
def test_generate_jsonl_any_settings_rerun_resume_refuse(tmp_path_factory, tiny, subspace, s, data):
    directory = tmp_path_factory.mktemp("gen")
    straight = _generate(tiny, subspace, s, directory / "straight.jsonl")
    expected = s["n"] * s["num_samples"]
    assert len(read_records(straight)) == expected
    with no_new_work():
        _generate(tiny, subspace, s, straight)
    before = straight.read_bytes()
    # killed after the first batch (where there is a second), or torn inside a record
    batches = -(-s["n"] // s["batch_size"])
    if batches > 1:
        with pytest.raises(Interrupted):
            _generate(tiny, subspace, s, directory / "killed.jsonl", progress=Interrupt(1))
        assert _generate(tiny, subspace, s, directory / "killed.jsonl").read_bytes() == before
    tear(straight, directory / "torn.jsonl.partial", keep_lines=data.draw(st.integers(0, expected - 1)))
    assert _generate(tiny, subspace, s, directory / "torn.jsonl").read_bytes() == before
    # one setting changed
    changed, named = one_setting_changed(s, data)
    with pytest.raises(SpdLensError, match="refusing to mix") as refused:
        _generate(tiny, subspace, changed, straight)
    assert named in str(refused.value)
    assert straight.read_bytes() == before


# --- the matrix: extract, train, eval and run over the CLI -------------------------------------

def test_extract_reruns_resumes_and_refuses(tmp_path, capsys):
    def command(out, *extra):
        return ["extract", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--batch-size", "1", *extra,
                "--out", str(out)]

    straight = tmp_path / "straight"
    assert cli(command(straight)) == 0
    before = snapshot(straight)
    with no_new_work():
        assert cli(command(straight)) == 0
    assert snapshot(straight) == before
    killed = tmp_path / "killed"
    with killed_in("gradients"):
        cli(command(killed))
    assert not (killed / "subspace.json").exists()  # nothing half-written is taken for a subspace
    assert cli(command(killed)) == 0
    a, b = CapabilitySubspace.load(straight), CapabilitySubspace.load(killed)
    assert snapshot(straight)["subspace.safetensors"] == snapshot(killed)["subspace.safetensors"]
    timing = ("seconds", "created")
    assert {k: v for k, v in a.meta.items() if k not in timing} == {k: v for k, v in b.meta.items() if k not in timing}
    for args, named in ((["--rank", "2"], "rank_policy: directory has 'rank_frac=0.5', now 'rank=2'"),
                        (["--seed", "1"], "seed: directory has 0, now 1"),
                        (["--layers", "1,3"], "layers: directory has [2, 3], now [1, 3]")):
        capsys.readouterr()
        assert cli(command(straight, *args)) == 2
        assert named in capsys.readouterr().err
    assert snapshot(straight) == before


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "gen.jsonl"
    assert cli(["generate", "--model", "tiny", "--task", "arithmetic", "--n", "3", "--num-samples", "2",
                "--temperature", "1", "--max-new-tokens", "4", "--out", str(out)]) == 0
    return out


def test_train_reruns_resumes_and_refuses(tmp_path, train_data, capsys):
    def command(out, data=train_data, lr="5e-3"):
        return ["train", "--model", "tiny", "--data", str(data), "--out", str(out), "--lr", lr, "--epochs", "1",
                "--batch-size", "2", "--checkpoint-every", "1"]

    straight = tmp_path / "straight"
    assert cli(command(straight)) == 0  # 6 records, 3 steps
    before = snapshot(straight)
    with no_new_work():
        assert cli(command(straight)) == 0
    assert snapshot(straight) == before
    killed = tmp_path / "killed"
    with killed_in("train", after=2):
        cli(command(killed))
    assert [p.name for p in (killed / "checkpoints").iterdir()] == ["step-2"] and not (killed / "train.json").exists()
    capsys.readouterr()
    assert cli(command(killed, lr="1e-3")) == 2  # a checkpoint made with other settings is not resumed
    assert "checkpoint has 0.005, now 0.001" in capsys.readouterr().err
    assert cli(command(killed)) == 0
    a, b = adapter_tensors(straight), adapter_tensors(killed)
    # Within rounding (MKL's products round with the arrays' alignment; see test_crash_safety); a
    # resume that lost the optimizer or RNG state is off by about the learning rate.
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=2e-4) for k in a)
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(train_data.read_text().splitlines(keepends=True)[:4]))
    for cmd, named in ((command(straight, lr="1e-3"), "config.lr: directory has 0.005, now 0.001"),
                       (command(straight, data=other_data), "data_sha256: directory has ")):
        assert cli(cmd) == 2
        assert named in capsys.readouterr().err
    assert snapshot(straight) == before


def test_eval_reruns_resumes_and_refuses(tmp_path, capsys):
    def command(out, tokens="2"):
        return ["eval", "--model", "tiny", "--task", "arithmetic", "--n", "3", "--batch-size", "2",
                "--max-new-tokens", tokens, "--out", str(out)]

    straight = tmp_path / "straight" / "e.json"
    assert cli(command(straight)) == 0
    before = snapshot(straight.parent)
    with no_new_work():
        assert cli(command(straight)) == 0
    assert snapshot(straight.parent) == before
    killed = tmp_path / "killed" / "e.json"
    with killed_in("eval"):
        cli(command(killed))
    assert not killed.exists() and len(read_records(killed.with_suffix(".generations.jsonl.partial"))) == 1
    assert cli(command(killed)) == 0
    assert snapshot(killed.parent) == before
    capsys.readouterr()
    assert cli(command(straight, tokens="3")) == 2
    assert "sampling.max_new_tokens: file has 2, now 3" in capsys.readouterr().err
    assert snapshot(straight.parent) == before


SELF_GENERATING = ["psr", "ssd", "spd", "spd-random", "spd-fullseq"]
RUN_CONFIG = """methods = {methods}
seeds = [0]
[model]
name = "tiny"
[task]
train_n = 2
eval_n = 1
[subspace]
n = 2
[projection]
alpha = {alpha}
[sampling]
max_new_tokens = 2
batch_size = 1
[eval]
max_new_tokens = 1
[train]
epochs = 1
batch_size = 2
lr = 1e-3
"""


def test_run_killed_inside_each_self_generation_resumes_to_the_uninterrupted_run(tmp_path, capsys):
    from spd_lens.config import load_config
    from spd_lens.experiment import Run

    config = tmp_path / "c.toml"
    config.write_text(RUN_CONFIG.format(methods=json.dumps(SELF_GENERATING), alpha=1.0))
    run = tmp_path / "run"
    for method in SELF_GENERATING:  # each call resumes the last one's generation, then is killed in the next
        with killed_in(f"generate {method}"):
            cli(["run", str(config), "--out", str(run)])
        assert len(read_records(run / "generations" / f"{method}-seed0.jsonl.partial")) == 1
    assert cli(["run", str(config), "--out", str(run)]) == 0
    # the runner's own generation stage, uninterrupted, in another directory
    uninterrupted = Run(load_config(config), tmp_path / "straight")
    for method in SELF_GENERATING:
        expected = uninterrupted.generations(method, 0)
        assert (run / "generations" / f"{method}-seed0.jsonl").read_bytes() == expected.read_bytes(), method
    records = {m: read_records(run / "generations" / f"{m}-seed0.jsonl")[0]["settings"] for m in SELF_GENERATING}
    assert records["psr"]["projection"] is None and records["ssd"]["projection"] is None
    spd, control = records["spd"]["projection"], records["spd-random"]["projection"]
    assert control["subspace_id"] != spd["subspace_id"] and control["subspace_parent"] == spd["subspace_id"]
    assert control["subspace_derivation"] == "random_like(seed=0)"
    assert records["spd-fullseq"]["projection"]["subspace_id"] not in (spd["subspace_id"], control["subspace_id"])
    # (a) rerun of the finished run: no new work, not a byte changed
    before = snapshot(run)
    with no_new_work():
        assert cli(["run", str(config), "--out", str(run)]) == 0
    assert snapshot(run) == before
    # (c) the projection changed: refused, naming the setting
    config.write_text(RUN_CONFIG.format(methods=json.dumps(SELF_GENERATING), alpha=0.5))
    capsys.readouterr()
    assert cli(["run", str(config), "--out", str(run)]) == 2
    assert "differs in projection.alpha: run has 1.0, now 0.5" in capsys.readouterr().err
    assert snapshot(run) == before
