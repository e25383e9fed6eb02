"""The pruning plan (what to remove and what that buys) and the measures it is stated in.

Measures, all over the transformer layers only (embeddings and task head excluded):
  encoder_params  every parameter of the layers (LayerNorms included);
  linear_params   weight entries of the layers' linear maps;
  flops           forward FLOPs for one sequence of `seq_len` tokens.
Costs come from the adapter, so a plan's "after" numbers are exact predictions that the surgery
tests check against the real pruned model.

This module is the one home of the rules that selection, surgery, preflight, the pipeline and the
baselines must agree on: the collapse rule (`SublayerCosts`, `layer_removals`), what a removal
frees (`removal_cost`, `removed_cost`, `unit_costs`) and the measure totals that targets are
fractions of (`measure_total`, `reachable_fraction`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import io
from ..arch.base import Adapter
from ..errors import IdpriorError
from .units import Cost, Unit

MEASURE_NAMES = ("encoder_params", "linear_params", "flops")
SUBLAYER = {"head": "attn", "attn": "attn", "neuron": "ffn", "ffn": "ffn"}  # the sub-layer a unit belongs to
MEMBER = {"attn": "head", "ffn": "neuron"}  # the units a sub-layer is made of


def measure_of(cost: Cost, measure: str, seq_len: int) -> float:
    if measure == "encoder_params":
        return float(cost.params)
    if measure == "linear_params":
        return float(cost.linear)
    if measure == "flops":
        return float(cost.flops(seq_len))
    raise ValueError(f"unknown measure {measure!r}")


# ---- the collapse rule and what a removal frees ---------------------------------------------------
def unit_count(adapter: Adapter, sublayer: str, layer: int) -> int:
    """Head units ("attn") or neurons ("ffn") the layer has now; 0 once that sub-layer is gone."""
    shape = adapter.shape(layer)
    if sublayer == "attn":
        return adapter.num_head_units(layer) if shape.has_attn else 0
    return shape.ffn_dim


@dataclass(frozen=True)
class SublayerCosts:
    """One sub-layer's costs, read from the adapter once; `removal` is the collapse rule on counts."""

    sub: str  # "attn" or "ffn"
    n: int  # head units / neurons it has now (0: already gone)
    member: Cost  # one head unit / neuron
    unowned: Cost  # what no unit owns (e.g. the output bias); goes with the whole sub-layer

    def collapses(self, kind: str, count: int = 1) -> bool:
        """The collapse rule: removing `count` units of `kind` takes the whole sub-layer when none of its
        heads (neurons) would be left, so no zero-width Linear ever exists; `attn`/`ffn` always do."""
        return kind == self.sub or count >= self.n

    def removal(self, kind: str, count: int = 1) -> Cost:
        """Cost freed by removing `count` units of `kind`, collapse included; zero once the sub-layer is gone."""
        if self.n == 0:
            return Cost()
        if self.collapses(kind, count):
            return self.member.scale(self.n) + self.unowned
        return self.member.scale(count)


def sublayer_costs(adapter: Adapter, sub: str, layer: int) -> SublayerCosts:
    """The `SublayerCosts` of `layer`'s "attn" or "ffn" as it is now."""
    n = unit_count(adapter, sub, layer)
    if n == 0:
        return SublayerCosts(sub, 0, Cost(), Cost())
    return SublayerCosts(sub, n, adapter.unit_cost(MEMBER[sub], layer), adapter.unit_cost(sub, layer))


def collapses(adapter: Adapter, kind: str, layer: int, count: int = 1) -> bool:
    """`SublayerCosts.collapses` for `layer` as it is now."""
    return sublayer_costs(adapter, SUBLAYER[kind], layer).collapses(kind, count)


def removal_cost(adapter: Adapter, kind: str, layer: int, count: int = 1) -> Cost:
    """Cost freed by removing `count` units of `kind` from `layer` as it is now (`SublayerCosts.removal`)."""
    return sublayer_costs(adapter, SUBLAYER[kind], layer).removal(kind, count)


def sublayer_cost(adapter: Adapter, kind: str, layer: int) -> Cost:
    """Cost of a whole present sub-layer ("attn" or "ffn"); zero if already removed."""
    return removal_cost(adapter, kind, layer)


def own_cost(adapter: Adapter, kind: str, layer: int) -> Cost:
    """What one unit owns by itself (no collapse): a head's or neuron's share, or a whole sub-layer.
    The cost that cost-aware rankings and cost-weighted priors divide or weight by."""
    return sublayer_cost(adapter, kind, layer) if kind == SUBLAYER[kind] else adapter.unit_cost(kind, layer)


