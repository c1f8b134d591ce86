"""Serving a hybrid model: a static cache and a graph-captured decode step (engine), and generation
over it or the eager cache, one batch or many prompts (generate: ``consa.generate``)."""

from .engine import DecodeEngine
from .generate import generate_many, generate_static

__all__ = ["DecodeEngine", "generate_many", "generate_static"]  # consa.generate is serving.generate.generate
