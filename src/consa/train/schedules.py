"""Options for a faster, more decisive ConSA search (``GateConfig`` holds their settings and checks them).

* ``beta_at``: hard-concrete temperature annealing. A lower β makes each sample z closer to {0, 1},
  so the student trains on the binary hybrids it will be cut to. At fixed log α it also lowers
  P(z≠0) = σ(log α − β·log(−γ/ζ)), i.e. raises ŝ; the sparsity controller shifts log α back.
* ``cosine_lr``: the gates' learning rate decays so that late steps refine instead of jitter.
* ``rank_init``: log α seeded from a ranking (attention mass, or a short Duo-style warm start), so
  the search begins with the order a cheap method found instead of a tie.
* ``decide_penalty``: mean P(1−P) over the gates; 0 for decided gates, its gradient pushes each
  undecided gate away from 0.5 towards the side it is on.
These are pure functions of the step; ``Search`` applies them (``train/search.py``). All but the
β anneal are off by default.
"""

from __future__ import annotations

import math

import torch

from ..gates import BETA

INITS = ("constant", "attention_mass", "duo")
DEFAULT_INIT_STEPS = {"attention_mass": 4, "duo": 30}  # calibration batches / warm-start steps when init_steps = 0


def progress(step: int, total: int) -> float:
    """Share of the planned steps done at ``step``: 0 at step 0, 1 at the last planned step and after."""
    return 1.0 if total <= 1 else min(1.0, step / (total - 1))


def beta_at(step: int, total: int, beta_final: float, beta0: float = BETA) -> float:
    """Geometric anneal from ``beta0`` (2/3) at step 0 to ``beta_final`` at the last planned step
    (held there after): geometric, because the sample's sharpness goes with 1/β, so each step
    sharpens by the same factor."""
    return beta0 * (beta_final / beta0) ** progress(step, total)


def cosine_lr(step: int, total: int, lr0: float, lr_final: float) -> float:
    """Cosine from ``lr0`` at step 0 to ``lr_final`` at the last planned step (held there after)."""
    return lr_final + (lr0 - lr_final) * 0.5 * (1.0 + math.cos(math.pi * progress(step, total)))


def decide_active(step: int, total: int, frac: float) -> bool:
    """True in the last ``frac`` of the planned steps and in any extension past them."""
    return frac > 0 and step >= total - int(round(frac * total))


def decide_penalty(p: torch.Tensor) -> torch.Tensor:
    """mean_u P_u (1 − P_u), P = P(z≠0): 0 at P ∈ {0, 1}, largest at 0.5. Its gradient in P is
    1 − 2P, so descent raises a gate above 0.5 and lowers one below: it separates, never reorders
    across 0.5. A mean (not a sum), so its weight does not depend on the number of units."""
    return (p * (1.0 - p)).mean()


def rank_init(scores, center: float, spread: float) -> torch.Tensor:
    """log α spaced evenly by rank of ``scores`` over [center − spread/2, center + spread/2], the
    highest score highest; tied scores share their mean rank (a Duo-style α clamped at 1 says nothing
    about order, so the init must not invent one). Ranks, not raw values, so the scale of any score
    gives the same start; centred at 3 (± 1) every P(z≠0) ≥ 0.95 at β = 2/3: training still begins
    near full attention, only the order is the score's. At today's default centre 0.5 it is ≥ 0.75."""
    s = torch.as_tensor(scores, dtype=torch.float64).flatten().tolist()
    n = len(s)
    order = sorted(range(n), key=lambda i: s[i])
    rank = [0.0] * n
    i = 0
    while i < n:
        j = i
        while j + 1 < n and s[order[j + 1]] == s[order[i]]:
            j += 1
        for k in range(i, j + 1):
            rank[order[k]] = (i + j) / 2
        i = j + 1
    return torch.tensor([center + spread * ((r / (n - 1) if n > 1 else 0.5) - 0.5) for r in rank], dtype=torch.float32)


def init_scores(model, cfg, batch_fn, num_swa: int) -> tuple[torch.Tensor, int]:
    """Per-unit scores for ``cfg.gates.init`` (higher = keep FA) and the tokens spent on them, computed on
    the bare model (before the search attaches its gates); ``cfg`` is the search's ``SearchConfig``.
    attention_mass: the training-free score on ``init_steps`` batches taken from steps the search never
    reaches; duo: the α of a Duo-style run of ``init_steps`` steps on the search's first batches."""
    from .baselines import attention_mass_allocation, duo_allocation

    g, t = cfg.gates, cfg.target
    n = g.init_steps or DEFAULT_INIT_STEPS[g.init]
    tokens = 0
    if g.init == "attention_mass":
        batches = [batch_fn(2_000_000_011 + i) for i in range(n)]
        tokens = sum(int(b["input_ids"].numel()) for b in batches if "input_ids" in b)
        alloc = attention_mass_allocation(model, t.granularity, num_swa, t.window, batches, sinks=t.sinks,
                                          reopen_native=t.reopen_native)
        scores = alloc.meta["scores"]
    else:
        alloc = duo_allocation(model, t.granularity, num_swa, t.window, batch_fn, steps=n, sinks=t.sinks,
                               seed=cfg.seed, backend=cfg.backend, reopen_native=t.reopen_native)
        first = batch_fn(0)
        tokens = n * int(first["input_ids"].numel()) if "input_ids" in first else 0
        scores = alloc.meta["alpha"]
    return torch.tensor(scores, dtype=torch.float64), tokens