def unit_costs(adapter: Adapter, kinds: Iterable[str], measure: str = "encoder_params",
               seq_len: int = 128) -> dict[tuple[str, int], tuple[int, float]]:
    """{(kind, layer): (number of units, `measure` of one unit's `own_cost`)} for every present
    sub-layer, layer by layer, kinds in the given order (a whole sub-layer counts as one unit)."""
    kinds = tuple(kinds)
    out: dict[tuple[str, int], tuple[int, float]] = {}
    for layer in range(adapter.num_layers):
        for kind in kinds:
            n = unit_count(adapter, SUBLAYER[kind], layer)
            if n:
                out[(kind, layer)] = (1 if kind == SUBLAYER[kind] else n,
                                      measure_of(own_cost(adapter, kind, layer), measure, seq_len))
    return out


def model_cost(adapter: Adapter) -> Cost:
    total = Cost()
    for layer in range(adapter.num_layers):
        total = total + sublayer_cost(adapter, "attn", layer) + sublayer_cost(adapter, "ffn", layer)
    return total


def measure_totals(adapter: Adapter, seq_len: int) -> dict[str, int]:
    """Every measure of the model as it is now: what targets and removed fractions are fractions of.
    encoder_params is read from the modules (it includes LayerNorms that no unit owns)."""
    full = model_cost(adapter)
    return {"encoder_params": adapter.layer_params(), "linear_params": full.linear, "flops": full.flops(seq_len)}


def measure_total(adapter: Adapter, measure: str, seq_len: int) -> float:
    """One entry of `measure_totals`."""
    if measure not in MEASURE_NAMES:
        raise ValueError(f"unknown measure {measure!r}")
    return float(measure_totals(adapter, seq_len)[measure])


def reachable_fraction(adapter: Adapter, kinds: Iterable[str], measure: str, seq_len: int) -> float:
    """The largest fraction of `measure` a plan of `kinds` can remove: one attention and one FFN
    sub-layer always stay, shrunk to one head unit (neuron) when that kind may go."""
    kinds = set(kinds)
    removable = 0.0
    for sub, member in MEMBER.items():
        layers = [i for i in range(adapter.num_layers) if unit_count(adapter, sub, i)]
        if not layers or not ({sub, member} & kinds):
            continue
        full = [measure_of(sublayer_cost(adapter, sub, i), measure, seq_len) for i in layers]
        if member in kinds:  # the last sub-layer may shrink to one unit
            gone = [measure_of(removal_cost(adapter, member, i, unit_count(adapter, sub, i) - 1), measure, seq_len)
                    for i in layers]
            keep = [f - g for f, g in zip(full, gone)]
        else:
            keep = full
        removable += sum(full) - min(keep)
    total = measure_total(adapter, measure, seq_len)
    return removable / total if total else 0.0


@dataclass
class LayerRemoval:
    """What a plan removes from one layer, collapse applied: whole sub-layers, else indices."""

    attn: bool = False
    ffn: bool = False
    heads: set[int] = field(default_factory=set)
    neurons: set[int] = field(default_factory=set)


def layer_removals(adapter: Adapter, units: Iterable[Unit | str], *, strict: bool = False) -> dict[int, LayerRemoval]:
    """Group `units` per layer and apply the collapse rule; a unit of a sub-layer that is already gone
    is dropped. `strict` (surgery) raises IdpriorError on a unit the model does not have; otherwise
    units of missing layers are ignored."""
    out: dict[int, LayerRemoval] = {}
    num_layers = adapter.num_layers
    counts = {(sub, i): unit_count(adapter, sub, i) for sub in MEMBER for i in range(num_layers)}
    for unit in units:
        unit = Unit.parse(unit) if isinstance(unit, str) else unit
        if not 0 <= unit.layer < num_layers:
            if strict:
                raise IdpriorError(f"unit {unit}: layer {unit.layer} does not exist; the model has {num_layers} layers")
            continue
        r = out.setdefault(unit.layer, LayerRemoval())
        if unit.kind in MEMBER:
            setattr(r, unit.kind, True)
            continue
        count = counts[(SUBLAYER[unit.kind], unit.layer)]
        if strict and not 0 <= unit.index < count:
            raise IdpriorError(
                f"unit {unit} does not exist: layer {unit.layer} now has {count} {unit.kind} units; "
                "make the plan from the model you prune"
            )
        (r.heads if unit.kind == "head" else r.neurons).add(unit.index)
    for layer, r in out.items():
        for sub, indices in (("attn", r.heads), ("ffn", r.neurons)):
            if not counts[(sub, layer)]:
                setattr(r, sub, False)
                indices.clear()
            elif getattr(r, sub) or collapses(adapter, MEMBER[sub], layer, len(indices)):
                setattr(r, sub, True)
                indices.clear()
    return out


