"""Michel et al. 2019, "Are Sixteen Heads Really Better than One?": gradient importance of gates.

I_u = Σ over calibration examples of |∂L/∂g_u| at g = 1 — the first-order (Taylor) estimate of
how much the loss changes when unit u is removed. Michel et al. score heads only; we score heads
and neurons alike, in the same loss units, so one global ranking is meaningful (default selection
"norm"). Their per-layer ℓ2 normalization of the scores is left out: it would make head and neuron
scores incomparable. Pruning is one shot (not their iterative schedule); `select` removes the
least important units first.
"""

from __future__ import annotations

from ..method.plan import PruningPlan
from .base import Method, check_batches
from .gradients import gate_gradient_stats


class MichelMethod(Method):
    name = "michel"
    needs_gradients = True
    retraining_free = True

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        check_batches(calib_batches, self.name, labels=True)
        scores = gate_gradient_stats(model, adapter, calib_batches)["abs"]
        return self._select(scores, adapter, target=target, measure=measure, seq_len=seq_len, kinds=kinds)
