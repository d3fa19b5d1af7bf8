"""A capability from your own data (spd_lens.tasks.custom) and one prompt format from extraction to scoring."""

import json

import pytest

import spd_lens
from spd_lens import Capability, Example, SpdLensError
from spd_lens.chat import NO_SYSTEM, encode, render_prompt
from spd_lens.sampling import SamplingConfig, generate_jsonl, sample
from spd_lens.tasks import Score, get_task
from spd_lens.tasks.custom import final_answer, span_match

SCORER_MODULE = "tests.test_capability"


def always_right(example, completion):
    """A scorer given as module:function in the tests."""
    return True


def plus_one(n: int = 30, system=None) -> list[Example]:
    return [Example(f"sum/{i}", f"What is {i} + 1?", f"It is {i + 1}.", [[6, 6 + len(str(i + 1))]], system=system)
            for i in range(n)]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- building one ---------------------------------------------------------------------------------

def test_jsonl_spans_by_offsets_by_text_and_whole_answer(tmp_path):
    path = write_jsonl(tmp_path / "caps.jsonl", [
        {"id": "fr", "prompt": "Capital of France?", "answer": "It is Paris.", "spans": [[6, 11]]},
        {"id": "de", "prompt": "Capital of Germany?", "answer": "Berlin, I think. Berlin.", "span": "Berlin"},
        {"prompt": "Capital of Italy?", "answer": " Rome ", "system": "", "target": {"city": "Rome"}},
        {"id": "es", "prompt": "Capital of Spain?", "answer": "Madrid", "shots": [["Capital of Peru?", "Lima"]]},
    ])
    cap = Capability.from_jsonl(path)
    by_id = {e.id: e for e in cap.all_examples()}
    assert cap.name == "caps" and len(cap) == 4
    assert by_id["fr"].span_texts() == ["Paris"]
    assert by_id["de"].spans == ((17, 23),)  # the last occurrence
    assert by_id["caps/3"].span_texts() == ["Rome"] and by_id["caps/3"].system == NO_SYSTEM
    assert by_id["caps/3"].target == {"city": "Rome"}
    assert "Capital of Peru?" in by_id["es"].prompt and by_id["es"].prompt.endswith("Capital of Spain?")
    assert get_task(cap) is cap and cap.example_by_id("fr") == by_id["fr"]


@pytest.mark.parametrize("record, message", [
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "span": "paris"}, "line 2: the span 'paris' does not occur"),
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "spans": [[0, 9]]}, "line 2: example 'a' has the span (0, 9)"),
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "spans": [["0", 1]]}, "line 2: 'spans' must be a list"),
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "span": "P", "spans": [[0, 1]]}, "not both"),
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "anwser": "x"}, "unknown field(s) ['anwser']"),
    ({"id": "a", "prompt": "Q?"}, "needs a non-empty string 'answer'"),
    ({"id": "a", "prompt": "Q?", "answer": "Paris", "split": "val"}, "'split' is 'val'"),
    ({"id": "first", "prompt": "Q?", "answer": "Paris"}, "repeat the id 'first'"),
])
def test_bad_records_are_refused_naming_the_line_and_the_fix(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"id": "first", "prompt": "Q0?", "answer": "A"}, record])
    with pytest.raises(SpdLensError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]").replace("?", r"\?")):
        Capability.from_jsonl(path)


def test_scorers_default_module_function_callable_and_bad_specs(tmp_path):
    example = Example("fr", "Capital of France?", "It is Paris.", [[6, 11]])
    assert span_match(example, "Hmm.\nThe answer is: paris!").passed
    assert not span_match(example, "Paris is big.\nThe answer is Lyon.").passed  # the final answer decides
    assert not span_match(example, "It is Parisian.").passed  # whole words only
    assert final_answer("a\n\\boxed{x{1}}\nb") == "x{1}"
    cap = spd_lens.capability([example], scorer=f"{SCORER_MODULE}:always_right")
    assert cap.score(example, "no idea") == Score(True, "passed")
    assert spd_lens.capability([example], scorer=lambda e, c: Score(False, "failed", "no")).score(example, "").detail == "no"
    with pytest.raises(SpdLensError, match="give it as 'package.module:function'"):
        spd_lens.capability([example], scorer="tests.test_capability.always_right")
    with pytest.raises(SpdLensError, match="cannot import module 'no_such_module'"):
        spd_lens.capability([example], scorer="no_such_module:f")
    with pytest.raises(SpdLensError, match="has no function 'nope'"):
        spd_lens.capability([example], scorer=f"{SCORER_MODULE}:nope")
    with pytest.raises(SpdLensError, match="return a spd_lens.tasks.Score or a bool"):
        spd_lens.capability([example], scorer=lambda e, c: "yes").score(example, "")