def normalize(adapter: Adapter, units: Iterable[Unit | str]) -> list[Unit]:
    """The plan's units as stored: collapse applied, units inside a removed sub-layer dropped. Sorted."""
    out: list[Unit] = []
    for layer, r in layer_removals(adapter, units).items():
        out += [Unit(sub, layer) for sub in ("attn", "ffn") if getattr(r, sub)]
        out += [Unit("head", layer, i) for i in r.heads] + [Unit("neuron", layer, i) for i in r.neurons]
    return sorted(out, key=Unit.sort_key)


def removed_cost(adapter: Adapter, units: Iterable[Unit | str], *, strict: bool = False) -> Cost:
    """Total cost that removing `units` frees (what `surgery.apply_plan` takes out, exactly)."""
    total = Cost()
    for layer, r in layer_removals(adapter, units, strict=strict).items():
        total = total + (removal_cost(adapter, "attn", layer) if r.attn else removal_cost(adapter, "head", layer, len(r.heads)))
        total = total + (removal_cost(adapter, "ffn", layer) if r.ffn else removal_cost(adapter, "neuron", layer, len(r.neurons)))
    return total


def measures(adapter: Adapter, units: Iterable[Unit], seq_len: int, total_params: int) -> dict:
    """Every measure before and after removing `units` (exact, from unit costs)."""
    gone = removed_cost(adapter, units)
    before = {**measure_totals(adapter, seq_len), "total_params": total_params}
    after = {
        "encoder_params": before["encoder_params"] - gone.params,
        "linear_params": before["linear_params"] - gone.linear,
        "flops": before["flops"] - gone.flops(seq_len),
        "total_params": total_params - gone.params,
    }
    removed = {k: (1 - after[k] / before[k]) if before[k] else 0.0 for k in before}
    return {"seq_len": seq_len, "before": before, "after": after, "removed_fraction": removed}


@dataclass
class PruningPlan:
    units: list[Unit]  # normalized (collapse applied), sorted
    method: str = "snip"
    selection: str = "norm"
    target: float | None = None
    measure: str = "encoder_params"
    tau: float | None = None
    measures: dict = field(default_factory=dict)
    structure: list[dict] = field(default_factory=list)  # per layer after pruning: heads / kv_heads / ffn
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {k: 0 for k in ("head", "neuron", "attn", "ffn")}
        for u in self.units:
            out[u.kind] += 1
        return out

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "selection": self.selection,
            "target": self.target,
            "measure": self.measure,
            "tau": self.tau,
            "counts": self.counts(),
            "measures": self.measures,
            "structure": self.structure,
            "warnings": self.warnings,
            "units": [str(u) for u in self.units],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PruningPlan:
        return cls(
            units=[Unit.parse(s) for s in d["units"]],
            method=d.get("method", "snip"),
            selection=d.get("selection", "norm"),
            target=d.get("target"),
            measure=d.get("measure", "encoder_params"),
            tau=d.get("tau"),
            measures=d.get("measures", {}),
            structure=d.get("structure", []),
            warnings=d.get("warnings", []),
        )

    def save(self, path: str | Path) -> None:
        io.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PruningPlan:
        return cls.from_dict(io.read_json(path))


def structure_after(adapter: Adapter, units: Iterable[Unit]) -> list[dict]:
    """Per layer: head units and FFN neurons before and after removing `units`."""
    removals = layer_removals(adapter, units)
    rows = []
    for layer in range(adapter.num_layers):
        r = removals.get(layer, LayerRemoval())
        heads, ffn = unit_count(adapter, "attn", layer), unit_count(adapter, "ffn", layer)
        rows.append({
            "layer": layer,
            "head_units": 0 if r.attn else heads - len(r.heads),
            "head_units_before": heads,
            "ffn": 0 if r.ffn else ffn - len(r.neurons),
            "ffn_before": ffn,
        })
    return rows
