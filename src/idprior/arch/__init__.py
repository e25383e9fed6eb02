"""Model-family adapters, looked up by `config.model_type`."""

from __future__ import annotations

from torch import nn

from ..errors import IdpriorError
from .base import OUT_BIAS_KEY, STRUCTURE_KEY, Adapter, LayerShape
from .bert import BertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter

ADAPTERS: tuple[type[Adapter], ...] = (BertAdapter, GPT2Adapter, LlamaAdapter)

__all__ = ["ADAPTERS", "OUT_BIAS_KEY", "STRUCTURE_KEY", "Adapter", "LayerShape", "get_adapter", "recipe_of", "supported_model_types"]


def supported_model_types() -> list[str]:
    """Every `config.model_type` idprior can prune, sorted."""
    return sorted(t for cls in ADAPTERS for t in cls.model_types)


def recipe_of(model_type: str | None) -> dict[str, dict]:
    """The measured recipe of a model family (`Adapter.recipe`); {} for an unknown type."""
    return next((cls.recipe for cls in ADAPTERS if model_type in cls.model_types), {})


def get_adapter(model: nn.Module, per_query_head: bool = False) -> Adapter:
    """The adapter for `model`'s family (bare `*Model` or any task head built on it)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model, per_query_head=per_query_head)
    raise IdpriorError(
        f"model_type {model_type!r} is not supported; use a model of type {', '.join(supported_model_types())}"
    )
