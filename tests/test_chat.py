from spd_lens.chat import encode, end_of_turn_ids, render_conversation, render_prompt


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
    import copy

    tok = copy.copy(tiny_tokenizer)
    tok.chat_template = None
    conv = render_conversation(tok, "Q", "A")
    assert conv.text.startswith("User: Q\nAssistant: A")
