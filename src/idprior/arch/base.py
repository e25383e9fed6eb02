"""The model-family adapter: the one place that knows where a family keeps its branches.

Everything else in idprior (gates, spectral normalization, scoring, the identity prior,
selection, surgery, saving) talks to a model only through an `Adapter`. An adapter answers:
  * where each layer's attention and feed-forward branches are, and the *output projection*
    of each (the module whose input holds the per-head contexts / the FFN activations and whose
    output is the branch f(x) added to the residual stream);
  * how big each layer is now (`LayerShape`) and what each unit costs (`Cost`);
  * which weight matrices get spectral normalization;
  * how to slice heads / neurons out, how to replace a whole sub-layer by the identity, and how
    to record the per-layer structure in `config` so that `load_pruned` can rebuild it.

Conventions shared by all adapters
  * Layer indices are 0-based positions in the model's layer list.
  * A *head unit* is one query head for multi-head attention, and one key/value group (its KV
    head plus the query heads that read it) for grouped-query attention, unless the adapter was
    built with `per_query_head=True`, in which case a head unit is a query-head *slot* index
    inside every group (removing slot s removes query head s of every group, so groups stay equal).
  * Removing a sub-layer means identity: post-LN layers keep `LN(x)` (branch output 0 incl. bias),
    pre-LN layers skip the branch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import IdpriorError
from ..method.units import Cost

STRUCTURE_KEY = "idprior_layers"  # config attribute holding the per-layer structure
OUT_BIAS_KEY = "idprior_out_bias"  # config attribute: out-projections given a bias by idprior ("attn:3", "ffn:0")


@dataclass
class LayerShape:
    """Current size of one layer. 0 heads means the attention sub-layer is gone; 0 ffn likewise."""

    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (== n_heads for multi-head attention)
    ffn_dim: int  # FFN neurons

    @property
    def has_attn(self) -> bool:
        return self.n_heads > 0

    @property
    def has_ffn(self) -> bool:
        return self.ffn_dim > 0

    def to_dict(self) -> dict:
        return asdict(self)


class Adapter(ABC):
    """Base class; one subclass per model family, registered by `config.model_type`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    norm_position: ClassVar[str] = "post"  # "post" (BERT: LN(x + f(x))) or "pre" (x + f(LN(x)))
    # What `--selection auto` means for this family: (selection mode, head_share or None).
    default_selection: ClassVar[tuple[str, float | None]] = ("norm", None)
    # SNIP's measured settings for this family, per mode ("finetune", "posttrain"), for the prune fields a user
    # leaves at None (`config.recipe_for`; the rest come from `config.RECIPE`).
    recipe: ClassVar[dict[str, dict]] = {}
    # How the family stores its projection weights: "linear" (nn.Linear, [out, in]) or "conv1d"
    # (transformers' Conv1D, [in, out]); the `kind` of `sn_targets`.
    weight_kind: ClassVar[str] = "linear"

    def __init__(self, model: nn.Module, per_query_head: bool = False):
        self.model = model
        self.config = model.config
        self.per_query_head = per_query_head
        self._layers: nn.ModuleList  # the transformer blocks; each family's __init__ finds them

    # ---- structure -------------------------------------------------------------------------
    def layers(self) -> list[nn.Module]:
        """The transformer blocks in order."""
        return list(self._layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers())

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def head_dim(self) -> int:
        return self.config.hidden_size // self.config.num_attention_heads

    @abstractmethod
    def shape(self, layer: int) -> LayerShape:
        """Current (possibly pruned) size of layer `layer`, read from the modules."""

    def shapes(self) -> list[LayerShape]:
        return [self.shape(i) for i in range(self.num_layers)]

    def num_head_units(self, layer: int) -> int:
        """Number of head units in the layer (see module docstring for GQA)."""
        s = self.shape(layer)
        if s.n_kv_heads == s.n_heads:
            return s.n_heads
        return s.n_heads // s.n_kv_heads if self.per_query_head else s.n_kv_heads

    def head_unit_of_query_heads(self, layer: int) -> torch.Tensor:
        """LongTensor [n_heads]: the head unit that owns each query head (for gating the O input)."""
        s = self.shape(layer)
        q = torch.arange(s.n_heads)
        if s.n_kv_heads == s.n_heads:
            return q
        group = s.n_heads // s.n_kv_heads
        return q % group if self.per_query_head else q // group

    def readout_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """[B, T] bool: the positions of the last layer's output that the model's head reads, or None
        when it reads them all (language modelling, token tagging). A last-layer branch reaches the
        output only through these positions, so its function norm is measured there
        (`prune.norm_positions: readout`)."""
        return None

    def stream_norms(self) -> list[nn.Module] | None:
        """Pre-LN models: every norm that reads the residual stream, in stream order (layer 0's attention
        pre-norm, its FFN pre-norm, layer 1's ..., the final norm); None in post-LN ones."""
        return None

    def branch_out_norm(self, layer: int, sub: str) -> nn.Module | None:
        """The norm through which the rest of the model first sees sub-layer `sub` ("attn" | "ffn") of
        `layer`: post-LN the LayerNorm it joins, LN(x + f(x)); pre-LN the next norm that reads the stream
        after the branch is added (the next sub-layer's pre-norm, or the final norm; a removed sub-layer's
        norm is skipped). Used by `prune.norm_after_ln`; None when there is none."""
        norms = self.stream_norms()
        if norms is None:
            return None
        start = 2 * layer + (1 if sub == "attn" else 2)  # the entry right after this branch's own pre-norm
        return next((ln for ln in norms[start:] if getattr(ln, "weight", None) is not None), None)

    # ---- branch modules ----------------------------------------------------------------------
    @abstractmethod
    def attn_out_proj(self, layer: int) -> nn.Module | None:
        """Output projection of the attention branch (input [B,T,n_heads*head_dim]); None if removed."""

    @abstractmethod
    def ffn_out_proj(self, layer: int) -> nn.Module | None:
        """Second FFN matrix (input [B,T,ffn_dim] activations); None if removed."""

    @abstractmethod
    def ffn_residual(self, layer: int) -> nn.Module:
        """A module whose input (first argument) is the residual stream the FFN branch writes into:
        pre-LN, the pre-FFN norm (its input x + attn(x)); post-LN, the FFN itself (its input LN(x + attn(x)))."""

    def out_weight(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as a [out_features, in_features] tensor (a view; Conv1D transposed)."""
        return module.weight.t() if self.weight_kind == "conv1d" else module.weight

    @abstractmethod
    def sn_targets(self, layer: int) -> list[tuple[nn.Module, str]]:
        """(module, kind) for every Q, K, V, O, FFN-in, FFN-out matrix of the layer that exists.

        kind is "linear" (weight [out, in]) or "conv1d" (weight [in, out]); spectral
        normalization registers a parametrization on `module.weight`.
        """

    # ---- costs -------------------------------------------------------------------------------
    @abstractmethod
    def unit_cost(self, kind: str, layer: int) -> Cost:
        """Cost of ONE unit of `kind` ("head" or "neuron") in `layer` at its current shape,
        or of the parts of a whole sub-layer ("attn"/"ffn") that no head/neuron owns (biases of the
        output projection, a pre-LN norm removed with the branch). So that
        cost(attn l) = num_head_units(l)*unit_cost("head", l) + unit_cost("attn", l), exactly.
        """

    def layer_params(self) -> int:
        """Parameters of all transformer layers (the "encoder parameters" measure)."""
        return sum(p.numel() for layer in self.layers() for p in layer.parameters())

    # ---- surgery -----------------------------------------------------------------------------
    @abstractmethod
    def prune_heads(self, layer: int, keep: list[int]) -> None:
        """Keep only head units `keep` (sorted unit indices); slices Q/K/V rows and O columns,
        keeps dtype/device, updates module attributes. Callers never pass an empty `keep`
        (they call remove_attn instead)."""

    @abstractmethod
    def prune_neurons(self, layer: int, keep: list[int]) -> None:
        """Keep only FFN neurons `keep` (non-empty, sorted)."""

    @abstractmethod
    def remove_attn(self, layer: int) -> None:
        """Replace the attention sub-layer by the identity mapping (no zero-width Linear)."""

    @abstractmethod
    def remove_ffn(self, layer: int) -> None:
        """Replace the feed-forward sub-layer by the identity mapping."""

    def out_proj(self, layer: int, sub: str) -> nn.Module | None:
        """`attn_out_proj` or `ffn_out_proj` by sub-layer name ("attn" / "ffn")."""
        if sub not in ("attn", "ffn"):
            raise ValueError(f"unknown sub-layer {sub!r}")
        return self.attn_out_proj(layer) if sub == "attn" else self.ffn_out_proj(layer)

    @torch.no_grad()
    def add_out_bias(self, layer: int, sub: str) -> nn.Parameter:
        """The bias of a sub-layer's output projection, created as zeros where the family has none
        (Llama's o_proj / down_proj), for compensation after surgery.

        Llama's `attention_bias` / `mlp_bias` config flags would also give q/k/v (gate/up) biases
        (more parameters, other unit costs), and Qwen2 has no flag for o_proj, so the added biases
        are listed in `config.idprior_out_bias` instead; loading rebuilds them from that list.
        """
        proj = self.out_proj(layer, sub)
        if proj is None:
            raise IdpriorError(f"layer {layer} has no {sub} sub-layer to give a bias")
        if proj.bias is None:
            if not isinstance(proj, nn.Linear):
                raise IdpriorError(f"cannot add a bias to {type(proj).__name__} (layer {layer} {sub})")
            w = proj.weight
            proj.bias = nn.Parameter(w.new_zeros(w.shape[0]), requires_grad=w.requires_grad)  # [out_features]
            recorded = set(getattr(self.config, OUT_BIAS_KEY, None) or [])
            setattr(self.config, OUT_BIAS_KEY, _sorted_sites(recorded | {f"{sub}:{layer}"}))
        return proj.bias

    def add_recorded_out_biases(self) -> None:
        """Give a freshly built (and reshaped) model the zero biases `config.idprior_out_bias` lists,
        so that the saved bias weights load strictly."""
        for site in getattr(self.config, OUT_BIAS_KEY, None) or []:
            sub, layer = site.split(":")
            if self.out_proj(int(layer), sub) is not None:
                self.add_out_bias(int(layer), sub)

    def sync_config(self) -> None:
        """Record the per-layer structure in `config` (saved to config.json)."""
        setattr(self.config, STRUCTURE_KEY, [s.to_dict() for s in self.shapes()])
        recorded = getattr(self.config, OUT_BIAS_KEY, None)
        if recorded:  # a sub-layer removed since its bias was added takes the bias with it
            kept = [site for site in recorded if self.out_proj(int(site.split(":")[1]), site.split(":")[0]) is not None]
            setattr(self.config, OUT_BIAS_KEY, kept)

    def check_config(self) -> None:
        """Raise if the modules and the recorded structure disagree."""
        recorded = getattr(self.config, STRUCTURE_KEY, None)
        if recorded is None:
            return
        actual = [s.to_dict() for s in self.shapes()]
        if recorded != actual:
            raise RuntimeError(f"model and config.{STRUCTURE_KEY} disagree: {recorded} vs {actual}")

    def check_target_shapes(self, shapes: list[LayerShape]) -> None:
        """Raise IdpriorError unless `shapes` can be reached from the current model by pruning."""
        if len(shapes) != self.num_layers:
            raise IdpriorError(
                f"config.{STRUCTURE_KEY} lists {len(shapes)} layers but the model has {self.num_layers}; "
                "re-save the pruned model with idprior.save_pruned"
            )
        for layer, (target, now) in enumerate(zip(shapes, self.shapes())):
            grows = target.n_heads > now.n_heads or target.n_kv_heads > now.n_kv_heads or target.ffn_dim > now.ffn_dim
            uneven = target.has_attn and (target.n_kv_heads <= 0 or target.n_heads % target.n_kv_heads)
            if grows or uneven:
                raise IdpriorError(
                    f"config.{STRUCTURE_KEY}[{layer}] = {target.to_dict()} does not fit layer shape "
                    f"{now.to_dict()}; re-save the pruned model with idprior.save_pruned"
                )

    def reshape_to(self, shapes: list[LayerShape]) -> None:
        """Give a freshly built (full-size) model the recorded shapes by keeping the first
        n heads/neurons and removing sub-layers; weights are loaded afterwards."""
        self.check_target_shapes(shapes)
        for layer, target in enumerate(shapes):
            current = self.shape(layer)
            if not target.has_attn:
                self.remove_attn(layer)
            else:
                self._reshape_heads(layer, target, current)
            if not target.has_ffn:
                self.remove_ffn(layer)
            elif target.ffn_dim != current.ffn_dim:
                self.prune_neurons(layer, list(range(target.ffn_dim)))

    def _reshape_heads(self, layer: int, target: LayerShape, current: LayerShape) -> None:
        """`reshape_to`'s step for a kept attention sub-layer: keep its first `target.n_heads` heads
        (multi-head attention; a family with grouped-query attention keeps whole KV groups)."""
        if target.n_heads != current.n_heads:
            self.prune_heads(layer, list(range(target.n_heads)))


# ---- helpers shared by the adapters -----------------------------------------------------------
def _sorted_sites(sites) -> list[str]:
    """"sub:layer" strings in (layer, attn before ffn) order."""
    return sorted(sites, key=lambda s: (int(s.split(":")[1]), s.split(":")[0] != "attn"))


def head_index(heads: list[int], head_dim: int, device: torch.device | None = None) -> torch.Tensor:
    """Feature indices [len(heads)*head_dim] of the given heads in a [.., n_heads*head_dim] layout."""
    idx = torch.tensor(heads, dtype=torch.long).unsqueeze(1) * head_dim + torch.arange(head_dim)
    return idx.reshape(-1).to(device)  # [k, head_dim] -> [k*head_dim]


@torch.no_grad()
def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep output features (`dim=0`, weight rows and bias) or input features (`dim=1`, columns)
    `index` of an nn.Linear in place; new Parameters keep dtype, device and requires_grad."""
    weight = linear.weight
    index = index.to(weight.device)
    linear.weight = nn.Parameter(weight.index_select(dim, index).clone(), requires_grad=weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            bias = linear.bias
            linear.bias = nn.Parameter(bias.index_select(0, index).clone(), requires_grad=bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


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


# Pre-LN decoders, measured on SmolLM2-135M (Llama layout; docs/results.md "Decoders") and applied to GPT-2, the
# other pre-LN family, by analogy. Fine-tuning: the prior measured through the next norm, milder reweighting,
# survivors debiased, a quarter of each layer kept (no SN, as for every family: `config.training_of`).
# Post-training: norms relative to the residual stream, a quarter kept, the kept columns re-fitted (lsq).
PRE_LN_DECODER_RECIPE: dict[str, dict] = {
    "finetune": {"norm_after_ln": True, "prior_gamma": 1.0, "prior_debias": True, "min_keep": 0.25},
    "posttrain": {"score": "residual", "min_keep": 0.25, "compensate": "lsq"},
}
