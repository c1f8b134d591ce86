"""KV budgets in the user's terms: what each unit holds, and an exact assignment under a budget.

A user says "the KV cache at 128K must fit in 25% of full attention's". A unit's cost is the KV slots
it holds at that *budget context* C: an FA head holds C, an SWA head of span w holds min(C, w − 1 + S)
(S sinks; the same count :meth:`Allocation.kv_slots` gives and the hybrid cache really holds). A layer
unit costs that times its KV heads. Fixed units (a model's native sliding layers) cost what they hold
and are taken off the budget before anything is chosen.

:func:`assign` is the final step of every budgeted method: each unit takes one option of the span menu,
the total cost stays within the budget, and the sum of the method's per-option values is the largest
possible (an exact multiple-choice knapsack by dynamic programming over the cost). A learned search
passes log-probabilities of each option, the MoA-style profile minus its loss estimates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .allocation import Allocation, AllocationError, ModelShape

FULL_NAMES = ("full", "fa", "none")
DP_RESOLUTION = 1 << 16  # most cost steps the knapsack table holds; costs are rounded *up* beyond that


def parse_menu(text: str | Sequence) -> tuple[int | None, ...]:
    """``"128,512,2048,full"`` → (128, 512, 2048, None): distinct SWA spans ascending, full attention
    (None) last when offered. Two options at least."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    spans, full = [], False
    for s in items:
        if s is None or (isinstance(s, str) and s.lower() in FULL_NAMES):
            full = True
            continue
        try:
            v = int(s)
        except (TypeError, ValueError):
            raise AllocationError(f"span menu entry {s!r} is neither a positive integer nor 'full'") from None
        if v < 1 or (isinstance(s, float) and s != v):
            raise AllocationError(f"span menu entry {s!r} must be an integer >= 1 or 'full'")
        spans.append(v)
    if len(set(spans)) != len(spans):
        raise AllocationError(f"span menu {items} repeats a span")
    menu = tuple(sorted(spans)) + ((None,) if full else ())
    if len(menu) < 2:
        raise AllocationError(f"a span menu needs at least two options, got {items}")
    return menu


def head_cost(span: int | None, context: int, sinks: int = 0) -> int:
    """KV slots one head of ``span`` (None = full attention) holds at ``context`` tokens."""
    return context if span is None else min(context, span - 1 + sinks)


@dataclass(frozen=True)
class BudgetProblem:
    """The searched units' option costs and the slots they may hold in all (fixed units taken off)."""

    menu: tuple[int | None, ...]
    costs: tuple[tuple[int, ...], ...]  # [unit][option], KV slots at the context
    budget: int  # slots the searched units may hold together
    full: int  # slots every head of the model would hold on full attention (fixed ones included)
    fixed: int  # slots the fixed units hold
    context: int
    heads: tuple[int, ...]  # KV heads per searched unit

    def saving_target(self) -> float:
        """The expected saving a search drives to: 1 − budget / (the searched units on full attention)."""
        return 1.0 - self.budget / (sum(self.heads) * self.context)

    def unit_cost_shares(self) -> list[list[float]]:
        """Option costs as shares of the searched units' full-attention total (they sum to 1 on FA)."""
        total = sum(self.heads) * self.context
        return [[c / total for c in row] for row in self.costs]


def problem(shape: ModelShape, granularity: str, menu: Sequence[int | None], kv_budget: float, context: int,
            sinks: int = 0, native: Sequence[int | None] | None = None) -> BudgetProblem:
    """The budget ``kv_budget`` (share of full attention's KV at ``context``, sinks included) over the
    searched units, each choosing an option of ``menu``. One clear error when no assignment fits or
    when full attention everywhere already fits (nothing to choose)."""
    if not 0.0 < kv_budget < 1.0 or math.isnan(kv_budget):
        raise AllocationError(f"the KV budget must be a share of full attention strictly between 0 and 1, got {kv_budget!r}")
    if not isinstance(context, int) or context < 1:
        raise AllocationError(f"the budget context must be an integer >= 1, got {context!r}")
    native = list(native) if native is not None else [None] * shape.num_layers
    h = shape.num_kv_heads
    full = shape.num_layers * h * context
    fixed = sum(h * head_cost(w, context) for w in native if w is not None)
    per_unit = h if granularity == "layer" else 1
    n_units = len(Allocation.free_units(native, granularity, h))
    costs = tuple(tuple(per_unit * head_cost(s, context, sinks) for s in menu) for _ in range(n_units))
    budget = int(math.floor(kv_budget * full + 1e-9)) - fixed
    lowest = sum(min(c) for c in costs)
    highest = sum(max(c) for c in costs)
    label = ",".join("full" if s is None else str(s) for s in menu)
    if budget < lowest:
        raise AllocationError(
            f"a KV budget of {kv_budget:g} at {context} tokens ({budget + fixed} slots) is below what the smallest "
            f"option of the menu {label} holds ({lowest + fixed} slots = {(lowest + fixed) / full:.4f} of full): "
            "offer a smaller span or raise the budget")
    if budget >= highest:
        raise AllocationError(
            f"a KV budget of {kv_budget:g} at {context} tokens fits every unit at its widest option ({label}): "
            "nothing to choose; lower the budget or raise the budget context")
    return BudgetProblem(tuple(menu), costs, budget, full, fixed, context, tuple([per_unit] * n_units))


