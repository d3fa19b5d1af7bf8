"""Engines that generate: prompts and sampling settings in, completions with finish reasons out.

An engine has a `name` (recorded with every generation as `settings["engine"]`) and one method,
`stream(model, tokenizer, prompts, config, positions)`, yielding `(i, k, Completion)` for sample k
of prompt i as each finishes. Prompts are rendered exactly as `spd_lens.sampling` renders them
(`prompt_turns`, the tokenizer's chat template), and sample k of the prompt at position p of its
full list is seeded by (seed, p, k): a completion does not depend on which prompts share a call.

- `HFEngine()`: the project's own refill decoder (`spd_lens.decode`) on the model in this process,
  hooks included (`project()`).
- `VLLMEngine(checkpoint)`: vLLM on a checkpoint directory, in vLLM's own environment
  (`bash run.sh setup-vllm` makes `.venv-vllm`), driven as one worker subprocess
  (`spd_lens/vllm_worker.py`) that stays up for every call until `close()`. vLLM has no K/V
  hooks: a projection reaches it folded into the weights (`folded_checkpoint`), a trained adapter
  through vLLM's LoRA support, unmerged (`adapter=`).

`model` in `stream` is the Hugging Face model the engine stands for: the HF engine decodes with it;
vLLM only reads nothing from it (the caller records its identity and projection from it).

Example:
    >>> from spd_lens.models import load_hf
    >>> from spd_lens.sampling import SamplingConfig
    >>> model, tokenizer = load_hf("tiny")
    >>> engine = get_engine("hf")
    >>> rows = list(engine.stream(model, tokenizer, ["1+1?", "2+2?"], SamplingConfig(max_new_tokens=3), [0, 1]))
    >>> sorted((i, k) for i, k, _ in rows), {c.finish_reason for _, _, c in rows} <= {"stop", "length"}
    ([(0, 0), (1, 0)], True)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from spd_lens.errors import SpdLensError

ENGINES = ("hf", "vllm")
WORKER = Path(__file__).with_name("vllm_worker.py")
# The CPU build's KV cache (GiB) when the caller sets none: vLLM's default (4) is most of a CI runner.
CPU_KV_CACHE_GIB = "1"


@dataclass(frozen=True)
class VLLMSettings:
    """How vLLM runs: `[sampling.vllm]` / `[eval.vllm]` in a config. None of these change a greedy
    completion, so none is recorded as an output-changing setting.

    `tensor_parallel_size` splits each layer over that many GPUs of one node,
    `data_parallel_size` runs that many engine replicas (vLLM's own scheduling, no home-made
    sharding); `max_model_len` bounds prompt + completion tokens; `max_lora_rank` must be at least
    the adapters' rank (spd-lens train: 8)."""

    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    max_model_len: int = 2048
    max_lora_rank: int = 8
    max_num_seqs: int = 0  # 0 = vLLM's default
    # The share of a GPU's memory vLLM takes (0 = its default, 0.9): lower it when this process holds
    # a model on the same GPU too.
    gpu_memory_utilization: float = 0.0
    enforce_eager: bool = True  # no CUDA-graph capture: a faster start, what the CPU build needs

    def __post_init__(self):
        for name in ("tensor_parallel_size", "data_parallel_size", "max_model_len", "max_lora_rank"):
            if getattr(self, name) < 1:
                raise SpdLensError(f"vllm {name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.gpu_memory_utilization < 1:
            raise SpdLensError(f"vllm gpu_memory_utilization must be in [0, 1) (0 = vLLM's default), got "
                               f"{self.gpu_memory_utilization}")
        if self.max_num_seqs < 0:
            raise SpdLensError(f"vllm max_num_seqs must be >= 0 (0 = vLLM's default), got {self.max_num_seqs}")


def check_engine(name: str) -> str:
    """`name` if it names an engine, else a SpdLensError naming the choices."""
    if name not in ENGINES:
        raise SpdLensError(f"engine must be one of {list(ENGINES)}, got {name!r}")
    return name


def get_engine(name: str, **options):
    """`HFEngine()` for "hf"; `VLLMEngine(**options)` for "vllm" (needs `checkpoint=`)."""
    if check_engine(name) == "hf":
        return HFEngine()
    return VLLMEngine(**options)


class HFEngine:
    """The refill decoder on the model in this process (`spd_lens.sampling.stream_completions`)."""

    name = "hf"

    def stream(self, model, tokenizer, prompts, config, positions: Sequence[int]):
        from spd_lens.sampling import stream_completions

        return stream_completions(model, tokenizer, prompts, config, positions=positions)

    def close(self) -> None:
        pass


def vllm_python() -> Path:
    """The interpreter of vLLM's environment: `$SPD_LENS_VLLM_PYTHON`, else `.venv-vllm` beside the
    project (what `bash run.sh setup-vllm` creates)."""
    given = os.environ.get("SPD_LENS_VLLM_PYTHON")
    path = Path(given) if given else Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        raise SpdLensError(f"vLLM's environment is not installed ({path} missing): run `bash run.sh setup-vllm` in "
                           "the project's directory, or point SPD_LENS_VLLM_PYTHON at a Python that imports vllm")
    return path


class VLLMEngine:
    """vLLM on `checkpoint` (a Hugging Face directory: `save_folded`'s, or a base model's) in `dtype`,
    in a worker subprocess of vLLM's environment, started on first use and kept until `close()`
    (or the end of a `with` block). `adapter` (a peft adapter directory, e.g. `TRAINED/adapter`) is
    applied by vLLM's LoRA support, unmerged; `with_adapter(dir)` gives the same engine with another.
    """

    name = "vllm"

    def __init__(self, checkpoint: str | Path, *, dtype: str = "float32", adapter: str | Path | None = None,
                 enable_lora: bool | None = None, settings: VLLMSettings = VLLMSettings(), seed: int = 0,
                 chunk: int = 64):
        self.checkpoint = Path(checkpoint)
        if not (self.checkpoint / "config.json").is_file():
            raise SpdLensError(f"{self.checkpoint} is not a Hugging Face checkpoint directory (no config.json): vLLM "
                               "loads a directory such as `spd-lens generate --save-folded DIR` writes")
        self.dtype, self.settings, self.seed, self.chunk = dtype, settings, seed, chunk
        self.adapter = _adapter_dir(adapter)
        self.enable_lora = self.adapter is not None if enable_lora is None else enable_lora
        self._process: subprocess.Popen | None = None
        self._log = None
        self._lock = threading.Lock()
        self.version: str | None = None

    def with_adapter(self, adapter: str | Path | None) -> "VLLMEngine":
        """This engine (the same worker) generating with `adapter` (None: the checkpoint alone)."""
        if adapter is not None and not self.enable_lora:
            raise SpdLensError("this vLLM engine was started without LoRA: create it with enable_lora=True (or an "
                               "adapter) to apply adapters")
        view = object.__new__(VLLMEngine)
        view.__dict__.update(self.__dict__)
        view.adapter = _adapter_dir(adapter)
        view._owner = getattr(self, "_owner", self)
        return view

    def _root(self) -> "VLLMEngine":
        return getattr(self, "_owner", self)

    def start(self) -> "VLLMEngine":
        """Starts the worker (vLLM loads the checkpoint: tens of seconds on a CPU) if not started."""
        root = self._root()
        if root._process is not None and root._process.poll() is None:
            return self
        python = vllm_python()
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env.pop("PYTHONPATH", None)  # the project's environment must not leak into vLLM's
        root._log = tempfile.NamedTemporaryFile("w+", prefix="spd-lens-vllm-", suffix=".log", delete=False)
        root._process = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=root._log, env=env, text=True, bufsize=1)
        s = root.settings
        setup = {"model": str(root.checkpoint), "dtype": root.dtype, "max_model_len": s.max_model_len,
                 "enable_lora": root.enable_lora, "max_lora_rank": s.max_lora_rank, "seed": root.seed,
                 "tensor_parallel_size": s.tensor_parallel_size, "data_parallel_size": s.data_parallel_size,
                 "enforce_eager": s.enforce_eager, "max_num_seqs": s.max_num_seqs,
                 "gpu_memory_utilization": s.gpu_memory_utilization}
        root._send(setup)
        answer = root._receive()
        root.version = answer.get("vllm")
        return self

    def _send(self, message: dict) -> None:
        try:
            self._process.stdin.write(json.dumps(message) + "\n")
            self._process.stdin.flush()
        except (BrokenPipeError, OSError):
            self._failed("the vLLM worker stopped")

    def _receive(self, expect: int | None = None) -> dict:
        line = self._process.stdout.readline()
        if not line:
            self._failed("the vLLM worker exited")
        message = json.loads(line)
        if "error" in message and message.get("id") == expect:
            self._failed(f"vLLM failed: {message['error']}")
        return message

    def _failed(self, what: str):
        tail = ""
        if self._log is not None:
            self._log.flush()
            tail = Path(self._log.name).read_text(errors="replace")[-3000:]
        raise SpdLensError(f"{what} (checkpoint {self.checkpoint}). Its log ({self._log.name if self._log else '-'}) "
                           f"ends:\n{tail}")

    def stream(self, model, tokenizer, prompts, config, positions: Sequence[int]) -> Iterator:
        """(i, k, Completion) as vLLM returns them (in chunks); see the module docstring."""
        from spd_lens.chat import cut_at_stop, encode, end_of_turn_ids, render_prompt, stop_strings
        from spd_lens.decode import row_seed
        from spd_lens.sampling import Completion, prompt_turns

        if config.batching != "refill":
            raise SpdLensError(f"batching={config.batching!r} is the HF engine's: vLLM schedules its own batches "
                               "(leave batching at 'refill' with engine='vllm')")
        turns = prompt_turns(prompts)
        positions = list(positions)
        encoded = [encode(tokenizer, render_prompt(tokenizer, user, system=own)) for user, own in turns]
        longest = max((len(e) for e in encoded), default=0) + config.max_new_tokens
        if longest > self.settings.max_model_len:
            raise SpdLensError(f"a prompt and its token budget need {longest} tokens, above vllm max_model_len "
                               f"{self.settings.max_model_len}: raise max_model_len in the config's vllm settings")
        rows = [(i, k) for i in range(len(encoded)) for k in range(config.num_samples)]
        if not rows:
            return
        stop_ids = end_of_turn_ids(tokenizer)
        stops = stop_strings(tokenizer)
        request = {"rows": [{"row": r, "prompt_token_ids": encoded[i],
                             "seed": row_seed(config.seed, positions[i] * config.num_samples + k)}
                            for r, (i, k) in enumerate(rows)],
                   "sampling": {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                                "max_tokens": config.max_new_tokens, "stop_token_ids": stop_ids, "stop": stops},
                   "adapter": str(self.adapter) if self.adapter else None, "chunk": self.chunk}
        root = self._root()
        with root._lock:
            self.start()
            root._requests = getattr(root, "_requests", 0) + 1
            request["id"] = root._requests
            root._send(request)
            while True:
                message = root._receive(request["id"])
                if message.get("id") != request["id"]:
                    continue  # the rest of an earlier call whose caller stopped reading
                if message.get("done"):
                    return
                i, k = rows[message["row"]]
                tokens = list(message["token_ids"])
                reason = "length" if message["finish_reason"] == "length" else "stop"
                if reason == "stop" and tokens and tokens[-1] in stop_ids:
                    tokens = tokens[:-1]  # as the HF engine: the end-of-turn id is not part of the answer
                text = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stops)
                yield i, k, Completion(text, reason, len(tokens))

    def close(self) -> None:
        """Stops the worker (vLLM's engine processes with it)."""
        root = self._root()
        process, root._process = root._process, None
        if process is None:
            return
        try:
            process.stdin.close()
            process.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
        if root._log is not None:
            root._log.close()

    def __enter__(self) -> "VLLMEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {"engine": "vllm", "checkpoint": str(self.checkpoint), "dtype": self.dtype,
                "adapter": str(self.adapter) if self.adapter else None, **asdict(self.settings)}


