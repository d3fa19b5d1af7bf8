"""Chat formatting and tokenisation: the one place that knows how prompts become token ids.

The rendered chat template already holds every special token, so text is always tokenised with
`add_special_tokens=False` (otherwise the default model gets a stray `<|im_start|>` and babbles).
`to_chat_tokens(model, prompt)` is the one-call way to get the ids the model sees for a user
prompt; `load_model` sets the bridge's `default_prepend_bos` to False for chat models, so
`model.to_tokens(render_prompt(...))` and `model(rendered_text)` give the same ids.

System prompt: chat templates such as SmolLM2's add their default system turn when a conversation
has none. `system=None` keeps that default, `system="..."` puts your own, and `system=NO_SYSTEM`
(the empty string) leaves the system turn out (the rendered text then starts at the user turn).

Example:
    >>> from spd_lens.tiny_tokenizer import build_byte_tokenizer
    >>> tok = build_byte_tokenizer()
    >>> render_prompt(tok, "2+2?")
    '<|im_start|>user\\n2+2?<|im_end|>\\n<|im_start|>assistant\\n'
    >>> conversation = render_conversation(tok, "2+2?", "4")
    >>> conversation.text[conversation.answer_start:conversation.answer_end]
    '4'
    >>> render_prompt(tok, "2+2?", system="Be brief.").split("\\n")[1]
    'Be brief.<|im_end|>'
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from jaxtyping import Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from spd_lens.errors import SpdLensError

# Used when a tokenizer has no chat template of its own (base models).
PLAIN_TEMPLATE_USER = "User: {user}\nAssistant: "
# Where a base model that has finished its answer starts the next exchange of a transcript.
PLAIN_STOP = "\nUser:"
# `system=NO_SYSTEM` leaves the system turn out (None keeps the template's default system prompt).
NO_SYSTEM = ""
_MARKER = "\x00spd_lens_system\x00"


@dataclass(frozen=True)
class Conversation:
    """A rendered user turn plus assistant answer, with the answer's character range in `text`."""

    text: str
    answer_start: int
    answer_end: int

    @property
    def prompt(self) -> str:
        return self.text[: self.answer_start]


def messages(user: str, assistant: str | None = None, system: str | None = None) -> list[dict[str, str]]:
    """Chat `messages` records as trainers read them (a system turn only when `system` is text)."""
    turns = [{"role": "system", "content": system}] if system else []
    turns.append({"role": "user", "content": user})
    if assistant is not None:
        turns.append({"role": "assistant", "content": assistant})
    return turns


def record_system(record: dict) -> str | None:
    """The system turn a chat-`messages` record was made under: its `system` field (written by
    `spd_lens.sampling` for an example with its own system prompt; "" = no system turn), else the
    content of a system message, else None (the template's default).

    >>> record_system({"messages": messages("2+2?", "4", system="Be brief.")}), record_system({"system": ""})
    ('Be brief.', '')
    """
    if "system" in record:
        return record["system"]
    turns = record.get("messages")
    if isinstance(turns, list):
        for turn in turns:
            if isinstance(turn, dict) and turn.get("role") == "system":
                return turn.get("content")
    return None


def _apply_template(tokenizer: PreTrainedTokenizerBase, turns: list[dict], system: str | None,
                    add_generation_prompt: bool) -> str:
    if system != NO_SYSTEM:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Render with a marker system turn, then cut that turn out; what a template puts before every
    # conversation (a BOS token) stays.
    marked = [{"role": "system", "content": _MARKER}, *turns]
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=add_generation_prompt)
    system_turn = tokenizer.apply_chat_template(marked[:1], tokenize=False)
    if not text.startswith(system_turn) or _MARKER in text[len(system_turn):]:
        raise SpdLensError("this tokenizer's chat template cannot render a conversation without its system turn: "
                           "pass system='...' (your own system prompt) or system=None (the template's default)")
    rest = text[len(system_turn):]
    bos = tokenizer.bos_token
    # A BOS that opens the whole conversation (Llama 3) stays; ChatML turns each start with their own.
    lead = bos if bos and system_turn.startswith(bos) and not rest.startswith(bos) else ""
    return lead + rest


