"""Cheap compensation after surgery, from calibration activations of the dense model.

A removed head or neuron takes its output-projection columns with it: the branch loses
W[:, R] x_R, where x is the projection's input (per-head contexts, FFN activations). Two
retraining-free repairs, for any method's plan (`prune.compensate`):

  bias  (FLAP, An et al. 2024) add the removed part's mean, W[:, R] mean(x_R), to the output
        projection's bias: the branch's output keeps its mean on calibration tokens, and its
        error shrinks to the fluctuation of the removed channels.
  lsq   re-fit the kept columns and the bias by least squares on calibration tokens,
        min E||W x - W'_K x_K - b'||^2 + lam ||W'_K - W_K||^2, ridge toward the old weights
        (lam = ridge x the mean of E[x_j^2] over kept channels); lam -> inf gives `bias` exactly.

A sub-layer removed whole has no bias left to carry its mean output c = W mean(x) + b. In a
pre-LN model (x + f(x)) nothing reads the residual stream between the nearest earlier surviving
branch and the removed one, so c is added to that branch's bias instead, exactly. Post-LN
(BERT: LN(x + f(x))) has no such place: a removed sub-layer there is not compensated (`notes`).

Statistics come from one pass of the dense model (the plan applied nowhere), so the same
`Compensation` applies to the gated model (full widths, gates closed) and to the pruned one:
gated + compensation == pruned + compensation, as gated == pruned without it. Llama's output
projections have no bias; `Adapter.add_out_bias` adds one and records it in the config so the
saved folder reloads (also with stock transformers and trust_remote_code).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import get_adapter
from ..arch.base import Adapter, head_index
from ..errors import IdpriorError
from .plan import layer_removals, unit_count
from .units import Unit

MODES = ("none", "bias", "lsq")
SUBS = ("attn", "ffn")


# ---- calibration statistics -------------------------------------------------------------------------
@torch.no_grad()
def channel_stats(model: nn.Module, adapter: Adapter, batches: Iterable[dict], sites: Iterable[tuple[str, int]], *,
                  squares: bool = False, gram: Iterable[tuple[str, int]] = (),
                  stop_after: tuple[str, int] | None = None) -> tuple[dict, int]:
    """Sums over real tokens of each output projection's input, in one eval pass.

    Returns ({(sub, layer): {"sum": [F], "sq": [F] (squares), "gram": [F, F] (sites in gram)}}, tokens),
    float64, F the projection's input width. Padding (attention_mask 0) is left out. `stop_after`: a site
    of `sites` after whose statistics each forward pass stops (nothing later is needed).
    """
    from .scoring import lean_forward_kwargs

    sites, gram = list(dict.fromkeys(sites)), set(gram)
    stats: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    mask: list[torch.Tensor | None] = [None]

    def hook(site):
        def fn(module, args):
            x = args[0].detach()  # [B, T, F]
            m = mask[0]
            xs = x[m] if m is not None and m.shape == x.shape[:2] else x.reshape(-1, x.shape[-1])  # [N, F] real tokens
            xs = xs.float()
            acc = stats.setdefault(site, {})
            parts = {"sum": xs.sum(0)}
            if squares:
                parts["sq"] = (xs**2).sum(0)
            if site in gram:
                parts["gram"] = xs.T @ xs  # [F, F]
            for k, v in parts.items():
                acc[k] = acc[k] + v.double() if k in acc else v.double()
            if site == stop_after:
                raise _Stop
        return fn

    handles = []
    for sub, layer in sites:
        proj = adapter.out_proj(layer, sub)
        if proj is None:
            raise IdpriorError(f"layer {layer} has no {sub} sub-layer to collect statistics from")
        handles.append(proj.register_forward_pre_hook(hook((sub, layer))))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    extra = lean_forward_kwargs(model)
    tokens = 0
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            am = batch.get("attention_mask")
            mask[0] = am.bool() if am is not None else None
            tokens += int(am.sum()) if am is not None else int(batch["input_ids"].numel())
            with contextlib.suppress(_Stop):
                model(**batch, **extra)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise IdpriorError("no calibration tokens: pass non-empty calibration batches")
    return stats, tokens


class _Stop(Exception):
    """Raised by `channel_stats`'s hook at `stop_after`: the rest of the forward pass is not needed."""


GRAM_SHARE = 0.5
"""lsq holds float64 Gram matrices [F, F] of the re-fit projections' inputs for at most this share of the
model's weight bytes at a time; more take several calibration passes, each stopping after its last layer
(all at once they are 1.1x SmolLM2's float32 weights and 3.3x Llama-3-8B's bfloat16 ones)."""


def gram_groups(adapter: Adapter, sites: list[tuple[str, int]], budget: float) -> list[list[tuple[str, int]]]:
    """`sites` in forward order, cut into consecutive groups whose float64 Gram matrices fit `budget` bytes
    (a site larger than the budget is a group of its own)."""
    order = {(sub, i): n for n, (i, sub) in enumerate((i, sub) for i in range(adapter.num_layers) for sub in SUBS)}
    groups: list[list[tuple[str, int]]] = []
    used = budget
    for site in sorted(sites, key=order.__getitem__):
        width = adapter.out_weight(adapter.out_proj(site[1], site[0])).shape[1]
        size = 8 * width * width
        if used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(site)
        used += size
    return groups


