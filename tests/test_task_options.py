"""Difficulty presets of the procedural tasks and k-shot prompts for models without a chat template."""

import copy
import json
import re

import pytest

from spd_lens import SpdLensError, get_task
from spd_lens.chat import PLAIN_STOP, cut_at_stop, few_shot_user, render_prompt, stop_strings
from spd_lens.config import build_task, config_from_dict
from spd_lens.evaluate import score_file
from spd_lens.sampling import SamplingConfig, generate_jsonl, sample
from spd_lens.tasks import default_shots


@pytest.fixture(scope="module")
def plain_tokenizer(tiny_tokenizer):
    """The tiny byte tokenizer without its chat template, as a base model's tokenizer is."""
    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = None
    return tok


def _terms(example) -> list[str]:
    expression = re.search(r"problem: (.*) =", example.prompt).group(1)
    return expression.split()[::2]


# --- difficulty -----------------------------------------------------------------------------------


def test_default_ids_are_unchanged_and_other_difficulties_are_named_in_the_id():
    assert get_task("arithmetic").examples("test", n=2, seed=0)[0].id == "arithmetic/test/0/1"
    assert get_task("arithmetic", preset="hard").examples("test", n=1, seed=0)[0].id == "arithmetic/test/0/1"
    assert get_task("family-mc").examples("test", n=1, seed=0)[0].id == "family-mc/test/0/1"
    assert get_task("arithmetic").examples("test", n=2, seed=1)[0].id == "arithmetic/test/s1/2"
    assert get_task("arithmetic", preset="easy").examples("test", n=1)[0].id.startswith("arithmetic@easy/test/0/")
    # Explicit options equal to a preset are that preset; others are spelled out.
    easy = get_task("arithmetic").presets["easy"]
    assert get_task("arithmetic", **easy).variant == "easy"
    assert get_task("arithmetic", max_digits=1).variant == "easy"
    assert get_task("arithmetic", operators="+").variant == "operators=+"
    assert get_task("family-mc", num_options=3, max_family_size=5).variant == "max_family_size=5,num_options=3"


@pytest.mark.parametrize("name, options", [
    ("arithmetic", {}), ("arithmetic", {"preset": "easy"}), ("arithmetic", {"max_digits": 1, "operators": "+"}),
    ("family-mc", {}), ("family-mc", {"preset": "easy"}), ("family-mc", {"num_options": 3, "min_family_size": 3}),
])
def test_any_instance_rebuilds_an_example_from_its_id(name, options):
    task = get_task(name, **options)
    examples = task.examples("test", n=3, seed=2) + task.examples("train", n=2, seed=0)
    default = get_task(name)
    for example in examples:
        assert default.example_by_id(example.id) == example
        assert default.example_by_id(example.id).prompt == example.prompt


@pytest.mark.parametrize("name", ["arithmetic", "family-mc"])
def test_seeds_draw_independent_questions_and_old_ids_still_rebuild(name):
    # reasoning-gym draws item i of seed g from Random(g + i): with seeds 2 apart, seed 1's
    # questions were seed 0's shifted by two items, so "three seeds" saw the same questions.
    task = get_task(name)
    first, second = (task.examples("train", n=60, seed=s) for s in (0, 1))
    shifted = [task.example_by_id(f"{name}/train/1/{i}") for i in range(8)]  # an id of the old spacing
    old_stream = task.examples("train", n=8, seed=0)
    def question(e):  # family-mc shuffles each example's options by its id: compare the puzzles
        return e.meta.get("question", e.prompt)

    assert {question(e) for e in shifted} & {question(e) for e in old_stream}  # the old streams overlapped
    shared = {question(e) for e in first} & {question(e) for e in second}
    assert len(shared) <= 20, f"seeds 0 and 1 share {len(shared)} of 60 questions"
    assert task.example_by_id(second[3].id) == second[3] and second[3].id.split("/")[2] == "s1"
    assert all(e.id == f"{name}/train/1/{i}" for i, e in enumerate(shifted))
    for bad in ("s-1/3", "s0/3", "01/3", "+1/3", "1/03", "s1_0/3"):
        with pytest.raises(SpdLensError, match="is not an example id"):
            task.example_by_id(f"{name}/train/{bad}")