def swa_units_for_budget(prob: BudgetProblem) -> int:
    """Single window ``(W, full)``: the fewest SWA units that meet the budget (every unit costs alike)."""
    if len(prob.menu) != 2 or prob.menu[1] is not None:
        raise AllocationError("a single-window budget needs the menu (W, full)")
    n = len(prob.costs)
    c_swa, c_fa = prob.costs[0]
    n_fa = (prob.budget - n * c_swa) // (c_fa - c_swa)
    return n - int(n_fa)


def assign(values: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Per unit, the option index maximising Σ values subject to Σ costs ≤ ``budget`` (exact, by dynamic
    programming over the total cost; costs beyond :data:`DP_RESOLUTION` steps are rounded up, which
    keeps the budget and may leave a little unused). Ties go to the cheaper total, then the lower
    options, so the result is deterministic."""
    v = np.asarray(values, dtype=np.float64)
    c = np.asarray(costs, dtype=np.int64)
    if v.shape != c.shape or v.ndim != 2 or v.shape[0] < 1:
        raise AllocationError(f"values {v.shape} and costs {c.shape} must both be [units, options]")
    if (c < 0).any() or budget < 0:
        raise AllocationError("costs and the budget must be >= 0")
    if not np.isfinite(v).all():
        raise AllocationError("option values must be finite")
    g = math.gcd(*[int(x) for x in c.ravel()], int(budget)) or 1
    q = max(1, -(-int(c.sum(axis=0).max() if c.size else 0) // g // DP_RESOLUTION))
    step = g * q
    sc = -(-c // step)  # ceil: a rounded cost never understates the real one
    cap = int(budget // step)
    if int(sc.min(axis=1).sum()) > cap:
        raise AllocationError(f"no assignment fits the budget of {budget} slots (the cheapest needs {int(c.min(axis=1).sum())})")
    neg = -np.inf
    dp = np.full(cap + 1, neg)
    dp[0] = 0.0
    choice = np.zeros((v.shape[0], cap + 1), dtype=np.int16)
    for u in range(v.shape[0]):
        best = np.full(cap + 1, neg)
        arg = np.zeros(cap + 1, dtype=np.int16)
        for k in range(v.shape[1]):
            s = int(sc[u, k])
            if s > cap:
                continue
            cand = np.full(cap + 1, neg)
            cand[s:] = dp[: cap + 1 - s] + v[u, k]
            better = cand > best + 1e-12
            best = np.where(better, cand, best)
            arg = np.where(better, k, arg)
        dp, choice[u] = best, arg
    end = int(np.flatnonzero(dp >= dp.max() - 1e-12)[0])  # the cheapest total among the best
    picks = [0] * v.shape[0]
    for u in range(v.shape[0] - 1, -1, -1):
        k = int(choice[u, end])
        picks[u] = k
        end -= int(sc[u, k])
    return picks


def budget_allocation(prob: BudgetProblem, values, granularity: str, shape: ModelShape, sinks: int = 0,
                      meta: dict | None = None, native: Sequence[int | None] | None = None) -> Allocation:
    """The allocation of :func:`assign` over ``prob``'s units, with the budget recorded in ``meta``."""
    picks = assign(values, prob.costs, prob.budget)
    spans = [prob.menu[k] for k in picks]
    held = sum(prob.costs[u][k] for u, k in enumerate(picks)) + prob.fixed
    window = max(s for s in prob.menu if s is not None)
    m = dict(meta or {})
    m["budget"] = {"kv_budget": round((prob.budget + prob.fixed) / prob.full, 6), "context": prob.context,
                   "menu": ["full" if s is None else s for s in prob.menu], "slots": held,
                   "kv_share": round(held / prob.full, 6)}
    return Allocation.from_spans(spans, granularity, shape, sinks, m, native=native,
                                 window=None if any(s is not None for s in spans) else window)
