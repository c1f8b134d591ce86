"""Rule-based allocations: the baselines a learned allocation has to beat, at the same SWA count.

Every rule orders the N units (layer-major for KV heads) and keeps the FA units it prefers; all
return the same :class:`Allocation` type with exactly ``num_swa`` SWA units. The data-driven
baselines (DuoAttention-style gates, attention-mass score) live in ``consa.train.baselines``.
"""

from __future__ import annotations

import random

from .allocation import Allocation, ModelShape, check_granularity
from .errors import ConsaError

RULES = ("interleaved", "fa_top", "fa_bottom", "fa_middle", "random")


def _from_fa_units(fa_idx, n, granularity, shape, window, sinks, name, native) -> Allocation:
    fa = [False] * n
    for i in fa_idx:
        fa[i] = True
    return Allocation.from_units(fa, granularity, shape, window, sinks, {"method": name}, native=native)


def rule_allocation(
    name: str, shape: ModelShape, granularity: str, num_swa: int, window: int, sinks: int = 0, seed: int = 0,
    native=None,
) -> Allocation:
    """The allocation of rule ``name`` with exactly ``num_swa`` SWA units.

    ``native`` (per layer: the model's own sliding window, or None) leaves those layers as the model has
    them: the rule then orders the other layers' units only (``fa_top`` = the top of *those* layers)."""
    check_granularity(granularity)
    n = len(Allocation.free_units(native, granularity, shape.num_kv_heads)) if native is not None else shape.num_units(granularity)
    if not 0 <= num_swa <= n:
        raise ConsaError(f"cannot make {num_swa} of {n} units SWA")
    k = n - num_swa  # FA units to keep
    if name == "interleaved":  # Gemma-style: FA units evenly spaced through the depth
        idx = sorted({min(n - 1, int((i + 0.5) * n / k)) for i in range(k)}) if k else []
        idx = _fill(idx, k, n)
    elif name == "fa_top":
        idx = list(range(n - k, n))
    elif name == "fa_bottom":
        idx = list(range(k))
    elif name == "fa_middle":
        start = (n - k) // 2
        idx = list(range(start, start + k))
    elif name == "random":
        idx = random.Random(seed).sample(range(n), k)
    else:
        raise ConsaError(f"unknown rule {name!r}; choose one of {', '.join(RULES)}")
    label = f"random-{seed}" if name == "random" else name
    return _from_fa_units(idx, n, granularity, shape, window, sinks, label, native)


def _fill(idx: list[int], k: int, n: int) -> list[int]:
    """Top up an evenly spaced index set that lost members to rounding collisions."""
    chosen = set(idx)
    for i in range(n):
        if len(chosen) >= k:
            break
        chosen.add(i)
    return sorted(chosen)
