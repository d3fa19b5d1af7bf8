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
from spd_lens.attribution import correctness_loss
from spd_lens.chat import to_chat_tokens
from spd_lens.extract import extract_subspace
from spd_lens.gradient_cache import GradientCache, cache_gradients
from spd_lens.models import DEFAULT_MODEL, load_hf, load_model, model_names
from spd_lens.projection import Projection, fold_projection, project
from spd_lens.runtime import Runtime
from spd_lens.subspace import CapabilitySubspace, RankPolicy, random_like
from spd_lens.tasks import Capability, Example, capability, get_task, task_names

__all__ = [
    "CapabilitySubspace",
    "RankPolicy",
    "Runtime",
    "GradientCache",
    "Projection",
    "fold_projection",
    "project",
    "cache_gradients",
    "correctness_loss",
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