def test_splits_by_hash_given_per_record_and_per_file(tmp_path):
    cap = spd_lens.capability(plus_one(60))
    sizes = cap.split_sizes()
    assert sum(sizes.values()) == 60 and all(sizes.values())
    # The same question lands in the same split whatever the rest of the list (hash of the prompt).
    again = spd_lens.capability(plus_one(60)[::-1])
    assert {e.id: cap.split_of(e) for e in cap.all_examples()} == {e.id: again.split_of(e) for e in again.all_examples()}
    train_ids = {e.id for e in cap.examples("train")}
    assert train_ids.isdisjoint(e.id for e in cap.examples("test"))
    assert train_ids.isdisjoint(e.id for e in cap.examples("dev"))
    given = spd_lens.capability({"train": plus_one(6), "test": plus_one(8)[6:]})
    assert {e.id for e in given.examples("test")} == {"sum/6", "sum/7"}
    assert len(given.examples("train")) + len(given.examples("dev")) == 6  # dev carved out of train
    records = [{"id": f"q{i}", "prompt": f"q{i}?", "answer": "a", "split": "test" if i < 2 else "train"} for i in range(5)]
    cap = Capability.from_jsonl(write_jsonl(tmp_path / "split.jsonl", records))
    assert {e.id for e in cap.examples("test")} == {"q0", "q1"}
    files = {"train": write_jsonl(tmp_path / "t.jsonl", records[2:]), "test": write_jsonl(tmp_path / "s.jsonl", records[:2])}
    with pytest.raises(SpdLensError, match="s.jsonl, line 1: the record says split 'test' but the file is the 'train' split"):
        Capability.from_jsonl({"train": files["test"], "test": files["train"]})
    del records[0]["split"]
    with pytest.raises(SpdLensError, match="line 1: this example has no split while others give one"):
        Capability.from_jsonl(write_jsonl(tmp_path / "mixed.jsonl", records))
    with pytest.raises(SpdLensError, match="has no test examples"):
        spd_lens.capability({"train": plus_one(3)}).examples("test")


# --- one prompt format from extraction to scoring ---------------------------------------------------

@pytest.fixture
def default_system_hf(tiny_hf):
    """The tiny model with a tokenizer whose template adds a default system turn (as SmolLM2's does)."""
    import copy

    from tests.test_chat import DEFAULT_SYSTEM_TEMPLATE

    tokenizer = copy.deepcopy(tiny_hf[1])
    tokenizer.chat_template = DEFAULT_SYSTEM_TEMPLATE
    return tiny_hf[0], tokenizer


def own_systems() -> list[Example]:
    return [Example("own/0", "What is 2 + 2?", "4", [[0, 1]], system=NO_SYSTEM),
            Example("own/1", "What is 3 + 3?", "6", [[0, 1]], system="Answer with a number."),
            Example("own/2", "What is 4 + 4?", "8", [[0, 1]])]


