"""Cut refinement: check the top-k cut on the true objective and swap units across it where that helps.

The search ranks units by log α, a proxy: the final allocation is judged by how far the *binary* hybrid
model is from the full one. Units just above and just below the cut are the ones the proxy is least sure
of, so after the search we try swapping an FA unit near the cut for an SWA unit near it, and keep a swap
when the KL of the binary allocation to the full model, on held-out batches the search never saw, drops.
The SWA count never changes (a swap is one-for-one), so the budget stays exact.

Three orders of trying the swaps (``order``):
* ``score``: the ``candidates`` FA units with the lowest log α against the ``candidates`` SWA units with the
  highest, nearest pairs first. Cheap, but it can only fix a near-tie at the cut.
* ``measured``: first the objective with each FA unit alone turned SWA (what that unit is worth *in this
  allocation*) and with each of the ``candidates`` best SWA units alone turned FA; pairs are then tried in the
  order of the sum of the two measured changes. This also finds an FA unit far above the cut whose work the
  other FA units already do (the stochastic search values a unit over random subsets of the others, the
  deployed cut is one fixed subset), at one evaluation per FA unit more.
* ``gradient``: the same order from a first-order estimate of every single flip (``flip_estimate``: one
  backward pass through the binary allocation instead of one forward per unit; redone after each kept
  swap). Every swap is still judged on the true objective, so a poor estimate costs evaluations, never
  quality; at scale (hundreds of units, long sequences) it is the affordable version of ``measured``.

The binary allocation is evaluated through the search's own gated attention with z ∈ {0, 1}
(``z·FA + (1 − z)·SWA`` is then exactly the hybrid), so no second attention path is involved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class RefineResult:
    """What refinement did: the final per-unit FA bits and the evidence for them."""

    fa: list[bool]
    kl_before: float
    kl_after: float
    evals: int
    swaps: list[tuple[int, int, float]] = field(default_factory=list)  # (fa unit → SWA, swa unit → FA, KL after)
    estimates: int = 0  # flip_estimate calls (order "gradient"): backward passes, not counted in evals

    @property
    def changed(self) -> int:
        """Units whose side differs from the top-k cut's (2 per kept swap)."""
        return 2 * len(self.swaps)

    def summary(self) -> dict:
        return {"kl_before": self.kl_before, "kl_after": self.kl_after, "evals": self.evals,
                "swaps": [list(s) for s in self.swaps], "units_changed": self.changed, "estimates": self.estimates}


def refine_cut(
    scores: torch.Tensor,
    fa: list[bool],
    objective: Callable[[list[bool]], float],
    *,
    candidates: int = 4,
    max_evals: int = 32,
    min_gain: float = 0.0,
    order: str = "score",
    flip_estimate: Optional[Callable[[list[bool]], list[float]]] = None,
) -> RefineResult:
    """Greedy first-improvement swaps across the cut, ranked by how close each pair sits to it.

    ``scores`` are the per-unit log α (higher = more FA), ``fa`` the top-k cut, ``objective(fa_bits)`` the
    held-out KL of that binary allocation. Each pass tries the ``candidates`` lowest-scoring FA units
    against the ``candidates`` highest-scoring SWA units, nearest pairs first, and accepts the first swap
    that lowers the objective by more than ``min_gain`` (relative); passes repeat until none helps or
    ``max_evals`` objective calls (the first, of the cut itself, included) are spent. ``order="measured"``
    tries the pairs of measured single-unit changes first (module docstring), then the near-cut ones; the
    measurements count against ``max_evals`` too (FA units lowest score first, so a small budget degrades
    towards ``score``). ``order="gradient"`` orders every (FA, SWA) pair by ``flip_estimate(fa)``, the
    estimated objective change of flipping each unit alone, re-estimated after each kept swap.
    """
    values = scores.detach().double().cpu().flatten().tolist()
    if len(values) != len(fa):
        raise ValueError(f"{len(values)} scores but {len(fa)} units")
    if candidates < 1 or max_evals < 1:
        raise ValueError("candidates and max_evals must be >= 1")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "gradient" and flip_estimate is None:
        raise ValueError("order 'gradient' needs flip_estimate")
    current = [bool(b) for b in fa]
    best = float(objective(current))
    result = RefineResult(fa=current, kl_before=best, kl_after=best, evals=1)
    tried: set[tuple[int, ...]] = {tuple(current)}
    measured = _measure(values, current, objective, candidates, max_evals, result) if order == "measured" else None
    improved = True
    while improved and result.evals < max_evals:
        improved = False
        if order == "gradient":  # every pair is estimated: no near-cut pairs left to append
            est = [float(x) for x in flip_estimate(current)]
            result.estimates += 1
            if len(est) != len(current):
                raise ValueError(f"flip_estimate gave {len(est)} values for {len(current)} units")
            pairs = _estimated_pairs(est, current)
        else:
            pairs = _pairs(values, current, candidates)
            if measured is not None:  # the measured pairs first, then the near-cut ones they left out
                first = _measured_pairs(measured, fa, current)
                seen = set(first)
                pairs = first + [p for p in pairs if p not in seen]
        for up, down in pairs:
            if result.evals >= max_evals:
                break
            trial = list(current)
            trial[up], trial[down] = False, True
            if tuple(trial) in tried:
                continue
            tried.add(tuple(trial))
            kl = float(objective(trial))
            result.evals += 1
            if kl < best * (1.0 - min_gain):
                current, best = trial, kl
                result.swaps.append((up, down, kl))
                improved = True
                break
    result.fa, result.kl_after = current, best
    return result


