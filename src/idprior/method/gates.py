"""Unit gates applied with hooks, so any supported model can be gated without touching its code.

For every layer that still has the branch, the adapter's output projections get
  * a forward pre-hook: attention out-proj input [B, T, n_heads*head_dim] * head gates (each head
    unit's gate expanded to its query heads × head_dim); FFN out-proj input [B, T, ffn] * neuron gates;
  * a forward hook: the projection's output (the branch f(x), bias included) * the sub-layer gate,
    and * 0 when every head (neuron) gate of the layer is 0, mirroring surgery's collapse rule.
A gate of 0 therefore gives exactly the model with that unit removed (up to summation order),
which is what tests/test_arch_surgery.py checks against the physically pruned model. Gates are
plain tensors multiplied in the graph, so callers may `requires_grad_()` them (Michel et al.).

Observers `obs(layer, site, tensor, module)` see the gated tensors, un-detached:
  "heads"   out-proj input   [B, T, n_heads*head_dim]
  "attn"    attention branch [B, T, D]
  "neurons" FFN activations  [B, T, ffn_dim]
  "ffn"     FFN branch       [B, T, D]
`token_mask` ([B, T] bool, set by callers) is only stored here, for observers to read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..arch import Adapter, get_adapter
from ..errors import IdpriorError
from .units import Unit

Observer = Callable[[int, str, torch.Tensor, nn.Module], None]


class Gates:
    """Gates for every unit of `model`; the hooks are attached on construction.

    Build a new `Gates` after surgery: the tensors follow the shapes the model had when built.
    """

    def __init__(self, model: nn.Module, adapter: Adapter | None = None, per_query_head: bool = False):
        self.model = model
        self.adapter = adapter if adapter is not None else get_adapter(model, per_query_head=per_query_head)
        ref = next(p for p in model.parameters() if p.is_floating_point())
        kw = {"dtype": ref.dtype, "device": ref.device}
        n_layers = self.adapter.num_layers
        self.head: list[torch.Tensor] = [torch.ones(self.adapter.num_head_units(i), **kw) for i in range(n_layers)]
        self.neuron: list[torch.Tensor] = [torch.ones(self.adapter.shape(i).ffn_dim, **kw) for i in range(n_layers)]
        self.attn = torch.ones(n_layers, **kw)
        self.ffn = torch.ones(n_layers, **kw)
        # [n_heads] head unit of each query head, to expand unit gates onto the out-proj input
        self._unit_of_q = [self.adapter.head_unit_of_query_heads(i).to(ref.device) for i in range(n_layers)]
        self.observers: list[Observer] = []
        self.token_mask: torch.Tensor | None = None
        self._handles: list = []
        self.attach()

    # ---- gate values ----------------------------------------------------------------------------
    def tensors(self) -> list[torch.Tensor]:
        """Every gate tensor (e.g. to make them require grad or to hand to an optimizer)."""
        return [*self.head, *self.neuron, self.attn, self.ffn]

    def requires_grad_(self, flag: bool = True) -> Gates:
        for t in self.tensors():
            t.requires_grad_(flag)
        return self

    @torch.no_grad()
    def set(self, unit: Unit | str, value: float) -> None:
        """Set one unit's gate (1 keeps the unit, 0 removes it)."""
        unit = Unit.parse(unit) if isinstance(unit, str) else unit
        if not 0 <= unit.layer < self.adapter.num_layers:
            raise IdpriorError(f"unit {unit}: layer {unit.layer} does not exist; the model has {self.adapter.num_layers} layers")
        if unit.kind == "attn":
            self.attn[unit.layer] = value
        elif unit.kind == "ffn":
            self.ffn[unit.layer] = value
        else:
            gates = (self.head if unit.kind == "head" else self.neuron)[unit.layer]
            if not 0 <= unit.index < len(gates):
                raise IdpriorError(f"unit {unit} does not exist: layer {unit.layer} has {len(gates)} {unit.kind} units")
            gates[unit.index] = value

    def apply_units(self, units: Iterable[Unit | str], value: float = 0.0) -> None:
        for unit in units:
            self.set(unit, value)

    @torch.no_grad()
    def reset(self) -> None:
        """All gates back to 1."""
        for t in self.tensors():
            t.fill_(1.0)

    def closed_units(self) -> list[Unit]:
        """Units whose gate is exactly 0, sorted (the plan these gates simulate)."""
        units = [Unit("attn", i) for i in range(len(self.attn)) if self.attn[i] == 0]
        units += [Unit("ffn", i) for i in range(len(self.ffn)) if self.ffn[i] == 0]
        for kind, per_layer in (("head", self.head), ("neuron", self.neuron)):
            for layer, gates in enumerate(per_layer):
                units += [Unit(kind, layer, j) for j in (gates == 0).nonzero().flatten().tolist()]
        return sorted(units, key=Unit.sort_key)

    # ---- hooks ----------------------------------------------------------------------------------
    def attach(self) -> Gates:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        for layer in range(self.adapter.num_layers):
            if (proj := self.adapter.attn_out_proj(layer)) is not None:
                self._handles.append(proj.register_forward_pre_hook(self._heads_hook(layer)))
                self._handles.append(proj.register_forward_hook(self._branch_hook(layer, "attn")))
            if (proj := self.adapter.ffn_out_proj(layer)) is not None:
                self._handles.append(proj.register_forward_pre_hook(self._neurons_hook(layer)))
                self._handles.append(proj.register_forward_hook(self._branch_hook(layer, "ffn")))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> Gates:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _notify(self, layer: int, site: str, tensor: torch.Tensor, module: nn.Module) -> None:
        for observer in self.observers:
            observer(layer, site, tensor, module)

    def _heads_hook(self, layer: int):
        head_dim = self.adapter.head_dim

        def hook(module, args):
            x = args[0]  # [B, T, n_heads*head_dim]
            if _open(self.head[layer]):  # every gate 1 and not trained: nothing to multiply
                self._notify(layer, "heads", x, module)
                return None
            gate = self.head[layer][self._unit_of_q[layer]]  # [n_heads]
            x = x * gate.repeat_interleave(head_dim).to(x.dtype)  # [n_heads*head_dim] broadcast
            self._notify(layer, "heads", x, module)
            return (x, *args[1:])

        return hook

    def _neurons_hook(self, layer: int):
        def hook(module, args):
            if _open(self.neuron[layer]):
                self._notify(layer, "neurons", args[0], module)
                return None
            x = args[0] * self.neuron[layer].to(args[0].dtype)  # [B, T, ffn] * [ffn]
            self._notify(layer, "neurons", x, module)
            return (x, *args[1:])

        return hook

    def _branch_hook(self, layer: int, site: str):
        units = "head" if site == "attn" else "neuron"

        def hook(module, args, output):
            # Looked up per call: callers may swap the tensors. A sub-layer whose units are all
            # closed is removed whole by surgery (the collapse rule), output bias included.
            sub, alive = getattr(self, site), (getattr(self, units)[layer] != 0).any()
            if alive and _open(sub[layer : layer + 1]):
                self._notify(layer, site, output, module)
                return None
            gate = sub[layer] * alive
            output = output * gate.to(output.dtype)  # [B, T, D] * scalar
            self._notify(layer, site, output, module)
            return output

        return hook


def _open(gate: torch.Tensor) -> bool:
    """Every gate in `gate` is 1 and none is being trained: multiplying by them changes nothing (the
    observers and the caller see the very same tensor), so the hooks skip it. Most gated passes are
    observers on an ungated model (the proximal prior's activation moments), where the products
    were an extra pass over every branch's activations forward and backward."""
    return not gate.requires_grad and bool((gate == 1).all())
