"""The identity prior: a Laplace (group-lasso) penalty on each branch's function norm.

    loss = task_loss + lambda(step) * sum_u c_u * ||f_u||_batch

||f_u||_batch is the function norm of unit u on the current batch (differentiable, computed by
the gate observers during the forward pass), c_u its weight (uniform, or its parameter cost),
normalized so that sum_u c_u = 1. The prior is centred at the identity (f_u = 0) and, being a
norm rather than a squared norm, drives unimportant branches to exactly-removable size.
lambda ramps up linearly over the first `warmup` fraction of steps.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch.base import Adapter
from .gates import Gates
from .plan import unit_costs
from .scoring import BranchNorms
from .train import TrainHook


class IdentityPrior(TrainHook):
    """A training hook adding λ(step) Σ c_u ‖f_u‖ to the loss; also callable as `extra_loss(model,
    batch, step, total_steps) -> (loss, terms)`."""

    def __init__(self, model: nn.Module, adapter: Adapter, gates: Gates, kinds=("head", "neuron"), lam: float = 0.1,
                 weight: str = "uniform", warmup: float = 0.1):
        self.lam, self.warmup = lam, warmup
        self.kinds = tuple(kinds)
        self.recorder = BranchNorms(model, gates, adapter, self.kinds, differentiable=True).attach()
        self.weights = self._weights(adapter, weight)

    def _weights(self, adapter: Adapter, weight: str) -> dict[tuple[str, int], torch.Tensor]:
        """c_u per (kind, layer), a tensor per entry, summing to 1 over every unit; "cost" weighs a
        unit by the parameters it owns (`plan.unit_costs`, a whole sub-layer for attn / ffn)."""
        raw = {key: torch.full((n, ), cost if weight == "cost" else 1.0)
               for key, (n, cost) in unit_costs(adapter, self.kinds, "encoder_params").items()}
        total = sum(float(v.sum()) for v in raw.values()) or 1.0
        return {k: v / total for k, v in raw.items()}

    def lam_at(self, step: int, total: int) -> float:
        ramp = self.warmup * total
        return self.lam * min(1.0, (step + 1) / ramp) if ramp > 0 else self.lam

    def penalty(self) -> torch.Tensor:
        """sum_u c_u ||f_u||_batch from the last training forward (0 if nothing was recorded)."""
        eps = 1e-10  # keeps the gradient finite at 0; subtracted so that a zero branch costs exactly 0
        norms = {k: v - eps**0.5 for k, v in self.recorder.norms(eps=eps).items()}
        terms = [(self.weights[k].to(v.device) * v).sum() for k, v in norms.items() if k in self.weights]
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()

    def __call__(self, model: nn.Module, batch: dict, step: int, total: int) -> tuple[torch.Tensor, dict]:
        pen = self.penalty()
        lam = self.lam_at(step, total)
        self.recorder.reset()
        return lam * pen, {"prior": float(pen.detach()), "lambda": lam}

    def loss(self, model, batch, outputs, loss, step, total):
        extra, terms = self(model, batch, step, total)
        return loss + extra, terms

    def detach(self) -> None:
        self.recorder.detach()