def render_prompt(tokenizer: PreTrainedTokenizerBase, user: str, *, system: str | None = None) -> str:
    """The text the model sees before it starts answering `user` (`system`: see the module docstring)."""
    if not tokenizer.chat_template:
        return (f"{system}\n" if system else "") + PLAIN_TEMPLATE_USER.format(user=user)
    return _apply_template(tokenizer, messages(user, system=system), system, add_generation_prompt=True)


def render_conversation(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str, *,
                        system: str | None = None) -> Conversation:
    """Prompt, answer and the end-of-turn marker, as the model would have produced them."""
    prompt = render_prompt(tokenizer, user, system=system)
    if not tokenizer.chat_template:
        text = prompt + assistant + (tokenizer.eos_token or "")
    else:
        text = _apply_template(tokenizer, messages(user, assistant, system=system), system, add_generation_prompt=False)
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


def encode_conversation(tokenizer: PreTrainedTokenizerBase, user: str, assistant: str, *,
                        system: str | None = None) -> EncodedConversation:
    conversation = render_conversation(tokenizer, user, assistant, system=system)
    encoding = tokenizer(conversation.text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    answer = [end > conversation.answer_start for _, end in offsets]
    return EncodedConversation(conversation, list(encoding["input_ids"]), offsets, answer)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of already-rendered text (no special tokens added)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def to_chat_tokens(model, prompt: str | list[str], *, system: str | None = None,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> Int[Tensor, "batch pos"]:
    """Token ids of the chat-formatted `prompt` (a user turn, then the assistant's opening), on the
    model's device: what spd_lens feeds the model (sampling, extraction) for the same prompt.

    `model` is a bridge (its `.tokenizer` is used) or a plain HF model with `tokenizer=`. A list of
    prompts is left-padded (pass `attention_mask` to an HF model; the bridge finds leading padding
    itself). Equals `model.to_tokens(render_prompt(model.tokenizer, prompt))` on a model from
    `load_model` (its `default_prepend_bos` is False for chat models); with `prepend_bos=True`,
    TransformerLens would add a second BOS in front of the rendered text.

    Example:
        >>> from spd_lens import load_model
        >>> model = load_model("tiny")
        >>> tokens = to_chat_tokens(model, "What is 2+2?")
        >>> bool((tokens == model.to_tokens(render_prompt(model.tokenizer, "What is 2+2?"))).all())
        True
    """
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise SpdLensError("a plain Hugging Face model carries no tokenizer: pass tokenizer=")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SpdLensError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    rendered = [render_prompt(tokenizer, p, system=system) for p in prompts]
    ids = tokenizer(rendered, add_special_tokens=False, padding=True, padding_side="left",
                    return_tensors="pt")["input_ids"]
    device = getattr(getattr(model, "cfg", None), "device", None) or getattr(model, "device", None)
    return ids.to(device) if device is not None else ids


def template_prefix(tokenizer: PreTrainedTokenizerBase, *, system: str | None = None) -> list[int]:
    """The token ids that prompts rendered by `render_prompt` start with (the template's opening:
    a system turn, the user header), found by rendering two unlike messages. A message whose first
    characters merge with the header's last token (e.g. one starting with a newline) may not start
    with it; `spd_lens.decode` then prefills that prompt whole.

    Example:
        >>> from spd_lens.models import load_hf
        >>> _, tokenizer = load_hf("tiny")
        >>> prefix = template_prefix(tokenizer)
        >>> encode(tokenizer, render_prompt(tokenizer, "2+2?"))[:len(prefix)] == prefix
        True
    """
    first, second = (encode(tokenizer, render_prompt(tokenizer, text, system=system)) for text in ("0", "Z ?"))
    length = next((i for i, (a, b) in enumerate(zip(first, second)) if a != b), min(len(first), len(second)))
    return first[:length]


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
