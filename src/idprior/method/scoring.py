"""Function norms of every prunable branch, from one pass over calibration data.

    ||f_u|| = sqrt( mean over real (non-padding) tokens of ||f_u(x)||^2 )

With `readout=True` (`prune.norm_positions: readout`) the mean in the LAST layer runs over the
positions the model's head reads (the adapter's `readout_mask`, e.g. [CLS] for a BERT classifier)
instead: a last-layer branch reaches the output only there, so its effect on other tokens is moot.

With `after_ln=True` (`prune.norm_after_ln`) a branch is measured where the rest of the model first
sees it, through the next norm (the adapter's `branch_out_norm`). Post-LN, LN(x + f) holds f as
γ ⊙ C f / σ_t (C removes the mean over the hidden size, σ_t the token's LN input std); pre-LN the next
pre-norm reads the stream x + f as γ ⊙ (x + f) / rms_t (an RMSNorm does not centre). So the output
weights are taken as diag(γ) C W (or diag(γ) W) and the norm is scaled by sqrt(mean over tokens of
1/σ_t²) of that norm's input. Layers whose norm gain or stream scale differ (≈3x across MiniLM's layers;
much more along a pre-LN decoder, whose stream grows with depth) are then compared on the scale the next
layer sees, and a branch writing into directions the next norm damps counts for less.

Heads come from the per-head context before the output projection: f_h(x) = ctx_h W_O[:, h],
so ||f_h||^2 = ctx_h^T (W_O[:, h]^T W_O[:, h]) ctx_h, computed with the small per-head Gram
matrix instead of materializing every head's output. A GQA head unit (one KV group) is the sum
of its query heads, so its Gram matrix spans all of the group's columns. Neurons:
||f_j||^2 = a_j^2 ||W2[:, j]||^2. Whole sub-layers: the norm of the branch output (bias included).

`BranchNorms` is a gate observer (see `gates.Gates.observers`) shared by scoring (no grad,
accumulated over batches) and the identity prior (differentiable, one batch at a time).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..arch import get_adapter
from ..arch.base import Adapter
from ..errors import IdpriorError
from .gates import Gates
from .plan import SUBLAYER
from .units import Unit


class BranchNorms:
    """Per-unit sums over real tokens of squared branch norms, filled in by the gate hooks.

    `sums[(kind, layer)]` is a [n_units] tensor ("head", "neuron") or a [1] tensor ("attn",
    "ffn"); `tokens` counts real tokens; `input_sq[layer]` sums ||layer input||^2 (for
    `--score relative`) and `ffn_input_sq[layer]` ||residual the FFN writes into||^2 (`--score residual`:
    in a pre-LN layer the FFN adds to x + attn(x), not to x). `differentiable=True` keeps the graph
    (identity prior) and restarts the sums at every training forward; otherwise they accumulate in
    float64 without grad. With `readout=True` the last layer counts only the adapter's readout
    positions (`readout_tokens`).
    """

    def __init__(self, model: nn.Module, gates: Gates, adapter: Adapter, kinds: Iterable[str] = ("head", "neuron", "attn", "ffn"),
                 differentiable: bool = False, readout: bool = False, after_ln: bool = False):
        self.model, self.gates, self.adapter = model, gates, adapter
        self.kinds = set(kinds)
        self.differentiable = differentiable
        self.sums: dict[tuple[str, int], torch.Tensor] = {}
        self.input_sq: dict[int, torch.Tensor] = {}
        self.ffn_input_sq: dict[int, torch.Tensor] = {}
        self.tokens = 0
        # decided once, from the model's head, so every rank and every batch agree
        self.readout = readout and adapter.readout_mask(torch.ones(1, 1, dtype=torch.bool)) is not None
        self.last_layer = adapter.num_layers - 1
        self.readout_positions: torch.Tensor | None = None  # [B, T] bool for the current batch
        self.readout_tokens = 0
        # post-LN: the LayerNorm after each sub-layer ("attn" | "ffn", layer) and Σ 1/σ_t² of its input
        self.out_norms = {(sub, i): ln for i in range(adapter.num_layers) for sub in ("attn", "ffn")
                          if after_ln and (ln := adapter.branch_out_norm(i, sub)) is not None}
        self.ln_sq: dict[tuple[str, int], torch.Tensor] = {}
        self.active = True
        self._handles: list = []
        self._perm_cache: dict[int, tuple[torch.Tensor, int]] = {}

    # ---- wiring ---------------------------------------------------------------------------------
    def attach(self) -> BranchNorms:
        self.gates.observers.append(self)
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward, with_kwargs=True))
        for i, layer in enumerate(self.adapter.layers()):
            self._handles.append(layer.register_forward_pre_hook(self._layer_input(i), with_kwargs=True))
            self._handles.append(self.adapter.ffn_residual(i).register_forward_pre_hook(self._ffn_input(i), with_kwargs=True))
        for key, ln in self.out_norms.items():
            self._handles.append(ln.register_forward_pre_hook(self._ln_input(key)))
        return self

    def detach(self) -> None:
        if self in self.gates.observers:
            self.gates.observers.remove(self)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.sums.clear()
        self.input_sq.clear()
        self.ffn_input_sq.clear()
        self.tokens = 0
        self.readout_tokens = 0
        self.ln_sq.clear()

    def _on_forward(self, module, args, kwargs):
        """Top-level pre-hook: remember which tokens are real and count them."""
        if self.differentiable:
            self.active = module.training
            if self.active:
                self.reset()
        if not self.active:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if mask is None:
            ref = ids if ids is not None else kwargs.get("inputs_embeds")
            mask = torch.ones(ref.shape[:2], dtype=torch.bool, device=ref.device)
        self.gates.token_mask = mask.bool()
        self.tokens += int(mask.sum())
        if self.readout:
            self.readout_positions = self.adapter.readout_mask(self.gates.token_mask) & self.gates.token_mask
            self.readout_tokens += int(self.readout_positions.sum())

    def _layer_input(self, layer: int):
        """Pre-hook on the layer: ||layer input||^2 into `input_sq` (subclasses may return a no-op)."""
        return self._stream_sq(layer, self.input_sq)

    def _ffn_input(self, layer: int):
        """Pre-hook on `adapter.ffn_residual`: ||stream the FFN writes into||^2 into `ffn_input_sq`."""
        return self._stream_sq(layer, self.ffn_input_sq)

    def _stream_sq(self, layer: int, store: dict):
        def hook(module, args, kwargs):
            if not self.active or self.differentiable:
                return
            x = kwargs.get("hidden_states", args[0] if args else None)
            if x is None:
                return
            sq = (x.detach().float() ** 2).sum(-1)  # [B, T]
            self._add(store, layer, self._masked_sum(sq[..., None], layer)[0])

        return hook

    def _ln_input(self, key: tuple[str, int]):
        def hook(module, args):
            if not self.active:
                return
            x = args[0].detach().float()
            # LayerNorm divides by the std over the hidden size, RMSNorm by the root mean square
            ms = x.var(-1, unbiased=False) if isinstance(module, nn.LayerNorm) else x.pow(2).mean(-1)
            eps = getattr(module, "eps", None) or getattr(module, "variance_epsilon", 1e-6)
            inv = 1.0 / (ms + eps)  # 1/σ_t²: [B, T]
            self._add(self.ln_sq, key, self._masked_sum(inv[..., None], key[1]).detach().double())

        return hook

    def out_weight(self, module: nn.Module, layer: int, sub: str) -> torch.Tensor:
        """[out, in] output weights of a branch, as diag(γ) C W when measured after its LayerNorm."""
        w = self.adapter.out_weight(module)
        ln = self.out_norms.get((sub, layer))
        return w if ln is None else seen_after_ln(ln, w)

    def ln_scale(self, key: tuple[str, int], n: int | None = None) -> float:
        """sqrt(mean of 1/σ_t²) after sub-layer `key` (1 when the branch is not measured after an LN)."""
        if key not in self.out_norms or key not in self.ln_sq:
            return 1.0
        return math.sqrt(float(self.ln_sq[key].sum()) / max(1, self.count(key[1]) if n is None else n))

    # ---- accumulation ---------------------------------------------------------------------------
    def positions(self, layer: int) -> torch.Tensor | None:
        """[B, T] bool: the tokens layer `layer` is measured on (None: all of them)."""
        if self.readout and layer == self.last_layer:
            return self.readout_positions
        return self.gates.token_mask

    def count(self, layer: int) -> int:
        """Number of tokens summed for layer `layer` (the denominator of its mean)."""
        if self.readout and layer == self.last_layer:
            return self.readout_tokens
        return self.tokens

    def _masked_sum(self, sq: torch.Tensor, layer: int) -> torch.Tensor:
        """[B, T, N] -> [N], summed over the tokens layer `layer` is measured on."""
        mask = self.positions(layer)
        if mask is None or mask.shape != sq.shape[:2]:
            return sq.sum(dim=(0, 1))
        return torch.einsum("btn,bt->n", sq, mask.to(sq.dtype))

    def _add(self, store: dict, key, value: torch.Tensor) -> None:
        if not self.differentiable:
            value = value.detach().double()
        store[key] = store[key] + value if key in store else value

    def _unit_layout(self, layer: int, n_heads: int) -> tuple[torch.Tensor, int]:
        """Permutation that puts each head unit's query heads side by side, and the unit count."""
        if layer not in self._perm_cache or self._perm_cache[layer][0].numel() != n_heads:
            owner = self.adapter.head_unit_of_query_heads(layer)
            self._perm_cache[layer] = (torch.argsort(owner, stable=True), int(owner.max()) + 1)
        return self._perm_cache[layer]

    def __call__(self, layer: int, site: str, x: torch.Tensor, module: nn.Module) -> None:
        if not self.active:
            return
        if not self.differentiable:
            x = x.detach()
        if site == "heads" and "head" in self.kinds:
            w = self.out_weight(module, layer, "attn")  # [D, H*dh]
            d_out = w.shape[0]
            dh = self.adapter.head_dim
            n_heads = x.shape[-1] // dh
            perm, n_units = self._unit_layout(layer, n_heads)
            perm = perm.to(x.device)
            b, t = x.shape[:2]
            ctx = x.view(b, t, n_heads, dh)[:, :, perm].reshape(b, t, n_units, -1)  # [B, T, U, k*dh]
            wu = w.view(d_out, n_heads, dh)[:, perm].reshape(d_out, n_units, -1)  # [D, U, k*dh]
            gram = torch.einsum("dui,duj->uij", wu.float(), wu.float())  # [U, k*dh, k*dh]
            sq = torch.einsum("btui,uij,btuj->btu", ctx.float(), gram, ctx.float()).clamp(min=0)  # [B, T, U]
            self._add(self.sums, ("head", layer), self._masked_sum(sq, layer))
        elif site == "neurons" and "neuron" in self.kinds:
            w = self.out_weight(module, layer, "ffn")  # [D, F]
            col_sq = (w.float() ** 2).sum(0)  # [F]
            act_sq = self._masked_sum(x.float() ** 2, layer)  # [F]
            self._add(self.sums, ("neuron", layer), act_sq * col_sq)
        elif site in ("attn", "ffn") and site in self.kinds:
            ln = self.out_norms.get((site, layer))
            if ln is not None:
                x = ln.weight.detach() * (x - x.mean(-1, keepdim=True))  # diag(γ) C f: [B, T, D]
            sq = (x.float() ** 2).sum(-1, keepdim=True)  # [B, T, 1]
            self._add(self.sums, (site, layer), self._masked_sum(sq, layer))

    # ---- results --------------------------------------------------------------------------------
    def norms(self, eps: float = 0.0) -> dict[tuple[str, int], torch.Tensor]:
        """sqrt(mean over tokens) for every (kind, layer) seen."""
        return {k: torch.sqrt(v / max(1, self.count(k[1])) + eps) * self.ln_scale((SUBLAYER[k[0]], k[1]))
                for k, v in self.sums.items()}


