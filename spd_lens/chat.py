"""Chat formatting and tokenisation: the one place that knows how prompts become token ids.

The rendered chat template already holds every special token, so text is always tokenised with
`add_special_tokens=False` (otherwise the default model gets a stray `<|im_start|>` and babbles).

Example:
    >>> from spd_lens.tiny_tokenizer import build_byte_tokenizer
    >>> tok = build_byte_tokenizer()
    >>> render_prompt(tok, "2+2?")
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n'
    >>> conversation = render_conversation(tok, "2+2?", "4")
    >>> conversation.text[conversation.answer_start:conversation.answer_end]
    '4'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

# Used when a tokenizer has no chat template of its own (base models).
PLAIN_TEMPLATE_USER = "User: {user}\nAssistant: "
# Where a base model that has finished its answer starts the next exchange of a transcript.
PLAIN_STOP = "\nUser:"


@dataclass(frozen=True)
class Conversation:
    """A rendered user turn plus assistant answer, with the answer's character range in `text`."""

    text: str
    answer_start: int
    answer_end: int

    @property
    def prompt(self) -> str:
        return self.text[: self.answer_start]


def messages(user: str, assistant: str | None = None) -> list[dict[str, str]]:
    """Chat `messages` records as trainers read them."""
    turns = [{"role": "user", "content": user}]
    if assistant is not None:
        turns.append({"role": "assistant", "content": assistant})
    return turns


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The text the model sees before it starts answering `user`."""
    if not tokenizer.chat_template:
        return PLAIN_TEMPLATE_USER.format(user=user)
    return tokenizer.apply_chat_template(messages(user), tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str) -> Conversation:
    """Prompt, answer and the end-of-turn marker, as the model would have produced them."""
    prompt = render_prompt(tokenizer, user)
    if not tokenizer.chat_template:
        text = prompt + assistant + (tokenizer.eos_token or "")
    else:
        text = tokenizer.apply_chat_template(messages(user, assistant), tokenize=False)
        if not text.startswith(prompt + assistant):
            # Templates that rewrite the assistant turn (e.g. strip reasoning) break the alignment.
            text = prompt + assistant + (tokenizer.eos_token or "")
    return Conversation(text=text, answer_start=len(prompt), answer_end=len(prompt) + len(assistant))


@dataclass(frozen=True)
class EncodedConversation:
    """Token ids of a rendered conversation, each token's character offsets, and which are the answer's."""

    conversation: Conversation
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    answer_mask: list[bool]  # the answer's tokens and the end-of-turn marker after it


def encode_conversation(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str) -> EncodedConversation:
    conversation = render_conversation(tokenizer, user, assistant)
    encoding = tokenizer(conversation.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    answer = [end > conversation.answer_start for _, end in offsets]
    return EncodedConversation(conversation, list(encoding["input_ids"]), offsets, answer)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already-rendered text (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an assistant turn (generation stops on any of them)."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def few_shot_user(demonstrations: Sequence[tuple[str, str]], user: str) -> str:
    """A user turn that holds worked exchanges before `user`, written in the plain template's format.

    `render_prompt` of the result on a tokenizer without a chat template is one transcript, each
    demonstration an exchange of its own, ending where the model answers `user`:

    >>> from spd_lens.tiny_tokenizer import build_byte_tokenizer
    >>> tok = build_byte_tokenizer()
    >>> tok.chat_template = None
    >>> render_prompt(tok, few_shot_user([("1+1?", "2"), ("2+3?", "5")], "4+4?")).split("\\n\\n")
    ['User: 1+1?\\nAssistant: 2', 'User: 2+3?\\nAssistant: 5', 'User: 4+4?\\nAssistant: ']

    With a chat template the same text is one user message.
    """
    head, tail = PLAIN_TEMPLATE_USER.split("{user}")
    exchanges = [PLAIN_TEMPLATE_USER.format(user=q) + a for q, a in demonstrations]
    transcript = "\n\n".join([*exchanges, PLAIN_TEMPLATE_USER.format(user=user)])
    return transcript[len(head):len(transcript) - len(tail)]


def stop_strings(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Text that ends an answer besides the end-of-turn tokens: without a chat template, the start
    of the next exchange (a base model rarely emits its end-of-text token after an answer)."""
    return [] if tokenizer.chat_template else [PLAIN_STOP]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first of `stops` (all of it when none occurs)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
