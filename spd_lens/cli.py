"""The `spd-lens` command: parse arguments, call the library, show progress, write results.

Every subcommand is a function taking parsed arguments, so tests call `main([...])` directly.
"""

from __future__ import annotations

import argparse
import sys

from spd_lens.errors import SpdLensError


def cmd_tasks(args: argparse.Namespace) -> int:
    from spd_lens.tasks import TASKS

    width = max(len(name) for name in TASKS)
    for name, cls in TASKS.items():
        print(f"{name:<{width}}  {cls.family:<5}  {cls.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from spd_lens.models import EMBEDDED_MODELS, TINY_MODEL

    for name, spec in EMBEDDED_MODELS.items():
        print(f"{name}  (default) {spec.description}")
    print(f"{TINY_MODEL}  a 4-layer random Llama with a byte tokenizer, for tests")
    print("or any local directory / hub id of a Hugging Face causal LM")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    """Greedy answer of the model to one question (a quick check that a model loads and speaks)."""
    import torch

    from spd_lens.chat import encode, end_of_turn_ids, render_prompt
    from spd_lens.models import load_hf

    model, tokenizer = load_hf(args.model)
    ids = torch.tensor([encode(tokenizer, render_prompt(tokenizer, args.question))])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, eos_token_id=end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spd-lens", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("tasks", help="list the tasks").set_defaults(func=cmd_tasks)
    commands.add_parser("models", help="list the built-in model names").set_defaults(func=cmd_models)

    ask = commands.add_parser("ask", help="greedy answer of a model to one question")
    ask.add_argument("question")
    ask.add_argument("--model", default="smollm2-135m-instruct")
    ask.add_argument("--max-new-tokens", type=int, default=48)
    ask.set_defaults(func=cmd_ask)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SpdLensError as err:
        print(f"spd-lens {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
