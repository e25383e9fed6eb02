"""Whole-layer dropping: ShortGPT's block influence and Sajjad et al.'s top-layer drop.

shortgpt    Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
            Expect": block influence BI_l = 1 - mean over real tokens of cos(x_in, x_out) of block l
            (forward hooks on `adapter.layers()`, eval mode, calibration batches); the lowest-BI
            blocks are dropped first. A block that barely rotates its input is close to the identity.
top-layers  Sajjad et al. 2020/2023, "On the Effect of Dropping Layers of Pre-trained Transformer
            Models": drop the top layers, highest index first (their best-performing strategy).
Dropping a layer removes both its `attn` and `ffn` units (identity mapping, as for every removal).
Layers are dropped whole until the target fraction of the measure is removed, so the overshoot is
at most one layer; `kinds` and `min_keep` are ignored (a layer drop empties whole layers). A layer whose
removal would leave the model without any attention or any FFN sub-layer is skipped (the plan says
so in `warnings`), and so is a layer in `protect`.
"""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from ..errors import IdpriorError
from ..method.plan import (
    PruningPlan,
    measure_of,
    measure_total,
    measures,
    normalize,
    structure_after,
    sublayer_cost,
)
from ..method.units import Unit
from .base import Method, check_batches, to_device


@torch.no_grad()
def block_influence(model, adapter: Adapter, batches: list[dict]) -> list[float]:
    """BI_l = 1 - mean over real tokens of cos(input, output) of every block, in eval mode."""
    n = adapter.num_layers
    cos_sum, tokens = [0.0] * n, [0.0] * n
    mask: list[torch.Tensor | None] = [None]

    def hook(layer: int):
        def fn(module, args, kwargs, output):
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, T]
            m = mask[0] if mask[0] is not None and mask[0].shape == cos.shape else torch.ones_like(cos)
            cos_sum[layer] += float((cos * m).sum())
            tokens[layer] += float(m.sum())
        return fn

    was_training = model.training
    model.eval()
    handles = [block.register_forward_hook(hook(i), with_kwargs=True) for i, block in enumerate(adapter.layers())]
    try:
        for batch in batches:
            batch = to_device(batch, model)
            mask[0] = batch["attention_mask"].float() if "attention_mask" in batch else None
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [1.0 - c / max(t, 1.0) for c, t in zip(cos_sum, tokens)]


def drop_layers(adapter: Adapter, order: list[int], keys: list[float], *, target: float, measure: str,
                seq_len: int, method: str, protect=frozenset()) -> PruningPlan:
    """Drop whole layers in `order` until `target` of `measure` is removed; `keys[l]` is recorded as tau."""
    if not 0 <= target < 1:
        raise IdpriorError(f"target must be in [0, 1), got {target}; it is the fraction of {measure} to remove")
    total = measure_total(adapter, measure, seq_len)
    shapes = adapter.shapes()
    attn_left = sum(s.has_attn for s in shapes)
    ffn_left = sum(s.has_ffn for s in shapes)
    removed: list[Unit] = []
    amount, tau, warnings = 0.0, None, []
    for layer in order:
        if amount >= target * total:
            break
        s = shapes[layer]
        if not (s.has_attn or s.has_ffn) or layer in protect:
            continue
        if (s.has_attn and attn_left == 1) or (s.has_ffn and ffn_left == 1):
            warnings.append(f"kept layer {layer}: dropping it would remove the model's last attention or FFN sub-layer")
            continue
        for kind, present in (("attn", s.has_attn), ("ffn", s.has_ffn)):
            if present:
                removed.append(Unit(kind, layer))
                amount += measure_of(sublayer_cost(adapter, kind, layer), measure, seq_len)
        attn_left -= s.has_attn
        ffn_left -= s.has_ffn
        tau = keys[layer]
    if amount < target * total:
        raise IdpriorError(
            f"target {target:.0%} of {measure} is out of reach by dropping whole layers "
            f"(at most {amount / total:.1%} without removing every layer); lower --target"
        )
    units = normalize(adapter, removed)
    total_params = sum(p.numel() for p in adapter.model.parameters())
    return PruningPlan(
        units=units, method=method, selection="layers", target=target, measure=measure, tau=tau,
        measures=measures(adapter, units, seq_len, total_params), structure=structure_after(adapter, units),
        warnings=warnings,
    )


class ShortGPTMethod(Method):
    name = "shortgpt"
    needs_gradients = False
    retraining_free = True

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        check_batches(calib_batches, self.name, labels=False)
        bi = block_influence(model, adapter, calib_batches)
        order = sorted(range(adapter.num_layers), key=lambda layer: (bi[layer], layer))
        return drop_layers(adapter, order, bi, target=target, measure=measure, seq_len=seq_len, method=self.name,
                           protect=self.protect)


class TopLayersMethod(Method):
    name = "top-layers"
    needs_gradients = False
    retraining_free = False

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        order = list(reversed(range(adapter.num_layers)))
        return drop_layers(adapter, order, [float(i) for i in range(adapter.num_layers)], target=target,
                           measure=measure, seq_len=seq_len, method=self.name, protect=self.protect)
