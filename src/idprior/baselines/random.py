"""Random unit pruning: the floor every informed method has to beat.

Each present unit of `kinds` gets an independent uniform score from `numpy.random.default_rng(seed)`
(in sorted unit order, so a seed always gives the same plan); `select` then removes the lowest
scores first. With the default selection "norm" every unit is equally likely to go, whatever its
cost, so kinds are removed roughly in proportion to their counts.
"""

from __future__ import annotations

import numpy as np

from ..method.plan import PruningPlan
from .base import Method, present_units


class RandomMethod(Method):
    name = "random"
    needs_gradients = False
    retraining_free = False

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        units = present_units(adapter, kinds)
        values = np.random.default_rng(seed).random(len(units))
        scores = {u: float(v) for u, v in zip(units, values)}
        return self._select(scores, adapter, target=target, measure=measure, seq_len=seq_len, kinds=kinds)
