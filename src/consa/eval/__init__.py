"""Evaluation: perplexity by range, retrieval grids, calibration, and the one ``evaluate`` entry point."""

from .calibration import calibrate, format_check, reported_grid
from .quality import perplexity, token_nll
from .retrieval import build_items, extract_prediction, model_generate_fn, run_grid
from .runner import EvalConfig, evaluate, format_markdown, summarize, write_run

__all__ = [
    "EvalConfig",
    "build_items",
    "calibrate",
    "evaluate",
    "extract_prediction",
    "format_check",
    "format_markdown",
    "model_generate_fn",
    "perplexity",
    "reported_grid",
    "run_grid",
    "summarize",
    "token_nll",
    "write_run",
]
