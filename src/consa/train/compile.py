"""Regional ``torch.compile`` for training: compile each repeated decoder block in place.

A whole-model compile traces every layer, so its cost grows with depth; compiling the block once and
reusing the graph for every layer (PyTorch's "regional compilation") costs one layer's compile. Compiling in place keeps the
parameter names, so checkpoints do not change. ``uncompile`` undoes it when the compiler fails on the
first step (pretraining then continues eagerly instead of dying).
"""

from __future__ import annotations

from torch import nn

from ..errors import ConsaError


def repeated_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's longest ``ModuleList`` of same-class modules (the decoder layers of a HF decoder)."""
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ConsaError(f"{type(model).__name__} has no list of repeated blocks to compile")
    return best


def compile_blocks(model: nn.Module) -> nn.ModuleList:
    """Compile every block of :func:`repeated_blocks` in place (``nn.Module.compile``); returns them."""
    blocks = repeated_blocks(model)
    for block in blocks:
        block.compile()
    return blocks


def uncompile(blocks: nn.ModuleList) -> None:
    """Back to eager calls for blocks compiled by :func:`compile_blocks`."""
    for block in blocks:
        block._compiled_call_impl = None  # what nn.Module.compile set; None is the eager path