# ---- the compensation ---------------------------------------------------------------------------------
@dataclass
class Compensation:
    """Weight and bias changes in the dense model's channel indices; `apply` fits either shape."""

    mode: str
    ridge: float | None = None
    widths: dict[tuple[str, int], int] = field(default_factory=dict)  # dense input width of re-fit projections
    weights: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # kept [K], W' [D, K]
    biases: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)  # [D] added to the projection's bias
    notes: list[str] = field(default_factory=list)

    @torch.no_grad()
    def apply(self, model: nn.Module, adapter: Adapter | None = None) -> dict:
        """Write the changes into `model`, dense-width (gated) or pruned by the same plan; a summary."""
        adapter = adapter or get_adapter(model)
        added = 0
        for (sub, layer), (kept, new) in self.weights.items():
            proj = _proj(adapter, layer, sub)
            w = adapter.out_weight(proj)  # [D, F] view (GPT-2's Conv1D transposed)
            if w.shape[1] == self.widths[(sub, layer)]:
                w[:, kept.to(w.device)] = new.to(w)  # gated: the removed columns stay, the gates close them
            elif w.shape[1] == len(kept):
                w.copy_(new.to(w))  # pruned: surgery keeps the kept channels in order
            else:
                raise IdpriorError(f"layer {layer} {sub}: the output projection has {w.shape[1]} inputs, neither the "
                                   f"dense {self.widths[(sub, layer)]} nor the pruned {len(kept)}; apply the "
                                   "compensation to the model it was fitted on, or to that model pruned by its plan")
        for (sub, layer), delta in self.biases.items():
            proj = _proj(adapter, layer, sub)
            had = proj.bias is not None
            bias = adapter.add_out_bias(layer, sub)
            added += 0 if had else bias.numel()
            bias.add_(delta.to(bias))
        return {"mode": self.mode, "ridge": self.ridge, "refit": len(self.weights), "biases": len(self.biases),
                "added_bias_params": added, "notes": list(self.notes)}


def _proj(adapter: Adapter, layer: int, sub: str) -> nn.Module:
    proj = adapter.out_proj(layer, sub)
    if proj is None:
        raise IdpriorError(f"layer {layer} has no {sub} sub-layer; apply the compensation to the model it was "
                           "fitted on, or to that model pruned by its plan")
    if parametrize.is_parametrized(proj):
        raise IdpriorError("cannot compensate a model with parametrizations (spectral normalization): fold them first")
    return proj


def _removed_channels(adapter: Adapter, layer: int, sub: str, removed: set[int]) -> torch.Tensor:
    """Input-channel indices of the output projection that the removed head units / neurons own."""
    if sub == "ffn":
        return torch.tensor(sorted(removed), dtype=torch.long)
    owner = adapter.head_unit_of_query_heads(layer).tolist()  # [n_heads] unit of each query head
    return head_index([q for q, u in enumerate(owner) if u in removed], adapter.head_dim)


@torch.no_grad()
def fit_compensation(model: nn.Module, units: Iterable[Unit | str], batches: Iterable[dict] | None, *, mode: str = "bias",
                     adapter: Adapter | None = None, ridge: float = 0.01, stats: tuple[dict, int] | None = None) -> Compensation:
    """The compensation for removing `units` from `model` (unpruned by them), from one calibration pass
    over `batches`, or from `stats`, a `channel_stats` result that covers the cut sub-layers (with
    "gram" for lsq), so that several plans can share one pass."""
    if mode not in ("bias", "lsq"):
        raise IdpriorError(f"compensation mode must be 'bias' or 'lsq', got {mode!r}")
    if mode == "lsq" and not ridge > 0:
        raise IdpriorError(f"lsq compensation needs ridge > 0, got {ridge}")
    adapter = adapter or get_adapter(model)
    removals = layer_removals(adapter, units, strict=True)
    partial, collapsed = _split_removals(adapter, removals)
    comp = Compensation(mode, ridge if mode == "lsq" else None)
    if not partial and not collapsed:
        return comp

    def add(site, delta):
        comp.biases[site] = comp.biases[site] + delta if site in comp.biases else delta

    def refit(stats: dict, n: int, sites) -> None:
        for sub, layer in sites:
            gone = partial[(sub, layer)]
            proj = adapter.out_proj(layer, sub)
            weight = adapter.out_weight(proj)
            w = weight.detach().double()  # [D, F]
            mean = stats[(sub, layer)]["sum"] / n  # [F]
            keep = torch.ones(w.shape[1], dtype=torch.bool)
            keep[gone] = False
            if mode == "bias":
                add((sub, layer), w[:, gone] @ mean[gone])  # [D]
                continue
            kept = keep.nonzero().flatten()
            new_w, delta = _ridge_refit(w, stats[(sub, layer)]["gram"] / n, mean, kept, ridge)
            comp.widths[(sub, layer)] = w.shape[1]
            comp.weights[(sub, layer)] = (kept, new_w.to(weight.dtype))  # `apply` writes it in the model's dtype
            add((sub, layer), delta)

    if stats is None and mode == "lsq":  # the Gram matrices in groups of layers, one calibration pass each
        budget = GRAM_SHARE * sum(p.numel() * p.element_size() for p in model.parameters())
        groups = gram_groups(adapter, list(partial), budget)
        batches = list(batches) if len(groups) > 1 else batches  # read once per group
        stats = {}
        for g, group in enumerate(groups):
            last = g == len(groups) - 1
            sites = [*group, *collapsed] if last else group
            stats, n = channel_stats(model, adapter, batches, sites, gram=group,
                                     stop_after=None if last and collapsed else group[-1])
            refit(stats, n, group)
        if not groups:
            stats, n = channel_stats(model, adapter, batches, collapsed)
    else:
        stats, n = _statistics(model, adapter, batches, stats, partial, collapsed, mode)
        refit(stats, n, partial)
    for sub, layer in collapsed:
        proj = adapter.out_proj(layer, sub)
        w = adapter.out_weight(proj).detach().double()
        c = w @ (stats[(sub, layer)]["sum"] / n)  # [D] the removed branch's mean output
        if proj.bias is not None:
            c = c + proj.bias.detach().double()
        target = _carrier(adapter, removals, sub, layer)
        if target is None:
            why = ("post-LN: no bias outside the LayerNorm" if adapter.norm_position != "pre"
                   else "no earlier branch survives")
            comp.notes.append(f"{sub}:{layer} removed whole, not compensated ({why})")
        else:
            add(target, c)
    return comp


