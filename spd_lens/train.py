"""A light trainer on exported JSONL (SPD step 5): next-token loss, LoRA through peft by default.

Defaults are the paper's: LoRA r=8, alpha=8, dropout 0.05 on q/k/v/o; AdamW lr 1e-5, weight
decay 0.01, cosine schedule, 5 epochs; loss on the completion only (`loss_on="all"` also trains on
the prompt, the paper's Eq. 14). A completion cut off at the sampling budget (`finish_reason:
"length"`) is never taught to end there: by default it is kept without its end-of-turn marker
(`truncated="keep"`), or left out (`truncated="drop"`). `accelerate` places the model and syncs gradients, so the same
code runs under `torchrun --nproc_per_node N` or `accelerate launch`. `batch_size` is the global
batch (the paper's): each process takes its share of every batch, `grad_accum` splits a share into
micro-batches, and the loss is normalised by the whole batch's token count, so 1 or N processes
take the same optimizer steps to the same weights (up to float rounding; LoRA dropout draws its
masks per process, so with dropout the split is part of the training settings). Checkpoints (model,
optimizer, scheduler, RNG states) every `checkpoint_every` optimizer steps; a rerun resumes from
the last complete one and ends with the same weights as an uninterrupted run.

Example:
    >>> # train_on_jsonl("tiny", "gen.jsonl", "runs/adapter", TrainConfig(epochs=1))
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import spd_lens
from spd_lens.chat import encode_conversation, record_system
from spd_lens.artifacts import canonical, check_same_settings, read_json_object, sha256_file
from spd_lens.errors import SpdLensError
from spd_lens.memory import release_freed_memory
from spd_lens.precision import Precision
from spd_lens.processes import Processes
from spd_lens.stages import runtime_record, weights_id
from spd_lens.runtime import Runtime, resolve_runtime
from spd_lens.tasks.records import read_jsonl

DONE_FILE = "train.json"
SETTINGS_FILE = "settings.json"  # in each checkpoint: a resume with other settings is refused
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TrainConfig:
    lora: bool = True
    lora_r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = 1e-5
    weight_decay: float = 0.01
    epochs: int = 5
    batch_size: int = 4  # the global batch: rows per optimizer step over all processes together
    grad_accum: int = 1  # micro-batches per process each global batch is split into (memory, not results)
    warmup_steps: int = 0
    max_length: int = 1024
    loss_on: str = "completion"  # or "all": prompt and completion
    max_grad_norm: float = 1.0
    checkpoint_every: int = 50
    truncated: str = "keep"  # cut-off completions: "keep" without end-of-turn, or "drop"
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.loss_on in ("completion", "all"), f"loss_on must be 'completion' or 'all', got {self.loss_on!r}"),
            (self.truncated in ("keep", "drop"), f"truncated must be 'keep' or 'drop', got {self.truncated!r}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}"),
            (self.checkpoint_every >= 1, f"checkpoint_every must be >= 1, got {self.checkpoint_every}"),
            (self.lora_r >= 1, f"lora_r must be >= 1, got {self.lora_r}"),
            (0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise SpdLensError(message)


class TrainingRecord(NamedTuple):
    """One training conversation; `finished` is False for a completion cut off at its budget."""

    user: str
    assistant: str
    finished: bool = True
    system: str | None = None  # the system turn it was sampled under (None: the template's default, "": none)


def read_training_records(path: str | Path) -> list[TrainingRecord]:
    """The conversations of a chat-`messages` JSONL; errors name the line.

    A record with `"finish_reason": "length"` is marked unfinished; records without the field
    (made elsewhere) count as finished.
    """
    path = Path(path)
    if not path.is_file():
        raise SpdLensError(f"training data {str(path)!r} is not a file: pass a JSONL made by `spd-lens generate`")
    pairs = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            turns = record["messages"]
            user = next(t["content"] for t in turns if t["role"] == "user")
            assistant = next(t["content"] for t in turns if t["role"] == "assistant")
        except (KeyError, TypeError, StopIteration, AttributeError) as err:
            raise SpdLensError(f"{path}: record {number} has no user and assistant 'messages'") from err
        system = record_system(record)
        reason = finish_reason(record) or "stop"
        if reason not in ("stop", "length"):
            raise SpdLensError(f"{path}: record {number} has finish_reason {reason!r}; expected 'stop' or 'length'")
        pairs.append(TrainingRecord(str(user), str(assistant), reason == "stop", system))
    return pairs


def finish_reason(record: dict) -> str | None:
    """Why a generated record ended: the project's (and vLLM's offline) top-level `finish_reason`,
    or an OpenAI-style response's `choices[0].finish_reason`; None when the record does not say.

    Example:
        >>> finish_reason({"choices": [{"finish_reason": "length"}]}), finish_reason({"messages": []})
        ('length', None)
    """
    if record.get("finish_reason") is not None:
        return record["finish_reason"]
    choices = record.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0].get("finish_reason")
    return None


def finish_reason_counts(path: str | Path) -> dict[str, int]:
    """How many records of a JSONL end by each reason ("stop", "length"), and how many do not say
    ("missing": made elsewhere without it; they are trained as finished, ending at end-of-turn).

    Example:
        >>> # finish_reason_counts("vllm_outputs.jsonl") -> {"missing": 12, "stop": 0, "length": 0}
    """
    counts = {"stop": 0, "length": 0, "missing": 0}
    for record in read_jsonl(path):
        reason = finish_reason(record) if isinstance(record, dict) else None
        key = "missing" if reason is None else reason
        counts[key] = counts.get(key, 0) + 1
    return counts


def build_features(tokenizer, records, config: TrainConfig) -> list[dict]:
    """Token ids and labels of each conversation: `(user, assistant)` pairs or `TrainingRecord`s.

    An unfinished record ends at its last character: no end-of-turn token follows it, so the
    model is not taught to stop where the sampling budget cut it. With `truncated="drop"`
    unfinished records are left out.
    """
    features = []
    for record in records:
        user, assistant, finished, system = TrainingRecord(*record)
        if not finished and config.truncated == "drop":
            continue
        encoded = encode_conversation(tokenizer, user, assistant, system=system)
        ids, answer = encoded.input_ids, encoded.answer_mask
        if not finished:
            answer_end = encoded.conversation.answer_end
            end = next((i for i, (start, _) in enumerate(encoded.offsets) if answer[i] and start >= answer_end), len(ids))
            ids, answer = ids[:end], answer[:end]
        ids = ids[: config.max_length]
        keep = answer[: config.max_length] if config.loss_on == "completion" else [True] * len(ids)
        labels = [i if k else -100 for i, k in zip(ids, keep)]
        labels[0] = -100
        features.append({"input_ids": ids, "labels": labels})
    return features


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch: every sequence ends at the last column, so the labelled (completion)
    tokens of all rows share the final columns and only those need logits (see `next_token_loss`)."""
    length = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), length), pad_id, dtype=torch.long)
    labels = torch.full((len(features), length), -100, dtype=torch.long)
    attention = torch.zeros((len(features), length), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        ids[row, length - n:] = torch.tensor(f["input_ids"])
        labels[row, length - n:] = torch.tensor(f["labels"])
        attention[row, length - n:] = 1
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return {"input_ids": ids, "labels": labels, "attention_mask": attention, "position_ids": positions}


def next_token_loss(model, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Mean (or, with `reduction="sum"`, summed) next-token NLL over the labelled tokens,
    unembedding only the columns that hold them.

    Equal to the usual full-logits loss (tested); the vocabulary projection is a fifth of a small
    model's compute, and with completion-only loss most columns need none.
    """
    labels = batch["labels"]
    length = labels.shape[1]
    labelled = labels != -100
    first = int(torch.where(labelled.any(dim=0))[0].min()) if labelled.any() else length - 1
    keep = length - first + 1  # logits at columns first-1 .. length-1
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1]
    targets = labels[:, length - keep + 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def epoch_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """A seeded shuffle, grouped by length within windows of 16 batches (less padding), batch order shuffled."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def wrap_for_training(model, config: TrainConfig):
    """LoRA (peft) on the configured modules, or every parameter for full fine-tuning."""
    if hasattr(model, "original_model"):
        raise SpdLensError("train a plain model from spd_lens.load_hf, not a TransformerBridge (booting rewires it)")
    if not config.lora:
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _last_checkpoint(directory: Path) -> tuple[int, Path] | None:
    found = []
    for path in (directory / "checkpoints").glob("step-*"):
        if (path / "complete").is_file():
            found.append((int(path.name.removeprefix("step-")), path))
    return max(found) if found else None


def train_on_jsonl(model_name: str, data: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), *,
                   runtime: Runtime | None = None, progress: Callable | None = None,
                   provenance: dict | None = None) -> Path:
    """Fine-tune `model_name` on `data`, saving into `out` (adapter/ or model/, plus train.json).

    A finished `out` (train.json present) made with the same settings (`training_settings`: base
    model, the data's content, the config) is returned as is; an interrupted one resumes from its
    last checkpoint. Either made with other settings is refused, naming them.
    `runtime` (default: auto) says where and in what precision: with LoRA the frozen base model
    is loaded in the runtime's dtype and the adapter weights stay float32 (peft keeps them so);
    full fine-tuning keeps float32 weights and computes in bfloat16 under autocast.
    """
    runtime = resolve_runtime(runtime)
    try:
        with runtime.device_context():
            return _train(model_name, data, Path(out), config, runtime, progress, provenance)
    finally:
        # The training copy of the model is gone: hand its memory back (measured: 1.91 GB resident
        # after training 32 records, 1.07 GB after the trim, which a kernel would otherwise keep).
        release_freed_memory()


def _train(model_name: str, data: str | Path, out: Path, config: TrainConfig, runtime: Runtime,
           progress: Callable | None, provenance: dict | None) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from spd_lens.models import load_hf

    pairs = read_training_records(data)
    settings = training_settings(model_name, data, config, runtime=runtime, processes=Processes.current().world)
    if (out / DONE_FILE).is_file():
        record = read_json_object(out / DONE_FILE, "a training run's record")
        # A record written before settings were kept names the base model and the config.
        old = record.get("settings") or {"base_model": record.get("base_model"), "config": record.get("config")}
        check_same_settings(old, {k: settings.get(k) for k in old}, str(out), "Use another --out or the same settings",
                            recorded="directory has")
        return out
    if not config.lora and runtime.dtype == torch.float16:
        raise SpdLensError("full fine-tuning in float16 needs loss scaling, which this trainer does not do: "
                           "use dtype 'bfloat16' or 'float32', or LoRA (float32 adapter weights)")
    resume = _last_checkpoint(out)
    if resume is not None and (resume[1] / SETTINGS_FILE).is_file():
        check_same_settings(read_json_object(resume[1] / SETTINGS_FILE, "a checkpoint's settings"), settings,
                            str(resume[1]), "Use another --out or the same settings", recorded="checkpoint has")
    # The global batch is split by hand (`_micro_batches`), so accelerate neither shards the data
    # nor steps the schedule once per process: one optimizer step, one scheduler step.
    accelerator = Accelerator(cpu=not runtime.is_cuda, step_scheduler_with_optimizer=False)
    if accelerator.device.type != runtime.device.type:
        raise SpdLensError(f"accelerate runs this process on {accelerator.device}, the runtime asks for {runtime.device}: "
                           "accelerate keeps the device its first use (or ACCELERATE_TORCH_DEVICE) chose for the "
                           "whole process; train in a new process, or on the same device")
    set_seed(config.seed)
    # Full fine-tuning updates the weights themselves: they stay float32 (a 1e-5 step is below
    # bfloat16's resolution) and the forward pass runs under autocast in the runtime's dtype.
    model, tokenizer = load_hf(model_name, runtime if config.lora else Runtime(runtime.device, torch.float32))
    autocast = nullcontext if config.lora else runtime.autocast
    model.config.use_cache = False  # no KV cache to build while training
    model.train()
    model = wrap_for_training(model, config)
    features = build_features(tokenizer, pairs, config)
    if not features:
        raise SpdLensError(f"{data}: all {len(pairs)} completions were cut off at their token budget and "
                           "train.truncated is 'drop': nothing is left to train on; use truncated = 'keep' "
                           "or sample with a larger max_new_tokens")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # `batch_size` is the global batch: the same optimizer steps on 1 or N processes.
    steps_per_epoch = math.ceil(len(features) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    world, rank = accelerator.num_processes, accelerator.process_index
    labelled = [sum(label != -100 for label in f["labels"]) for f in features]

    step = 0
    losses: list[float] = []  # per optimizer step: the global batch's mean token loss
    if resume is not None:
        step, checkpoint = resume
        accelerator.load_state(str(checkpoint))
        losses = _read_loss_history(checkpoint, step)
    started = time.time()
    bar = progress(range(total_steps)) if progress and accelerator.is_main_process else None
    if bar is not None and hasattr(bar, "refresh") and step:
        bar.n = bar.initial = step  # resumed steps count as done, not as instant progress in the rate
        bar.refresh()
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        batches = epoch_batches([len(f["input_ids"]) for f in features], config.batch_size, config.seed * 1000 + epoch)
        for rows in batches[done_in_epoch:]:
            # The loss of a global batch is its summed token NLL over its labelled token count, so
            # every process's share adds up to the one-process gradient however the rows divide.
            tokens = max(sum(labelled[i] for i in rows), 1)
            total = torch.zeros((), device=accelerator.device)
            micro = _micro_batches(rows, world, rank, config.grad_accum)
            for index, (mine, weight) in enumerate(micro):
                batch = {k: v.to(accelerator.device) for k, v in
                         collate([features[i] for i in mine], tokenizer.pad_token_id).items()}
                last = index == len(micro) - 1
                with accelerator.no_sync(model) if not last else nullcontext(), autocast():
                    loss = next_token_loss(model, batch, reduction="sum") * (weight / tokens)
                    if not torch.isfinite(loss):
                        raise SpdLensError(f"training loss is {loss.item()} at step {step} (epoch {epoch}): stopping "
                                           "before the adapter is poisoned; lower lr or check the data")
                    # DDP averages gradients over the processes; the shares are to be summed.
                    accelerator.backward(loss * world)
                total += loss.detach()
            norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            # A finite loss can still have NaN gradients (a kernel's backward pass):
            # one such step would write NaN into every trained weight.
            if norm is not None and not torch.isfinite(torch.as_tensor(norm)):
                raise SpdLensError(f"gradient norm is {float(norm)} at step {step} (epoch {epoch}): stopping "
                                   "before the adapter is poisoned; lower lr or check the data (on CUDA, try "
                                   "another attention kernel: see spd_lens.runtime.avoid_cudnn_attention)")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            losses.append(float(accelerator.reduce(total, reduction="sum")))
            if bar is not None and hasattr(bar, "update"):
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % config.checkpoint_every == 0 and step < total_steps:
                _save_checkpoint(accelerator, out, step, settings, losses)
    if bar is not None and hasattr(bar, "close"):
        bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
        target = out / ("adapter" if config.lora else "model")
        tmp = out / (target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        final.save_pretrained(tmp)
        if not config.lora:
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        unfinished = sum(not r.finished for r in pairs)
        record = {"base_model": model_name, "data": str(data), "n_records": len(pairs),
                  "n_unfinished": unfinished, "n_trained": len(features), "config": asdict(config),
                  "settings": settings,
                  "steps": total_steps, "processes": world,
                  "per_process_batch_size": math.ceil(config.batch_size / (world * config.grad_accum)),
                  "global_batch_size": config.batch_size,
                  "loss_history": losses, "final_losses": losses[-5:],
                  "seconds_this_run": round(time.time() - started, 2), "resumed_at_step": resume[0] if resume else 0,
                  "runtime": runtime.describe(),
                  "spd_lens_version": spd_lens.__version__,
                  **(provenance or {})}
        tmp_json = out / (DONE_FILE + ".tmp")
        tmp_json.write_text(json.dumps(record, indent=2))
        os.replace(tmp_json, out / DONE_FILE)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    accelerator.wait_for_everyone()
    return out


def training_settings(model_name: str, data: str | Path, config: TrainConfig, *, runtime: Runtime | None = None,
                      processes: int = 1) -> dict:
    """What a trained directory must share with a new call to be reused or resumed (canonical form):
    the base model and its weights id, the data's content, the config, the resolved device type and
    dtype, and the number of processes where it changes the result (LoRA dropout draws its masks
    per process, so they differ with the split; without dropout the split changes nothing)."""
    settings = {"base_model": model_name, "weights": weights_id(model_name), "data_sha256": sha256_file(data),
                "config": asdict(config)}
    if runtime is not None:
        settings["runtime"] = runtime_record(runtime)
    if config.lora and config.lora_dropout > 0:
        settings["processes"] = processes
    return canonical(settings)


def _micro_batches(rows: list[int], world: int, rank: int, accumulation: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of one global batch `rows`, with their weights: the batch is
    dealt over `world * accumulation` slots (slot `j * world + rank` is this process's j-th). A slot
    left empty (a last batch smaller than the slots) runs the batch's first row at weight 0, so
    every process takes part in each gradient sync and adds nothing.

    Example:
        >>> _micro_batches([0, 1, 2, 3, 4], world=2, rank=1, accumulation=2)
        [([1], 1.0), ([3], 1.0)]
        >>> _micro_batches([7], world=2, rank=1, accumulation=1)
        [([7], 0.0)]
    """
    slots = world * accumulation
    micro = []
    for j in range(accumulation):
        mine = rows[j * world + rank::slots]
        micro.append((mine, 1.0) if mine else (rows[:1], 0.0))
    return micro


def _save_checkpoint(accelerator, out: Path, step: int, settings: dict, losses: list[float]) -> None:
    directory = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(directory))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (directory / "losses.json").write_text(json.dumps(losses))
        (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        (directory / "complete").write_text(str(step))
        for older in (out / "checkpoints").glob("step-*"):  # keep only the newest complete one
            if older != directory:
                shutil.rmtree(older, ignore_errors=True)


def _read_loss_history(checkpoint: Path, step: int) -> list[float]:
    """The per-step losses up to a checkpoint (checkpoints from before the history have none)."""
    path = checkpoint / "losses.json"
    losses = json.loads(path.read_text()) if path.is_file() else []
    if len(losses) != step:
        return [float("nan")] * (step - len(losses)) + losses[:step]
    return losses


def load_trained(model_name: str, trained: str | Path, *, merge: bool = True, runtime: Runtime | None = None):
    """(model, tokenizer) of `model_name` with a trained adapter (or a fully fine-tuned model) from
    `trained`, on `runtime`'s device (default: auto) and in its evaluation dtype
    (`spd_lens.precision.Precision`): float32 whatever the runtime's dtype. The adapter is merged in
    float32; merged into half-precision weights most of a small update would round away."""
    from spd_lens.models import load_hf

    runtime = Precision.of(resolve_runtime(runtime)).evaluation_runtime()
    trained = Path(trained)
    meta_path = trained / DONE_FILE
    if not meta_path.is_file():
        raise SpdLensError(f"{trained} holds no finished training run ({DONE_FILE} missing): train it with `spd-lens train`")
    meta = read_json_object(meta_path, "a training run's record")
    if meta.get("base_model") != model_name:
        raise SpdLensError(f"{trained} was trained on {meta.get('base_model')!r}, not {model_name!r}: load it with "
                           f"model {meta.get('base_model')!r}")
    if (trained / "model").is_dir():
        model, tokenizer = load_hf(str(trained / "model"), runtime)
        model.config.spd_lens_model_id = f"{model_name}+{trained}"
        return model, tokenizer
    from peft import PeftModel

    model, tokenizer = load_hf(model_name, runtime)
    try:
        peft_model = PeftModel.from_pretrained(model, str(trained / "adapter"))
    except Exception as err:  # peft/safetensors raise many types for a broken adapter
        raise SpdLensError(f"the adapter in {trained} does not load into {model_name!r}: {err}") from err
    model = peft_model.merge_and_unload() if merge else peft_model
    model.eval()
    model.config.spd_lens_model_id = f"{model_name}+{trained.name}"
    return model, tokenizer