def dtype_of(model) -> str:
    """The dtype name ("float32", "bfloat16") of `model`'s weights: the dtype vLLM is asked for."""
    from spd_lens.runtime import Runtime

    return str(Runtime.of(model).dtype).removeprefix("torch.")


def _adapter_dir(adapter: str | Path | None) -> Path | None:
    """The peft adapter directory in `adapter` (itself, or `adapter/adapter` of a spd-lens train dir)."""
    if adapter is None:
        return None
    adapter = Path(adapter)
    for candidate in (adapter, adapter / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate.resolve()
    if (adapter / "model").is_dir():
        raise SpdLensError(f"{adapter} holds a fully fine-tuned model, not an adapter: give vLLM {adapter / 'model'} "
                           "as its checkpoint")
    raise SpdLensError(f"{adapter} holds no LoRA adapter (no adapter_config.json there or in {adapter / 'adapter'})")


def folded_checkpoint(model_name: str, projection, directory: str | Path | None = None, *,
                      dtype: str = "float32") -> Path:
    """`directory` holding `model_name` with `projection` folded into its K/V weights, folded in float32
    and then cast to `dtype` (the run's): what vLLM generates projected from (`projection=None`: the
    model itself, e.g. the embedded default's GGUF as a plain checkpoint). A directory already holding
    this fold (same model, projection and dtype, recorded in its `spd_lens_fold.json`) is reused.
    `directory` None: one under the cache (`spd_lens.cache.cache_root()/checkpoints/HASH`).

    Example:
        >>> import tempfile
        >>> from spd_lens import extract_subspace, load_hf
        >>> from spd_lens.projection import Projection
        >>> model, tokenizer = load_hf("tiny")
        >>> projection = Projection.build(extract_subspace(model, "arithmetic", n=2, layers=[1], rank=2, tokenizer=tokenizer))
        >>> (folded_checkpoint("tiny", projection, tempfile.mkdtemp()) / "config.json").is_file()
        True
    """
    import torch

    from spd_lens.artifacts import canonical
    from spd_lens.models import load_hf
    from spd_lens.projection import fold_projection, save_folded
    from spd_lens.runtime import Runtime

    import hashlib

    from spd_lens.cache import cache_root

    record = canonical({"model": model_name, "projection": projection.provenance() if projection else None,
                        "dtype": dtype})
    if directory is None:
        digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
        directory = cache_root() / "checkpoints" / digest
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    stamp = directory / "spd_lens_fold.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == record:
        return directory
    model, tokenizer = load_hf(model_name, Runtime.resolve("cpu", "float32"))
    folded = fold_projection(model, projection) if projection is not None else model
    folded.to(getattr(torch, dtype))
    folded.config.spd_lens_model_id = model_name
    tmp = directory.with_name(directory.name + ".tmp")
    save_folded(folded, tokenizer, tmp)
    (tmp / "spd_lens_fold.json").write_text(json.dumps(record))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory
