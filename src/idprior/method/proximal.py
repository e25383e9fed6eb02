"""The identity prior: a group soft-threshold of every unit's function norm after each optimizer step,
with a strength driven to the pruning target.

Why not a loss term: `task_loss + λ Σ c_u ‖f_u‖` under Adam is inert (Adam normalises each
weight's step, and the normalised weights make the pull ~1e-5 per unit; docs/history.md). Like AdamW
decouples weight decay, this prior acts on the weights directly, after `opt.step()`:

  unit output weights  w_u: the out-projection columns of a head unit (every query head it owns),
                       or column j of the FFN out-projection for neuron j;
  function norm        ‖f_u‖² = tr(W_uᵀ W_u · M_u) with M_u the EMA (over training batches) of the
                       per-token second moment of the branch input (head context / activation a_j),
                       so the norm is exact for the *current* weights, right after the Adam step;
  proximal step        w_u ← w_u · max(0, 1 − δ_u / ‖f_u‖): f_u is linear in w_u, so this is an
                       exact soft-threshold ‖f_u‖ ← max(0, ‖f_u‖ − δ_u); units at or below δ_u
                       land exactly at the identity (f_u = 0), and the task gradient, through
                       Adam, can regrow a unit only by a step larger than its threshold;
  strength             δ_u = λ · ω_u · F̄_k / a_u, F̄_k the mean norm of kind k at the phase start (so
                       λ is unitless: 0.01 = 1% of a typical unit per step), ω_u = (F̄_k / (‖f_u‖ +
                       ε F̄_k))^γ (reweighted group lasso, small units pulled harder), a_u the unit's
                       mean sqrt(v) (Adam's second moment over its output weights) relative to its
                       kind's: the step in Adam's metric (as adaptive proximal methods take it, e.g.
                       ProxGen, Yun et al. 2021), so a unit the loss keeps pushing on falls more
                       slowly than one it ignores;
  controller           the fraction of the prune measure carried by units at the identity
                       (‖f_u‖ ≤ 1e-3 F̄_k; costs and the collapse rule from `plan.removal_cost`)
                       should follow s(t) = target (1 − (1 − t/T_r)³), then hold; each step
                       λ ← clip(λ · exp(κ (s(t) − frac_H) / target), λ_min, λ_max), where frac_H
                       also counts the units the current λ drives to zero within H = `horizon` ·
                       steps (a unit needs many steps to fall, so integrating on the lagging
                       fraction alone overshoots: measured on tiny BERT, 0.63-0.72 for a 0.5 target
                       without the lead, 0.56 with H = 0.2). With `head_share` h, heads and
                       neurons get a λ each, tracking h·s and (1−h)·s.

With spectral normalization the modified tensor is the parametrization's `original` (what the
optimizer owns); the norm uses the effective weight original · min(1, c/σ) with the stored σ
estimate, so the threshold is exact while SN does not bind (shrinking columns only lowers σ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import distributed
from ..arch.base import Adapter
from ..config import RECIPE, PruneConfig, prior_active
from ..errors import IdpriorError
from .gates import Gates
from .plan import SUBLAYER, measure_of, model_cost, removal_cost
from .scoring import BranchNorms
from .selection import floor_count
from .spectral import BoundedSpectralNorm
from .units import Unit, parse_kinds

PROX_KINDS = ("head", "neuron")


class ActivationMoments(BranchNorms):
    """Gate observer: second moments of the branch inputs on the current training batch.

    `moments[("head", l)]` is [U, k*dh, k*dh] (Σ over real tokens of c_u c_uᵀ, c_u the unit's
    concatenated query-head contexts), `moments[("neuron", l)]` is [F] (Σ a_j²). Weight-free, so
    the prior can evaluate ‖f_u‖ with the weights as they are after the optimizer step. Sums
    restart at every training forward; eval forwards (validation during training) are ignored.
    """

    def __init__(self, model: nn.Module, gates: Gates, adapter: Adapter, kinds: Iterable[str] = PROX_KINDS,
                 readout: bool = False, after_ln: bool = False):
        super().__init__(model, gates, adapter, kinds, differentiable=False, readout=readout, after_ln=after_ln)
        self.moments: dict[tuple[str, int], torch.Tensor] = {}

    def reset(self) -> None:
        super().reset()
        self.moments.clear()

    def _on_forward(self, module, args, kwargs):
        self.active = module.training
        if self.active:
            self.reset()
            super()._on_forward(module, args, kwargs)

    def unit_layout(self, layer: int, n_heads: int) -> tuple[torch.Tensor, int]:
        """Permutation putting each head unit's query heads side by side, and the unit count."""
        return self._unit_layout(layer, n_heads)

    def _layer_input(self, layer: int):
        return lambda module, args, kwargs: None  # the residual-stream norm is not needed here

    def __call__(self, layer: int, site: str, x: torch.Tensor, module: nn.Module) -> None:
        if not self.active:
            return
        x = x.detach()
        mask = self.positions(layer)
        if mask is not None and mask.shape == x.shape[:2]:
            x = x * mask[..., None].to(x.dtype)  # padding tokens contribute nothing (mask² = mask)
        if site == "heads" and "head" in self.kinds:
            dh = self.adapter.head_dim
            b, t = x.shape[:2]
            n_heads = x.shape[-1] // dh
            perm, n_units = self._unit_layout(layer, n_heads)
            ctx = x.view(b, t, n_heads, dh)[:, :, perm.to(x.device)].reshape(b * t, n_units, -1)  # [BT, U, k*dh]
            ctx = ctx.float().transpose(0, 1)  # [U, BT, k*dh]
            self._add(self.moments, ("head", layer), ctx.transpose(1, 2) @ ctx)  # [U, k*dh, k*dh], summed in float64
        elif site == "neurons" and "neuron" in self.kinds:
            self._add(self.moments, ("neuron", layer), (x.float() ** 2).sum(dim=(0, 1)))  # [F]


