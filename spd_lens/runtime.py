"""Where models run and in what precision: one small object every stage receives.

`Runtime.resolve(device, dtype)` turns the settings a user writes into a concrete torch device
and dtype, and refuses what cannot work on this machine:

- device: `"auto"` (CUDA when present, else the CPU), `"cpu"`, `"cuda"` or `"cuda:N"`. Under a
  multi-process launch (`torchrun`, `accelerate launch`: `LOCAL_RANK` set) a bare `"cuda"` or
  `"auto"` takes the process's own GPU, `cuda:LOCAL_RANK`.
- dtype: `"auto"` (bfloat16 on CUDA, float16 on GPUs without native bfloat16, float32 on the CPU), `"float32"`, `"bfloat16"` or
  `"float16"` (all three run on the CPU with the pinned torch; half precision there is for tests
  and memory, not speed).

What stays in float32 or float64 whatever the dtype: the Gram matrices of the gradients (float64),
subspace bases and projection maps (float64, cast to the activations' dtype when applied), the
training loss (float32 logits), and LoRA adapter weights (float32 over a half-precision base).

Example:
    >>> runtime = Runtime.resolve("cpu", "bfloat16")
    >>> runtime.describe()
    {'device': 'cpu', 'dtype': 'bfloat16'}
    >>> runtime.banner().startswith("runtime: device cpu, dtype bfloat16, torch ")
    True
    >>> Runtime.resolve("auto", "auto").dtype in (torch.float32, torch.bfloat16)
    True
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from contextlib import nullcontext
from pathlib import Path
from dataclasses import dataclass

import torch

from spd_lens.errors import SpdLensError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def check_device(spec: str) -> str:
    """`spec` if it is a device setting spd_lens understands (availability is not checked here)."""
    match = _DEVICE.match(spec) if isinstance(spec, str) else None
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise SpdLensError(f"device {spec!r} is not understood: use one of {list(DEVICE_CHOICES)} "
                           "(e.g. 'cuda:1' for the second GPU)")
    return spec


def check_dtype(spec: str) -> str:
    """`spec` if it is a dtype setting spd_lens understands."""
    if spec not in DTYPE_CHOICES:
        raise SpdLensError(f"dtype {spec!r} is not understood: use one of {list(DTYPE_CHOICES)}")
    return spec


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Runtime:
    """A concrete device and dtype for models (see the module docstring)."""

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str | torch.device | None = "auto",
                dtype: str | torch.dtype | None = "auto") -> "Runtime":
        """The runtime for these settings on this machine; None means "auto"."""
        resolved = _resolve_device(device)
        return cls(resolved, _resolve_dtype(dtype, resolved))

    @classmethod
    def of(cls, model) -> "Runtime":
        """Where a (Hugging Face or bridged) model's weights live, and their dtype."""
        hf = getattr(model, "original_model", model)
        return cls(torch.device(hf.device), hf.dtype)

    def describe(self) -> dict[str, str]:
        return {"device": str(self.device), "dtype": dtype_name(self.dtype)}

    def __str__(self) -> str:
        return f"{self.device} {dtype_name(self.dtype)}"

    def banner(self) -> str:
        """One line saying what this runtime resolved to and which torch runs it: what every CLI
        command that loads a model prints first (`describe()` is the part recorded with results).

        Example:
            >>> Runtime.resolve("cpu", "float32").banner()  # doctest: +ELLIPSIS
            'runtime: device cpu, dtype float32, torch ..., CUDA available: ...'
        """
        available = "yes" if torch.cuda.is_available() else "no"
        where = f" ({torch.cuda.get_device_name(self.device)})" if self.is_cuda else ""
        return (f"runtime: device {self.device}{where}, dtype {dtype_name(self.dtype)}, torch {torch.__version__} "
                f"({torch_build()}), CUDA available: {available}")

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def place(self, model):
        """`model` moved to this device and cast to this dtype (in place for torch modules).

        Rotary-position frequency buffers (`inv_freq`) stay float32, as `from_pretrained` leaves
        them: rounded to bfloat16 they would shift every position's angle.
        """
        avoid_cudnn_attention(self.device)
        model = model.to(device=self.device)
        if getattr(model, "dtype", self.dtype) != self.dtype:
            kept = {name: buffer for name, buffer in model.named_buffers() if name.endswith("inv_freq")}
            model = model.to(dtype=self.dtype)
            for name, buffer in kept.items():
                owner, _, attribute = name.rpartition(".")
                model.get_submodule(owner)._buffers[attribute] = buffer
        return model

    def autocast(self):
        """Mixed-precision context for float32 weights computing in this dtype (a no-op for float32)."""
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def device_context(self):
        """Makes this CUDA device the current one (libraries that say just "cuda" then use it)."""
        if self.is_cuda and self.device.index is not None:
            return torch.cuda.device(self.device)
        return nullcontext()


CUDA_INDEX_EXAMPLE = "https://download.pytorch.org/whl/cu128"


