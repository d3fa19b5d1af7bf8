"""Log-likelihood scoring of multiple choice: no generation, the option labels' probabilities.

As evaluation harnesses score MMLU: the model reads the rendered prompt once, and its choice is
the option whose label is the most probable next token at the answer position. Which token that
is depends on the template. With a chat template the label is the first token of the assistant
turn, written without a space ("A" after "<|im_start|>assistant\\n": the template ends the line;
for SmolLM2-135M-Instruct the four letters take 87% of the next-token probability on 200 family-mc
questions, " A" under 0.02% on the one looked at).
With the plain "User: ...\\nAssistant: " prompt of models without a template, the prompt's
trailing space moves into the label (" A"), the way the text tokenises had the model written it.
Every label must be a single token there; a label that is not is an error naming it.

The forward pass goes through the Hugging Face model (inside a bridge, its hooks still fire, so a
projection context applies), left-padded in batches with positions counted from each row's first
real token, so a question's log-probs do not depend on what it is batched with.

Example:
    >>> from spd_lens import get_task, load_hf
    >>> model, tok = load_hf("tiny")
    >>> rows = loglik_choices(model, tok, get_task("family-mc").examples("test", n=2), batch_size=2)
    >>> sorted(rows[0]["logprobs"]), rows[0]["chosen"] in "ABCD"
    (['A', 'B', 'C', 'D'], True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from spd_lens.chat import encode, render_prompt
from spd_lens.errors import SpdLensError
from spd_lens.models import hf_model_of
from spd_lens.tasks import Example


@dataclass(frozen=True)
class ChoiceQuery:
    """One question as the model reads it: the prompt's token ids and each label's next-token id."""

    example: Example
    context_ids: list[int]
    label_ids: dict[str, int]


def choice_query(tokenizer: PreTrainedTokenizerBase, example: Example) -> ChoiceQuery:
    """Tokenise the rendered prompt and find the single token each option label is written as."""
    labels = example.meta.get("labels")
    if not labels:
        raise SpdLensError(f"example {example.id!r} has no option labels: log-likelihood scoring needs a "
                           "multiple-choice task (family-mc, mmlu, arc)")
    rendered = render_prompt(tokenizer, example.prompt, system=example.system)  # the prompt the example carries
    context = rendered.rstrip(" ")
    gap = rendered[len(context):]  # a trailing space belongs to the label, as harnesses split it
    context_ids = encode(tokenizer, context)
    label_ids = {}
    for label in labels:
        whole = encode(tokenizer, context + gap + label)
        if whole[:len(context_ids)] != context_ids or len(whole) != len(context_ids) + 1:
            pieces = tokenizer.convert_ids_to_tokens(whole[len(context_ids):])
            raise SpdLensError(f"option label {gap + label!r} of example {example.id!r} is not one token after the "
                               f"prompt for this tokenizer (it is {pieces}); log-likelihood scoring compares single "
                               "label tokens: use single-character labels such as A-D")
        label_ids[label] = whole[-1]
    return ChoiceQuery(example, context_ids, label_ids)


def answer_logprobs(model, ids: Int[Tensor, "batch pos"],
                    attention: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch vocab"]:
    """Log-probabilities of the next token after each left-padded row."""
    hf = hf_model_of(model)
    # Positions count from each row's first real token, as in generation.
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=False,
                    logits_to_keep=1).logits
    return logits[:, -1].float().log_softmax(-1)


def loglik_choices(model, tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], batch_size: int = 8,
                   progress: Callable[[Iterable], Iterable] | None = None) -> list[dict]:
    """Each example's label log-probabilities and the label chosen by them, in order.

    A row: `prompt_id`, `target`, `logprobs` (label -> log-probability over the whole
    vocabulary), `chosen` (the most probable label), `passed` (chosen == target) and
    `label_mass` (the probability on all labels together: how much the model means to answer
    with a label at all).
    """
    if batch_size < 1:
        raise SpdLensError(f"batch_size must be >= 1, got {batch_size}")
    queries = [choice_query(tokenizer, example) for example in examples]
    device = hf_model_of(model).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    starts = range(0, len(queries), batch_size)
    for start in progress(starts) if progress else starts:
        batch = queries[start:start + batch_size]
        length = max(len(q.context_ids) for q in batch)
        ids = torch.tensor([[pad] * (length - len(q.context_ids)) + q.context_ids for q in batch], device=device)
        attention = torch.tensor([[0] * (length - len(q.context_ids)) + [1] * len(q.context_ids) for q in batch],
                                 device=device)
        logprobs = answer_logprobs(model, ids, attention).cpu()
        for query, row in zip(batch, logprobs):
            values = {label: float(row[token]) for label, token in query.label_ids.items()}
            chosen = max(values, key=values.get)
            rows.append({"prompt_id": query.example.id, "target": query.example.target, "logprobs": values,
                         "chosen": chosen, "passed": chosen == query.example.target,
                         "label_mass": float(torch.tensor(list(values.values())).exp().sum())})
    return rows