def test_arithmetic_options_shape_the_questions():
    for example in get_task("arithmetic", min_terms=3, max_terms=3, max_digits=1).examples("train", n=20):
        assert len(_terms(example)) == 3 and all(len(t) == 1 for t in _terms(example))
    additions = get_task("arithmetic", operators="+").examples("train", n=20)
    assert all(" - " not in e.prompt for e in additions) and all(" + " in e.prompt for e in additions)
    hard = get_task("arithmetic").examples("train", n=60)
    assert any(len(t) == 2 for e in hard for t in _terms(e)) and any(" - " in e.prompt for e in hard)


def test_a_filtered_split_extends_its_stream_and_keeps_the_first_examples():
    # "+" keeps about half of the generated sums and dev a small share of those: the first pass
    # over the stream (20 n + 200 items) held 172 dev questions for n=200.
    task = get_task("arithmetic", operators="+")
    many = task.examples("dev", n=300, seed=0)
    assert len(many) == 300 and len({e.prompt for e in many}) == 300
    assert [e.id for e in task.examples("dev", n=100, seed=0)] == [e.id for e in many[:100]]
    assert task.example_by_id(many[-1].id).prompt == many[-1].prompt
    # A split with fewer distinct questions than asked still ends, with a clear error.
    with pytest.raises(SpdLensError, match="has only 43 test examples"):
        get_task("arithmetic", preset="easy").examples("test", n=100, seed=0)


def test_family_options_shape_the_questions():
    two = get_task("family-mc", num_options=2).examples("test", n=10)
    assert all(e.meta["labels"] == ["A", "B"] and e.target in "AB" for e in two)
    assert all("\nC. " not in e.prompt for e in two)
    small = get_task("family-mc", min_family_size=3, max_family_size=3).examples("train", n=10)
    # Three people: a grandfather, a grandmother and their son, one marriage and one child.
    assert all(e.prompt.count(" is married to ") == 1 and "child called" in e.prompt for e in small)


def test_train_and_test_stay_apart_at_every_difficulty():
    for options in ({"preset": "easy"}, {"num_options": 2}):
        task = get_task("arithmetic" if "preset" in options else "family-mc", **options)
        train = {e.prompt for e in task.examples("train", n=60)}
        assert not train & {e.prompt for e in task.examples("test", n=20)}


@pytest.mark.parametrize("name, options, message", [
    ("arithmetic", {"preset": "medium"}, r"no preset 'medium': use one of \['easy', 'hard'\]"),
    ("arithmetic", {"min_terms": 3, "max_terms": 2}, "max_terms must be >= min_terms"),
    ("arithmetic", {"operators": "*"}, "operators must be"),
    ("arithmetic", {"digits": 1}, "takes no option.*max_digits"),
    ("family-mc", {"num_options": 1}, "num_options must be 2-6"),
    ("family-mc", {"min_family_size": 2}, "3 <= min_family_size"),
    ("mmlu", {"preset": "easy"}, "takes no option"),
])
def test_bad_difficulty_options_are_named(name, options, message):
    with pytest.raises(SpdLensError, match=message):
        get_task(name, **options)


def test_an_id_of_an_unknown_difficulty_is_an_error():
    with pytest.raises(SpdLensError, match="'sideways' is not a difficulty"):
        get_task("arithmetic").example_by_id("arithmetic@sideways/test/0/3")
    with pytest.raises(SpdLensError, match="expected 'arithmetic"):
        get_task("arithmetic").example_by_id("arithmetic@/test/0/3")


