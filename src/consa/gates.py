"""Hard-concrete L0 gates (Louizos et al., 2018), one per attention unit.

z_u = 1 keeps unit u on full attention, z_u = 0 switches it to sliding-window attention. log α is kept in
fp32 whatever the model dtype, so tiny gradient steps are not rounded away in bf16.
"""

from __future__ import annotations

import math

import torch
from torch import nn

BETA = 2.0 / 3.0
GAMMA = -0.1
ZETA = 1.1
EPS = 1e-6


class HardConcreteGates(nn.Module):
    """A vector of hard-concrete gates over ``num_units`` units.

    ``beta`` (the temperature) is a plain attribute that may change between steps (the search's
    ``beta_final`` anneals it): ``sample``, ``prob_nonzero`` and the controller's shift solver all read
    the current value, so the sparsity they report is that of the samples actually drawn.
    ``deterministic`` does not depend on β (Louizos et al.'s test-time gate)."""

    def __init__(self, num_units: int, init_log_alpha: float = 3.0, beta: float = BETA, gamma: float = GAMMA, zeta: float = ZETA):
        super().__init__()
        if num_units < 1:
            raise ValueError("need at least one gate")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.log_alpha = nn.Parameter(torch.full((num_units,), float(init_log_alpha), dtype=torch.float32))

    @property
    def num_units(self) -> int:
        return self.log_alpha.numel()

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised sample z in [0, 1] (differentiable in log α)."""
        # Noise is drawn on the generator's device (CPU by default) so runs are reproducible anywhere.
        dev = generator.device if generator is not None else self.log_alpha.device
        u = torch.rand(self.log_alpha.shape, generator=generator, device=dev, dtype=torch.float32)
        u = u.to(self.log_alpha.device).clamp(EPS, 1.0 - EPS)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def deterministic(self) -> torch.Tensor:
        """The eval-time gate: the same value every call."""
        s = torch.sigmoid(self.log_alpha)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def forward(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.sample(generator) if self.training else self.deterministic()

    def prob_nonzero(self, shift: float = 0.0) -> torch.Tensor:
        """P(z_u ≠ 0) = σ(log α + shift − β·log(−γ/ζ)): the probability that unit u keeps any full
        attention (``shift``: as if every log α were moved by it, for the controller's solver)."""
        return torch.sigmoid(self.log_alpha + shift - self.beta * math.log(-self.gamma / self.zeta))

    def expected_sparsity(self, shift: float = 0.0) -> torch.Tensor:
        """ŝ = 1 − mean_u P(z_u ≠ 0): the expected share of SWA units."""
        return 1.0 - self.prob_nonzero(shift).mean()


class SpanGates(HardConcreteGates):
    """Per unit, a chain of K − 1 hard-concrete gates over a span menu of K options (narrowest first,
    widest, usually full attention, last): z_{u,j} ≠ 0 means "unit u sees wider than option j".

    The unit's output mixes the options' outputs with weights w_k = P_k − P_{k+1}, P_k = Π_{j<k} z_j
    (P_0 = 1, P_K = 0): a convex mix that is one option exactly when the gates are binary, and
    the two-option menu {W, full} reduces to ConSA's single gate (w = [1 − z, z]). The chain makes a
    wider span cost a gate more than a narrower one, so the budget pushes units down one step at a
    time. ``expected_sparsity`` is the expected *saving* 1 − E[cost] / cost on full attention, with
    ``costs`` [units, K] the options' shares of the full-attention total: the controller drives it to
    1 − budget exactly as it drives ConSA's share of SWA units (same solver, same settling)."""

    def __init__(self, costs: torch.Tensor, init_log_alpha: float = 3.0, **kw):
        costs = torch.as_tensor(costs, dtype=torch.float32)
        if costs.dim() != 2 or costs.shape[1] < 2:
            raise ValueError("costs must be [units, options] with at least two options")
        super().__init__(costs.shape[0], init_log_alpha, **kw)
        self.log_alpha = nn.Parameter(torch.full((costs.shape[0], costs.shape[1] - 1), float(init_log_alpha)))
        self.register_buffer("costs", costs)

    @property
    def num_units(self) -> int:
        return self.log_alpha.shape[0]

    @staticmethod
    def weights(z: torch.Tensor) -> torch.Tensor:
        """Chain gate values [U, K − 1] → option weights [U, K] (each row sums to 1)."""
        ones = z.new_ones(z.shape[0], 1)
        reach = torch.cat([ones, torch.cumprod(z, dim=1), z.new_zeros(z.shape[0], 1)], dim=1)  # P_0 … P_K
        return reach[:, :-1] - reach[:, 1:]

    def level_probs(self, shift: float = 0.0) -> torch.Tensor:
        """P(unit u takes option k) [U, K] under independent gates."""
        return self.weights(self.prob_nonzero(shift))

    def expected_sparsity(self, shift: float = 0.0) -> torch.Tensor:
        return 1.0 - (self.level_probs(shift) * self.costs).sum()

    def reach_probs(self) -> torch.Tensor:
        """P(unit u takes option k or a wider one) [U, K] (column 0 is 1)."""
        p = self.prob_nonzero()
        return torch.cat([p.new_ones(p.shape[0], 1), torch.cumprod(p, dim=1)], dim=1)

    def option_scores(self) -> torch.Tensor:
        """The values of the budgeted assignment [U, K]: option k is worth Σ_{j=1..k} P(reach j), each
        step up floored at 1e-6. Every step up is worth something, so the assignment spends the budget
        as ConSA's top-k spends its count, and the units most likely to be wide get the width first."""
        reach = self.reach_probs()[:, 1:].clamp_min(1e-6)
        return torch.cat([reach.new_zeros(reach.shape[0], 1), torch.cumsum(reach, dim=1)], dim=1)

    def most_likely(self) -> torch.Tensor:
        """Each unit's most likely option [U] (for the agreement with the assignment)."""
        return self.level_probs().argmax(1)


def topk_swa(scores: torch.Tensor, num_swa: int) -> list[bool]:
    """Global cut: the ``num_swa`` lowest-scoring units become SWA; returns per-unit FA bits.

    Ties are broken by unit index (lower index goes SWA first), so the count is exact whatever the
    scores, constant vectors included.
    """
    n = scores.numel()
    if not 0 <= num_swa <= n:
        raise ValueError(f"cannot make {num_swa} of {n} units SWA")
    values = scores.detach().double().cpu().flatten().tolist()
    order = sorted(range(n), key=lambda i: (values[i], i))
    fa = [True] * n
    for i in order[:num_swa]:
        fa[i] = False
    return fa


NEAR_CUT = 1.0  # log α band around the cut: about half the sd (π/√3) of the logistic noise in one gate sample


def cut_margin(log_alpha: torch.Tensor, fa: list[bool], band: float = NEAR_CUT) -> dict:
    """How many units the top-k cut ``fa`` separates by less than ``band`` in log α from the other side.

    The cut sits halfway between the lowest FA and the highest SWA log α. Units within ``band`` of it
    change order in a gate sample about as often as not, so the gates have not told them apart: the cut
    between them is close to a ranking of noise, and only the ``fa_clear`` units above the band are
    decided FA. (Runs 8–9 at t = 0.875: 3 of 28 FA units clear; 25 share the band with all 196 SWA units.)
    """
    v = log_alpha.detach().double().cpu().flatten().tolist()
    if len(v) != len(fa):
        raise ValueError(f"{len(v)} gates but {len(fa)} units in the cut")
    on = [x for x, f in zip(v, fa) if f]
    off = [x for x, f in zip(v, fa) if not f]
    if not on or not off:
        return {"cut_log_alpha": None, "band": band, "fa_clear": len(on), "fa_near_cut": 0, "swa_near_cut": 0}
    cut = (min(on) + max(off)) / 2
    return {"cut_log_alpha": round(cut, 4), "band": band, "fa_clear": sum(x > cut + band for x in on),
            "fa_near_cut": sum(x <= cut + band for x in on), "swa_near_cut": sum(x >= cut - band for x in off)}


def prob_in_ramp(log_alpha: float, beta: float, gamma: float = GAMMA, zeta: float = ZETA) -> float:
    """P(0 < z < 1) for one hard-concrete gate: the share of its samples through which the task loss has a
    gradient to log α (outside, the clamp passes none), while the L0 penalty's gradient reaches every gate."""
    lo = math.log(-gamma / zeta)  # logit of the stretched sigmoid where z = 0
    hi = math.log((1.0 - gamma) / (zeta - 1.0))  # ... where z = 1

    def sig(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-x))

    return sig(beta * hi - log_alpha) - sig(beta * lo - log_alpha)


def cut_agreement(prob_nonzero: torch.Tensor, fa: list[bool]) -> float:
    """Share of units whose own gate (P(z ≠ 0) ≥ 0.5 means FA) agrees with the global top-k cut ``fa``.

    Near 1 the cut only confirms what the gates decided. Well below 1 it ranks gates that are still
    undecided (all near closed, say), so more search steps can change the allocation (an agreement
    near 0.78 after 150 steps has been seen to give a different, better allocation after 600).
    """
    p = prob_nonzero.detach().double().cpu().flatten().tolist()
    if len(p) != len(fa):
        raise ValueError(f"{len(p)} gates but {len(fa)} units in the cut")
    return sum((pi >= 0.5) == bool(f) for pi, f in zip(p, fa)) / max(1, len(fa))

