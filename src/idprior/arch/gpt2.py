"""GPT-2: pre-LN decoder with fused QKV in transformers' Conv1D (weight [in, out], y = x·W + b).

Block l:  h = x + c_proj·MHA(c_attn·ln_1(x)),  y = h + mlp.c_proj·act(mlp.c_fc·ln_2(h)).
c_attn's output is [q | k | v], each n_heads*head_dim wide; GPT2Attention splits it with
`split_size` and reshapes with `head_dim`, so slicing updates `split_size` and `num_heads`.
A removed branch is skipped (see prenorm.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IdpriorError
from .base import LayerShape, head_index
from .prenorm import PreLNDecoderAdapter


class GPT2Adapter(PreLNDecoderAdapter):
    model_types = ("gpt2",)
    weight_kind = "conv1d"
    family = "gpt2"
    layers_attr, final_norm_attr = "h", "ln_f"
    attn_attr, attn_norm_attr, ffn_norm_attr = "attn", "ln_1", "ln_2"
    attn_in_attrs, attn_out_attr = ("c_attn",), "c_proj"
    ffn_in_attrs, ffn_out_attr = ("c_fc",), "c_proj"

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        super().__init__(model, per_query_head)
        if getattr(self.config, "add_cross_attention", False):
            raise IdpriorError("GPT-2 with cross-attention is not supported; use a decoder-only GPT-2")

    def shape(self, layer: int) -> LayerShape:
        attn, mlp = self._attn(layer), self._mlp(layer)
        heads = 0 if attn is None else attn.c_proj.nx // self.head_dim
        return LayerShape(heads, heads, 0 if mlp is None else mlp.c_fc.nf)

    def qkv_biases(self, attn: nn.Module) -> tuple[int, int, int]:
        return (1, 1, 1)  # Conv1D always has a bias

    def prune_heads(self, layer: int, keep: list[int]) -> None:
        attn = self._attn(layer)
        width = attn.split_size  # current n_heads * head_dim
        rows = head_index(keep, self.head_dim)
        qkv = torch.cat([rows + part * width for part in range(3)])  # q, k, v blocks of c_attn
        self._slice(attn.c_attn, qkv, outputs=True)
        self._slice(attn.c_proj, rows, outputs=False)
        attn.num_heads = len(keep)
        attn.split_size = len(keep) * self.head_dim