def test_generation_and_export_render_the_prompt_each_example_carries(default_system_hf, tmp_path, monkeypatch):
    import spd_lens.sampling as sampling
    from spd_lens.train import TrainConfig, build_features, read_training_records

    model, tokenizer = default_system_hf
    seen = []
    real = sampling.decode_stream

    def spy(model, prompts, **options):
        seen.extend(list(p) for p in prompts)
        return real(model, prompts, **options)

    monkeypatch.setattr(sampling, "decode_stream", spy)
    examples = own_systems()
    wanted = [encode(tokenizer, render_prompt(tokenizer, e.prompt, system=e.system)) for e in examples]
    default = [encode(tokenizer, render_prompt(tokenizer, e.prompt)) for e in examples]
    assert wanted[0] != default[0] and wanted[1] != default[1] and wanted[2] == default[2]
    path = generate_jsonl(model, tokenizer, examples, tmp_path / "g.jsonl", SamplingConfig(max_new_tokens=3),
                          task="custom")
    assert seen == wanted
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records[0]["system"] == "" and records[0]["messages"][0]["role"] == "user"
    assert records[1]["messages"][0] == {"role": "system", "content": "Answer with a number."}
    assert "system" not in records[2]
    # Training renders the same prompt each completion was sampled under.
    features = build_features(tokenizer, read_training_records(path), TrainConfig())
    assert [f["input_ids"][:len(w)] for f, w in zip(features, wanted)] == wanted
    # Log-likelihood multiple choice reads the label after the same prompt.
    from spd_lens.mc_loglik import choice_query

    asked = Example("mc/0", "Pick one: A) 4 B) 5", "A", [[0, 1]], meta={"labels": ["A", "B"]}, system=NO_SYSTEM)
    assert choice_query(tokenizer, asked).context_ids == encode(
        tokenizer, render_prompt(tokenizer, asked.prompt, system=NO_SYSTEM).rstrip(" "))
    # The static (transformers generate) path renders them the same way.
    static = SamplingConfig(max_new_tokens=3, batching="static")
    assert sample(model, tokenizer, examples, static) == [
        sample(model, tokenizer, [e.prompt], static, system=e.system)[0] for e in examples]


def test_a_call_whose_examples_and_rendering_disagree_is_refused(default_system_hf, tmp_path):
    from spd_lens.evaluate import score_file

    model, tokenizer = default_system_hf
    examples = own_systems()
    with pytest.raises(SpdLensError, match=r"example 'own/0' carries the system prompt '' \(no system turn\), but this "
                                           r"call renders with None \(the template's default\)"):
        sample(model, tokenizer, examples, SamplingConfig(max_new_tokens=2), system=None)
    path = tmp_path / "g.jsonl"
    plain = [Example(e.id, e.prompt, e.reference, e.spans) for e in examples]
    generate_jsonl(model, tokenizer, plain, path, SamplingConfig(max_new_tokens=2), task="custom")
    with pytest.raises(SpdLensError, match="system_prompts"):  # resuming the file under other prompts
        generate_jsonl(model, tokenizer, examples, path, SamplingConfig(max_new_tokens=2), task="custom")
    cap = spd_lens.capability(examples)
    with pytest.raises(SpdLensError, match="the completion of 'own/0' was sampled under the system prompt None"):
        score_file(cap, path)  # completions of the template's default prompt scored as no-system ones
    assert score_file(spd_lens.capability(plain), path).n == 3


# --- everywhere a task goes -----------------------------------------------------------------------

def test_a_capability_goes_where_a_task_goes(tmp_path):
    """extract_subspace, cache_gradients, correctness_loss, head_attribution and evaluate take it
    (a Capability, its list of Examples, or the path of its JSONL), each with its own prompts."""
    from spd_lens.attribution import head_attribution
    from spd_lens.evaluate import evaluate

    model = spd_lens.load_model("tiny")
    examples = plus_one(24, system="Answer with a number.")
    cap = spd_lens.capability(examples, name="plus-one", max_new_tokens=4)
    path = write_jsonl(tmp_path / "plus-one.jsonl", [{"id": e.id, "prompt": e.prompt, "answer": e.reference,
                                                      "span": e.span_texts()[0], "system": e.system} for e in examples])
    from_task = spd_lens.extract_subspace(model, cap, n=4, rank=2)
    from_file = spd_lens.extract_subspace(model, str(path), n=4, rank=2)
    from_list = spd_lens.extract_subspace(model, cap.examples("train", n=4), rank=2)
    assert from_task.meta["task"] == from_file.meta["task"] == "plus-one"
    assert from_task.meta["examples_sha256"] == from_file.meta["examples_sha256"] == from_list.meta["examples_sha256"]
    cache = spd_lens.cache_gradients(model, cap, n=4)
    assert len(cache.example_ids) == 4
    assert spd_lens.correctness_loss(model, cap, n=4) == pytest.approx(spd_lens.correctness_loss(model, cap.examples("train", n=4)))
    rows = head_attribution(model, cap, n=4, score_top=1, score_n=1, subspace=from_task)
    assert len(rows) == 4 and sum(r["delta_score"] is not None for r in rows) == 1  # the subspace's 2 layers x 2 heads
    result = evaluate(model, model.tokenizer, cap, n=3, generations=tmp_path / "eval.jsonl",
                      config=SamplingConfig(max_new_tokens=4))
    records = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert result.n == 3 and all(r["messages"][0]["content"] == "Answer with a number." for r in records)
    assert evaluate(model, model.tokenizer, examples[:2], generations=tmp_path / "list.jsonl",  # a plain list
                    config=SamplingConfig(max_new_tokens=2)).n == 2


