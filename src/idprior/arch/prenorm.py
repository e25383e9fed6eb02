"""What the pre-LN decoder families (GPT-2, Llama-style) share: one `PreLNDecoderAdapter`.

Block l:  h = x + attn(norm_a(x)),  y = h + ffn(norm_f(h)),  and a final norm after the last block.
A family names its modules in class attributes (the block list, the branches, their norms and
projections) and keeps only what differs: how many heads a layer has, how heads are sliced (fused
QKV, grouped-query attention) and which q/k/v biases exist. A removed branch is skipped: the branch
becomes a stub that returns 0 and its pre-norm becomes nn.Identity, so the block gives x + 0 = x.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import nn

from ..errors import IdpriorError
from ..method.units import Cost
from .base import PRE_LN_DECODER_RECIPE, Adapter, LayerShape, slice_conv1d, slice_linear


def cache_from_kwargs(kwargs: dict):
    """The KV cache passed to an attention module (`cache` in transformers >= 5.x, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


class SkippedAttention(nn.Module):
    """A removed pre-LN attention branch: f(x) = 0, so the layer's residual gives x + 0 = x.

    It still appends a [B, 1, T, 1] zero key/value to the KV cache: transformers reads the past
    length from a cache layer (layer 0 for positions and masks) and a layer that never updates
    would report 0 during generation. The stub costs B*T numbers per layer and is never attended.
    """

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = cache_from_kwargs(kwargs)
        if cache is not None and hasattr(cache, "update"):
            batch, seq = hidden_states.shape[:2]
            stub = hidden_states.new_zeros(batch, 1, seq, 1)  # [B, heads=1, T, head_dim=1]
            cache.update(stub, stub, self.layer_idx)
        # A 0-dim zero broadcasts in `residual + out` and leaves the residual exactly unchanged.
        return hidden_states.new_zeros(()), None


class SkippedFFN(nn.Module):
    """A removed pre-LN feed-forward branch: f(x) = 0 (a 0-dim zero that broadcasts)."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states.new_zeros(())


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _has_bias(module: nn.Module) -> int:
    return 0 if module.bias is None else 1


class PreLNDecoderAdapter(Adapter):
    """Base of the pre-LN decoder adapters; a subclass sets the names below and implements `shape`,
    `prune_heads` and `qkv_biases`."""

    norm_position = "pre"
    recipe = PRE_LN_DECODER_RECIPE
    family: ClassVar[str]  # named in the error for a model without the block list
    layers_attr: ClassVar[str]  # the block list on `model.base_model`
    final_norm_attr: ClassVar[str]  # the norm after the last block, on `model.base_model`
    attn_attr: ClassVar[str]  # a block's attention branch ...
    attn_norm_attr: ClassVar[str]  # ... and the pre-norm it reads
    mlp_attr: ClassVar[str] = "mlp"  # a block's FFN branch ...
    ffn_norm_attr: ClassVar[str]  # ... and its pre-norm
    attn_in_attrs: ClassVar[tuple[str, ...]]  # the attention's input projections (one fused QKV, or q, k, v)
    attn_out_attr: ClassVar[str]  # its output projection
    ffn_in_attrs: ClassVar[tuple[str, ...]]  # the FFN's input projections (a neuron is one row of each)
    ffn_out_attr: ClassVar[str]  # its output projection (a neuron is one column)

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        super().__init__(model, per_query_head)
        layers = getattr(model.base_model, self.layers_attr, None)
        if layers is None:
            raise IdpriorError(
                f"{type(model).__name__} has no {self.family} layer list `{self.layers_attr}`; pass a {self.family} model"
            )
        self._layers = layers

    # ---- structure ------------------------------------------------------------------------------
    def _attn(self, layer: int) -> nn.Module | None:
        attn = getattr(self._layers[layer], self.attn_attr)
        return None if isinstance(attn, SkippedAttention) else attn

    def _mlp(self, layer: int) -> nn.Module | None:
        mlp = getattr(self._layers[layer], self.mlp_attr)
        return None if isinstance(mlp, SkippedFFN) else mlp

    def _slot_mode(self, shape: LayerShape) -> bool:
        """True when a head unit is a query slot shared by all groups (per_query_head with real GQA)."""
        return self.per_query_head and shape.n_heads != shape.n_kv_heads

    # ---- branch modules -------------------------------------------------------------------------
    def attn_out_proj(self, layer: int) -> nn.Module | None:
        attn = self._attn(layer)
        return None if attn is None else getattr(attn, self.attn_out_attr)

    def ffn_out_proj(self, layer: int) -> nn.Module | None:
        mlp = self._mlp(layer)
        return None if mlp is None else getattr(mlp, self.ffn_out_attr)

    def ffn_residual(self, layer: int) -> nn.Module:
        return getattr(self._layers[layer], self.ffn_norm_attr)

    def stream_norms(self) -> list[nn.Module]:
        pre = [getattr(block, name) for block in self._layers for name in (self.attn_norm_attr, self.ffn_norm_attr)]
        return pre + [getattr(self.model.base_model, self.final_norm_attr)]

    def sn_targets(self, layer: int) -> list[tuple[nn.Module, str]]:
        targets = []
        if (attn := self._attn(layer)) is not None:
            targets += [(getattr(attn, name), self.weight_kind) for name in (*self.attn_in_attrs, self.attn_out_attr)]
        if (mlp := self._mlp(layer)) is not None:
            targets += [(getattr(mlp, name), self.weight_kind) for name in (*self.ffn_in_attrs, self.ffn_out_attr)]
        return targets

    # ---- costs ----------------------------------------------------------------------------------
    @abstractmethod
    def qkv_biases(self, attn: nn.Module) -> tuple[int, int, int]:
        """1 where the query / key / value projection has a bias, else 0."""

    def unit_cost(self, kind: str, layer: int) -> Cost:
        d, hd = self.hidden_size, self.head_dim
        block = self._layers[layer]
        if kind in ("head", "attn"):
            attn = self._attn(layer)
            if attn is None:
                return Cost()
            s = self.shape(layer)
            q_per_unit = s.n_kv_heads if self._slot_mode(s) else s.n_heads // s.n_kv_heads
            kv_per_unit = 0 if self._slot_mode(s) else 1
            # one query head = q rows (+ bias) and out-projection columns; one KV head = k and v rows (+ biases)
            q_bias, k_bias, v_bias = self.qkv_biases(attn)
            q_head = Cost(params=hd * (2 * d + q_bias), linear=2 * d * hd, q_heads=1, head_dim=hd)
            kv_head = Cost(params=hd * (2 * d + k_bias + v_bias), linear=2 * d * hd)
            if kind == "head":
                return q_head.scale(q_per_unit) + kv_head.scale(kv_per_unit)
            # owned by no unit: the out-projection's bias, the pre-attention norm, and in slot mode every KV head
            out = getattr(attn, self.attn_out_attr)
            rest = Cost(params=(0 if out.bias is None else d) + _numel(getattr(block, self.attn_norm_attr)))
            return rest + kv_head.scale(s.n_kv_heads - kv_per_unit * s.n_kv_heads)
        if kind in ("neuron", "ffn"):
            mlp = self._mlp(layer)
            if mlp is None:
                return Cost()
            if kind == "ffn":  # the out-projection's bias + the pre-FFN norm
                out = getattr(mlp, self.ffn_out_attr)
                return Cost(params=(0 if out.bias is None else d) + _numel(getattr(block, self.ffn_norm_attr)))
            matrices = len(self.ffn_in_attrs) + 1
            in_bias = sum(_has_bias(getattr(mlp, name)) for name in self.ffn_in_attrs)
            return Cost(params=matrices * d + in_bias, linear=matrices * d)
        raise ValueError(f"unknown unit kind {kind!r}")

    # ---- surgery --------------------------------------------------------------------------------
    def _slice(self, module: nn.Module, index: torch.Tensor, outputs: bool) -> None:
        """Keep output features (`outputs=True`) or input features `index` of a projection in place."""
        if self.weight_kind == "conv1d":
            slice_conv1d(module, index, dim=1 if outputs else 0)
        else:
            slice_linear(module, index, dim=0 if outputs else 1)

    def prune_neurons(self, layer: int, keep: list[int]) -> None:
        mlp = self._mlp(layer)
        index = torch.tensor(keep, dtype=torch.long)
        for name in self.ffn_in_attrs:
            self._slice(getattr(mlp, name), index, outputs=True)
        self._slice(getattr(mlp, self.ffn_out_attr), index, outputs=False)

    def remove_attn(self, layer: int) -> None:
        block = self._layers[layer]
        if self._attn(layer) is not None:
            setattr(block, self.attn_attr, SkippedAttention(getattr(block, self.attn_attr).layer_idx))
            setattr(block, self.attn_norm_attr, nn.Identity())

    def remove_ffn(self, layer: int) -> None:
        block = self._layers[layer]
        if self._mlp(layer) is not None:
            setattr(block, self.mlp_attr, SkippedFFN())
            setattr(block, self.ffn_norm_attr, nn.Identity())
