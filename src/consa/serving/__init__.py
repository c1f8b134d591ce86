"""Serving a hybrid model: a static cache and a graph-captured decode step (engine), and generation
over it, one batch or many prompts (generate)."""

from .engine import DecodeEngine
from .generate import generate_many, generate_static

__all__ = ["DecodeEngine", "generate_many", "generate_static"]
