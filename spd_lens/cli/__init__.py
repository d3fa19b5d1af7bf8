"""The `spd-lens` command: parse arguments, call the library, show progress, write results.

Every subcommand is a function taking parsed arguments, so tests call `main([...])` directly.
Commands live by group: `explore` (tasks, models, ask, extract, generate, heads, overlap),
`training` (train, eval, score) and `experiments` (demo, run, plan, ablate, report, compare);
`common` holds the options they share.
"""

from __future__ import annotations

import argparse
import sys

from spd_lens.errors import SpdLensError
from spd_lens.processes import Processes


def _set_threads(threads: int) -> None:
    import os

    import torch

    cores = os.cpu_count() or 1
    if not 1 <= threads <= 4 * cores:
        raise SpdLensError(f"--threads must be between 1 and {4 * cores} (this machine has {cores} cores), got {threads}")
    torch.set_num_threads(threads)


def build_parser() -> argparse.ArgumentParser:
    from spd_lens.cli import experiments, explore, training

    parser = argparse.ArgumentParser(
        prog="spd-lens",
        description="Self-Policy Distillation on TransformerLens: capability subspaces from correctness-token "
                    "gradients, projected self-generation, distillation and evaluation against baselines.",
        epilog="Start with `spd-lens demo`; `spd-lens COMMAND --help` for each command.",
    )
    parser.add_argument("--threads", type=int,
                        help="CPU threads for torch (default: all cores); see the README on running two jobs with 1 thread each")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (explore, experiments, training):
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`spd-lens ARGS`: 0 when done, 2 on a bad input (one line saying what and the fix), 130 / 143
    when stopped by Ctrl-C / SIGTERM (one line saying what was kept and the command to resume)."""
    from spd_lens.cli import stopping

    if argv is None:  # the console command (a test calling main([...]) keeps its own handlers)
        stopping.stop_on_signals()
    words = sys.argv[1:] if argv is None else list(argv)
    stopping.keep(None)
    try:
        args = build_parser().parse_args(argv)
        try:
            if args.threads is not None:
                _set_threads(args.threads)
            code = args.func(args)
            stopping.check()  # a stop whose exception a destructor swallowed still ends as a stop
            Processes.current().close()  # under torchrun: leave the process group together
            return code
        except SpdLensError as err:
            print(f"spd-lens {args.command}: error: {err}", file=sys.stderr)
            return 2
    except (KeyboardInterrupt, stopping.Stopped) as stop:
        import signal

        signum = stop.signum if isinstance(stop, stopping.Stopped) else signal.SIGINT
        print(stopping.line_for(words, signum), file=sys.stderr, flush=True)
        return 128 + signum
