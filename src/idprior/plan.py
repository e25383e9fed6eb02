"""The pruning plan (what to remove and what that buys) and the measures it is stated in.

Measures, all over the transformer layers only (embeddings and task head excluded):
  encoder_params  every parameter of the layers (LayerNorms included);
  linear_params   weight entries of the layers' linear maps;
  flops           forward FLOPs for one sequence of `seq_len` tokens.
Costs come from the adapter, so a plan's "after" numbers are exact predictions that the surgery
tests check against the real pruned model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from . import io
from .arch.base import Adapter
from .units import Cost, Unit

MEASURE_NAMES = ("encoder_params", "linear_params", "flops")


def measure_of(cost: Cost, measure: str, seq_len: int) -> float:
    if measure == "encoder_params":
        return float(cost.params)
    if measure == "linear_params":
        return float(cost.linear)
    if measure == "flops":
        return float(cost.flops(seq_len))
    raise ValueError(f"unknown measure {measure!r}")


def sublayer_cost(adapter: Adapter, kind: str, layer: int) -> Cost:
    """Cost of a whole present sub-layer ("attn" or "ffn"); zero if already removed."""
    shape = adapter.shape(layer)
    if kind == "attn":
        return adapter.unit_cost("head", layer).scale(adapter.num_head_units(layer)) + adapter.unit_cost("attn", layer) if shape.has_attn else Cost()
    return adapter.unit_cost("neuron", layer).scale(shape.ffn_dim) + adapter.unit_cost("ffn", layer) if shape.has_ffn else Cost()


def model_cost(adapter: Adapter) -> Cost:
    total = Cost()
    for layer in range(adapter.num_layers):
        total = total + sublayer_cost(adapter, "attn", layer) + sublayer_cost(adapter, "ffn", layer)
    return total


def normalize(adapter: Adapter, units: Iterable[Unit]) -> list[Unit]:
    """Apply the collapse rule: every head of a layer -> `attn`, every neuron -> `ffn`; drop units
    inside a removed sub-layer. Sorted, deterministic."""
    units = set(units)
    out: set[Unit] = set()
    for layer in range(adapter.num_layers):
        shape = adapter.shape(layer)
        heads = {u for u in units if u.layer == layer and u.kind == "head"}
        neurons = {u for u in units if u.layer == layer and u.kind == "neuron"}
        if shape.has_attn:
            if Unit("attn", layer) in units or len(heads) >= adapter.num_head_units(layer):
                out.add(Unit("attn", layer))
            else:
                out |= heads
        if shape.has_ffn:
            if Unit("ffn", layer) in units or len(neurons) >= shape.ffn_dim:
                out.add(Unit("ffn", layer))
            else:
                out |= neurons
    return sorted(out, key=Unit.sort_key)


def removed_cost(adapter: Adapter, units: Iterable[Unit]) -> Cost:
    total = Cost()
    for u in normalize(adapter, units):
        if u.kind in ("attn", "ffn"):
            total = total + sublayer_cost(adapter, u.kind, u.layer)
        else:
            total = total + adapter.unit_cost(u.kind, u.layer)
    return total


def measures(adapter: Adapter, units: Iterable[Unit], seq_len: int, total_params: int) -> dict:
    """Every measure before and after removing `units` (exact, from unit costs)."""
    units = list(units)
    full = model_cost(adapter)
    gone = removed_cost(adapter, units)
    before = {
        "encoder_params": adapter.layer_params(),
        "linear_params": full.linear,
        "flops": full.flops(seq_len),
        "total_params": total_params,
    }
    after = {
        "encoder_params": before["encoder_params"] - gone.params,
        "linear_params": full.linear - gone.linear,
        "flops": full.flops(seq_len) - gone.flops(seq_len),
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
    units = normalize(adapter, units)
    rows = []
    for layer in range(adapter.num_layers):
        s = adapter.shape(layer)
        heads_gone = sum(1 for u in units if u.layer == layer and u.kind == "head")
        neurons_gone = sum(1 for u in units if u.layer == layer and u.kind == "neuron")
        attn_gone = Unit("attn", layer) in units or not s.has_attn
        ffn_gone = Unit("ffn", layer) in units or not s.has_ffn
        rows.append({
            "layer": layer,
            "head_units": 0 if attn_gone else adapter.num_head_units(layer) - heads_gone,
            "head_units_before": adapter.num_head_units(layer) if s.has_attn else 0,
            "ffn": 0 if ffn_gone else s.ffn_dim - neurons_gone,
            "ffn_before": s.ffn_dim,
        })
    return rows
