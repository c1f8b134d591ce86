"""argparse ``type=`` checks for numbers, so a bad value is refused while parsing: before a model
loads or a file is written, as one ``consa: error: argument --x: …`` line."""

from __future__ import annotations

import argparse
import math


def _number(cast, text: str):
    try:
        v = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if cast is int else 'a number'}, got {text!r}") from None
    if cast is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _check(cast, ok, need: str):
    def parse(text: str):
        v = _number(cast, text)
        if not ok(v):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return v

    parse.__name__ = need  # argparse names the type in some messages
    return parse


positive_int = _check(int, lambda v: v >= 1, "an integer >= 1")
nonneg_int = _check(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _check(float, lambda v: v > 0, "a number > 0")
nonneg_float = _check(float, lambda v: v >= 0, "a number >= 0")
fraction = _check(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
open_fraction = _check(float, lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")


def positive_float_or_off(text: str):
    """A number > 0, or ``off`` (None): for options whose default is on."""
    if text.strip().lower() == "off":
        return None
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 or 'off', got {text!r}") from None
