"""Batched self-generation and its JSONL export, resumable.

`sample(model, tokenizer, prompts, config)` generates `num_samples` completions per prompt with
a KV cache, temperature / top-p / top-k, stopping at end of turn (and, for a model without a chat
template, where it starts the next exchange: `chat.stop_strings`). By default
(`batching="refill"`, `spd_lens.decode`) at most `batch_size` rows are in flight and a finished
row's slot goes to the next waiting prompt at once, so no step is spent on finished rows; each
sample draws from its own generator seeded from (seed, its prompt's position, its index), so a
completion does not depend on which prompts share its batch. `batching="static"` is
transformers' batched `generate` (a batch decodes until its longest row ends; seeded per batch).
`sample_completions` gives each completion's finish reason too: `stop` (it ended its turn) or
`length` (cut off at `max_new_tokens`), which the trainer needs so that a cut-off text is never
taught as a finished answer.

`generate_jsonl(...)` writes one record per completion in the chat `messages` format (plus
`finish_reason` and `completion_tokens`) into `OUT.partial` as prompts finish (one write + fsync
per prompt; per batch with static batching), then in the examples' order to `OUT`.
Rerunning the same command resumes: records of prompts already complete are kept, a torn tail is
dropped, and nothing is duplicated; a finished file is left untouched. Each record's `settings`
name the model, task, prompts, sampling settings and the projection active on the model (read
from the model itself: hooks attached with `project()` / `Projection.attach`, or folded weights),
and settings that differ from the file's, the projection included, are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import spd_lens
from spd_lens.artifacts import canonical, check_same_settings
from spd_lens.chat import cut_at_stop, encode, end_of_turn_ids, messages, render_prompt, stop_strings, template_prefix
from spd_lens.decode import decode_stream
from spd_lens.errors import SpdLensError
from spd_lens.models import hf_model_of, model_id
from spd_lens.processes import Processes
from spd_lens.projection import projection_provenance
from spd_lens.runtime import Runtime
from spd_lens.stages import UNRECORDED, runtime_record
from spd_lens.tasks import Example
from spd_lens.tasks.base import check_unique_ids


BATCHING = ("refill", "static")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 256
    num_samples: int = 1
    seed: int = 0
    batch_size: int = 8  # rows in flight at once
    # "refill": finished rows leave the batch and waiting prompts take their slots (spd_lens.decode);
    # "static": transformers' batched generate, a batch decoding until its longest row ends.
    batching: str = "refill"

    def __post_init__(self):
        checks = [
            (self.temperature == 0 or 0.01 <= self.temperature <= 100,
             f"temperature must be 0 (greedy) or between 0.01 and 100, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}"),
            (self.num_samples >= 1, f"num_samples must be >= 1, got {self.num_samples}"),
            (self.num_samples == 1 or self.temperature > 0,
             f"num_samples={self.num_samples} needs sampling (temperature > 0): greedy decoding gives one completion"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.batching in BATCHING, f"batching must be one of {list(BATCHING)}, got {self.batching!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpdLensError(message)


FINISH_REASONS = ("stop", "length")


@dataclass(frozen=True)
class Completion:
    """One generated answer: its text, why it ended (`stop` | `length`) and its token count."""

    text: str
    finish_reason: str
    tokens: int


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()  # `system` not given: each Example renders its own, a bare string the template's default

Prompts = Sequence["str | Example"]


def prompt_turns(prompts: Prompts, system: str | None | _Unset = UNSET) -> list[tuple[str, str | None]]:
    """(user text, system prompt) of each prompt, as it is rendered for generation.

    An `Example` renders exactly the prompt it carries: its text (its shots included) and its
    `system`, the same turns extraction takes gradients on. A bare string renders with `system`
    (not given: the template's default). A `system` given beside Examples that carry another is
    refused, naming both: the model would be sampled on another prompt than the one its
    examples (and a subspace extracted from them) describe.

    >>> from spd_lens.tasks import Example
    >>> prompt_turns([Example("a", "2+2?", "4", [[0, 1]], system=""), "3+3?"])
    [('2+2?', ''), ('3+3?', None)]
    """
    if isinstance(prompts, (str, Example)):
        prompts = [prompts]
    turns = []
    for prompt in prompts:
        if isinstance(prompt, Example):
            if not isinstance(system, _Unset) and system != prompt.system:
                raise SpdLensError(
                    f"example {prompt.id!r} carries the system prompt {_describe_system(prompt.system)}, but this call "
                    f"renders with {_describe_system(system)}: leave system= out (each example is rendered with its "
                    "own) or make the examples carry the prompt you mean (dataclasses.replace(example, system=...))")
            turns.append((prompt.prompt, prompt.system))
        elif isinstance(prompt, str):
            turns.append((prompt, None if isinstance(system, _Unset) else system))
        else:
            raise SpdLensError(f"a prompt must be a string or an spd_lens.Example, got {type(prompt).__name__}")
    return turns


def _describe_system(system) -> str:
    if system is None:
        return "None (the template's default)"
    return "'' (no system turn)" if system == "" else repr(system)


def _shared_prefix(tokenizer, systems: Sequence[str | None]) -> list[int]:
    """The template opening most prompts share (their most common system prompt's)."""
    if not systems:
        return template_prefix(tokenizer)
    common = max(set(systems), key=lambda s: (systems.count(s), s is None, s or ""))
    return template_prefix(tokenizer, system=common)


def sample(model, tokenizer, prompts: Prompts, config: SamplingConfig, *, first_index: int = 0,
           system: str | None | _Unset = UNSET) -> list[list[str]]:
    """`config.num_samples` completion texts for each prompt (one batch): a user prompt string or an
    `Example`, rendered as `prompt_turns` says (an Example with its own system prompt and shots)."""
    return [[c.text for c in row] for row in sample_completions(model, tokenizer, prompts, config,
                                                                first_index=first_index, system=system)]


def sample_completions(model, tokenizer, prompts: Prompts, config: SamplingConfig, *,
                       first_index: int = 0, system: str | None | _Unset = UNSET) -> list[list[Completion]]:
    """`config.num_samples` completions for each prompt (a string or an `Example`), with finish reasons.

    Prompt i is the `first_index + i`-th of its list: with `batching="refill"` its samples draw
    from generators seeded by that position, so they do not depend on how prompts are grouped."""
    if config.batching == "static":
        return _sample_static(model, tokenizer, prompts, config, first_index=first_index, system=system)
    out: list[list[Completion | None]] = [[None] * config.num_samples for _ in prompts]
    for i, k, completion in stream_completions(model, tokenizer, prompts, config, first_index=first_index,
                                               system=system):
        out[i][k] = completion
    return out  # type: ignore[return-value]


def stream_completions(model, tokenizer, prompts: Prompts, config: SamplingConfig, *,
                       first_index: int = 0, positions: Sequence[int] | None = None,
                       system: str | None | _Unset = UNSET) -> Iterator[tuple[int, int, Completion]]:
    """(prompt i, sample k, completion) as each finishes, decoding with `spd_lens.decode`: at most
    `config.batch_size` rows in flight, refilled from the waiting prompts. `positions` (default
    `first_index`, `first_index + 1`, ...) place each prompt in its full list, which seeds its samples.
    Prompts are strings or `Example`s (see `prompt_turns`)."""
    turns = prompt_turns(prompts, system)
    positions = list(range(first_index, first_index + len(turns))) if positions is None else list(positions)
    encoded = [encode(tokenizer, render_prompt(tokenizer, user, system=own)) for user, own in turns]
    rows = [(i, k) for i in range(len(prompts)) for k in range(config.num_samples)]
    stops = stop_strings(tokenizer)

    def stopped(tokens: list[int]) -> bool:  # a stop string in the newest tokens (models without a template)
        return any(stop in tokenizer.decode(tokens[-16:], skip_special_tokens=True) for stop in stops)

    stream = decode_stream(
        model, [encoded[i] for i, _ in rows], max_new_tokens=config.max_new_tokens, slots=config.batch_size,
        stop_ids=end_of_turn_ids(tokenizer), pad_id=tokenizer.pad_token_id, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, seed=config.seed,
        row_indices=[positions[i] * config.num_samples + k for i, k in rows], stopped=stopped if stops else None,
        shared_prefix=_shared_prefix(tokenizer, [own for _, own in turns]))
    for row, decoded in stream:
        i, k = rows[row]
        text = cut_at_stop(tokenizer.decode(decoded.tokens, skip_special_tokens=True), stops)
        yield i, k, Completion(text, decoded.finish_reason, len(decoded.tokens))


def _sample_static(model, tokenizer, prompts: Prompts, config: SamplingConfig, *,
                   first_index: int = 0, system: str | None | _Unset = UNSET) -> list[list[Completion]]:
    """transformers' batched `generate` over all `prompts` as one batch (the reference path)."""
    hf = hf_model_of(model)
    rendered = [render_prompt(tokenizer, user, system=own) for user, own in prompt_turns(prompts, system)]
    encoded = [encode(tokenizer, text) for text in rendered]
    length = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (length - len(e)) + e for e in encoded], device=hf.device)
    attention = torch.tensor([[0] * (length - len(e)) + [1] * len(e) for e in encoded], device=hf.device)
    greedy = config.temperature == 0
    stop_ids = end_of_turn_ids(tokenizer)
    options = dict(max_new_tokens=config.max_new_tokens, do_sample=not greedy, eos_token_id=stop_ids,
                   pad_token_id=pad, use_cache=True, num_return_sequences=config.num_samples)
    if not greedy:
        options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k or None)
    else:
        options.update(temperature=None, top_p=None, top_k=None)
    stops = stop_strings(tokenizer)
    if stops:
        options.update(stop_strings=stops, tokenizer=tokenizer)
    torch.manual_seed(config.seed * 1_000_003 + first_index)
    with torch.no_grad():
        output = hf.generate(input_ids=ids, attention_mask=attention, **options)
    generated = output[:, length:]
    decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
    texts = [cut_at_stop(t, stops) for t in decoded]
    # A row that ended its turn holds an end-of-turn id, or (a model without a chat template)
    # reached a stop string, after which generation pads it; a row with neither ran out of budget.
    ended = torch.isin(generated, torch.tensor(stop_ids + ([pad] if stops else []), device=generated.device))
    stopped = [bool(e) or text != full for e, text, full in zip(ended.any(dim=1).tolist(), texts, decoded)]
    counts = torch.where(ended.any(dim=1), ended.int().argmax(dim=1), generated.shape[1]).tolist()
    completions = [Completion(text, "stop" if done else "length", count)
                   for text, done, count in zip(texts, stopped, counts)]
    return [completions[i * config.num_samples:(i + 1) * config.num_samples] for i in range(len(prompts))]