def test_score_file_reads_stored_ids_of_every_difficulty(tmp_path):
    # Records as `spd-lens generate` wrote them before difficulty options existed, and with them.
    default = get_task("arithmetic").examples("test", n=3, seed=0)
    easy = get_task("arithmetic", preset="easy").examples("test", n=3, seed=0)
    path = tmp_path / "completions.jsonl"
    records = [{"prompt_id": e.id, "messages": [{"role": "user", "content": e.prompt},
                                                {"role": "assistant", "content": f"The answer is {e.target}."}]}
               for e in default + easy]
    records[0]["messages"][1]["content"] = "The answer is 12345."
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = score_file("arithmetic", path)
    assert [r["passed"] for r in result.results] == [False, True, True, True, True, True]
    assert result.results[3]["prompt_id"].startswith("arithmetic@easy/")


# --- shots ----------------------------------------------------------------------------------------


def test_shots_show_train_examples_and_never_the_question_itself():
    task = get_task("arithmetic", shots=3)
    for split in ("train", "test"):
        plain = get_task("arithmetic").examples(split, n=8, seed=1)
        shown = task.examples(split, n=8, seed=1)
        for before, after in zip(plain, shown):
            assert after.id == before.id and after.target == before.target and after.reference == before.reference
            demos = [get_task("arithmetic").example_by_id(i) for i in after.meta["shots"]]
            assert len(demos) == 3 and all("/train/" in d.id for d in demos)
            assert before.prompt not in [d.prompt for d in demos]
            assert after.prompt == few_shot_user([(d.prompt, d.reference) for d in demos], before.prompt)
            assert after.prompt.endswith(before.prompt)
    # Different examples see different demonstrations; the same example always the same ones.
    assert len({tuple(e.meta["shots"]) for e in task.examples("test", n=8, seed=1)}) > 1
    assert get_task("arithmetic", shots=3).examples("test", n=8, seed=1) == task.examples("test", n=8, seed=1)


def test_an_example_in_the_demonstration_pool_is_not_shown_itself():
    task = get_task("family-mc", shots=5)
    for example in task.examples("train", n=6, seed=0):  # seed 0: the pool's own examples
        question = get_task("family-mc").example_by_id(example.id).prompt
        assert example.prompt.count(question) == 1


def test_example_by_id_has_the_shots_of_the_task():
    task = get_task("family-mc", preset="easy", shots=2)
    example = task.examples("test", n=1)[0]
    assert get_task("family-mc", shots=2).example_by_id(example.id) == example
    assert get_task("family-mc", shots=2).example_by_id(example.id).prompt == example.prompt
    assert get_task("family-mc").example_by_id(example.id).prompt != example.prompt


def test_default_shots_depend_on_the_chat_template(tiny_tokenizer, plain_tokenizer):
    assert default_shots(get_task("arithmetic"), tiny_tokenizer) == 0
    assert default_shots(get_task("arithmetic"), plain_tokenizer) == 3
    assert default_shots(get_task("humaneval"), plain_tokenizer) == 1
    with pytest.raises(SpdLensError, match="shots must be"):
        get_task("arithmetic", shots=-1)
    with pytest.raises(SpdLensError, match="fewer than shots=40"):
        get_task("arithmetic", shots=40).examples("test", n=1)


def test_k_shot_prompt_renders_as_one_transcript_for_a_base_model(plain_tokenizer, tiny_tokenizer):
    example = get_task("arithmetic", preset="easy", shots=2).examples("test", n=1)[0]
    text = render_prompt(plain_tokenizer, example.prompt)
    exchanges = text.split("\n\n")
    assert len(exchanges) == 3 and all(x.startswith("User: State the final answer") for x in exchanges)
    assert [x.split("\nAssistant: ")[1] for x in exchanges[:2]] == [
        get_task("arithmetic").example_by_id(i).reference for i in example.meta["shots"]]
    assert text.endswith("Answer with just the number.\nAssistant: ")
    # With a chat template the demonstrations are one user message.
    chat = render_prompt(tiny_tokenizer, example.prompt)
    assert chat.count("<|im_start|>user") == 1 and chat.count("\nAssistant: ") == 2


