"""Sparsity control: drive the expected sparsity ŝ of the gates to the target t, and keep it there.

Two controllers share one interface (``penalty`` inside the loss, ``after_step`` after the optimiser):

* ``lagrangian`` (default): the augmented Lagrangian λ1(ŝ − t) + λ2(ŝ − t)², with λ2 fixed and λ1
  updated by a damped method-of-multipliers step. There are two ways this
  goes wrong when gates move by Adam, which takes fixed-size steps whatever the gradient's scale:
  an undamped λ overshoots (ŝ → 0.91 for t = 0.75, most gates pinned at the floor) or oscillates.
  Here the multiplier update is damped (small dual step, leaky integral) and, as a last guard, a
  *bounded* common shift of log α (at most ``max_shift`` per step) removes what error is left after
  the warm-up. The shift moves every gate by the same amount, so it never changes their ranking:
  the ranking is what the task loss taught, the budget is what the controller enforces.
* ``project``: after each step shift every log α by one common offset, found by bisection, so that
  ŝ equals the scheduled target exactly (budget by construction; no multiplier at all).

Both log ŝ, the hard top-k sparsity and λ every step (see ``state``). Knows nothing of transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gates import HardConcreteGates

MODES = ("lagrangian", "project")


@dataclass
class ControllerConfig:
    target: float
    warmup_steps: int = 0
    mode: str = "lagrangian"
    lambda2: float = 10.0  # quadratic penalty coefficient (fixed: a growing λ2 makes the problem stiff)
    dual_lr: float = 0.5  # method-of-multipliers step on λ1
    dual_decay: float = 0.02  # leak on λ1: damps the integral so it cannot wind up
    max_shift: float = 1.0  # largest common log α correction per step (lagrangian mode), after warm-up
    correct_after_warmup: bool = True


class SparsityController:
    def __init__(self, cfg: ControllerConfig):
        if cfg.mode not in MODES:
            raise ValueError(f"unknown constraint mode {cfg.mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 < cfg.target < 1.0:
            raise ValueError(f"sparsity target must be in (0, 1), got {cfg.target}")
        self.cfg = cfg
        self.lambda1 = 0.0
        self.last_shift = 0.0

    def target_at(self, step: int) -> float:
        """Linear warm-up of the target from 0 to t over ``warmup_steps``."""
        w = self.cfg.warmup_steps
        if w <= 0 or step >= w:
            return self.cfg.target
        return self.cfg.target * (step + 1) / w

    def penalty(self, expected_sparsity: torch.Tensor, step: int) -> torch.Tensor:
        if self.cfg.mode == "project":
            return expected_sparsity.new_zeros(())
        err = expected_sparsity - self.target_at(step)
        return self.lambda1 * err + self.cfg.lambda2 * err * err

    @torch.no_grad()
    def after_step(self, gates: HardConcreteGates, step: int) -> None:
        target = self.target_at(step)
        if self.cfg.mode == "project":
            self.last_shift = project_to_sparsity(gates, target)
            return
        err = float(gates.expected_sparsity()) - target
        # Damped dual ascent (∂/∂λ1 of the penalty is ŝ − t): λ1 goes negative while ŝ sits below the
        # target, which makes raising ŝ pay; the leak keeps the integral from winding up.
        self.lambda1 = (1.0 - self.cfg.dual_decay) * self.lambda1 + self.cfg.dual_lr * err
        self.last_shift = 0.0
        if self.cfg.correct_after_warmup and step >= self.cfg.warmup_steps:
            shift = solve_shift(gates, target)
            shift = max(-self.cfg.max_shift, min(self.cfg.max_shift, shift))
            gates.log_alpha.add_(shift)
            self.last_shift = shift

    def state_dict(self) -> dict:
        return {"lambda1": self.lambda1, "last_shift": self.last_shift}

    def load_state_dict(self, state: dict) -> None:
        self.lambda1 = float(state["lambda1"])
        self.last_shift = float(state.get("last_shift", 0.0))


@torch.no_grad()
def solve_shift(gates: HardConcreteGates, target: float, iters: int = 60) -> float:
    """The common offset δ with ŝ(log α + δ) = target, by bisection (ŝ decreases monotonically in δ,
    for single gates and span chains alike)."""
    lo, hi = -50.0, 50.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if float(gates.expected_sparsity(mid)) > target:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@torch.no_grad()
def project_to_sparsity(gates: HardConcreteGates, target: float) -> float:
    shift = solve_shift(gates, target)
    gates.log_alpha.add_(shift)
    return shift