def seen_after_ln(ln: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """diag(γ) C W: output weights [out, in] as the norm after the branch sees them (C removes the mean
    over the hidden size for a LayerNorm, nothing for an RMSNorm; the 1/σ scale is applied to the norm,
    see `BranchNorms.ln_scale`)."""
    if isinstance(ln, nn.LayerNorm):
        w = w - w.mean(0, keepdim=True)
    return ln.weight.detach()[:, None].to(w.dtype) * w


@torch.no_grad()
def score(model: nn.Module, batches: Iterable[dict], *, kinds: Iterable[str] = ("head", "neuron", "attn", "ffn"),
          adapter: Adapter | None = None, relative: bool = False, residual: bool = False, readout: bool = False,
          after_ln: bool = False, desc: str = "score", lean: bool = True) -> dict[Unit, float]:
    """Function norm of every unit of `kinds`, in eval mode, in one pass over `batches`.

    `readout=True`: last-layer norms over the positions the model's head reads; `after_ln=True`:
    norms measured after the LayerNorm each branch joins (post-LN models; see BranchNorms).

    With `relative=True` each norm is divided by the RMS norm of its layer's input, so that
    layers with larger residual streams (pre-LN decoders) are not favoured. `residual=True` divides
    by the RMS of the residual stream each branch writes into: the layer input for attention, the
    FFN's own input stream for the FFN (in a pre-LN decoder x + attn(x), which an early layer's
    attention can make much larger than x), i.e. the branch's relative update of that stream.

    Memory: the gate hooks reduce every branch to per-unit sums as soon as it is computed, and
    under no_grad nothing else keeps a layer's activations, so beyond the weights the peak is
    about one layer's activations (plus the logits, cut to the last position for causal LMs;
    `lean=False` keeps the full forward, for the memory benchmark's comparison).

    Several processes: when `torch.distributed` is initialized (e.g. under `accelerate launch`),
    rank r takes batches r, r + world, ... and the per-unit sums and token counts are all-reduced
    in float64, so every rank returns the same scores (hence makes the same plan) as one process
    scoring every batch, up to float64 summation order. Every rank passes the same, unsharded
    batches (not a loader that `accelerate` has already split).
    """
    adapter = adapter or get_adapter(model)
    kinds = tuple(kinds)
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    extra = lean_forward_kwargs(model) if lean else {}
    with Gates(model, adapter) as gates:
        rec = BranchNorms(model, gates, adapter, kinds, readout=readout, after_ln=after_ln).attach()
        try:
            for i, batch in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=rank != 0)):
                if i % world != rank:
                    continue
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, **extra)
        finally:
            rec.detach()
    model.train(was_training)
    if world > 1:
        _all_reduce(rec, adapter, device)
    out: dict[Unit, float] = {}
    for (kind, layer), value in sorted(rec.norms().items()):
        if relative or residual:
            store = rec.ffn_input_sq if residual and kind in ("neuron", "ffn") else rec.input_sq
            rms_in = float(torch.sqrt(store[layer] / max(1, rec.count(layer))))
            value = value / max(rms_in, 1e-12)
        if kind in ("attn", "ffn"):
            out[Unit(kind, layer)] = float(value[0])
        else:
            for i, v in enumerate(value.tolist()):
                out[Unit(kind, layer, i)] = float(v)
    check_finite(out)
    return out


