"""Post-LN encoders laid out like BERT: BERT, RoBERTa, ELECTRA, XLM-RoBERTa, CamemBERT.

Layer l:  a = LN_a(x + O·MHA(x)),  y = LN_f(a + W2·act(W1·a)).
Modules:  layer.attention.self.{query,key,value}, layer.attention.output.{dense,LayerNorm},
          layer.intermediate.dense (W1), layer.output.{dense (W2), LayerNorm}.
Removing a branch keeps its LayerNorm (post-LN identity is LN(x)); the replacement modules keep the
LayerNorm under its original state-dict name so a pruned checkpoint keeps the familiar keys.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IdpriorError
from ..method.units import Cost
from .base import Adapter, LayerShape, head_index, slice_linear


class LayerNormOnlyOutput(nn.Module):
    """Stands in for a BertSelfOutput / BertOutput whose branch is gone: LN(residual + 0)."""

    def __init__(self, layer_norm: nn.Module):
        super().__init__()
        self.LayerNorm = layer_norm

    def forward(self, hidden_states, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(input_tensor)


class RemovedPostLNAttention(nn.Module):
    """Stands in for a removed BertAttention: returns (LN(x), None) like the original's (out, weights)."""

    def __init__(self, layer_norm: nn.Module):
        super().__init__()
        self.output = LayerNormOnlyOutput(layer_norm)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return self.output(None, hidden_states), None


class BertAdapter(Adapter):
    model_types = ("bert", "roberta", "electra", "xlm-roberta", "camembert")
    norm_position = "post"
    # tuned on validation on MiniLM-L6 (docs/history.md, "Encoders: the unpaired grid and the first defaults")
    default_selection = ("share", 0.3)

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        super().__init__(model, per_query_head)
        encoder = getattr(model.base_model, "encoder", None)
        if encoder is None or not hasattr(encoder, "layer"):
            raise IdpriorError(
                f"{type(model).__name__} has no BERT-style encoder.layer list; pass a bert/roberta/electra model"
            )
        self._layers = encoder.layer
        if any(getattr(layer, "add_cross_attention", False) for layer in self._layers):
            raise IdpriorError("BERT layers with cross-attention are not supported; use an encoder-only model")

    # ---- structure ------------------------------------------------------------------------------
    def _self_attn(self, layer: int) -> nn.Module | None:
        attn = self._layers[layer].attention
        return None if isinstance(attn, RemovedPostLNAttention) else attn.self

    def _ffn_in(self, layer: int) -> nn.Linear | None:
        intermediate = self._layers[layer].intermediate
        return None if isinstance(intermediate, nn.Identity) else intermediate.dense

    def shape(self, layer: int) -> LayerShape:
        attn = self._self_attn(layer)
        heads = 0 if attn is None else attn.query.out_features // self.head_dim
        ffn_in = self._ffn_in(layer)
        return LayerShape(heads, heads, 0 if ffn_in is None else ffn_in.out_features)

    # ---- branch modules -------------------------------------------------------------------------
    # sequence-level heads of these families read position 0 ([CLS] / <s>) of the last layer
    _READS_FIRST = ("ForSequenceClassification", "ForMultipleChoice")

    def readout_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        if not type(self.model).__name__.endswith(self._READS_FIRST):
            return None
        mask = torch.zeros_like(attention_mask, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    def branch_out_norm(self, layer: int, sub: str) -> nn.Module | None:
        block = self._layers[layer]
        return block.attention.output.LayerNorm if sub == "attn" else block.output.LayerNorm

    def attn_out_proj(self, layer: int) -> nn.Module | None:
        attn = self._layers[layer].attention
        return None if isinstance(attn, RemovedPostLNAttention) else attn.output.dense

    def ffn_out_proj(self, layer: int) -> nn.Module | None:
        out = self._layers[layer].output
        return None if isinstance(out, LayerNormOnlyOutput) else out.dense

    def ffn_residual(self, layer: int) -> nn.Module:
        return self._layers[layer].intermediate  # called with the attention block's output, LN_a(x + attn(x))

    def sn_targets(self, layer: int) -> list[tuple[nn.Module, str]]:
        targets = []
        attn = self._self_attn(layer)
        if attn is not None:
            targets += [(attn.query, "linear"), (attn.key, "linear"), (attn.value, "linear")]
            targets.append((self.attn_out_proj(layer), "linear"))
        if self._ffn_in(layer) is not None:
            targets += [(self._ffn_in(layer), "linear"), (self.ffn_out_proj(layer), "linear")]
        return targets

    # ---- costs ----------------------------------------------------------------------------------
    def unit_cost(self, kind: str, layer: int) -> Cost:
        d, hd = self.hidden_size, self.head_dim
        if kind in ("head", "attn"):
            attn = self._self_attn(layer)
            if attn is None:
                return Cost()
            out = self.attn_out_proj(layer)
            if kind == "attn":  # the O bias; the LayerNorm stays
                return Cost(params=0 if out.bias is None else out.bias.numel())
            qkv_bias = sum(hd for lin in (attn.query, attn.key, attn.value) if lin.bias is not None)
            return Cost(params=4 * d * hd + qkv_bias, linear=4 * d * hd, q_heads=1, head_dim=hd)
        if kind in ("neuron", "ffn"):
            ffn_in = self._ffn_in(layer)
            if ffn_in is None:
                return Cost()
            out = self.ffn_out_proj(layer)
            if kind == "ffn":
                return Cost(params=0 if out.bias is None else out.bias.numel())
            in_bias = 0 if ffn_in.bias is None else 1
            return Cost(params=2 * d + in_bias, linear=2 * d)
        raise ValueError(f"unknown unit kind {kind!r}")

    # ---- surgery --------------------------------------------------------------------------------
    def prune_heads(self, layer: int, keep: list[int]) -> None:
        attn = self._self_attn(layer)
        rows = head_index(keep, self.head_dim)
        for lin in (attn.query, attn.key, attn.value):
            slice_linear(lin, rows, dim=0)
        slice_linear(self.attn_out_proj(layer), rows, dim=1)
        attn.num_attention_heads = len(keep)
        attn.all_head_size = len(keep) * self.head_dim

    def prune_neurons(self, layer: int, keep: list[int]) -> None:
        index = torch.tensor(keep, dtype=torch.long)
        slice_linear(self._ffn_in(layer), index, dim=0)
        slice_linear(self.ffn_out_proj(layer), index, dim=1)

    def remove_attn(self, layer: int) -> None:
        block = self._layers[layer]
        if not isinstance(block.attention, RemovedPostLNAttention):
            block.attention = RemovedPostLNAttention(block.attention.output.LayerNorm)

    def remove_ffn(self, layer: int) -> None:
        block = self._layers[layer]
        if not isinstance(block.output, LayerNormOnlyOutput):
            block.intermediate = nn.Identity()
            block.output = LayerNormOnlyOutput(block.output.LayerNorm)
