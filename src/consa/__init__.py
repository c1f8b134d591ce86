"""consa: learn where a decoder LLM needs full attention (ConSA), then serve the hybrid model.

Importing consa registers the ``consa`` attention and mask functions with transformers.
"""

from .interrupts import interrupt_point as _interrupt_point, quiet_ctrl_c as _quiet_ctrl_c

_quiet_ctrl_c()  # first: in the consa command, a Ctrl-C during the seconds of imports below is one line
_interrupt_point("startup")

from .allocation import Allocation, AllocationError, ModelShape
from .attention import hybrid as _hybrid  # noqa: F401  (registers attn_implementation="consa")
from .attention.plan import KernelConfig
from .models import (UnsupportedModelError, apply_allocation, attach_gates, detach, hybrid_cache, model_shape, plans_of,
                     reorder_heads)
from .serving.generate import generate


def load(path, **kwargs):
    """Load a consa export (native or head-wise) ready to serve; see :func:`consa.export.load`."""
    from .export import load as _load

    return _load(path, **kwargs)


def heal(model, allocation, batches, out, **kwargs):
    """Fine-tune ``model`` under a fixed allocation towards full attention; see :func:`consa.train.heal.heal`."""
    from .train.heal import heal as _heal

    return _heal(model, allocation, batches, out, **kwargs)


__version__ = "0.1.0"
__all__ = [
    "Allocation",
    "AllocationError",
    "KernelConfig",
    "ModelShape",
    "UnsupportedModelError",
    "apply_allocation",
    "attach_gates",
    "detach",
    "generate",
    "heal",
    "hybrid_cache",
    "load",
    "model_shape",
    "plans_of",
    "reorder_heads",
]
