"""Thresholding to a target: rank units, remove the lowest until the target is reached.

Modes (how units of different kinds are compared; docs/method.md, "Thresholding to a target"):
  norm             raw function norm, one global ranking;
  norm-per-cost    norm divided by the unit's cost in the chosen measure;
  energy-per-cost  squared norm divided by cost;
  relative         norm divided by its sub-layer's output norm (needs attn/ffn scores);
  share            per-kind rankings, `head_share` of the budget taken from heads, the rest from
                   the other kinds;
  prior            norm divided by the median non-zero norm of its kind: after the proximal prior
                   the units it drove to exactly zero come first, and the rest compare heads and
                   neurons on one relative scale.
The threshold tau is the key of the last unit removed: every unit with a smaller key is removed,
and the target is overshot by at most that one unit. Collapse: the last head of a layer takes the
whole attention sub-layer with it, the last neuron the whole FFN. Ties break by (layer, kind,
index). No plan removes every attention sub-layer or every FFN sub-layer of the model: such a
unit is skipped and the plan says so in `warnings`.

Options for models whose layers must not be gutted (a global ranking on a pre-LN decoder empties
its early FFNs, docs/history.md, "Decoders"): `min_keep`, a fraction of each layer's head
units and of its neurons that always stays (so no sub-layer collapses), and `protect`, layers
never touched. Units they hold back are skipped, like the last sub-layer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from ..arch.base import Adapter
from ..errors import IdpriorError
from .plan import (
    MEMBER,
    SUBLAYER,
    PruningPlan,
    measure_of,
    measure_total,
    measures,
    normalize,
    own_cost,
    structure_after,
    sublayer_costs,
    unit_count,
)
from .units import Unit


def _key_fn(mode: str, scores: dict[Unit, float], cost_of):
    if mode == "norm" or mode == "share":
        return lambda u: scores[u]
    if mode == "norm-per-cost":
        return lambda u: scores[u] / max(cost_of(u), 1e-30)
    if mode == "energy-per-cost":
        return lambda u: scores[u] ** 2 / max(cost_of(u), 1e-30)
    if mode == "prior":
        med = {k: statistics.median([v for u, v in scores.items() if u.kind == k and v > 0] or [1.0])
               for k in {u.kind for u in scores}}
        return lambda u: scores[u] / max(med[u.kind], 1e-30)
    if mode == "relative":
        def rel(u: Unit) -> float:
            ref_kind = "attn" if u.kind in ("head", "attn") else "ffn"
            ref = scores.get(Unit(ref_kind, u.layer))
            if ref is None:
                raise IdpriorError("selection 'relative' needs the sub-layer scores (attn:L, ffn:L) in scores.json; rescore")
            return scores[u] / max(ref, 1e-30)
        return rel
    raise IdpriorError(f"unknown selection mode {mode!r}")


def protected_layers(num_layers: int, first: int = 0, last: int = 0) -> frozenset[int]:
    """Indices of the first `first` and the last `last` layers."""
    return frozenset(range(min(first, num_layers))) | frozenset(range(max(0, num_layers - last), num_layers))


def floor_count(min_keep: float, n: int) -> int:
    """Units of an n-unit sub-layer that `min_keep` always keeps: ceil(min_keep * n), so at least one
    when min_keep > 0 (nothing collapses); 1e-9 because 0.3 * 10 is 3.0000000000000004. The proximal
    prior spares the same number."""
    return math.ceil(min_keep * n - 1e-9) if min_keep > 0 and n else 0


class _State:
    """Which units are gone so far, with the protection rules; costs and collapse come from `plan`."""

    def __init__(self, adapter: Adapter, measure: str, seq_len: int, min_keep: float = 0.0,
                 protect: Iterable[int] = ()):
        self.adapter, self.measure, self.seq_len = adapter, measure, seq_len
        self.costs = {sub: [sublayer_costs(adapter, sub, i) for i in range(adapter.num_layers)] for sub in MEMBER}
        self.left = {sub: [c.n for c in costs] for sub, costs in self.costs.items()}  # units left per layer
        self.floor = {sub: [floor_count(min_keep, n) for n in left] for sub, left in self.left.items()}
        self.protect = frozenset(protect)
        self.taken = {sub: [0] * adapter.num_layers for sub in MEMBER}  # head units / neurons taken per layer
        self.removed: list[Unit] = []
        self.amount = 0.0
        self.warnings: list[str] = []

    def _m(self, cost) -> float:
        return measure_of(cost, self.measure, self.seq_len)

    def blocked(self, u: Unit) -> str | None:
        """Why `u` cannot be taken now ("gone", "protected", "min_keep", "last"), or None."""
        sub, layer = SUBLAYER[u.kind], u.layer
        left = self.left[sub]
        if left[layer] == 0:
            return "gone"
        if layer in self.protect:
            return "protected"
        if self.floor[sub][layer] and (u.kind == sub or left[layer] - 1 < self.floor[sub][layer]):
            return "min_keep"
        if self.costs[sub][layer].collapses(u.kind, self.taken[sub][layer] + 1) and sum(1 for n in left if n > 0) == 1:
            return "last"  # would remove the model's last attention (FFN) sub-layer
        return None

    def gain(self, u: Unit) -> float | None:
        """Measure removed by taking `u` now; None if it is blocked (see `blocked`)."""
        if self.blocked(u) is not None:
            return None
        sub, layer = SUBLAYER[u.kind], u.layer
        taken, costs = self.taken[sub][layer], self.costs[sub][layer]
        return self._m(costs.removal(u.kind, taken + 1)) - self._m(costs.removal(MEMBER[sub], taken))

    def take(self, u: Unit, gain: float) -> None:
        self.removed.append(u)
        self.amount += gain
        sub = SUBLAYER[u.kind]
        if u.kind == sub:
            self.left[sub][u.layer] = 0
        else:
            self.left[sub][u.layer] -= 1
            self.taken[sub][u.layer] += 1


def _take_below(state: _State, order: list[Unit], key, tau: float) -> float:
    """Every unit whose key is under `tau`, in order (the collapse and protection rules permitting); returns tau."""
    for u in order:
        if key(u) >= tau:
            break
        g = state.gain(u)
        if g is not None:
            state.take(u, g)
    return tau


def _take_budget(state: _State, order: list[Unit], key, budget: float, mode: str,
                 head_share: float | None) -> float | None:
    """Greedy in key order until `budget` is removed; mode "share" first fills `head_share` of it from
    heads, the rest from the other kinds, and finishes from everything left if a pool ran dry.
    Returns the key of the last unit taken."""
    if mode != "share":
        return _greedy(state, order, key, budget)
    if head_share is None:
        raise IdpriorError("selection 'share' needs head_share (the fraction of the budget taken from heads)")
    heads = [u for u in order if u.kind in ("head", "attn")]
    others = [u for u in order if u.kind not in ("head", "attn")]
    last_key = _greedy(state, heads, key, head_share * budget)
    last_key = _greedy(state, others, key, budget) or last_key
    if state.amount < budget:  # a pool ran dry: finish from everything left
        last_key = _greedy(state, order, key, budget) or last_key
    return last_key


def _warn_kept_last(state: _State, order: list[Unit]) -> None:
    """A warning for each unit kind the collapse rule kept (the last attention / FFN sub-layer)."""
    taken = set(state.removed)  # a set: `in` on the list made this quadratic (minutes for SmolLM2's 46k neurons)
    skipped = [u for u in order[: len(state.removed) + 1] if u not in taken and state.blocked(u) == "last"]
    if any(u.kind in ("head", "attn") for u in skipped):
        state.warnings.append("kept the model's last attention sub-layer (a plan may not remove all attention)")
    if any(u.kind in ("neuron", "ffn") for u in skipped):
        state.warnings.append("kept the model's last FFN sub-layer (a plan may not remove every FFN)")


def select(
    scores: dict[Unit, float],
    adapter: Adapter,
    *,
    target: float | None = None,
    tau: float | None = None,
    measure: str = "encoder_params",
    seq_len: int = 128,
    mode: str = "norm",
    kinds: Iterable[str] = ("head", "neuron"),
    head_share: float | None = None,
    total_params: int | None = None,
    method: str = "snip",
    min_keep: float = 0.0,
    protect: Iterable[int] = (),
) -> PruningPlan:
    """Choose the units to remove so that at least `target` of `measure` goes (or all below `tau`);
    `min_keep` and `protect` (layer indices) hold units back (module docstring)."""
    if not 0 <= min_keep < 1:
        raise IdpriorError(f"min_keep must be in [0, 1), got {min_keep}; it is the fraction of each layer's units kept")
    if (target is None) == (tau is None):
        raise IdpriorError("give exactly one of target (a fraction to remove) or tau (a raw threshold)")
    if target is not None and not 0 <= target < 1:
        raise IdpriorError(f"target must be in [0, 1), got {target}; it is the fraction of {measure} to remove")
    kinds = tuple(kinds)
    counts = {(sub, i): unit_count(adapter, sub, i) for sub in MEMBER for i in range(adapter.num_layers)}
    cands = [u for u in scores if u.kind in kinds and _present(counts, u)]
    if not cands:
        raise IdpriorError(f"no scored units of kinds {','.join(kinds)} in this model; check --kinds")

    def cost_of(u: Unit) -> float:
        return measure_of(own_cost(adapter, u.kind, u.layer), measure, seq_len)

    key = _key_fn(mode, scores, cost_of)
    order = sorted(cands, key=lambda u: (key(u), *u.sort_key()))
    total = measure_total(adapter, measure, seq_len)
    state = _State(adapter, measure, seq_len, min_keep, protect)
    if tau is not None:
        last_key = _take_below(state, order, key, tau)
    elif target > 0:
        last_key = _take_budget(state, order, key, target * total, mode, head_share)
        if state.amount < target * total:
            held = " or holding back what prune.min_keep / protect_first / protect_last keep" if (
                min_keep or state.protect) else ""
            raise IdpriorError(
                f"target {target:.0%} of {measure} is out of reach with kinds {','.join(kinds)} "
                f"(at most {state.amount / total:.1%} can go without removing every attention or FFN sub-layer{held}); "
                "lower --target or add kinds"
            )
    else:
        last_key = None
    _warn_kept_last(state, order)
    units = normalize(adapter, state.removed)
    total_params = total_params if total_params is not None else sum(p.numel() for p in adapter.model.parameters())
    return PruningPlan(
        units=units, method=method, selection=mode, target=target, measure=measure, tau=last_key,
        measures=measures(adapter, units, seq_len, total_params), structure=structure_after(adapter, units),
        warnings=state.warnings,
    )


def _present(counts: dict[tuple[str, int], int], u: Unit) -> bool:
    """The model has `u` now (a scored unit may be gone after an earlier round's surgery);
    `counts[(sub, layer)]` is `unit_count`."""
    n = counts.get((SUBLAYER[u.kind], u.layer), 0)
    return n > 0 and (u.kind in MEMBER or u.index < n)


def _greedy(state: _State, order: list[Unit], key, budget: float) -> float | None:
    last = None
    for u in order:
        if state.amount >= budget:
            break
        g = state.gain(u)
        if g is None:
            continue
        state.take(u, g)
        last = key(u)
    return last