def test_k_shot_spans_cover_only_the_answer(plain_tokenizer):
    task = get_task("family-mc", shots=3)
    for example in task.examples("train", n=3):
        encoded = task.locate(plain_tokenizer, example)
        chosen = [i for i, keep in zip(encoded.input_ids, encoded.correctness_mask) if keep]
        assert plain_tokenizer.decode(chosen) == example.target
        # The demonstrations' answer letters are prompt, not answer.
        assert not any(encoded.answer_mask[: encoded.prompt_length])
        assert encoded.prompt_length > 3 * 40


def test_stop_strings_only_without_a_chat_template(tiny_tokenizer, plain_tokenizer):
    assert stop_strings(tiny_tokenizer) == [] and stop_strings(plain_tokenizer) == [PLAIN_STOP] == ["\nUser:"]
    assert cut_at_stop("7\n\nUser: what", ["\nUser:"]) == "7\n"
    assert cut_at_stop("7", ["\nUser:"]) == "7" and cut_at_stop("a\nUser:b\nUser:", ["\nUser:", "b"]) == "a"


def test_sampling_stops_where_the_next_exchange_would_start(tiny_hf, plain_tokenizer, monkeypatch):
    import spd_lens.sampling

    model, _ = tiny_hf
    prompt = get_task("arithmetic", shots=1).examples("test", n=1)[0].prompt

    def usable(text):  # a printable two-character stretch, first seen after the fifth character
        return next((i for i in range(5, len(text) - 2) if text[i:i + 2].isascii() and text[i:i + 2].isprintable()
                     and text.find(text[i:i + 2]) == i), None)

    # The random model never writes "\nUser:"; a stop string taken from its own text shows that
    # generation halts there and the stop string is dropped. The first seed whose text has one:
    for seed in range(50):
        config = SamplingConfig(temperature=1.0, max_new_tokens=40, seed=seed)  # seeded: the same text every call
        free = sample(model, plain_tokenizer, [prompt], config)[0][0]
        if usable(free) is not None:
            break
    assert sample(model, plain_tokenizer, [prompt], config)[0][0] == free
    start = usable(free)
    monkeypatch.setattr(spd_lens.sampling, "stop_strings", lambda tok: [free[start:start + 2]])
    assert sample(model, plain_tokenizer, [prompt], config)[0][0] == free[:start]
    # Generation itself halts at the stop string (one byte token each), not only the text.
    monkeypatch.setattr(spd_lens.sampling, "cut_at_stop", lambda text, stops: text)
    assert sample(model, plain_tokenizer, [prompt], config)[0][0] == free[:start + 2]


def test_a_base_model_sees_one_prompt_in_every_stage(tiny_hf, plain_tokenizer, tmp_path):
    from spd_lens.extract import extract_subspace
    from spd_lens.train import TrainConfig, build_features, read_training_records

    model, _ = tiny_hf
    task = get_task("arithmetic", preset="easy", shots=2)
    examples = task.examples("train", n=3, seed=1)
    rendered = [render_prompt(plain_tokenizer, e.prompt) for e in examples]
    assert all(text.count("\nAssistant: ") == 3 for text in rendered)
    # Extraction: the gradients' sequences start with the same rendered prompt (one token a byte).
    for example, text in zip(examples, rendered):
        encoded = task.locate(plain_tokenizer, example)
        assert plain_tokenizer.decode(encoded.input_ids[:encoded.prompt_length]) == text
    subspace = extract_subspace(model, task, n=3, seed=1, rank=2, tokenizer=plain_tokenizer)
    assert subspace.meta["n_rows"] > sum(len(text) for text in rendered)  # every position, demonstrations too
    # Self-generation exports the prompt; training renders it again the same way.
    path = generate_jsonl(model, plain_tokenizer, examples, tmp_path / "gen.jsonl", SamplingConfig(max_new_tokens=4),
                          task=task.name)
    features = build_features(plain_tokenizer, read_training_records(path), TrainConfig())
    assert [plain_tokenizer.decode(f["input_ids"])[:len(t)] for f, t in zip(features, rendered)] == rendered
    # Evaluation and scoring rebuild the same prompts from the ids.
    assert [task.example_by_id(e.id).prompt for e in examples] == [e.prompt for e in examples]