def _read_records(path: Path) -> list[dict]:
    """Complete records of a JSONL file (a torn tail from an interrupted write is left out)."""
    records = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def prompts_hash(examples: Sequence[Example]) -> str:
    """A short hash of the prompts (ids, text, and the system prompt of an example that carries its
    own): names the prompts a file was generated for."""
    return hashlib.sha256(json.dumps([[e.id, e.prompt] + ([e.system] if e.system is not None else [])
                                      for e in examples]).encode()).hexdigest()[:16]


def generation_settings(model, examples: Sequence[Example], config: SamplingConfig, *, task: str,
                        provenance: dict | None = None, engine: str = "hf") -> dict:
    """The `settings` each record of `generate_jsonl` carries, in canonical (JSON) form; `engine`
    names what generated (`spd_lens.engines`: "hf" or "vllm").

    `projection` is read from the model (`spd_lens.projection.projection_provenance`); a
    `provenance["projection"]` that disagrees with it is an error."""
    given = dict(provenance or {})
    projection = projection_provenance(model)
    if "projection" in given and canonical(given["projection"]) != canonical(projection):
        raise SpdLensError(f"provenance names the projection {given['projection']!r}, but the model is projected by "
                           f"{projection!r}: the projection is read from the model; leave it out of provenance")
    given["projection"] = projection
    systems = sorted({e.system for e in examples if e.system is not None})
    # Named (not only hashed) where examples carry their own, so a resume refusal says which differs.
    given = {**({"system_prompts": systems} if systems else {}), **given}
    return canonical({"model": model_id(model), "task": task, **asdict(config), "engine": engine,
                      "n_prompts": len(examples),
                      "prompts_sha256": prompts_hash(examples), **given,
                      "runtime": runtime_record(Runtime.of(model)),  # bfloat16 greedy differs from float32
                      "spd_lens_version": spd_lens.__version__})


