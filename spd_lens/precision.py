"""Where half precision is allowed and where float32 is kept: one policy beside `Runtime`.

A run's `Runtime` says where models compute and in what dtype (bfloat16 on a GPU by default).
Half precision is fine where an error of a bfloat16 ulp (about 0.4% of a value) cannot change
what is measured, and wrong where the quantity of interest is smaller than that:

=========================================  ==========================================
half precision allowed (the runtime dtype)  float32 (or float64) kept
=========================================  ==========================================
sampling the training data                  LoRA adapter weights and their optimizer
the gradient passes of extraction           Gram matrices, subspace bases (float64)
the frozen base model during LoRA training  the training loss (float32 logits)
                                            evaluation of a trained model (and, so a
                                            table compares models, not precisions, of
                                            every method it is compared with)
=========================================  ==========================================

**Evaluation of a trained update: merged in float32 and evaluated in float32.** A LoRA step at
the paper's lr 1e-5 moves a weight by far less than half a bfloat16 ulp, so merging the float32
adapter into bfloat16 weights rounds most of it away (on SmolLM2-135M after 24 steps only 2.8%
of the q/k/v/o update survived). The other choice, leaving the adapter unmerged and computing
its branch in float32, is not enough: its output is added to a bfloat16 activation and every
later layer computes in bfloat16, so a change smaller than an activation's ulp is rounded there
(measured on the tiny model's layer-0 q_proj: cosine 0.48 to the exact change, norm 0.64x).
Only a float32 forward pass keeps the whole update; it costs twice the weights' memory and a
slower matmul on a GPU, which is small beside sampling for a model of the paper's size.

Example:
    >>> import torch
    >>> from spd_lens.runtime import Runtime
    >>> policy = Precision.of(Runtime.resolve("cpu", "bfloat16"))
    >>> policy.evaluation_runtime().describe()
    {'device': 'cpu', 'dtype': 'float32'}
    >>> policy.describe()["adapters"], policy.describe()["compute"]
    ('float32', 'bfloat16')
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spd_lens.runtime import Runtime, dtype_name


@dataclass(frozen=True)
class Precision:
    """The dtypes each kind of work uses for a run whose models compute in `runtime.dtype`."""

    runtime: Runtime

    @classmethod
    def of(cls, runtime: Runtime) -> "Precision":
        return cls(runtime)

    @property
    def compute(self) -> torch.dtype:
        """Sampling, gradient passes, the frozen base model while training: the runtime's dtype."""
        return self.runtime.dtype

    adapters: torch.dtype = torch.float32  # trained LoRA weights (peft keeps them so over a half base)
    grams: torch.dtype = torch.float64  # Gram matrices of the gradients and the bases made from them
    evaluation: torch.dtype = torch.float32  # every evaluation of a run (see the module docstring)

    def evaluation_runtime(self) -> Runtime:
        """Where and in what dtype models are evaluated: the runtime's device, float32."""
        return Runtime(self.runtime.device, self.evaluation)

    def describe(self) -> dict[str, str]:
        return {"compute": dtype_name(self.compute), "adapters": dtype_name(self.adapters),
                "grams": dtype_name(self.grams), "evaluation": dtype_name(self.evaluation)}