def check_finite(scores: dict[Unit, float]) -> None:
    """Refuse NaN/inf norms: a plan ranked on them would be arbitrary, so stop with the likely cause."""
    bad = sorted((u for u, v in scores.items() if not math.isfinite(v)), key=Unit.sort_key)
    if bad:
        u = bad[0]
        where = f"{u.kind} unit {u.index} of layer {u.layer}" if u.kind in ("head", "neuron") else f"{u.kind} of layer {u.layer}"
        raise IdpriorError(
            f"the function norm of {where} is {scores[u]} ({len(bad)} of {len(scores)} units are not finite): the "
            "model's activations overflow or its weights hold NaN/inf, most likely a diverged fine-tune (see "
            "train_log.jsonl; lower train.lr) or float16 overflow (use --dtype float32)"
        )


def lean_forward_kwargs(model: nn.Module) -> dict:
    """Forward options that skip what scoring never reads: the KV cache, and the logits of all but
    the last position (a causal LM's [B, T, vocab] logits are 1.6 GB for SmolLM2 at 64 x 128
    tokens, far more than one layer's activations)."""
    params = inspect.signature(model.forward).parameters
    extra = {}
    if "use_cache" in params:
        extra["use_cache"] = False
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def _rank_world() -> tuple[int, int]:
    """(rank, processes) scoring shares its batches with: one process inside `distributed.alone()`."""
    return (distributed.rank(), distributed.world()) if distributed.world() > 1 else (0, 1)