ORDERS = ("score", "measured", "gradient")


def _estimated_pairs(est: list[float], fa: list[bool]) -> list[tuple[int, int]]:
    """Every (FA unit, SWA unit) pair, by the estimated change of flipping both (the sum of the single flips),
    most negative first."""
    ups = sorted((i for i, f in enumerate(fa) if f), key=lambda i: (est[i], i))
    downs = sorted((i for i, f in enumerate(fa) if not f), key=lambda i: (est[i], i))
    return sorted(((u, d) for u in ups for d in downs), key=lambda p: (est[p[0]] + est[p[1]], p))


def _measure(values, fa, objective, k: int, max_evals: int, result: RefineResult) -> dict[int, float]:
    """{unit: objective with that unit alone flipped}: every FA unit (lowest score first), then the ``k``
    highest-scoring SWA units, while the budget lasts (at least one evaluation is left for a swap)."""
    fa_units = sorted((i for i, f in enumerate(fa) if f), key=lambda i: (values[i], i))
    swa_units = sorted((i for i, f in enumerate(fa) if not f), key=lambda i: (-values[i], -i))[:k]
    out: dict[int, float] = {}
    for u in swa_units[:1] + fa_units + swa_units[1:]:  # one SWA unit early, so any budget can pair
        if result.evals >= max_evals - 1:
            break
        trial = list(fa)
        trial[u] = not trial[u]
        out[u] = float(objective(trial))
        result.evals += 1
    return out


def _measured_pairs(measured: dict[int, float], cut: list[bool], fa: list[bool]) -> list[tuple[int, int]]:
    """(FA unit, SWA unit) pairs among the measured units still on the side they were measured on (the
    ``cut``'s), by the sum of their single-flip objectives: the FA unit whose loss costs least with the SWA
    unit whose gain is largest first."""
    ups = [u for u in measured if cut[u] and fa[u]]
    downs = [d for d in measured if not cut[d] and not fa[d]]
    return sorted(((u, d) for u in ups for d in downs), key=lambda p: (measured[p[0]] + measured[p[1]], p))


def _pairs(values: list[float], fa: list[bool], k: int) -> list[tuple[int, int]]:
    """(FA unit, SWA unit) pairs from the ``k`` units nearest the cut on each side, closest scores first.

    Scores tie-break by unit index, as ``gates.topk_swa`` does, so the order is deterministic."""
    fa_units = sorted((i for i, f in enumerate(fa) if f), key=lambda i: (values[i], i))[:k]
    swa_units = sorted((i for i, f in enumerate(fa) if not f), key=lambda i: (-values[i], -i))[:k]
    pairs = [(u, d) for u in fa_units for d in swa_units]
    return sorted(pairs, key=lambda p: (values[p[0]] - values[p[1]], p))
