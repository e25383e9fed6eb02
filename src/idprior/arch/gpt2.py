"""GPT-2: pre-LN decoder with fused QKV in transformers' Conv1D (weight [in, out], y = x·W + b).

Block l:  h = x + c_proj·MHA(c_attn·ln_1(x)),  y = h + mlp.c_proj·act(mlp.c_fc·ln_2(h)).
c_attn's output is [q | k | v], each n_heads*head_dim wide; GPT2Attention splits it with
`split_size` and reshapes with `head_dim`, so slicing updates `split_size` and `num_heads`.
A removed branch is skipped (its pre-LN becomes nn.Identity, the branch returns 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import IdpriorError
from ..units import Cost
from .base import PRE_LN_DECODER_RECIPE, Adapter, LayerShape, SkippedAttention, SkippedFFN, head_index


@torch.no_grad()
def slice_conv1d(conv: nn.Module, index: torch.Tensor, dim: int) -> None:
    """Keep output features (`dim=1`: weight columns and bias) or input features (`dim=0`: rows)
    `index` of a transformers Conv1D (weight [nx, nf]) in place, keeping dtype and device."""
    weight = conv.weight
    index = index.to(weight.device)
    conv.weight = nn.Parameter(weight.index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if dim == 1:
        bias = conv.bias
        conv.bias = nn.Parameter(bias.index_select(0, index).clone(), requires_grad=bias.requires_grad)
        conv.nf = len(index)
    else:
        conv.nx = len(index)


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    norm_position = "pre"
    recipe = PRE_LN_DECODER_RECIPE

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        super().__init__(model, per_query_head)
        blocks = getattr(model.base_model, "h", None)
        if blocks is None:
            raise IdpriorError(f"{type(model).__name__} has no GPT-2 block list `h`; pass a gpt2 model")
        if getattr(self.config, "add_cross_attention", False):
            raise IdpriorError("GPT-2 with cross-attention is not supported; use a decoder-only GPT-2")
        self._blocks = blocks

    # ---- structure ------------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        return list(self._blocks)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    def _attn(self, layer: int) -> nn.Module | None:
        attn = self._blocks[layer].attn
        return None if isinstance(attn, SkippedAttention) else attn

    def _mlp(self, layer: int) -> nn.Module | None:
        mlp = self._blocks[layer].mlp
        return None if isinstance(mlp, SkippedFFN) else mlp

    def shape(self, layer: int) -> LayerShape:
        attn, mlp = self._attn(layer), self._mlp(layer)
        heads = 0 if attn is None else attn.c_proj.nx // self.head_dim
        return LayerShape(heads, heads, 0 if mlp is None else mlp.c_fc.nf)

    # ---- branch modules -------------------------------------------------------------------------
    def attn_out_proj(self, layer: int) -> nn.Module | None:
        attn = self._attn(layer)
        return None if attn is None else attn.c_proj

    def ffn_out_proj(self, layer: int) -> nn.Module | None:
        mlp = self._mlp(layer)
        return None if mlp is None else mlp.c_proj

    def ffn_residual(self, layer: int) -> nn.Module:
        return self._blocks[layer].ln_2

    def stream_norms(self) -> list[nn.Module]:
        return [n for block in self._blocks for n in (block.ln_1, block.ln_2)] + [self.model.base_model.ln_f]

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        return module.weight.t()  # Conv1D stores [in, out]

    def sn_targets(self, layer: int) -> list[tuple[nn.Module, str]]:
        targets = []
        if (attn := self._attn(layer)) is not None:
            targets += [(attn.c_attn, "conv1d"), (attn.c_proj, "conv1d")]
        if (mlp := self._mlp(layer)) is not None:
            targets += [(mlp.c_fc, "conv1d"), (mlp.c_proj, "conv1d")]
        return targets

    # ---- costs ----------------------------------------------------------------------------------
    def unit_cost(self, kind: str, layer: int) -> Cost:
        d, hd = self.hidden_size, self.head_dim
        block = self._blocks[layer]
        if kind in ("head", "attn"):
            attn = self._attn(layer)
            if attn is None:
                return Cost()
            if kind == "attn":  # c_proj bias + ln_1
                ln = sum(p.numel() for p in block.ln_1.parameters())
                return Cost(params=attn.c_proj.bias.numel() + ln)
            # q, k, v columns of c_attn (+ their biases) and the head's rows of c_proj
            return Cost(params=4 * d * hd + 3 * hd, linear=4 * d * hd, q_heads=1, head_dim=hd)
        if kind in ("neuron", "ffn"):
            mlp = self._mlp(layer)
            if mlp is None:
                return Cost()
            if kind == "ffn":  # c_proj bias + ln_2
                ln = sum(p.numel() for p in block.ln_2.parameters())
                return Cost(params=mlp.c_proj.bias.numel() + ln)
            return Cost(params=2 * d + 1, linear=2 * d)
        raise ValueError(f"unknown unit kind {kind!r}")

    # ---- surgery --------------------------------------------------------------------------------
    def prune_heads(self, layer: int, keep: list[int]) -> None:
        attn = self._attn(layer)
        width = attn.split_size  # current n_heads * head_dim
        rows = head_index(keep, self.head_dim)
        qkv = torch.cat([rows + part * width for part in range(3)])  # q, k, v blocks of c_attn
        slice_conv1d(attn.c_attn, qkv, dim=1)
        slice_conv1d(attn.c_proj, rows, dim=0)
        attn.num_heads = len(keep)
        attn.split_size = len(keep) * self.head_dim

    def prune_neurons(self, layer: int, keep: list[int]) -> None:
        mlp = self._mlp(layer)
        index = torch.tensor(keep, dtype=torch.long)
        slice_conv1d(mlp.c_fc, index, dim=1)
        slice_conv1d(mlp.c_proj, index, dim=0)

    def remove_attn(self, layer: int) -> None:
        block = self._blocks[layer]
        if self._attn(layer) is not None:
            block.attn = SkippedAttention(block.attn.layer_idx)
            block.ln_1 = nn.Identity()

    def remove_ffn(self, layer: int) -> None:
        block = self._blocks[layer]
        if self._mlp(layer) is not None:
            block.mlp = SkippedFFN()
            block.ln_2 = nn.Identity()

    def reshape_to(self, shapes: list[LayerShape]) -> None:
        self.check_target_shapes(shapes)
        for layer, target in enumerate(shapes):
            current = self.shape(layer)
            if not target.has_attn:
                self.remove_attn(layer)
            elif target.n_heads != current.n_heads:
                self.prune_heads(layer, list(range(target.n_heads)))
            if not target.has_ffn:
                self.remove_ffn(layer)
            elif target.ffn_dim != current.ffn_dim:
                self.prune_neurons(layer, list(range(target.ffn_dim)))
