"""Prunable units and their costs.

A unit is one residual branch that can be removed: a head (or a GQA key/value group), a whole
attention sub-layer, a whole feed-forward sub-layer, or one FFN neuron. Units are plain frozen
dataclasses with a stable string form (`head:3:5`, `neuron:2:100`, `attn:4`, `ffn:1`) used in
every JSON artefact, and they sort by (layer, kind order, index) so plans are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IdpriorError

KINDS = ("head", "attn", "ffn", "neuron")
_KIND_ORDER = {k: i for i, k in enumerate(KINDS)}


@dataclass(frozen=True)
class Unit:
    kind: str
    layer: int
    index: int | None = None  # head / neuron index inside the layer; None for attn / ffn

    def __post_init__(self):
        if self.kind not in KINDS:
            raise IdpriorError(f"unknown unit kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if (self.index is None) != (self.kind in ("attn", "ffn")):
            raise IdpriorError(f"unit {self.kind} needs {'no' if self.kind in ('attn', 'ffn') else 'an'} index")

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}" if self.index is None else f"{self.kind}:{self.layer}:{self.index}"

    @classmethod
    def parse(cls, text: str) -> Unit:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise IdpriorError(f"bad unit {text!r}; write kind:layer or kind:layer:index, e.g. head:3:5")
        try:
            nums = [int(p) for p in parts[1:]]
        except ValueError:
            raise IdpriorError(f"bad unit {text!r}; layer and index must be integers") from None
        return cls(parts[0], nums[0], nums[1] if len(nums) == 2 else None)

    def sort_key(self) -> tuple[int, int, int]:
        return (self.layer, _KIND_ORDER[self.kind], -1 if self.index is None else self.index)


@dataclass(frozen=True)
class Cost:
    """What a unit owns: all parameters, the weight entries of its linear maps, and its query heads.

    FLOPs follow from these at a sequence length T: every linear weight entry costs 2 FLOPs per
    token, and every query head costs 4·T·head_dim per token for scores and weighted values.
    """

    params: int = 0
    linear: int = 0
    q_heads: int = 0
    head_dim: int = 0

    def flops(self, seq_len: int) -> int:
        """FLOPs for one sequence of length `seq_len`."""
        return 2 * seq_len * self.linear + 4 * seq_len * seq_len * self.head_dim * self.q_heads

    def __add__(self, other: Cost) -> Cost:
        hd = self.head_dim or other.head_dim
        return Cost(self.params + other.params, self.linear + other.linear, self.q_heads + other.q_heads, hd)

    def scale(self, n: int) -> Cost:
        return Cost(self.params * n, self.linear * n, self.q_heads * n, self.head_dim)


def parse_kinds(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """`"head,ffn"` -> ("head", "ffn"), validated, in canonical order."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s.strip() for s in items if s.strip()]
    bad = [s for s in items if s not in KINDS]
    if bad or not items:
        raise IdpriorError(f"bad --kinds {text!r}; use a comma list of {', '.join(KINDS)}")
    return tuple(k for k in KINDS if k in items)
