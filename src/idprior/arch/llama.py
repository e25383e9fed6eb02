"""Llama-style pre-LN decoders with RMSNorm, a gated MLP and grouped-query attention:
Llama (and SmolLM2), Qwen2 (q/k/v biases), Mistral.

Layer l:  h = x + o_proj·GQA(q_proj, k_proj, v_proj)(input_layernorm(x)),
          y = h + down_proj·(act(gate_proj·n) * up_proj·n),  n = post_attention_layernorm(h).
Query head q reads KV head q // group (group = n_heads / n_kv_heads, repeat_kv layout), so a KV
group is the KV head g with query heads g*group .. g*group+group-1. Neuron j is the
(gate_proj row j, up_proj row j, down_proj column j) triple. A removed branch is skipped.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IdpriorError
from ..units import Cost
from .base import (
    PRE_LN_DECODER_RECIPE,
    Adapter,
    LayerShape,
    SkippedAttention,
    SkippedFFN,
    head_index,
    slice_linear,
)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bias(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else 1


class LlamaAdapter(Adapter):
    model_types = ("llama", "qwen2", "mistral")
    norm_position = "pre"
    recipe = PRE_LN_DECODER_RECIPE

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        super().__init__(model, per_query_head)
        layers = getattr(model.base_model, "layers", None)
        if layers is None:
            raise IdpriorError(f"{type(model).__name__} has no decoder layer list `layers`; pass a llama-style model")
        self._layers = layers

    # ---- structure ------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self._layers)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def _attn(self, layer: int) -> nn.Module | None:
        attn = self._layers[layer].self_attn
        return None if isinstance(attn, SkippedAttention) else attn

    def _mlp(self, layer: int) -> nn.Module | None:
        mlp = self._layers[layer].mlp
        return None if isinstance(mlp, SkippedFFN) else mlp

    def shape(self, layer: int) -> LayerShape:
        attn, mlp = self._attn(layer), self._mlp(layer)
        if attn is None:
            heads = kv_heads = 0
        else:
            heads = attn.q_proj.out_features // self.head_dim
            kv_heads = attn.k_proj.out_features // self.head_dim
        return LayerShape(heads, kv_heads, 0 if mlp is None else mlp.down_proj.in_features)

    def _slot_mode(self, shape: LayerShape) -> bool:
        """True when a head unit is a query slot shared by all groups (per_query_head with real GQA)."""
        return self.per_query_head and shape.n_heads != shape.n_kv_heads

    # ---- branch modules -------------------------------------------------------------------------
    def attn_out_proj(self, layer: int) -> nn.Module | None:
        attn = self._attn(layer)
        return None if attn is None else attn.o_proj

    def ffn_out_proj(self, layer: int) -> nn.Module | None:
        mlp = self._mlp(layer)
        return None if mlp is None else mlp.down_proj

    def ffn_residual(self, layer: int) -> nn.Module:
        return self._layers[layer].post_attention_layernorm

    def stream_norms(self) -> list[nn.Module]:
        pre = [n for block in self._layers for n in (block.input_layernorm, block.post_attention_layernorm)]
        return pre + [self.model.base_model.norm]

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight

    def sn_targets(self, layer: int) -> list[tuple[nn.Module, str]]:
        targets = []
        if (attn := self._attn(layer)) is not None:
            targets += [(m, "linear") for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)]
        if (mlp := self._mlp(layer)) is not None:
            targets += [(m, "linear") for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        return targets

    # ---- costs ----------------------------------------------------------------------------------
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
            # one query head = q rows (+ bias) and o columns; one KV head = k and v rows (+ biases)
            q_head = Cost(params=hd * (2 * d + _bias(attn.q_proj)), linear=2 * d * hd, q_heads=1, head_dim=hd)
            kv_head = Cost(params=hd * (2 * d + _bias(attn.k_proj) + _bias(attn.v_proj)), linear=2 * d * hd)
            if kind == "head":
                return q_head.scale(q_per_unit) + kv_head.scale(kv_per_unit)
            # owned by no unit: o bias, the pre-attention norm, and in slot mode every KV head
            rest = Cost(params=(0 if attn.o_proj.bias is None else d) + _numel(block.input_layernorm))
            return rest + kv_head.scale(s.n_kv_heads - kv_per_unit * s.n_kv_heads)
        if kind in ("neuron", "ffn"):
            mlp = self._mlp(layer)
            if mlp is None:
                return Cost()
            if kind == "ffn":  # down_proj bias + the pre-FFN norm
                down_bias = 0 if mlp.down_proj.bias is None else d
                return Cost(params=down_bias + _numel(block.post_attention_layernorm))
            in_bias = _bias(mlp.gate_proj) + _bias(mlp.up_proj)
            return Cost(params=3 * d + in_bias, linear=3 * d)
        raise ValueError(f"unknown unit kind {kind!r}")

    # ---- surgery --------------------------------------------------------------------------------
    def _slice_attention(self, layer: int, q_keep: list[int], kv_keep: list[int]) -> None:
        """Keep query heads `q_keep` and KV heads `kv_keep`; q_keep must list, in order, the same
        number of query heads for each kept KV head (the repeat_kv layout)."""
        attn = self._attn(layer)
        q_rows = head_index(q_keep, self.head_dim)
        kv_rows = head_index(kv_keep, self.head_dim)
        slice_linear(attn.q_proj, q_rows, dim=0)
        slice_linear(attn.k_proj, kv_rows, dim=0)
        slice_linear(attn.v_proj, kv_rows, dim=0)
        slice_linear(attn.o_proj, q_rows, dim=1)
        attn.num_key_value_groups = len(q_keep) // len(kv_keep)

    def prune_heads(self, layer: int, keep: list[int]) -> None:
        s = self.shape(layer)
        owner = self.head_unit_of_query_heads(layer).tolist()  # [n_heads] unit of each query head
        kept = set(keep)
        q_keep = [q for q in range(s.n_heads) if owner[q] in kept]
        kv_keep = list(range(s.n_kv_heads)) if self._slot_mode(s) else list(keep)
        self._slice_attention(layer, q_keep, kv_keep)

    def prune_neurons(self, layer: int, keep: list[int]) -> None:
        mlp = self._mlp(layer)
        index = torch.tensor(keep, dtype=torch.long)
        slice_linear(mlp.gate_proj, index, dim=0)
        slice_linear(mlp.up_proj, index, dim=0)
        slice_linear(mlp.down_proj, index, dim=1)

    def remove_attn(self, layer: int) -> None:
        block = self._layers[layer]
        if self._attn(layer) is not None:
            block.self_attn = SkippedAttention(block.self_attn.layer_idx)
            block.input_layernorm = nn.Identity()

    def remove_ffn(self, layer: int) -> None:
        block = self._layers[layer]
        if self._mlp(layer) is not None:
            block.mlp = SkippedFFN()
            block.post_attention_layernorm = nn.Identity()

    def reshape_to(self, shapes: list[LayerShape]) -> None:
        self.check_target_shapes(shapes)
        for layer, target in enumerate(shapes):
            current = self.shape(layer)
            if not target.has_attn:
                self.remove_attn(layer)
            elif (target.n_heads, target.n_kv_heads) != (current.n_heads, current.n_kv_heads):
                # keep the first n_kv KV heads and the first (n_heads / n_kv) query heads of each
                group, new_group = current.n_heads // current.n_kv_heads, target.n_heads // target.n_kv_heads
                if new_group > group:
                    raise IdpriorError(
                        f"config.idprior_layers[{layer}] asks for {new_group} query heads per KV head but the "
                        f"model has {group}; re-save the pruned model with idprior.save_pruned"
                    )
                q_keep = [g * group + j for g in range(target.n_kv_heads) for j in range(new_group)]
                self._slice_attention(layer, q_keep, list(range(target.n_kv_heads)))
            if not target.has_ffn:
                self.remove_ffn(layer)
            elif target.ffn_dim != current.ffn_dim:
                self.prune_neurons(layer, list(range(target.ffn_dim)))