def test_spd_lens_run_distils_a_capability_from_a_jsonl_end_to_end(tmp_path, monkeypatch, capsys):
    from spd_lens.cli import main as cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_scorer.py").write_text(
        "def first_digit(example, completion):\n    return completion.strip()[:1] == example.reference[:1]\n")
    write_jsonl(tmp_path / "mine.jsonl", [{"id": f"p{i}", "prompt": f"What is {i} + 1?", "answer": f"It is {i + 1}.",
                                           "span": str(i + 1)} for i in range(40)])
    (tmp_path / "run.toml").write_text(
        'seeds = [0]\nmethods = ["base", "psr", "spd"]\n[model]\nname = "tiny"\n'
        '[task]\nexamples = "mine.jsonl"\nscorer = "my_scorer:first_digit"\ntrain_n = 4\neval_n = 3\n'
        '[subspace]\nn = 4\n[sampling]\nmax_new_tokens = 4\n[eval]\nmax_new_tokens = 4\n[train]\nepochs = 1\n')
    assert cli(["run", "run.toml", "--out", "out"]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["task"] == "mine" and set(metrics["methods"]) == {"base", "psr", "spd"}
    assert all(m["questions"] == 3 for m in metrics["methods"].values())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["task"]["examples"] == "mine.jsonl"
    (tmp_path / "run.toml").write_text((tmp_path / "run.toml").read_text().replace("first_digit", "nope"))
    assert cli(["run", "run.toml", "--out", "out2"]) == 2
    assert "module 'my_scorer' has no function 'nope'" in capsys.readouterr().err


def test_config_and_command_line_take_your_examples(tmp_path, capsys):
    from spd_lens.cli import main as cli
    from spd_lens.config import build_task, config_from_dict

    path = write_jsonl(tmp_path / "caps.jsonl", [{"id": f"c{i}", "prompt": f"Say {i}.", "answer": str(i)} for i in range(12)])
    config = config_from_dict({"task": {"examples": str(path), "scorer": f"{SCORER_MODULE}:always_right",
                                         "options": {"max_new_tokens": 8}}})
    task = build_task(config)
    assert isinstance(task, Capability) and config.task.name == task.name == "caps" and task.max_new_tokens == 8
    assert task.score(task.all_examples()[0], "anything").passed
    for bad, message in ((({"scorer": "m:f"}), "task.scorer = 'm:f' scores your own examples"),
                         ({"examples": str(path), "preset": "easy"}, "task.data and task.preset belong to shipped"),
                         ({"examples": str(path), "options": {"max_digits": 1}}, "takes only max_new_tokens")):
        with pytest.raises(SpdLensError, match=message):
            build_task(config_from_dict({"task": bad}))
    out = tmp_path / "eval.json"
    assert cli(["eval", "--model", "tiny", "--task", str(path), "--n", "2", "--max-new-tokens", "2",
                "--scorer", f"{SCORER_MODULE}:always_right", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "caps" and result["n"] == 2 and result["score"] == 1.0
    assert cli(["eval", "--model", "tiny", "--task", "arithmetic", "--scorer", "m:f", "--out", str(out)]) == 2
    assert "--scorer scores your own examples" in capsys.readouterr().err
