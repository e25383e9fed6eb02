"""Baseline pruning methods, each sharing SNIP's selection, surgery and recovery code.

    method = get_method("fisher")
    plan = method.plan(model, adapter, calib_batches, target=0.5, measure="flops", seq_len=128)

`METHODS` maps each name to its class; `get_method(name, **options)` builds one (options:
`selection`, the `select` mode for the unit-ranking methods, with `head_share` for selection
"share"; `min_keep` and `protect`, held-back units as in `select`; layer drops honour `protect`
and ignore `min_keep` and `head_share`).
"""

from __future__ import annotations

from ..errors import IdpriorError
from .base import Method
from .fisher import FisherMethod
from .flap import FlapMethod, WandaSPMethod
from .layerdrop import ShortGPTMethod, TopLayersMethod
from .magnitude import MagnitudeMethod
from .michel import MichelMethod
from .random import RandomMethod

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (RandomMethod, MagnitudeMethod, MichelMethod, FisherMethod, ShortGPTMethod, TopLayersMethod,
                FlapMethod, WandaSPMethod)
}

__all__ = ["METHODS", "Method", "get_method", "resolve_compensation"]


def resolve_compensation(mode: str, method: str) -> str:
    """`prune.compensate` "auto" -> the method's own (`Method.compensate`: "bias" for flap and
    wanda-sp, "none" for SNIP and the other baselines); any other value as given. Here, not in
    compensate.py, which the FLAP baselines import."""
    if mode != "auto":
        return mode
    return getattr(METHODS.get(method), "compensate", "none")


def get_method(name: str, **options) -> Method:
    """The baseline called `name`; IdpriorError listing the known names otherwise."""
    if name not in METHODS:
        raise IdpriorError(f"unknown method {name!r}; use one of {', '.join(METHODS)}")
    return METHODS[name](**options)
