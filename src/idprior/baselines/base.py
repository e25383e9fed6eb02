"""What every baseline shares: the `Method` interface and small helpers.

A method turns a (fine-tuned) model and calibration batches into a `PruningPlan` under the same
target, measure and collapse/protection rules as SNIP, so that surgery, recovery and evaluation
are the same code for every method and only the choice of units differs (docs/method.md, "Pipeline").

`needs_gradients`: the method runs backward passes (calibration batches need `labels`).
`retraining_free`: the method, as published, prunes a fine-tuned model and is evaluated without
further training, so a run may compare it with recovery switched off.
`compensate`: what `prune.compensate: auto` means for the method ("none", "bias", "lsq";
compensate.py), e.g. FLAP's bias compensation is part of FLAP.
`head_share`: with selection "share", the fraction of the budget taken from heads, as for SNIP,
so a baseline's plan can have the same head/neuron split as the SNIP plan it is compared with.
"""

from __future__ import annotations

from torch import nn

from ..arch.base import Adapter
from ..errors import IdpriorError
from ..method.plan import PruningPlan
from ..method.selection import select
from ..method.units import Unit


class Method:
    """A pruning method; subclasses set the class attributes and implement `plan`."""

    name: str = ""
    needs_gradients: bool = False
    retraining_free: bool = False
    compensate: str = "none"

    def __init__(self, selection: str = "norm", min_keep: float = 0.0, protect=(), head_share: float | None = None):
        self.selection = selection  # how `select` compares units of different kinds
        self.head_share = head_share  # selection "share": fraction of the budget taken from heads
        self.min_keep = min_keep  # `select`'s per-layer minimum keep fraction (unit-ranking methods)
        self.protect = frozenset(protect)  # layer indices never pruned

    def plan(self, model: nn.Module, adapter: Adapter, calib_batches: list[dict], *, target: float,
             measure: str = "encoder_params", seq_len: int = 128, kinds=("head", "neuron"),
             seed: int = 0) -> PruningPlan:
        raise NotImplementedError

    def _select(self, scores: dict[Unit, float], adapter: Adapter, *, target: float, measure: str,
                seq_len: int, kinds) -> PruningPlan:
        return select(scores, adapter, target=target, measure=measure, seq_len=seq_len,
                      mode=self.selection, kinds=kinds, method=self.name, min_keep=self.min_keep, protect=self.protect,
                      head_share=self.head_share)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, selection={self.selection!r})"


def present_units(adapter: Adapter, kinds) -> list[Unit]:
    """Every unit of `kinds` that still exists in the model, sorted."""
    units = []
    for layer in range(adapter.num_layers):
        shape = adapter.shape(layer)
        if shape.has_attn:
            units += [Unit("head", layer, i) for i in range(adapter.num_head_units(layer))] if "head" in kinds else []
            units += [Unit("attn", layer)] if "attn" in kinds else []
        if shape.has_ffn:
            units += [Unit("neuron", layer, j) for j in range(shape.ffn_dim)] if "neuron" in kinds else []
            units += [Unit("ffn", layer)] if "ffn" in kinds else []
    return sorted(units, key=Unit.sort_key)


def check_batches(calib_batches: list[dict], method: str, labels: bool) -> None:
    """Raise IdpriorError for missing calibration data (or labels, for gradient methods)."""
    if not calib_batches:
        raise IdpriorError(f"method {method!r} needs calibration batches; pass a non-empty calibration set")
    if labels and any("labels" not in b for b in calib_batches):
        raise IdpriorError(f"method {method!r} needs `labels` in every calibration batch (it differentiates the task loss)")


def to_device(batch: dict, model: nn.Module) -> dict:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}