def torch_build() -> str:
    """Which build of torch this is: "CPU-only build", "CUDA 12.8 build" or "ROCm 6.4 build".

    Example:
        >>> torch_build() in ("CPU-only build", f"CUDA {torch.version.cuda} build", f"ROCm {torch.version.hip} build")
        True
    """
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    return "CPU-only build"


def nvidia_gpu_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (a driver loaded or `nvidia-smi` installed), whatever
    torch makes of it."""
    return Path("/proc/driver/nvidia/gpus").is_dir() or shutil.which("nvidia-smi") is not None


def unused_gpu_advice() -> str | None:
    """Why torch cannot use the NVIDIA GPU this machine shows, and the fix; None when there is no
    such GPU or torch uses it. `Runtime.resolve("auto")` warns with it when it falls back to the CPU.

    Example:
        >>> unused_gpu_advice() is None or "run.sh setup" in unused_gpu_advice()
        True
    """
    if torch.cuda.is_available() or not nvidia_gpu_visible():
        return None
    fix = (f"reinstall torch for your driver's CUDA version (nvidia-smi shows it), e.g. "
           f"`SPD_LENS_TORCH_INDEX={CUDA_INDEX_EXAMPLE} bash run.sh setup` or "
           f"`pip install --force-reinstall torch==<version> --index-url {CUDA_INDEX_EXAMPLE}` (see docs/gpu.md)")
    if torch.version.cuda is None:
        return f"this machine has an NVIDIA GPU but torch {torch.__version__} is a CPU-only build, so 'auto' runs on the CPU: {fix}"
    return (f"this machine has an NVIDIA GPU but torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot "
            f"use it (a driver older than that CUDA version?), so 'auto' runs on the CPU: {fix}")


def avoid_cudnn_attention(device: str | torch.device) -> None:
    """On CUDA, leaves cuDNN out of the kernels torch picks for scaled-dot-product attention.

    Its backward pass returns NaN query gradients for some masked sequence lengths on Hopper GPUs
    (pytorch/pytorch#196678: an attention mask and a length of 64 mod 128, torch 2.11 on). Seen
    here on an H200 (torch 2.11, cuDNN 9.19): bfloat16 LoRA training on self-generated records
    went NaN at its fourth step with torch's default kernels and ran clean without cuDNN's. The
    memory-efficient kernel takes its place; the setting is process-wide, as torch keeps it.

    Example:
        >>> avoid_cudnn_attention("cpu")  # nothing to do off CUDA; on "cuda" it turns cuDNN's kernel off
    """
    if torch.device(device).type == "cuda" and torch.backends.cuda.cudnn_sdp_enabled():
        torch.backends.cuda.enable_cudnn_sdp(False)


def resolve_runtime(runtime: Runtime | None = None, device: str | torch.device | None = None,
                    dtype: str | torch.dtype | None = None) -> Runtime:
    """`runtime` itself, or one resolved from `device` / `dtype` (None = "auto"); not both."""
    if runtime is not None:
        if device is not None or dtype is not None:
            raise SpdLensError("give either runtime= or device= / dtype=, not both")
        if not isinstance(runtime, Runtime):
            raise SpdLensError(f"runtime must be a spd_lens.runtime.Runtime, got {type(runtime).__name__}: "
                               "make one with Runtime.resolve(device, dtype)")
        return runtime
    return Runtime.resolve(device, dtype)


def _resolve_device(spec: str | torch.device | None) -> torch.device:
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = check_device("auto" if spec is None else spec)
    if spec == "auto":
        if not torch.cuda.is_available():
            advice = unused_gpu_advice()
            if advice:
                warnings.warn(advice, RuntimeWarning, stacklevel=3)
            return torch.device("cpu")
        spec = "cuda"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise SpdLensError(f"device {spec!r} was asked for, but this machine has no usable CUDA device (torch "
                           f"{torch.__version__}, {build}): use device 'cpu' or 'auto', or install a CUDA build "
                           f"of torch (`SPD_LENS_TORCH_INDEX={CUDA_INDEX_EXAMPLE} bash run.sh setup`, see docs/gpu.md)")
    count = torch.cuda.device_count()
    if spec == "cuda":
        local_rank = os.environ.get("LOCAL_RANK")
        index = int(local_rank) % count if local_rank is not None else torch.cuda.current_device()
        return torch.device("cuda", index)
    index = int(spec.split(":")[1])
    if index >= count:
        raise SpdLensError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s), "
                           f"cuda:0..cuda:{count - 1}")
    return torch.device("cuda", index)


def _resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        # float64 only from code: numerical checks (finite differences) need it, configs do not
        if spec not in (*DTYPES.values(), torch.float64):
            raise SpdLensError(f"dtype {spec} is not supported: use one of {list(DTYPES)}")
        dtype = spec
    else:
        spec = check_dtype("auto" if spec is None else spec)
        if spec == "auto":
            if device.type != "cuda":
                return torch.float32
            # GPUs older than Ampere only emulate bfloat16: float16 is their half precision.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        dtype = DTYPES[spec]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise SpdLensError(f"dtype 'bfloat16' was asked for, but {torch.cuda.get_device_name(device)} has no native "
                           "bfloat16: use dtype 'float16' or 'float32'")
    return dtype
