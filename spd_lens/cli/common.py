"""What several command groups share: argument types, task and runtime options, progress bars."""

from __future__ import annotations

import argparse
import dataclasses

from spd_lens.errors import SpdLensError

DEFAULT_MODEL = "smollm2-135m-instruct"


def int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 14,29, got {text!r}") from None


def progress(desc: str):
    from tqdm.auto import tqdm

    return lambda iterable: tqdm(iterable, desc=desc, unit="batch")


def progress_labelled(label: str):
    """A progress bar for a command's steps, which also ends the command between steps once Ctrl-C
    or SIGTERM asked it to (`stopping.check`: a stop whose exception a destructor swallowed)."""
    from tqdm.auto import tqdm

    from spd_lens.cli.stopping import check

    class StoppableBar(tqdm):
        def __iter__(self):
            for item in super().__iter__():
                check()
                yield item

        def update(self, n=1):
            check()
            return super().update(n)

    return lambda iterable: StoppableBar(iterable, desc=label, leave=False)


# --- where models run ---------------------------------------------------------------------------

def add_runtime_args(parser: argparse.ArgumentParser, config: bool = False) -> None:
    over = " (overrides the config's [model] setting)" if config else ""
    parser.add_argument("--device", help="auto (default: CUDA when present, else CPU), cpu, cuda or cuda:N" + over)
    parser.add_argument("--dtype", help="auto (default: bfloat16 on CUDA, else float32), float32, bfloat16 or "
                                        "float16" + over)


def runtime(args: argparse.Namespace):
    """The runtime of --device / --dtype, announced (`announce_runtime`): commands call it before loading a model."""
    from spd_lens.runtime import Runtime

    return announce_runtime(Runtime.resolve(args.device, args.dtype))


def announce_runtime(resolved):
    """Prints the resolved runtime's one line (device, dtype, torch build, CUDA available) first, once
    per process on the main process, and returns it."""
    from spd_lens.processes import Processes

    if Processes.current().is_main:
        print(resolved.banner(), flush=True)
    return resolved


def with_runtime(config, args: argparse.Namespace):
    """The config with --device / --dtype, where given, as its [model] settings."""
    from spd_lens.runtime import check_device, check_dtype

    changes = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    check_device(changes.get("device", "auto"))
    check_dtype(changes.get("dtype", "auto"))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes)) if changes else config


# --- tasks ----------------------------------------------------------------------------------------

def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", metavar="FILE|SPLIT=FILE",
                        help="local JSONL for hub tasks such as gsm8k, mbpp, mmlu: FILE (divided by hash into "
                             "train/dev/test), a directory with train.jsonl and test.jsonl, or SPLIT=FILE per split, "
                             "each used whole (repeatable, e.g. --data test=gsm8k_test.jsonl)")
    parser.add_argument("--preset", help="difficulty preset of a procedural task (arithmetic, family-mc: easy, hard)")
    parser.add_argument("--option", action="append", metavar="KEY=VALUE",
                        help="a task option, e.g. max_digits=1 or num_options=3 (repeatable)")
    parser.add_argument("--shots", type=int, help="demonstrations from the train split before each question "
                        "(default: 0 with a chat template, the task's base_shots without one)")
    add_scorer_argument(parser)


def add_scorer_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scorer", metavar="MODULE:FUNCTION",
                        help="with --task FILE.jsonl (your own examples): the function (example, completion) -> "
                             "Score or bool that scores them (default: the answer span in the final answer)")


def data_source(values: list[str] | None):
    """--data FILE (or directory), or --data train=FILE --data test=FILE: each file used whole as its split."""
    if not values:
        return None
    pairs = [v.partition("=") for v in values]
    if len(values) == 1 and not pairs[0][1]:
        return values[0]
    if any(not sep or split not in ("train", "dev", "test") for split, sep, _ in pairs) or len({p[0] for p in pairs}) != len(pairs):
        raise SpdLensError(f"--data {values}: give one FILE (divided by hash into train/dev/test), a directory with "
                           "train.jsonl and test.jsonl, or SPLIT=FILE once per split, e.g. --data test=gsm8k_test.jsonl")
    return {split: path for split, _, path in pairs}


def task_options(args: argparse.Namespace, tokenizer) -> dict:
    """get_task options from --data, --preset, --option and --shots (default: `tasks.default_shots`)."""
    from spd_lens.tasks import TASKS, default_shots

    data = data_source(args.data)
    options = {"path": data} if data else {}
    if args.preset:
        options["preset"] = args.preset
    for text in args.option or []:
        key, sep, value = text.partition("=")
        if not sep or not key:
            raise SpdLensError(f"--option {text!r}: write KEY=VALUE, e.g. --option max_digits=1")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    task_class = TASKS.get(args.task)
    shots = args.shots if args.shots is not None else default_shots(task_class, tokenizer) if task_class else 0
    return {**options, **scorer_option(args), "shots": shots}


def scorer_option(args: argparse.Namespace) -> dict:
    """{"scorer": ...} from --scorer, which only your own examples (--task FILE.jsonl) take."""
    from spd_lens.tasks import TASKS

    scorer = getattr(args, "scorer", None)
    if scorer is None:
        return {}
    if args.task in TASKS:
        raise SpdLensError(f"--scorer scores your own examples (--task FILE.jsonl); task {args.task!r} has its own "
                           "scorer: drop --scorer")
    return {"scorer": scorer}


# --- the code sandbox -----------------------------------------------------------------------------

def add_sandbox_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("code sandbox (tasks that run model-written code)")
    group.add_argument("--unsafe-sandbox", action="store_true",
                       help="where neither root nor user namespaces are available, run the code anyway with only "
                            "resource limits (recorded in the output as unsafe); use only inside a throwaway VM")
    group.add_argument("--strict-sandbox", action="store_true",
                       help="show programs only the interpreter's installation and their working directory "
                            "(nothing of $HOME, /etc, /var, ...)")
    group.add_argument("--sandbox-backend", choices=["builtin", "bwrap"],
                       help="bwrap: build the sandbox with bubblewrap where installed (non-root runs); default builtin")


def sandbox_options(args: argparse.Namespace):
    from spd_lens.sandbox import SandboxOptions

    return SandboxOptions(strict=args.strict_sandbox, unsafe=args.unsafe_sandbox,
                          backend=args.sandbox_backend or "builtin")


def configured_task(args: argparse.Namespace, **options):
    """The task named on the command line, its code sandbox set from the flags and checked."""
    from spd_lens.tasks import get_task
    from spd_lens.tasks.code import configure_sandbox

    options = {**scorer_option(args), **options}
    return configure_sandbox(get_task(args.task, **options), sandbox_options(args))


def with_sandbox_flags(config, args: argparse.Namespace):
    """A config whose [sandbox] settings include the command line's flags."""
    s = config.sandbox
    return dataclasses.replace(config, sandbox=dataclasses.replace(
        s, strict=s.strict or args.strict_sandbox, unsafe=s.unsafe or args.unsafe_sandbox,
        backend=args.sandbox_backend or s.backend))


def with_flags(config, args: argparse.Namespace):
    """A config with the command line's runtime and sandbox flags applied."""
    return with_sandbox_flags(with_runtime(config, args), args)