def resume_view(settings: dict) -> dict:
    """The recorded settings a file is resumed or reused by: all of them, less what cannot change
    a record (with refill decoding a prompt's completion does not depend on the rows in flight, so
    `batch_size` is left out; static batches keep it). A runtime an older file did not record
    reads as not recorded, never as equal."""
    view = {**canonical(settings)}
    if view.get("batching", "refill") == "refill":
        view.pop("batch_size", None)
    view.setdefault("runtime", UNRECORDED)
    view.setdefault("engine", "hf")  # files written before engines were recorded came from the HF decoder
    return view


def check_same_generation(recorded: dict, settings: dict, where: str) -> None:
    """Refuse to resume or reuse `where` unless its records were made with these settings (`resume_view`)."""
    check_same_settings(resume_view(recorded), resume_view(settings), where,
                        "Use another output path or the same settings")


def finished_generations(path: str | Path, settings: dict, count: int) -> bool:
    """True when `path` is a finished file of `count` records made with `settings` (`resume_view`):
    what another run directory's generations must be to be taken over."""
    path = Path(path)
    if not path.is_file():
        return False
    records = _read_records(path)
    return (len(records) == count and
            resume_view(records[0].get("settings", {})) == resume_view(settings))


def generate_jsonl(
    model,
    tokenizer,
    examples: Sequence[Example],
    out: str | Path,
    config: SamplingConfig,
    *,
    task: str,
    provenance: dict | None = None,
    progress: Callable | None = None,
    processes: Processes | None = None,
    engine=None,
) -> Path:
    """Generate for every example and export to `out` (see the module docstring). Returns `out`.

    `engine` (`spd_lens.engines`; default the HF refill decoder on `model`) generates; `model` is
    still what the records name (its id, its projection, its runtime), so a vLLM engine is given the
    model its checkpoint was saved from. A file made by another engine is refused on resume.

    Under a multi-process launch (`processes`, default `Processes.current()`) each process
    generates every world-th example into its own part file, `OUT.rankR.partial` (resumable like
    `OUT.partial`), and the main process merges the parts in the examples' order into `OUT`: with
    refill decoding the same records one process writes. Every process returns `out`."""
    processes = processes or Processes.current()
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if out.is_dir():
        raise SpdLensError(f"--out {str(out)!r} is a directory: give a file path such as {str(out / 'generations.jsonl')!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SpdLensError(f"cannot create the directory of {str(out)!r}: {err}") from err
    check_unique_ids([e.id for e in examples])  # records and resumed batches are keyed by prompt id
    settings = generation_settings(model, examples, config, task=task, provenance=provenance,
                                   engine=engine.name if engine is not None else "hf")
    if (processes.parallel and engine is not None and engine.name != "hf"
            and not finished_generations(out, settings, len(examples) * config.num_samples)):
        raise SpdLensError(f"engine {engine.name!r} runs in one process (it parallelises itself: its "
                           "tensor/data-parallel settings); launch without torchrun / accelerate")
    if processes.parallel:
        return _generate_sharded(model, tokenizer, examples, out, config, settings, task, progress, processes)
    # The unit kept on resume. Refill decoding: a prompt, whose completions depend on nothing but
    # itself and its position. Static batches: a whole batch, whose output depends on its members
    # (padding, the random stream), so it is regenerated whole or not at all.
    unit = 1 if config.batching == "refill" else config.batch_size
    position = {e.id: i for i, e in enumerate(examples)}
    existing = partial if partial.exists() else out if out.exists() else None
    kept: list[dict] = []
    if existing is not None:
        records = _read_records(existing)
        for record in records[:1]:
            check_same_generation(record.get("settings", {}), settings, str(existing))
        by_key = {(r.get("prompt_id"), r.get("sample_index")): r for r in records if r.get("prompt_id") in position}
        for start in range(0, len(examples), unit):
            keys = [(e.id, k) for e in examples[start:start + unit] for k in range(config.num_samples)]
            if all(key in by_key for key in keys):
                kept.extend(by_key[key] for key in keys)
        if existing == out and kept == records and len(kept) == len(examples) * config.num_samples:
            return out  # finished with these settings: nothing to do, the file stays as it is
        _rewrite(partial, kept)
        if existing == out:
            out.unlink()
    done = {r["prompt_id"] for r in kept}
    todo = [e for e in examples if e.id not in done]
    try:
        handle = open(partial, "ab")
    except OSError as err:
        raise SpdLensError(f"cannot write {str(partial)!r}: {err}") from err

    def write(example: Example, samples: Sequence[Completion]) -> None:
        _write_prompt(handle, example, samples, task, settings)

    with handle:
        if config.batching == "refill":
            finished = _FinishedPrompts(model, tokenizer, todo, [position[e.id] for e in todo], config, engine)
            for example, samples in progress(finished) if progress else finished:
                write(example, samples)
        else:
            starts = list(range(0, len(todo), config.batch_size))
            for start in progress(starts) if progress else starts:
                batch = todo[start:start + config.batch_size]
                # Seeded by the batch's position in the full list: a resumed run reproduces the same output.
                completions = _sample_static(model, tokenizer, batch, config,
                                             first_index=position[batch[0].id])
                for example, samples in zip(batch, completions):
                    write(example, samples)
    # Records went in as prompts finished; the complete file lists them in the examples' order.
    ordered = sorted(_read_records(partial), key=lambda r: (position[r["prompt_id"]], r["sample_index"]))
    _rewrite(partial, ordered)
    os.replace(partial, out)
    return out


def _write_prompt(handle, example: Example, samples: Sequence[Completion], task: str, settings: dict) -> None:
    # The system turn the completion was sampled under: in `messages` when it is text, and as
    # `system` whenever the example carries its own ("" = none), so training renders the same prompt.
    own = {"system": example.system} if example.system is not None else {}
    lines = [json.dumps({"id": f"{example.id}#{k}", "task": task, "prompt_id": example.id, "sample_index": k,
                         "messages": messages(example.prompt, c.text, system=example.system), **own,
                         "finish_reason": c.finish_reason, "completion_tokens": c.tokens, "settings": settings}) + "\n"
             for k, c in enumerate(samples)]
    handle.write("".join(lines).encode())  # one write and fsync per prompt: a crash tears at most one line
    handle.flush()
    os.fsync(handle.fileno())


def _generate_sharded(model, tokenizer, examples: Sequence[Example], out: Path, config: SamplingConfig,
                      settings: dict, task: str, progress: Callable | None, processes: Processes) -> Path:
    """`generate_jsonl` for one process of several (see its docstring)."""
    if config.batching != "refill":
        raise SpdLensError("batching='static' runs in one process (its batches are seeded together): use the "
                           "default refill decoding under torchrun / accelerate launch")
    position = {e.id: i for i, e in enumerate(examples)}
    mine = [examples[i] for i in processes.shard(len(examples))]
    part = out.with_name(f"{out.name}.rank{processes.rank}.partial")
    # Whatever any earlier run left (one process's partial, parts of any number of processes)
    # counts: every process reads all of it and keeps the complete prompts of its own shard.
    sources = [out] if out.is_file() else [out.with_name(out.name + ".partial"),
                                           *sorted(out.parent.glob(f"{out.name}.rank*.partial"))]
    by_key: dict[tuple, dict] = {}
    for source in (s for s in sources if s.is_file()):
        records = _read_records(source)
        for record in records[:1]:
            check_same_generation(record.get("settings", {}), settings, str(source))
        by_key.update({(r.get("prompt_id"), r.get("sample_index")): r for r in records})
    if out.is_file():
        return out  # finished with these settings
    kept = [by_key[(e.id, k)] for e in mine
            if all((e.id, k) in by_key for k in range(config.num_samples)) for k in range(config.num_samples)]
    processes.barrier()  # everyone has read before anyone rewrites
    _rewrite(part, kept)
    processes.barrier()
    if processes.is_main:  # leftovers of one process, or of more processes than now
        current = {out.with_name(f"{out.name}.rank{r}.partial") for r in range(processes.world)}
        for stale in [out.with_name(out.name + ".partial"), *out.parent.glob(f"{out.name}.rank*.partial")]:
            if stale.is_file() and stale not in current:
                stale.unlink()
    done = {r["prompt_id"] for r in kept}
    todo = [e for e in mine if e.id not in done]
    with open(part, "ab") as handle:
        finished = _FinishedPrompts(model, tokenizer, todo, [position[e.id] for e in todo], config)
        for example, samples in progress(finished) if progress and processes.is_main else finished:
            _write_prompt(handle, example, samples, task, settings)
    processes.barrier()
    if processes.is_main:
        parts = [out.with_name(f"{out.name}.rank{r}.partial") for r in range(processes.world)]
        records = [r for p in parts for r in _read_records(p)]
        keys = {(r["prompt_id"], r["sample_index"]) for r in records}
        if len(keys) != len(records) or len(records) != len(examples) * config.num_samples:
            raise SpdLensError(f"the parts of {out} hold {len(records)} records ({len(keys)} distinct) for "
                               f"{len(examples)} prompts x {config.num_samples} samples: rerun the same command")
        merged = out.with_name(out.name + ".partial")
        _rewrite(merged, sorted(records, key=lambda r: (position[r["prompt_id"]], r["sample_index"])))
        os.replace(merged, out)
        for p in parts:
            p.unlink()
    processes.barrier()  # every process returns once OUT is complete
    return out


class _FinishedPrompts:
    """(example, its completions) as each prompt's last sample finishes; sized, for progress bars."""

    def __init__(self, model, tokenizer, examples: Sequence[Example], positions: Sequence[int], config: SamplingConfig,
                 engine=None):
        self.args = (model, tokenizer, examples, positions, config)
        self.engine = engine

    def __len__(self) -> int:
        return len(self.args[2])

    def __iter__(self):
        model, tokenizer, examples, positions, config = self.args
        pending: dict[int, dict[int, Completion]] = {}
        stream = (self.engine.stream(model, tokenizer, examples, config, positions) if self.engine is not None
                  else stream_completions(model, tokenizer, examples, config, positions=positions))
        for i, k, completion in stream:
            pending.setdefault(i, {})[k] = completion
            if len(pending[i]) == config.num_samples:
                samples = pending.pop(i)
                yield examples[i], [samples[k] for k in range(config.num_samples)]


def _rewrite(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
