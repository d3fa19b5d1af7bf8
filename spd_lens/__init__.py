"""spd_lens: Self-Policy Distillation as a TransformerLens extension.

Example:
    >>> import spd_lens
    >>> model = spd_lens.load_model("tiny")
    >>> task = spd_lens.get_task("arithmetic")
    >>> len(task.examples("train", n=2, seed=0))
    2
"""

__version__ = "0.1.0"

from spd_lens.errors import SpdLensError
from spd_lens.attribution import correctness_loss, span_accuracy
from spd_lens.chat import to_chat_tokens
from spd_lens.extract import extract_subspace
from spd_lens.gradient_cache import GradientCache, cache_gradients
from spd_lens.models import DEFAULT_MODEL, load_hf, load_model, model_names
from spd_lens.projection import Projection, fold_projection, project
from spd_lens.runtime import Runtime
from spd_lens.subspace import CapabilitySubspace, RankPolicy, random_like
from spd_lens.tasks import Capability, Example, capability, get_task, task_names



def __getattr__(name: str):
    # spd_lens.ablate(model, examples, ...): imported on first use (it pulls in the run machinery).
    if name == "ablate":
        import spd_lens.ablate as module

        return module
    raise AttributeError(f"module 'spd_lens' has no attribute {name!r}")


__all__ = [
    "ablate",
    "CapabilitySubspace",
    "RankPolicy",
    "Runtime",
    "GradientCache",
    "Projection",
    "fold_projection",
    "project",
    "cache_gradients",
    "correctness_loss",
    "span_accuracy",
    "extract_subspace",
    "random_like",
    "to_chat_tokens",
    "Capability",
    "Example",
    "capability",
    "DEFAULT_MODEL",
    "SpdLensError",
    "__version__",
    "get_task",
    "load_hf",
    "load_model",
    "model_names",
    "task_names",
]
