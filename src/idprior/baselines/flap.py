"""FLAP and Wanda-sp: retraining-free structured scores from calibration activations, with bias compensation.

An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models" (FLAP),
scores each input channel j of an output projection (a head's context features, an FFN neuron's
activation x_j) on calibration tokens:
  flap      Var_tokens(x_j) * ||W[:, j]||^2   (their WIFV metric). It measures what bias compensation
            cannot restore: replacing x_j by its mean changes the branch output by W[:, j](x_j - mean x_j).
  wanda-sp  mean_i |W_ij| * RMS_tokens(x_j)    (their WIFN; Wanda's |W| ||X|| per structure, the
            structured Wanda baseline of the FLAP paper).
A head unit's score is the mean over its channels (all query heads of a GQA group); a whole
sub-layer's the mean over its units. Scores are standardized per layer and kind, (s - mean) / std
over the layer's attention channels or neurons, as FLAP's adaptive structure search (AL-AM) does, so
one global ranking can compare layers whose activations differ in scale; `select` then removes the
lowest scores first until the target, with the same unit costs, collapse rule and protections as
every method (FLAP's compression weights are those costs). `standardize=False` ranks raw scores.
Both methods ask for bias compensation (`compensate = "bias"`, compensate.py), which is part of FLAP;
`prune.compensate` overrides it.
"""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from ..method.compensate import SUBS, channel_stats
from ..method.plan import PruningPlan
from ..method.units import Unit
from .base import Method, check_batches

METRICS = ("fluctuation", "wanda")


def _standardize(s: torch.Tensor) -> torch.Tensor:
    std = s.std() if s.numel() > 1 else s.new_zeros(())
    return (s - s.mean()) / std if std > 0 else torch.zeros_like(s)


@torch.no_grad()
def channel_scores(model, adapter: Adapter, batches: list[dict], metric: str = "fluctuation") -> dict[tuple[str, int], torch.Tensor]:
    """{(sub, layer): [F] float64 score of every input channel of the sub-layer's output projection}."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    sites = [(sub, layer) for layer in range(adapter.num_layers) for sub in SUBS if adapter.out_proj(layer, sub) is not None]
    stats, n = channel_stats(model, adapter, batches, sites, squares=True)
    out = {}
    for sub, layer in sites:
        w = adapter.out_weight(adapter.out_proj(layer, sub)).detach().double()  # [D, F]
        mean, sq = stats[(sub, layer)]["sum"] / n, stats[(sub, layer)]["sq"] / n  # [F] E[x], E[x^2]
        if metric == "fluctuation":
            out[(sub, layer)] = (sq - mean**2).clamp(min=0) * (w**2).sum(0)
        else:
            out[(sub, layer)] = w.abs().mean(0) * sq.sqrt()
    return out


def unit_scores(adapter: Adapter, channels: dict[tuple[str, int], torch.Tensor], standardize: bool = True) -> dict[Unit, float]:
    """Head units (mean over their channels), neurons, and whole sub-layers (mean over their units)."""
    scores: dict[Unit, float] = {}
    for (sub, layer), s in channels.items():
        s = _standardize(s) if standardize else s
        if sub == "ffn":
            per_unit = s  # one channel per neuron
            scores.update({Unit("neuron", layer, j): float(v) for j, v in enumerate(per_unit.tolist())})
        else:
            owner = adapter.head_unit_of_query_heads(layer)  # [n_heads] unit of each query head
            per_q = s.view(len(owner), adapter.head_dim).mean(1)  # [n_heads*hd] -> [n_heads, hd] -> [n_heads]
            n_units = adapter.num_head_units(layer)
            per_unit = per_q.new_zeros(n_units).index_add_(0, owner, per_q) / torch.bincount(owner, minlength=n_units)
            scores.update({Unit("head", layer, u): float(v) for u, v in enumerate(per_unit.tolist())})
        scores[Unit(sub, layer)] = float(per_unit.mean())
    return scores


class FlapMethod(Method):
    name = "flap"
    needs_gradients = False
    retraining_free = True
    compensate = "bias"
    metric = "fluctuation"

    def __init__(self, selection: str = "norm", standardize: bool = True, **options):
        super().__init__(selection, **options)
        self.standardize = standardize

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        check_batches(calib_batches, self.name, labels=False)
        scores = unit_scores(adapter, channel_scores(model, adapter, calib_batches, self.metric), self.standardize)
        return self._select(scores, adapter, target=target, measure=measure, seq_len=seq_len, kinds=kinds)


class WandaSPMethod(FlapMethod):
    name = "wanda-sp"
    metric = "wanda"