def test_resume_refuses_generations_of_other_shots(tmp_path, tiny_hf):
    model, tokenizer = tiny_hf
    config = SamplingConfig(max_new_tokens=4)
    out = tmp_path / "gen.jsonl"
    generate_jsonl(model, tokenizer, get_task("arithmetic").examples("train", n=2), out, config, task="arithmetic")
    with pytest.raises(SpdLensError, match="prompts_sha256: file has"):
        generate_jsonl(model, tokenizer, get_task("arithmetic", shots=1).examples("train", n=2), out, config,
                       task="arithmetic")


# --- config and CLI -------------------------------------------------------------------------------


def test_config_takes_preset_options_and_shots(tiny_tokenizer, plain_tokenizer):
    config = config_from_dict({"task": {"name": "family-mc", "preset": "easy", "options": {"max_family_size": 5}}})
    task = build_task(config, tiny_tokenizer)
    assert (task.num_options, task.variant, task.shots) == (3, "max_family_size=5,num_options=3", 0)
    assert build_task(config, plain_tokenizer).shots == 3
    assert build_task(config_from_dict({"task": {"shots": 1}}), plain_tokenizer).shots == 1
    with pytest.raises(SpdLensError, match="pass the model's tokenizer"):
        build_task(config)
    # The calibration task is [task] itself, or another task at its default difficulty.
    assert build_task(config, plain_tokenizer, calibration=True).variant == "max_family_size=5,num_options=3"
    other = config_from_dict({"task": {"preset": "easy", "shots": 2}, "subspace": {"task": "family-mc"}})
    calibration = build_task(other, calibration=True)
    assert (calibration.name, calibration.variant, calibration.shots) == ("family-mc", "", 2)
    assert config_from_dict({}).task.options == {} and config_from_dict({}).task.shots is None


@pytest.mark.parametrize("values, message", [
    ({"task": {"preset": "medium"}}, "no preset 'medium'"),
    ({"task": {"options": {"digits": 1}}}, "takes no option"),
    ({"task": {"options": 3}}, "task.options must be a table"),
    ({"task": {"shots": -2}}, "shots must be"),
])
def test_bad_task_settings_are_refused_when_the_config_loads(values, message):
    with pytest.raises(SpdLensError, match=message):
        config_from_dict(values)


def test_eval_cli_with_preset_and_shots(tmp_path, capsys):
    from spd_lens.cli import main

    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "tiny", "--task", "arithmetic", "--preset", "easy", "--option", "operators=+",
                 "--shots", "2", "--n", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    generations = [json.loads(line) for line in open(out.with_suffix(".generations.jsonl"))]
    assert all(g["prompt_id"].startswith("arithmetic@") and "operators=+" in g["prompt_id"] for g in generations)
    assert all(g["messages"][0]["content"].count("\nAssistant: ") == 2 for g in generations)
    assert main(["eval", "--model", "tiny", "--task", "arithmetic", "--option", "max_digits", "--out", str(out)]) == 2
    assert "write KEY=VALUE" in capsys.readouterr().err


def test_resolved_config_of_earlier_runs_is_unchanged():
    # A run directory written before these settings existed must still match its config.
    assert set(config_from_dict({}).to_dict()["task"]) == {"name", "data", "train_n", "eval_n", "eval_split"}
    task = config_from_dict({"task": {"preset": "easy", "shots": 0}}).to_dict()["task"]
    assert (task["preset"], task["shots"]) == ("easy", 0) and "options" not in task