def _split_removals(adapter: Adapter, removals) -> tuple[dict[tuple[str, int], torch.Tensor], list[tuple[str, int]]]:
    """(removed channels of the sub-layers that stay, sub-layers removed whole)."""
    partial: dict[tuple[str, int], torch.Tensor] = {}
    collapsed: list[tuple[str, int]] = []
    for layer, r in sorted(removals.items()):
        for sub, indices in (("attn", r.heads), ("ffn", r.neurons)):
            if getattr(r, sub):
                collapsed.append((sub, layer))
            elif indices:
                partial[(sub, layer)] = _removed_channels(adapter, layer, sub, indices)
    return partial, collapsed


def _statistics(model, adapter, batches, stats, partial, collapsed, mode: str) -> tuple[dict, int]:
    """`stats` checked to cover every cut sub-layer, or one calibration pass that collects them."""
    if stats is None:
        return channel_stats(model, adapter, batches, [*partial, *collapsed], gram=partial if mode == "lsq" else ())
    stats, n = stats
    missing = [f"{s}:{i}" for s, i in [*partial, *collapsed] if (s, i) not in stats]
    missing += [f"{s}:{i} (gram)" for s, i in partial if mode == "lsq" and "gram" not in stats.get((s, i), {})]
    if missing:
        raise IdpriorError(f"the statistics lack {', '.join(missing)}; collect them with channel_stats")
    return stats, n


def _carrier(adapter: Adapter, removals, sub: str, layer: int) -> tuple[str, int] | None:
    """The nearest surviving branch before (sub, layer) in residual order (pre-LN only): its output
    reaches the removed branch's place in the residual stream with nothing in between reading it."""
    if adapter.norm_position != "pre":
        return None
    order = [(s, i) for i in range(adapter.num_layers) for s in SUBS]
    for s, i in reversed(order[: order.index((sub, layer))]):
        r = removals.get(i)
        if unit_count(adapter, s, i) and not (r is not None and getattr(r, s)):
            return (s, i)
    return None


def _ridge_refit(w: torch.Tensor, second: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor,
                 ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """New kept columns [D, K] and bias change [D]: ridge regression of W x on [x_K, 1], pulled toward W_K.

    second = E[x x^T] [F, F], mean = E[x] [F]. With z = [x_K; 1]: (E[z z^T] + Lam) Theta = E[z x^T] W^T + Lam Theta0,
    Theta0 = [W_K^T; 0], Lam = lam on the x_K block and 0 on the intercept (left free, so it absorbs the mean).
    """
    k = len(kept)
    a = torch.empty(k + 1, k + 1, dtype=torch.float64)
    a[:k, :k] = second[kept][:, kept]
    a[:k, k] = a[k, :k] = mean[kept]
    a[k, k] = 1.0
    b = torch.cat([second[kept], mean[None]]) @ w.T  # [K+1, F] @ [F, D] -> [K+1, D]
    scale = float(a.diagonal()[:k].mean()) if k else 1.0
    lam = ridge * (scale if scale > 0 else 1.0)
    theta0 = torch.cat([w[:, kept].T, w.new_zeros(1, w.shape[0])])  # [K+1, D]
    reg = torch.full((k + 1,), lam, dtype=torch.float64)
    reg[k] = 0.0
    theta = torch.linalg.solve(a + torch.diag(reg), b + reg[:, None] * theta0)  # [K+1, D]
    return theta[:k].T.contiguous(), theta[k]
