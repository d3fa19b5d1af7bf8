import copy
from dataclasses import replace

import pytest
import torch

from spd_lens import SpdLensError
from spd_lens.chat import NO_SYSTEM, encode, end_of_turn_ids, render_conversation, render_prompt, to_chat_tokens
from spd_lens.models import load_hf
from spd_lens.tasks import Example, locate_spans


def test_conversation_answer_range_and_prompt_prefix(tiny_tokenizer):
    conv = render_conversation(tiny_tokenizer, "What is 2+2?", "4")
    assert conv.text[conv.answer_start:conv.answer_end] == "4"
    assert conv.prompt == render_prompt(tiny_tokenizer, "What is 2+2?")
    assert conv.text.endswith("<|im_end|>\n")


def test_encode_adds_no_special_tokens(tiny_tokenizer):
    ids = encode(tiny_tokenizer, "ab")
    assert tiny_tokenizer.decode(ids) == "ab" and len(ids) == 2


def test_end_of_turn_ids_include_im_end(tiny_tokenizer):
    assert tiny_tokenizer.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tiny_tokenizer)


def test_plain_template_for_tokenizers_without_chat_template(tiny_tokenizer):
    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = None
    conv = render_conversation(tok, "Q", "A")
    assert conv.text.startswith("User: Q\nAssistant: A")


# A ChatML template that, like SmolLM2's, adds a default system turn when there is none.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nDefault system.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = DEFAULT_SYSTEM_TEMPLATE
    return tok


def test_system_prompt_default_own_or_left_out(chat_tokenizer):
    default = render_prompt(chat_tokenizer, "Q")
    assert default.startswith("<|im_start|>system\nDefault system.<|im_end|>\n<|im_start|>user\nQ")
    own = render_prompt(chat_tokenizer, "Q", system="Be brief.")
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ")
    left_out = render_prompt(chat_tokenizer, "Q", system=NO_SYSTEM)
    assert left_out == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
    conv = render_conversation(chat_tokenizer, "Q", "A", system=NO_SYSTEM)
    assert conv.prompt == left_out and conv.text[conv.answer_start:conv.answer_end] == "A"


def test_a_template_that_opens_with_bos_keeps_it_without_the_system_turn(chat_tokenizer):
    chat_tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
        "<|end_header_id|>\n\n{% endif %}")
    text = render_prompt(chat_tokenizer, "Q", system=NO_SYSTEM)
    assert text == "<|im_start|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def test_example_system_reaches_the_correctness_tokens(chat_tokenizer):
    plain = Example("e/0", "What is 2+2?", "4", ((0, 1),))
    located = locate_spans(chat_tokenizer, plain)
    without = locate_spans(chat_tokenizer, replace(plain, system=NO_SYSTEM))
    assert chat_tokenizer.decode(without.input_ids) == render_conversation(chat_tokenizer, plain.prompt, "4",
                                                                           system=NO_SYSTEM).text
    system_turn = encode(chat_tokenizer, "<|im_start|>system\nDefault system.<|im_end|>\n")
    assert located.input_ids == system_turn + without.input_ids
    assert sum(without.correctness_mask) == sum(located.correctness_mask) == 1


def test_chat_tokens_equal_transformer_lens_tokens_and_logits(tiny_bridge):
    tokenizer = tiny_bridge.tokenizer
    rendered = render_prompt(tokenizer, "What is 2+2?")
    tokens = to_chat_tokens(tiny_bridge, "What is 2+2?")
    assert tokens[0].tolist() == encode(tokenizer, rendered)
    assert torch.equal(tiny_bridge.to_tokens(rendered), tokens)  # no second BOS in front
    assert tiny_bridge.to_str_tokens(rendered)[:2] == ["<|im_start|>", "u"]
    with torch.no_grad():
        assert torch.equal(tiny_bridge(rendered), tiny_bridge(tokens))
    assert tiny_bridge.to_tokens(rendered, prepend_bos=True).shape[1] == tokens.shape[1] + 1  # asked for: given
    batch = to_chat_tokens(tiny_bridge, ["Q", "A longer question?"])
    assert batch.shape == (2, tokens.shape[1] - len("What is 2+2?") + len("A longer question?"))
    assert batch[0, 0].item() == tokenizer.pad_token_id  # left-padded, as the bridge and sampling expect
    hf, _ = load_hf("tiny")
    assert torch.equal(to_chat_tokens(hf, "What is 2+2?", tokenizer=tokenizer), tokens)
    with pytest.raises(SpdLensError, match="pass tokenizer="):
        to_chat_tokens(hf, "What is 2+2?")
    with pytest.raises(SpdLensError, match="non-empty list of strings"):
        to_chat_tokens(tiny_bridge, [])
