"""Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers": Fisher mask search.

Importance of unit u is the diagonal of the empirical Fisher information of its mask (gate):
I_u = Σ over calibration examples of (∂L_i/∂g_u)^2 at g = 1, so removing u costs ≈ ½ I_u in loss.
The mask search under the budget is their knapsack, solved greedily: keep the units with the highest
importance per unit cost until the kept budget is used — equivalently, `select` with selection
"norm-per-cost" removes the lowest I_u / cost_u first until the target fraction of the measure is
gone (cost in the chosen measure: parameters or FLOPs). Out of scope: the paper's mask
rearrangement (block-diagonal Fisher within a layer) and mask tuning (least-squares rescaling of
the kept units); the plan is the searched mask only.
"""

from __future__ import annotations

from ..method.plan import PruningPlan
from .base import Method, check_batches
from .gradients import gate_gradient_stats


class FisherMethod(Method):
    name = "fisher"
    needs_gradients = True
    retraining_free = True

    def __init__(self, selection: str = "norm-per-cost", **options):
        super().__init__(selection, **options)

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        check_batches(calib_batches, self.name, labels=True)
        scores = gate_gradient_stats(model, adapter, calib_batches)["sq"]
        return self._select(scores, adapter, target=target, measure=measure, seq_len=seq_len, kinds=kinds)
