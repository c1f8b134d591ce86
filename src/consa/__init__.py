"""consa: learn where a decoder LLM needs full attention (ConSA), then serve the hybrid model.

Importing consa registers the ``consa`` attention and mask functions with transformers.
"""

from .allocation import Allocation, AllocationError, ModelShape
from .attention import hybrid as _hybrid  # noqa: F401  (registers attn_implementation="consa")
from .models import UnsupportedModelError, apply_allocation, attach_gates, detach, model_shape, reorder_heads

__version__ = "0.1.0"
__all__ = [
    "Allocation",
    "AllocationError",
    "ModelShape",
    "UnsupportedModelError",
    "apply_allocation",
    "attach_gates",
    "detach",
    "model_shape",
    "reorder_heads",
]