def _clear_bias(module: nn.Module) -> None:
    """Every unit of the sub-layer is at the identity: its output bias goes as well, because surgery's
    collapse rule removes the whole sub-layer, bias included (post-LN: LN(x + b) is not LN(x)), and a
    model with its units at zero must equal the pruned model."""
    if getattr(module, "bias", None) is not None:
        module.bias.zero_()


class _Stored:
    """Stands in for a module so that `adapter.out_weight` gives its [out, in] view of `weight`."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def stored_out_weight(adapter: Adapter, module: nn.Module) -> tuple[torch.Tensor, float]:
    """([out, in] view of the tensor the optimizer owns, scalar that the forward multiplies it by).

    Without SN that is `module.weight` and 1. With bounded SN it is the parametrization's
    `original` and min(1, c/σ̂) from the stored power-iteration vectors: reading `module.weight`
    instead would run an extra power-iteration step in training mode and edit a computed copy.
    """
    if not parametrize.is_parametrized(module, "weight"):
        return adapter.out_weight(module), 1.0
    original = module.parametrizations.weight.original
    scale = 1.0
    for p in module.parametrizations.weight:
        if not isinstance(p, BoundedSpectralNorm):
            raise IdpriorError(f"the proximal prior supports only idprior's spectral norm on output projections, found {type(p).__name__}")
        sigma = float(p.sigma(original))
        scale *= min(1.0, float(p.bound) / max(sigma, p.eps))
    return adapter.out_weight(_Stored(original)), scale


# The controller's constants, measured once and not options (docs/history.md): the starting λ (unitless: 0.01 =
# 1% of a mean unit norm per step), the fraction of the phase over which the schedule reaches the target, and
# the controller gain κ (0 would keep λ at LAM0).
LAM0, RAMP, GAIN = 0.01, 0.5, 0.5


class ProximalPrior:
    """Callable as `post_step(model, step, total) -> log terms` for `train.train`, after `opt.step()`.

    The defaults of the options that are config fields are the config's (`config.RECIPE`, `PruneConfig`), so a
    prior built here is the one `idprior prune` runs; `from_config` builds it from a resolved `PruneConfig`.
    `gamma` (`prior_gamma`) is the reweighting exponent; `head_share` (`prior_head_share`) gives heads and
    neurons a λ each; `after_ln` (`norm_after_ln`) measures every branch through the next norm.
    `lam0`, `ramp` (T_r as a fraction of the phase) and `gain` (κ) default to the measured constants `LAM0`,
    `RAMP`, `GAIN` (not config fields; tests set them to isolate one mechanism); `readout` measures the last
    layer where the model's head reads, as scoring does.
    `ema` smooths the activation moments over batches; `eps` bounds the reweighting at (1/eps)^γ; a unit is
    "at the identity" once ‖f_u‖ <= `zero_tol` · F̄_k; `horizon` (a fraction of the phase, under 1 − RAMP so that
    bound units land before the end) is the lead H.
    Once a group's fraction at the identity reaches its share of the target, its units still away from zero
    are no longer pulled (only the zeros stay pinned), so the prior stops at the target instead of overshooting
    it by the units already on their way down.
    `min_keep` (`prune.min_keep`, the selection's per-layer floor): in every sub-layer the ceil(min_keep · n)
    units of largest norm are not pulled, so the prior cannot empty a layer the selection would refill.
    `debias` (`prior_debias`): when a group reaches its share of the target, its units still away from zero get
    back the shrinkage the prior applied to them (`_restore_survivors`).
    """

    @classmethod
    def from_config(cls, model: nn.Module, adapter: Adapter, gates: Gates, p: PruneConfig) -> ProximalPrior:
        """The prior a resolved `config.PruneConfig` asks for (`build_prior`)."""
        return cls(model, adapter, gates, target=p.target, kinds=parse_kinds(p.kinds), measure=p.measure,
                   seq_len=p.flops_seq_len, gamma=p.prior_gamma, head_share=p.prior_head_share,
                   after_ln=p.norm_after_ln, min_keep=p.min_keep, debias=p.prior_debias)

    def __init__(self, model: nn.Module, adapter: Adapter, gates: Gates, *, target: float,
                 kinds: Iterable[str] = PROX_KINDS, measure: str = PruneConfig.measure,
                 seq_len: int = PruneConfig.flops_seq_len, gamma: float = RECIPE["prior_gamma"],
                 head_share: float | None = PruneConfig.prior_head_share, after_ln: bool = RECIPE["norm_after_ln"],
                 min_keep: float = RECIPE["min_keep"], debias: bool = RECIPE["prior_debias"], readout: bool = True,
                 lam0: float = LAM0, ramp: float = RAMP, gain: float = GAIN, ema: float = 0.9, eps: float = 0.1,
                 zero_tol: float = 1e-3, lam_min: float = 1e-5, lam_max: float = 1.0, horizon: float = 0.2):
        self.model, self.adapter = model, adapter
        self.kinds = tuple(k for k in PROX_KINDS if k in tuple(kinds))
        if not self.kinds:
            raise IdpriorError(f"the proximal prior acts on heads and neurons; kinds {tuple(kinds)} have neither")
        self.target, self.measure, self.seq_len = target, measure, seq_len
        self.gamma, self.ramp, self.gain, self.ema, self.eps, self.zero_tol = gamma, ramp, gain, ema, eps, zero_tol
        self.lam_min, self.lam_max, self.horizon = lam_min, lam_max, horizon
        self.opt = None
        if not 0 <= min_keep < 1:
            raise IdpriorError(f"min_keep must be in [0, 1), got {min_keep}; it is the fraction of each layer's units kept")
        self.min_keep = min_keep
        self.debias = debias
        self.shrunk: dict[tuple[str, int], torch.Tensor] = {}  # debias: Π_t α_u(t), what the prior did to each unit
        self.restored: set[str] = set()  # debias: groups whose survivors were restored
        self.spared: dict[tuple[str, int], torch.Tensor] = {}  # units the floor kept from the last step's pull
        self.head_share = head_share if len(self.kinds) == 2 else None
        self.lam = {g: float(lam0) for g in (("head", "neuron") if self.head_share is not None else ("all",))}
        # the whole of the measure, as selection.select counts it (encoder params include the norms)
        self.total = (float(adapter.layer_params()) if measure == "encoder_params"
                      else measure_of(model_cost(adapter), measure, seq_len))
        self.fbar: dict[str, float] = {}  # F̄_k, set at the first step of the phase
        self.ema_m: dict[tuple[str, int], torch.Tensor] = {}  # EMA of per-token moments (float64)
        self.norms: dict[tuple[str, int], torch.Tensor] = {}  # ‖f_u‖ right after the last step
        self.deltas: dict[tuple[str, int], torch.Tensor] = {}  # δ_u of the last step
        self.recorder = ActivationMoments(model, gates, adapter, self.kinds, readout=readout, after_ln=after_ln).attach()
        self.ema_ln: dict[tuple[str, int], float] = {}  # EMA of mean 1/σ_t² after each sub-layer (after_ln)

    # ---- norms and the proximal step ---------------------------------------------------------
    def _sites(self):
        for layer in range(self.adapter.num_layers):
            for kind in self.kinds:
                module = self.adapter.attn_out_proj(layer) if kind == "head" else self.adapter.ffn_out_proj(layer)
                if module is not None:
                    yield kind, layer, module

    def _update_ema(self) -> None:
        rec = self.recorder
        if not rec.moments:
            raise IdpriorError("the proximal prior ran before any training forward (attach it before training)")
        if distributed.world() > 1:
            _all_reduce_moments(rec)  # every rank must shrink the same weights by the same factors
        for key, m in rec.moments.items():
            n = max(1, rec.count(key[1]))
            old = self.ema_m.get(key)
            self.ema_m[key] = m / n if old is None else self.ema * old + (1 - self.ema) * (m / n)
        for key in rec.ln_sq:
            now = rec.ln_scale(key) ** 2
            self.ema_ln[key] = now if key not in self.ema_ln else self.ema * self.ema_ln[key] + (1 - self.ema) * now
        rec.reset()

    def _norm(self, kind: str, layer: int, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖f_u‖ with the current weights [n_units] float64, [out, in] view of the stored weight).

        Under FSDP2 the weight is this rank's rows (`distributed.local_rows`) and the norms are reduced over
        the shards (`unit_sq_norms`), so every rank gets the whole matrix's norms."""
        w, scale = stored_out_weight(self.adapter, module)
        local, group, rows = distributed.local_rows(w)
        wd, m = local.detach().double(), self.ema_m[(kind, layer)]
        sub = SUBLAYER[kind]
        ln = self.recorder.out_norms.get((sub, layer))
        gamma = None
        if ln is not None:  # measured after the LayerNorm: diag(γ) C W, times sqrt(E[1/σ²]) (see scoring)
            gamma = _gamma_rows(ln, wd.shape[0], rows)
            scale *= math.sqrt(self.ema_ln.get((sub, layer), 1.0))
        heads = None
        if kind == "head":
            dh = self.adapter.head_dim
            heads = (*self.recorder.unit_layout(layer, wd.shape[1] // dh), dh)
        sq = unit_sq_norms(wd, m, heads=heads, ln_weight=gamma, centre=isinstance(ln, nn.LayerNorm),
                           rows=rows, group=group)
        return scale * sq.clamp(min=0).sqrt(), w

    def bind_optimizer(self, opt: torch.optim.Optimizer) -> None:
        """Called by `train.train`: the optimizer whose state the step's metric reads."""
        self.opt = opt

    def _adam_scale(self, modules: dict) -> dict[tuple[str, int], torch.Tensor]:
        """Per unit: mean sqrt(v) over its output weights, divided by the mean over units of its kind."""
        raw = {}
        for (kind, layer), module in modules.items():
            param = (module.parametrizations.weight.original if parametrize.is_parametrized(module, "weight")
                     else module.weight)
            v = self.opt.state.get(param, {}).get("exp_avg_sq") if self.opt is not None else None
            if v is None:
                raise IdpriorError("the identity prior needs an Adam-family optimizer state for every output projection "
                                   "(train with AdamW, as idprior prune and the Trainer do)")
            local, group, rows = distributed.local_rows(self.adapter.out_weight(_Stored(v)))  # FSDP2: a row shard
            col = distributed.row_mean(local.detach().double().sqrt(), rows, group)  # [in]
            if kind == "head":
                perm, n_units = self.recorder.unit_layout(layer, col.numel() // self.adapter.head_dim)
                col = col.view(-1, self.adapter.head_dim)[perm.to(col.device)].reshape(n_units, -1).mean(1)  # [U]
            raw[(kind, layer)] = col
        out = {}
        for kind in self.kinds:
            mean = float(torch.cat([h for (k, _), h in raw.items() if k == kind]).mean())
            out |= {key: h / max(mean, 1e-300) for key, h in raw.items() if key[0] == kind}
        return out

    def _shrink(self, kind: str, layer: int, w: torch.Tensor, alpha: torch.Tensor) -> None:
        """w_u ← α_u w_u on the unit's output columns, in place in the stored parameter."""
        if kind == "head":
            owner = self.adapter.head_unit_of_query_heads(layer).to(alpha.device)  # [n_heads] -> unit
            alpha = alpha[owner].repeat_interleave(self.adapter.head_dim)  # [n_heads*dh], one per column
        w = distributed.local_rows(w)[0]  # FSDP2: this rank's rows; α is the same on every rank
        w.mul_(alpha.to(w.dtype)[None, :])  # [out, in] * [in]

    @torch.no_grad()
    def __call__(self, model: nn.Module, step: int, total: int) -> dict:
        self._update_ema()
        modules = {(k, layer): module for k, layer, module in self._sites()}
        current = {key: self._norm(*key, module) for key, module in modules.items()}
        if not self.fbar:
            for kind in self.kinds:
                mean = float(torch.cat([n for (k, _), (n, _) in current.items() if k == kind]).mean())
                if not mean > 0:
                    raise IdpriorError(f"every {kind} unit has a zero or non-finite function norm ({mean}) at the start of the prior phase")
                self.fbar[kind] = mean
        reached = self._reached()
        if self.debias:
            self._restore_survivors(reached, current)
        metric = self._adam_scale(modules)
        for (kind, layer), (norm, w) in current.items():
            fbar, lam = self.fbar[kind], self.lam[self._group(kind)]
            delta = lam * fbar * (fbar / (norm + self.eps * fbar)) ** self.gamma  # δ_u = λ ω_u F̄_k
            delta = delta / metric[(kind, layer)].clamp(min=1e-3).to(delta.device)  # in Adam's metric
            if reached[self._group(kind)]:
                delta = torch.where(norm <= self.zero_tol * fbar, delta, torch.zeros_like(delta))
            if self.min_keep > 0:
                spared = self._floor(norm)
                delta = torch.where(spared, torch.zeros_like(delta), delta)
                self.spared[(kind, layer)] = spared
            alpha = torch.where(norm > delta, 1 - delta / norm.clamp(min=1e-300), torch.zeros_like(norm))
            self._shrink(kind, layer, w, alpha)
            if not bool((alpha > 0).any()):
                _clear_bias(modules[(kind, layer)])
            self.norms[(kind, layer)] = norm * alpha  # = max(0, ‖f_u‖ − δ_u), exactly what the shrink did
            if self.debias:
                self.shrunk[(kind, layer)] = self.shrunk.get((kind, layer), torch.ones_like(alpha)) * alpha
            self.deltas[(kind, layer)] = delta
        fracs = self.fractions()
        lead = self.fractions(self._bound_for_identity(self.horizon * total))
        sched = self.schedule(step, total)
        self.control(lead, sched)
        return self._terms(model, fracs, lead, sched)

    def _restore_survivors(self, reached: dict[str, bool], current: dict) -> None:
        """Debias (`prior_debias`): the step a group's share of the target first sits at the identity, every
        unit of it still away from zero gets back the shrinkage the prior applied to it, w_u ← w_u / Π_t α_u(t).

        Why: the soft-threshold pulls every unit, so the branches that stay end the prior phase shrunk as
        well (on 20ng seed 0, kept output columns at 0.82-0.94 of their starting norm under the default);
        that is the lasso's shrinkage bias, and the relaxed / debiased lasso's answer is to undo it on the
        selected support. Units at zero stay at zero (the invariant gate 0 = removed is untouched); the
        task's own updates in between are rescaled with the unit, and SN still bounds the result.
        """
        for group, done in reached.items():
            if not done or group in self.restored:
                continue
            self.restored.add(group)
            for (kind, layer), (norm, w) in current.items():
                if self._group(kind) != group or (kind, layer) not in self.shrunk:
                    continue
                live = norm > self.zero_tol * self.fbar[kind]
                factor = torch.where(live, 1.0 / self.shrunk[(kind, layer)].clamp(min=1e-12), torch.ones_like(norm))
                self._shrink(kind, layer, w, factor)
                current[(kind, layer)] = (norm * factor, w)
                self.shrunk[(kind, layer)] = torch.ones_like(norm)

    def _floor(self, norm: torch.Tensor) -> torch.Tensor:
        """Mask of the largest units of one sub-layer that `selection.select`'s floor keeps."""
        keep = floor_count(self.min_keep, norm.numel())
        mask = torch.zeros_like(norm, dtype=torch.bool)
        mask[torch.topk(norm, keep).indices] = True
        return mask

    # ---- target and controller ----------------------------------------------------------------
    def _reached(self) -> dict[str, bool]:
        """Per group: the last step left its share of the target at the identity."""
        if not self.norms:
            return {g: False for g in self.lam}
        fracs = self.fractions()
        return {g: fracs[g] >= self.target * self._share(g) for g in self.lam}

    def _group(self, kind: str) -> str:
        return "all" if "all" in self.lam else kind

    def _share(self, group: str) -> float:
        if group == "all":
            return 1.0
        return self.head_share if group == "head" else 1.0 - self.head_share

    def identity_units(self, kind: str | None = None) -> list[Unit]:
        """Units whose norm after the last step is at the identity (<= zero_tol · F̄_k), sorted."""
        out = []
        for (k, layer), n in self.norms.items():
            if kind in (None, k):
                out += [Unit(k, layer, i) for i in (n <= self.zero_tol * self.fbar[k]).nonzero().flatten().tolist()]
        return sorted(out, key=Unit.sort_key)

    def _at_identity(self) -> dict[tuple[str, int], torch.Tensor]:
        return {(k, layer): n <= self.zero_tol * self.fbar[k] for (k, layer), n in self.norms.items()}

    def _bound_for_identity(self, steps: float) -> dict[tuple[str, int], torch.Tensor]:
        """Units at the identity or that the current λ takes there within `steps` steps, were the
        loss not to resist: dn/dt = −λ F̄ (F̄ / (n + εF̄))^γ falls from n to 0 in
        ((n + εF̄)^(γ+1) − (εF̄)^(γ+1)) / ((γ+1) λ F̄^(γ+1)) steps."""
        out = {}
        for (kind, layer), n in self.norms.items():
            fbar, lam, g1 = self.fbar[kind], self.lam[self._group(kind)], self.gamma + 1
            fall = (((n / fbar + self.eps) ** g1 - self.eps**g1) / (g1 * lam))  # in steps
            falls = fall <= steps
            if (kind, layer) in self.spared:
                falls = falls & ~self.spared[(kind, layer)]  # the floor's units are not pulled
            out[(kind, layer)] = (n <= self.zero_tol * fbar) | falls
        return out

    def fractions(self, at: dict[tuple[str, int], torch.Tensor] | None = None) -> dict[str, float]:
        """Fraction of the measure carried by the units flagged in `at` (default: at the identity),
        per controller group ("all", or "head" and "neuron").

        Costs come from `plan.removal_cost` (collapse rule included) per (kind, layer): sub-layers are
        independent, so the fraction is a sum over layers of what removing that many units frees.
        """
        at = self._at_identity() if at is None else at
        per_kind = {kind: 0.0 for kind in self.kinds}
        for (kind, layer), flagged in at.items():
            count = int(flagged.sum())
            if count:
                per_kind[kind] += measure_of(removal_cost(self.adapter, kind, layer, count), self.measure, self.seq_len)
        per_kind = {k: v / self.total for k, v in per_kind.items()}
        return {g: sum(per_kind.values()) if g == "all" else per_kind[g] for g in self.lam}

    def schedule(self, step: int, total: int) -> float:
        """s(t) = target (1 − (1 − t/T_r)³) for t < T_r, then target; t = steps done."""
        t = (step + 1) / max(1.0, self.ramp * total)
        return self.target * (1 - (1 - min(1.0, t)) ** 3)

    def control(self, fracs: dict[str, float], sched: float) -> None:
        """Multiplicative integral control: log λ integrates the error relative to the target."""
        for g in self.lam:
            share = self._share(g)
            err = (sched * share - fracs[g]) / (self.target * max(share, 0.05))
            self.lam[g] = min(self.lam_max, max(self.lam_min, self.lam[g] * math.exp(self.gain * err)))

    def _terms(self, model: nn.Module, fracs: dict[str, float], lead: dict[str, float], sched: float) -> dict:
        terms = {"lambda": sum(self.lam.values()) / len(self.lam), "prior_identity_frac": sum(fracs.values()),
                 "prior_bound_frac": sum(lead.values()), "prior_schedule": sched}
        if "all" not in self.lam:
            terms.update({f"lambda_{g}": v for g, v in self.lam.items()})
        for kind in self.kinds:
            zeros = sum(int((n == 0).sum()) for (k, _), n in self.norms.items() if k == kind)
            # mean δ_u / F̄_k over the units still away from zero (at zero, ω_u sits at its cap)
            deltas = torch.cat([d[n > 0] for (k, _), d in self.deltas.items() if k == kind
                                for n in (self.norms[(k, _)],)])
            terms[f"prior_zero_{kind}"] = float(zeros)
            terms[f"prior_delta_{kind}"] = float(deltas.mean()) / self.fbar[kind] if deltas.numel() else 0.0
        return terms

    # ---- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """λ, F̄, the EMA moments and the norms after the last step (whether a group has reached its share is
        read from them at the next step): what a resumed run needs to continue bit-identically."""
        state: dict = {"lam": dict(self.lam), "fbar": dict(self.fbar)}
        state.update({f"norm.{kind}.{layer}": n for (kind, layer), n in self.norms.items()})
        if self.debias:
            state["restored"] = sorted(self.restored)
            state.update({f"shrunk.{kind}.{layer}": a for (kind, layer), a in self.shrunk.items()})
        if self.ema_ln:
            state["ema_ln"] = {f"{sub}.{layer}": v for (sub, layer), v in self.ema_ln.items()}
        state.update({f"ema.{kind}.{layer}": m for (kind, layer), m in self.ema_m.items()})
        return state

    def load_state_dict(self, state: dict) -> None:
        self.lam = {g: float(v) for g, v in state["lam"].items()}
        self.fbar = {k: float(v) for k, v in state["fbar"].items()}
        self.ema_ln = {(k.split(".")[0], int(k.split(".")[1])): float(v) for k, v in state.get("ema_ln", {}).items()}
        device = next(p for p in self.model.parameters()).device
        self.restored = set(state.get("restored", []))
        self.ema_m, self.shrunk, self.norms = {}, {}, {}
        for name, m in state.items():
            if name.startswith(("ema.", "shrunk.", "norm.")):
                which, kind, layer = name.split(".")
                store = {"ema": self.ema_m, "shrunk": self.shrunk, "norm": self.norms}[which]
                store[(kind, int(layer))] = m.to(device=device, dtype=torch.float64)

    def detach(self) -> None:
        self.recorder.detach()


def unit_sq_norms(w: torch.Tensor, m: torch.Tensor, *, heads: tuple[torch.Tensor, int, int] | None = None,
                  ln_weight: torch.Tensor | None = None, centre: bool = False, rows: int | None = None,
                  group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """Per unit ‖f_u‖² (before the after-LN scale), from rows `w` [d, in] (float64) of the [D, in] output weight.

    heads: (permutation putting each unit's query heads side by side, unit count, head_dim) for head units,
    tr(W_uᵀ W_u M_u) with M_u = m[u]; None for neurons, ‖W[:, j]‖² m_j. ln_weight (γ of these rows) and centre
    (a LayerNorm): the weight the norm after the branch sees, diag(γ) C W as `scoring.seen_after_ln`.
    group: the process group holding the other rows (FSDP2, `distributed.local_rows`), rows = D. Every term
    is a sum over rows, so each rank sums its rows and one all-reduce gives the whole matrix's; the centring
    needs the column mean over all D rows, which is reduced first. Without a group `w` is the whole matrix.
    """
    if centre:
        w = w - distributed.row_mean(w, rows or w.shape[0], group)[None, :]
    if ln_weight is not None:
        w = ln_weight[:, None].to(w.dtype) * w
    if heads is not None:
        perm, n_units, dh = heads
        wu = w.reshape(w.shape[0], -1, dh)[:, perm.to(w.device)].reshape(w.shape[0], n_units, -1)  # [d, U, k*dh]
        sq = (torch.einsum("dui,duj->uij", wu, wu) * m).sum(dim=(1, 2))  # tr(W_uᵀW_u M_u): [U]
    else:
        sq = (w**2).sum(0) * m  # ‖W2[:, j]‖² E[a_j²]: [F]
    return distributed.sum_rows(sq, group)


def _gamma_rows(ln: nn.Module, d: int, rows: int) -> torch.Tensor:
    """γ of the norm after a branch for the `d` of `rows` output-weight rows this rank holds: under FSDP2 the
    norm's weight is sharded like the projection's (same dim, same cut), so its local rows are the ones needed."""
    gamma, _, _ = distributed.local_rows(ln.weight.detach())
    if gamma.shape[0] != d:
        raise IdpriorError(f"the norm after a branch holds {gamma.shape[0]} of its {rows} weights on this rank and "
                           f"the branch's output projection {d} rows: shard both with fully_shard on the same mesh")
    return gamma


def _all_reduce_moments(rec: ActivationMoments) -> None:
    """Sum the batch moments, the LayerNorm input statistics (`after_ln`) and the token counts over ranks
    (same keys on every rank: same model), so that every rank takes the step the global batch asks for."""
    for store in (rec.moments, rec.ln_sq):
        for key in sorted(store):
            torch.distributed.all_reduce(store[key], op=torch.distributed.ReduceOp.SUM)
    device = next(iter(rec.moments.values())).device
    tokens = torch.tensor([float(rec.tokens), float(rec.readout_tokens)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tokens, op=torch.distributed.ReduceOp.SUM)
    rec.tokens, rec.readout_tokens = (int(round(float(t))) for t in tokens)


def build_prior(p: PruneConfig, model: nn.Module, adapter: Adapter) -> tuple[ProximalPrior | None, Gates | None]:
    """(the identity prior, the gates it observes through), attached, for a fine-tune with the resolved prune
    settings `p`; (None, None) when they ask for no prior. The one place the pipeline and `hf.SnipTrainer`
    build it."""
    if not prior_active(p):
        return None, None
    gates = Gates(model, adapter).attach()
    return ProximalPrior.from_config(model, adapter, gates, p), gates
