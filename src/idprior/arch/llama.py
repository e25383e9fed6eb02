"""Llama-style pre-LN decoders with RMSNorm, a gated MLP and grouped-query attention:
Llama (and SmolLM2), Qwen2 (q/k/v biases), Mistral.

Layer l:  h = x + o_proj·GQA(q_proj, k_proj, v_proj)(input_layernorm(x)),
          y = h + down_proj·(act(gate_proj·n) * up_proj·n),  n = post_attention_layernorm(h).
Query head q reads KV head q // group (group = n_heads / n_kv_heads, repeat_kv layout), so a KV
group is the KV head g with query heads g*group .. g*group+group-1. Neuron j is the
(gate_proj row j, up_proj row j, down_proj column j) triple. A removed branch is skipped (see prenorm.py).
"""

from __future__ import annotations

from torch import nn

from ..errors import IdpriorError
from .base import LayerShape, head_index, slice_linear
from .prenorm import PreLNDecoderAdapter


class LlamaAdapter(PreLNDecoderAdapter):
    model_types = ("llama", "qwen2", "mistral")
    family = "llama-style"
    layers_attr, final_norm_attr = "layers", "norm"
    attn_attr, attn_norm_attr, ffn_norm_attr = "self_attn", "input_layernorm", "post_attention_layernorm"
    attn_in_attrs, attn_out_attr = ("q_proj", "k_proj", "v_proj"), "o_proj"
    ffn_in_attrs, ffn_out_attr = ("gate_proj", "up_proj"), "down_proj"

    @property
    def head_dim(self) -> int:
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    def shape(self, layer: int) -> LayerShape:
        attn, mlp = self._attn(layer), self._mlp(layer)
        if attn is None:
            heads = kv_heads = 0
        else:
            heads = attn.q_proj.out_features // self.head_dim
            kv_heads = attn.k_proj.out_features // self.head_dim
        return LayerShape(heads, kv_heads, 0 if mlp is None else mlp.down_proj.in_features)

    def qkv_biases(self, attn: nn.Module) -> tuple[int, int, int]:
        q, k, v = (0 if proj.bias is None else 1 for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        return q, k, v

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

    def _reshape_heads(self, layer: int, target: LayerShape, current: LayerShape) -> None:
        """Keep the first n_kv KV heads and the first (n_heads / n_kv) query heads of each."""
        if (target.n_heads, target.n_kv_heads) == (current.n_heads, current.n_kv_heads):
            return
        group, new_group = current.n_heads // current.n_kv_heads, target.n_heads // target.n_kv_heads
        if new_group > group:
            raise IdpriorError(
                f"config.idprior_layers[{layer}] asks for {new_group} query heads per KV head but the "
                f"model has {group}; re-save the pruned model with idprior.save_pruned"
            )
        q_keep = [g * group + j for g in range(target.n_kv_heads) for j in range(new_group)]
        self._slice_attention(layer, q_keep, list(range(target.n_kv_heads)))
