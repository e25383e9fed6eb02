"""Bounded spectral normalization: W <- W * min(1, c / sigma(W)).

Plain spectral normalization divides by sigma and so changes a pretrained model at step 0. The
bounded form leaves a matrix alone while its spectral norm stays under the bound c, and rescales
it onto the bound otherwise. With `bound="init"` c is the matrix's own sigma at load time: the
pretrained function is unchanged at step 0 and no weight can grow past its pretrained spectral
norm during fine-tuning. sigma comes from one power-iteration step per training forward with
persistent u, v (as in Miyato et al., 2018). Implemented as a `torch.nn.utils.parametrize`
parametrization, so it is folded into plain weights with `fold()` before surgery and export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..arch.base import Adapter


class BoundedSpectralNorm(nn.Module):
    """Parametrization of one weight; `transpose` for Conv1D weights stored [in, out]."""

    def __init__(self, weight: torch.Tensor, bound: float | None = None, transpose: bool = False,
                 init_iters: int = 30, eps: float = 1e-12):
        super().__init__()
        self.transpose = transpose
        self.eps = eps
        w = self._mat(weight.detach()).float()  # [out, in]
        u = F.normalize(torch.randn(w.shape[0], generator=torch.Generator().manual_seed(0)), dim=0, eps=eps)
        v = F.normalize(w.t() @ u, dim=0, eps=eps)
        for _ in range(init_iters):
            u = F.normalize(w @ v, dim=0, eps=eps)
            v = F.normalize(w.t() @ u, dim=0, eps=eps)
        sigma_est = float(u @ w @ v)
        sigma = float(torch.linalg.matrix_norm(w, ord=2)) if bound is None else float(bound)
        # the estimate never exceeds the true sigma in exact arithmetic; the max absorbs rounding so that
        # bound="init" leaves the weight bit-identical at step 0
        self.register_buffer("bound", torch.tensor(max(sigma, sigma_est) if bound is None else sigma))
        self.register_buffer("u", u.to(weight.dtype))
        self.register_buffer("v", v.to(weight.dtype))
        self.clipped = False  # whether the last forward rescaled the weight onto the bound (SN binding)
        self.ratio = 1.0  # sigma / bound of the weight the last forward saw (> 1: clipped; logged by `sn_stats`)

    def _mat(self, w: torch.Tensor) -> torch.Tensor:
        return w.t() if self.transpose else w

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """Set u, v to the exact top singular vectors of the current weight (training takes only
        one power-iteration step per forward, which can lag behind fast-moving weights)."""
        U, _, Vh = torch.linalg.svd(self._mat(weight).float(), full_matrices=False)
        self.u.copy_(U[:, 0].to(self.u.dtype))
        self.v.copy_(Vh[0].to(self.v.dtype))

    def sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """Differentiable estimate u^T W v with the stored vectors (no update)."""
        return self.u @ self._mat(weight) @ self.v

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        w = self._mat(weight)
        if self.training:
            with torch.no_grad():  # one power-iteration step per training forward
                v = F.normalize(w.t() @ self.u, dim=0, eps=self.eps)
                u = F.normalize(w @ v, dim=0, eps=self.eps)
                self.u.copy_(u)
                self.v.copy_(v)
        with torch.no_grad():
            est = self.u @ w @ self.v
            self.clipped = bool(est > self.bound)
            self.ratio = float(est / self.bound)
        if not self.clipped:
            # under the bound SN is the identity: the weight itself, not a scaled copy (the same values
            # and gradients as `weight * 1`, without a copy of every matrix per forward and its backward)
            return weight
        sigma = self.u.clone() @ w @ self.v.clone()  # clones: later in-place updates must not touch the graph
        return weight * (self.bound / sigma.clamp(min=self.eps))


def attach(model: nn.Module, adapter: Adapter, bound: str | float = "init") -> int:
    """Register bounded SN on every Q, K, V, O, FFN-in and FFN-out weight; returns how many."""
    fixed = None if bound == "init" else float(bound)
    n = 0
    for layer in range(adapter.num_layers):
        for module, kind in adapter.sn_targets(layer):
            if parametrize.is_parametrized(module, "weight"):
                continue
            sn = BoundedSpectralNorm(module.weight, fixed, transpose=(kind == "conv1d"))
            sn.to(module.weight.device)
            parametrize.register_parametrization(module, "weight", sn, unsafe=True)
            n += 1
    return n


def fold(model: nn.Module) -> int:
    """Replace every parametrized weight by its normalized value, with sigma estimates converged
    first so that the folded weights really stay under their bounds."""
    was_training = model.training
    model.eval()
    for module, sn in sn_modules(model):
        sn.refresh(module.parametrizations.weight.original)
    n = 0
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
                n += 1
    model.train(was_training)
    return n


def sn_modules(model: nn.Module) -> list[tuple[nn.Module, BoundedSpectralNorm]]:
    out = []
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations["weight"]:
                if isinstance(p, BoundedSpectralNorm):
                    out.append((module, p))
    return out


def sn_stats(model: nn.Module) -> dict[str, float]:
    """Where SN binds, as the last forward saw it: the fraction of SN matrices rescaled onto their bound
    and the mean / max of sigma / bound over them (> 1 at a clipped matrix); {} without SN. Read from
    what every forward records, so logging it each training step costs nothing."""
    mods = [sn for _, sn in sn_modules(model)]
    if not mods:
        return {}
    ratios = [sn.ratio for sn in mods]
    return {"sn_clip_frac": sum(sn.clipped for sn in mods) / len(mods), "sn_ratio_mean": sum(ratios) / len(ratios),
            "sn_ratio_max": max(ratios)}
