"""Baselines for a KV budget with per-unit spans: a MoA-style profile and one uniform span.

* :func:`profile_allocation` (after MoA, Fu et al. 2024, arXiv 2406.14909): a first-order estimate of
  each unit's loss increase for each span, from forward/backward passes on calibration data with
  full attention everywhere, then the budgeted assignment that minimises the summed estimates. The
  estimate comes from the same span chain the search trains (``gates.SpanGates``): at z = 1 (full
  attention) ∂L/∂z_{u,j} = ⟨∂L/∂o_u, FA_u − o_{u,j}⟩, so ΔL_{u,j} ≈ −∂L/∂z_{u,j}, one backward for all
  units and spans. Per sequence the magnitude |ΔL| is kept (a signed estimate at the model's own
  optimum is mostly noise around 0) and averaged over sequences. The loss is the LM loss on the data
  (the KL to the model itself has no gradient at full attention).
* :func:`uniform_span_allocation`: every unit on one span, the widest the budget allows (no FA).
"""

from __future__ import annotations

import torch

from ..allocation import Allocation
from ..budget import BudgetProblem, budget_allocation
from ..gates import SpanGates
from ..models import attach_gates, detach, model_shape, searchable_native
from .losses import forward_logits, lm_sum
from .search import units_to_heads


def profile_estimates(model, granularity: str, menu: tuple, batch_fn, batches: int = 4, sinks: int = 0,
                      backend: str = "auto", reopen_native: bool = False, progress: bool = False) -> torch.Tensor:
    """ΔL estimates [units, len(menu)] (full attention: 0), averaged |·| over every sequence of
    ``batch_fn(0 … batches − 1)``."""
    shape = model_shape(model)
    native = searchable_native(model, reopen_native)
    free = [i for i, w in enumerate(native) if w is None]
    ext = tuple(menu) if menu[-1] is None else tuple(menu) + (None,)  # the Taylor point is full attention
    model.eval().requires_grad_(False)
    mix = attach_gates(model, max(s for s in ext if s is not None), sinks, backend=backend, reopen_native=reopen_native,
                       menu=ext)
    device = next(model.parameters()).device
    n_units = len(free) * (1 if granularity == "layer" else shape.num_kv_heads)
    total = torch.zeros(n_units, len(ext) - 1, dtype=torch.float64)
    count = 0
    it = range(batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="span profile", dynamic_ncols=True)
    try:
        for i in it:
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch_fn(i).items()}
            for r in range(batch["input_ids"].shape[0]):
                row = {k: (v[r : r + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
                z = torch.ones(n_units, len(ext) - 1, device=device, requires_grad=True)
                mix.z = units_to_heads(SpanGates.weights(z), granularity, shape, free)
                s, n = lm_sum(forward_logits(model, row), row["input_ids"], row.get("loss_mask"))
                (s / n.clamp_min(1.0)).backward()
                total += (-z.grad).abs().double().cpu()
                count += 1
    finally:
        detach(model)
    est = torch.cat([total / max(1, count), torch.zeros(n_units, 1, dtype=torch.float64)], dim=1)  # full: 0
    return est if menu[-1] is None else est[:, :-1]


def profile_allocation(model, granularity: str, prob: BudgetProblem, batch_fn, batches: int = 4, sinks: int = 0,
                       backend: str = "auto", reopen_native: bool = False, progress: bool = False) -> Allocation:
    """MoA-style: the budgeted assignment with the smallest summed loss estimate."""
    shape = model_shape(model)
    native = searchable_native(model, reopen_native)
    est = profile_estimates(model, granularity, prob.menu, batch_fn, batches, sinks, backend, reopen_native, progress)
    meta = {"method": "moa_profile", "profile_batches": batches,
            "estimates": [[round(float(x), 6) for x in row] for row in est]}
    return budget_allocation(prob, (-est).tolist(), granularity, shape, sinks, meta, native=native)


def uniform_span_allocation(prob: BudgetProblem, granularity: str, shape, sinks: int = 0, native=None) -> Allocation:
    """Every searched unit on the one span that spends the budget (the widest that fits; any span, not
    only the menu's), as in MoA's uniform baseline."""
    heads = sum(prob.heads)
    span = prob.budget // heads + 1 - sinks
    if span < 1:
        from ..allocation import AllocationError

        raise AllocationError(f"the budget leaves {prob.budget // heads} slots per head, fewer than the {sinks} sinks")
    span = min(span, prob.context)
    held = heads * min(prob.context, span - 1 + sinks) + prob.fixed
    meta = {"method": "uniform_span", "budget": {"kv_budget": round((prob.budget + prob.fixed) / prob.full, 6),
                                                 "context": prob.context, "slots": held, "kv_share": round(held / prob.full, 6)}}
    n = len(prob.costs)
    return Allocation.from_spans([span] * n, granularity, shape, sinks, meta, native=native)