def _all_reduce(rec: BranchNorms, adapter: Adapter, device: torch.device) -> None:
    """Sum `rec`'s per-unit sums, input norms and token counts over all ranks, in place.

    Every rank lays out the same keys in the same order (a rank that saw no batch contributes
    zeros of the adapter's shapes), flattens them into one float64 vector and all-reduces it once.
    """
    layout: list[tuple[dict, object, int]] = []  # (store, key, length)
    for layer in range(adapter.num_layers):
        shape = adapter.shape(layer)
        sizes = {"head": adapter.num_head_units(layer) if shape.has_attn else 0, "neuron": shape.ffn_dim,
                 "attn": int(shape.has_attn), "ffn": int(shape.has_ffn)}
        layout += [(rec.sums, (kind, layer), sizes[kind]) for kind in sorted(rec.kinds) if sizes[kind]]
        layout += [(rec.input_sq, layer, 1), (rec.ffn_input_sq, layer, 1)]
        layout += [(rec.ln_sq, key, 1) for key in sorted(rec.out_norms) if key[1] == layer]
    parts = [store.get(key, torch.zeros(n, dtype=torch.float64, device=device)).reshape(n).double()
             for store, key, n in layout]
    counts = torch.tensor([float(rec.tokens), float(rec.readout_tokens)], dtype=torch.float64, device=device)
    flat = torch.cat([*parts, counts])  # [sum n + 2]
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for store, key, n in layout:
        store[key] = flat[offset:offset + n].clone()
        offset += n
    rec.tokens, rec.readout_tokens = int(round(float(flat[-2]))), int(round(float(flat[-1])))


def scores_to_json(scores: dict[Unit, float]) -> dict[str, float]:
    return {str(u): v for u, v in sorted(scores.items(), key=lambda kv: kv[0].sort_key())}


def scores_from_json(data: dict[str, float]) -> dict[Unit, float]:
    return {Unit.parse(k): float(v) for k, v in data.items()}
