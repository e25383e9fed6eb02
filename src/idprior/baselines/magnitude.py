"""Weight-magnitude pruning: a unit's score is the Frobenius norm of the weights it owns.

Our reading of magnitude pruning for structured units (cf. Li et al. 2017, "Pruning Filters for
Efficient ConvNets", which ranks filters by weight norm):
  head    the Q rows and O columns of its query heads, plus the K and V rows of its key/value head
          when the unit owns one (multi-head attention, or a GQA key/value group; a per-query-head
          slot owns no K/V rows because they stay with the other slots);
  neuron  its row of every FFN input matrix (W1, or gate and up) and its column of W2;
  attn / ffn  the norm over all heads / neurons of the sub-layer.
Biases are left out. Weights come only through the adapter: `sn_targets` lists Q, K, V, O, FFN-in(s),
FFN-out in that order (GPT-2's fused c_attn is Q|K|V stacked), `attn_out_proj`/`ffn_out_proj` split
that list. No data is used.
"""

from __future__ import annotations

import torch

from ..arch.base import Adapter
from ..method.plan import PruningPlan
from ..method.units import Unit
from .base import Method


def _matrices(adapter: Adapter, layer: int):
    """[out, in] weights of the layer: (attention inputs, O, FFN inputs, FFN out); None when absent."""
    o_proj, down = adapter.attn_out_proj(layer), adapter.ffn_out_proj(layer)
    attn_in, ffn_in, seen_o = [], [], False
    for module, kind in adapter.sn_targets(layer):
        w = (module.weight if kind == "linear" else module.weight.t()).detach().float()
        if module is o_proj:
            seen_o = True
        elif module is down:
            continue
        elif o_proj is not None and not seen_o:
            attn_in.append(w)
        else:
            ffn_in.append(w)
    o = None if o_proj is None else adapter.out_weight(o_proj).detach().float()
    w2 = None if down is None else adapter.out_weight(down).detach().float()
    return attn_in, o, ffn_in, w2


@torch.no_grad()
def weight_energies(adapter: Adapter, layer: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Squared weight norms: ([head units], [neurons]) of one layer; None for a removed sub-layer."""
    attn_in, o, ffn_in, w2 = _matrices(adapter, layer)
    shape, hd = adapter.shape(layer), adapter.head_dim
    heads = neurons = None
    if o is not None:
        h, kv = shape.n_heads, shape.n_kv_heads
        rows = (torch.cat(attn_in, 0) ** 2).sum(1)  # [(h + 2*kv) * hd]
        if rows.numel() != (h + 2 * kv) * hd:
            raise RuntimeError(f"layer {layer}: Q/K/V rows {rows.numel()} != (heads + 2*kv_heads)*head_dim")
        q, k, v = rows.split([h * hd, kv * hd, kv * hd])
        per_q = q.view(h, hd).sum(1) + (o**2).sum(0).view(h, hd).sum(1)  # [h] Q rows + O columns
        owner = adapter.head_unit_of_query_heads(layer)  # [h] unit of each query head
        heads = torch.zeros(adapter.num_head_units(layer)).index_add_(0, owner, per_q)
        slot_mode = adapter.per_query_head and h != kv
        if not slot_mode:  # unit g owns KV head g (MHA: head g; GQA: group g)
            heads += k.view(kv, hd).sum(1) + v.view(kv, hd).sum(1)
    if w2 is not None:
        neurons = sum((w**2).sum(1) for w in ffn_in) + (w2**2).sum(0)  # [ffn]
    return heads, neurons


def magnitude_scores(adapter: Adapter) -> dict[Unit, float]:
    """Every present unit's weight norm (heads, neurons and their attn / ffn sub-layers): the scores
    the method ranks, public so that a script can reuse them (e.g. to round FFN widths)."""
    scores: dict[Unit, float] = {}
    for layer in range(adapter.num_layers):
        heads, neurons = weight_energies(adapter, layer)
        for kind, sub, energy in (("head", "attn", heads), ("neuron", "ffn", neurons)):
            if energy is None:
                continue
            scores.update({Unit(kind, layer, i): float(e) for i, e in enumerate(energy.sqrt().tolist())})
            scores[Unit(sub, layer)] = float(energy.sum().sqrt())
    return scores


class MagnitudeMethod(Method):
    name = "magnitude"
    needs_gradients = False
    retraining_free = False

    def plan(self, model, adapter, calib_batches, *, target, measure="encoder_params", seq_len=128,
             kinds=("head", "neuron"), seed=0) -> PruningPlan:
        return self._select(magnitude_scores(adapter), adapter, target=target, measure=measure, seq_len=seq_len,
                            kinds=kinds)
