"""Per-example gradients of the loss with respect to every unit gate (shared by michel and fisher).

With gates g at 1, ∂L/∂g_u = Σ_tokens ⟨∂L/∂y, x_u⟩, where x_u is the part of the gated tensor that
g_u multiplies (a head's context slice, a neuron's activation, a whole branch output). A gate
observer registers a tensor hook on each gated tensor and reduces `grad * x` over tokens only, not
over the batch, which gives every example's gradient from one backward pass per batch. The task
loss is a batch mean, so an example's gradient is B times its slice (exact for sequence
classification and regression; for a token-mean LM loss it is the example's share of the batch loss
scaled by B). Only the gates are differentiated (`torch.autograd.grad`), so the model's `.grad`
fields are left alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..arch.base import Adapter
from ..method.gates import Gates
from ..method.units import Unit
from .base import present_units, to_device


class _PerExample:
    """Gate observer: calls `sink(kind, layer, per_example [B, n_units])` during backward."""

    def __init__(self, adapter: Adapter, sink: Callable[[str, int, torch.Tensor], None]):
        self.adapter, self.sink = adapter, sink
        self._owner: dict[int, torch.Tensor] = {}

    def __call__(self, layer: int, site: str, x: torch.Tensor, module: nn.Module) -> None:
        if not x.requires_grad:
            return
        saved = x.detach()
        kind = {"heads": "head", "neurons": "neuron"}.get(site, site)

        def hook(grad: torch.Tensor) -> None:
            batch = grad.shape[0]
            prod = (grad.float() * saved.float()).sum(1)  # [B, W] summed over tokens
            if site == "heads":
                hd = self.adapter.head_dim
                per_q = prod.view(batch, -1, hd).sum(-1)  # [B, n_heads]
                owner = self._owner.setdefault(layer, self.adapter.head_unit_of_query_heads(layer).to(grad.device))
                per_unit = per_q.new_zeros(batch, int(owner.max()) + 1).index_add_(1, owner, per_q)
            elif site in ("attn", "ffn"):
                per_unit = prod.sum(-1, keepdim=True)  # [B, 1]
            else:
                per_unit = prod  # [B, ffn]
            self.sink(kind, layer, per_unit.double() * batch)

        x.register_hook(hook)


def gate_gradient_stats(model: nn.Module, adapter: Adapter, batches: list[dict]) -> dict[str, dict[Unit, float]]:
    """Σ over examples of |∂L_i/∂g_u| ("abs") and of (∂L_i/∂g_u)^2 ("sq"), for every unit, in eval mode."""
    sums: dict[str, dict[tuple[str, int], torch.Tensor]] = {"abs": {}, "sq": {}}

    def sink(kind: str, layer: int, g: torch.Tensor) -> None:
        for stat, value in (("abs", g.abs().sum(0)), ("sq", (g**2).sum(0))):
            store = sums[stat]
            store[(kind, layer)] = store[(kind, layer)] + value if (kind, layer) in store else value

    was_training = model.training
    model.eval()
    try:
        with Gates(model, adapter) as gates:
            gates.requires_grad_(True)
            gates.observers.append(_PerExample(adapter, sink))
            for batch in batches:
                loss = model(**to_device(batch, model)).loss
                torch.autograd.grad(loss, gates.tensors(), allow_unused=True)
    finally:
        model.train(was_training)
    zeros = dict.fromkeys(present_units(adapter, ("head", "neuron", "attn", "ffn")), 0.0)
    out: dict[str, dict[Unit, float]] = {"abs": dict(zeros), "sq": dict(zeros)}
    for stat, store in sums.items():
        for (kind, layer), value in sorted(store.items()):
            if kind in ("attn", "ffn"):
                out[stat][Unit(kind, layer)] = float(value[0])
            else:
                out[stat].update({Unit(kind, layer, i): float(v) for i, v in enumerate(value.tolist())})
    return out
