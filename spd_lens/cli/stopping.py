"""Ctrl-C and SIGTERM: a command ends with one line naming what was kept and how to go on.

SIGTERM (`kill`, a scheduler's preemption) is raised as `Stopped`, which like KeyboardInterrupt
is no `Exception`: `finally` blocks run on the way out, so a stopped call's time is recorded and
nothing half-written is presented as finished. `main` catches both, prints the line and exits
128 + the signal's number (130 for Ctrl-C, 143 for SIGTERM), with no traceback.

Each command that keeps work says what it kept through `keep(describe)`: `describe()` is called
only when the command is stopped, and reads the files it wrote.

Example:
    >>> stopped_line(["run", "c.toml", "--out", "runs/c"], 2, "1/3 evaluations finished")
    'spd-lens run: stopped by Ctrl-C (SIGINT); kept: 1/3 evaluations finished; rerun `spd-lens run c.toml --out runs/c` to resume'
"""

from __future__ import annotations

import json
import shlex
import signal
from collections.abc import Callable
from pathlib import Path

_describe: Callable[[], str] | None = None


class Stopped(BaseException):
    """A signal (SIGTERM) ending the command, raised where Python code runs next."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


_pending: int | None = None  # the signal that asked this command to stop, once one has


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signum)


def stop_on_signals() -> None:
    """End the command on SIGTERM as on Ctrl-C (see the module docstring), and remember the signal:
    an exception raised while a destructor runs (a progress bar's, a tensor's) is only printed by
    Python, and the command would go on as if never stopped; `check` raises it again."""
    import threading

    global _pending
    _pending = None  # a new command: no stop asked for yet

    def stop(signum, frame):
        global _pending
        _pending = signum
        _raise(signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)


def check() -> None:
    """Raise again a stop whose first exception was swallowed (called between steps of a command
    and when it returns); nothing when no signal came."""
    if _pending is not None:
        _raise(_pending)


def keep(describe: Callable[[], str] | None) -> None:
    """Register what the running command keeps when stopped (None: nothing)."""
    global _describe
    _describe = describe


def _kept() -> str | None:
    if _describe is None:
        return None
    try:
        return _describe()
    except Exception as err:  # noqa: BLE001 - the line must still be printed
        return f"(what was kept could not be read: {type(err).__name__})"


def stopped_line(words: list[str], signum: int, kept: str | None = None) -> str:
    """The one line printed when a command is stopped: which signal, what was kept, the command to
    run again (the same words: every stage resumes from what it finished)."""
    how = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else f"{signal.Signals(signum).name}"
    command = "spd-lens " + shlex.join(words)
    name = next((w for w in words if not w.startswith("-")), "")
    if kept:
        return f"spd-lens {name}: stopped by {how}; kept: {kept}; rerun `{command}` to resume"
    return f"spd-lens {name}: stopped by {how}; nothing was kept; rerun `{command}` to start again"


def line_for(words: list[str], signum: int) -> str:
    """`stopped_line` with what the running command registered through `keep`."""
    return stopped_line(words, signum, _kept())


# --- what commands keep -------------------------------------------------------------------------------

def partial_records(out: Path) -> tuple[int, int | None]:
    """Records kept towards the JSONL `out` (in `OUT.partial`, or the per-process parts) and how
    many the call makes (from the first record's settings: prompts x samples), where it says."""
    lines, total = 0, None
    for part in sorted(out.parent.glob(out.name + "*.partial")):
        with open(part, "rb") as handle:
            for line in handle:
                if not line.endswith(b"\n"):
                    continue  # a torn last line: dropped on resume
                lines += 1
                if total is None:
                    try:
                        settings = json.loads(line).get("settings", {})
                        total = settings["n_prompts"] * settings.get("num_samples", 1)
                    except (ValueError, KeyError, TypeError, AttributeError):
                        pass
    return lines, total


def _records(out: Path, root: Path) -> str:
    kept, total = partial_records(out)
    where = out.relative_to(root) if out.is_relative_to(root) else out
    return f"{kept}/{total} records of {where}" if total else f"{kept} records of {where}"


def jsonl_kept(out: str | Path) -> str:
    """What a stopped `generate --out FILE` (or an evaluation's generations file) kept."""
    out = Path(out)
    if out.is_file():
        return f"{out} is complete"
    if out.parent.is_dir() and any(out.parent.glob(out.name + "*.partial")):
        return _records(out, out.parent)
    return "no completion yet"


def run_kept(config, out: str | Path) -> str:
    """What a stopped `spd-lens run` kept in `out`: finished evaluations and trainings of the
    config's methods, and the records of any generation under way."""
    from spd_lens.methods import METHOD_TABLE

    out = Path(out)
    stems = [(m, m if not METHOD_TABLE[m].seeded else f"{m}-seed{s}") for m in config.methods
             for s in (config.seeds if METHOD_TABLE[m].seeded else [None])]
    evaluated = sum((out / "eval" / f"{stem}.json").is_file() for _, stem in stems)
    trains = [stem for m, stem in stems if METHOD_TABLE[m].sampling]
    parts = [f"{evaluated}/{len(stems)} evaluations finished"]
    if trains:
        trained = sum((out / "adapters" / stem / "train.json").is_file() for stem in trains)
        parts.append(f"{trained}/{len(trains)} trainings finished")
    for directory in ("generations", "eval"):
        under_way = {part.name.split(".jsonl")[0] for part in (out / directory).glob("*.jsonl*.partial")}
        parts += [_records(out / directory / f"{name}.jsonl", out) for name in sorted(under_way)]
    checkpoints = sorted((out / "adapters").glob("*/checkpoints/step-*")) if (out / "adapters").is_dir() else []
    parts += [f"training checkpoint {c.relative_to(out)}" for c in checkpoints]
    return ", ".join(parts) + f" in {out}"


def ablation_kept(out: str | Path) -> str:
    """What a stopped `spd-lens ablate` kept: the finished cells of its table."""
    cells = Path(out) / "ablation.jsonl"
    n = sum(1 for line in cells.read_bytes().splitlines() if line.strip()) if cells.is_file() else 0
    return f"{n} ablation cell{'' if n == 1 else 's'} in {cells}"


def training_kept(out: str | Path) -> str:
    """What a stopped `spd-lens train` kept: its newest checkpoint."""
    checkpoints = sorted(Path(out).glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[-1]))
    return f"checkpoint {checkpoints[-1]}" if checkpoints else "no checkpoint yet"
