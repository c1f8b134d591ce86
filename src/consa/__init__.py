"""consa: learn where a decoder LLM needs full attention (ConSA), then serve the hybrid model.

Importing consa registers the ``consa`` attention and mask functions with transformers.
"""

from .allocation import Allocation, AllocationError, ModelShape
from .attention import hybrid as _hybrid  # noqa: F401  (registers attn_implementation="consa")
from .models import UnsupportedModelError, apply_allocation, attach_gates, detach, model_shape, reorder_heads


def load(path, **kwargs):
    """Load a consa export (native or head-wise) ready to serve; see :func:`consa.export.load`."""
    from .export import load as _load

    return _load(path, **kwargs)


def heal(model, allocation, batches, out, **kwargs):
    """Fine-tune ``model`` under a fixed allocation towards full attention; see :func:`consa.train.heal.heal`."""
    from .train.heal import heal as _heal

    return _heal(model, allocation, batches, out, **kwargs)


def generate(model, input_ids, **kwargs):
    """Generate with the hybrid KV cache: on CUDA a static cache + CUDA-graph decode, else
    ``model.generate`` with a fresh ``HybridCache`` (``static=False`` forces that); a list of prompts
    gives a list of new-token lists. See :func:`consa.attention.cache.generate`."""
    from .attention.cache import generate as _generate

    return _generate(model, input_ids, **kwargs)

__version__ = "0.1.0"
__all__ = [
    "Allocation",
    "AllocationError",
    "ModelShape",
    "UnsupportedModelError",
    "apply_allocation",
    "attach_gates",
    "detach",
    "generate",
    "heal",
    "load",
    "model_shape",
    "reorder_heads",
]
