"""idprior: structured pruning of Transformers with SNIP, spectral-normalized identity priors.

SNIP here is our reconstruction of Lin et al., "Pruning Redundant Mappings in Transformer Models
via Spectral-Normalized Identity Prior" (Findings of EMNLP 2020) from the paper's abstract; it is
not Lee et al.'s "SNIP: Single-shot Network Pruning". Public API (imported lazily, so
`import idprior` stays fast):

    load(spec, task)                       model + tokenizer from a local folder / alias
    load_task(name, ...)                   task data (offline tasks, GLUE, user files)
    Gates, score, ProximalPrior            gates, function norms, the identity prior
    attach_spectral_norm, fold_spectral_norm
    select, PruningPlan, Unit              thresholding to a target
    apply_plan, save_pruned, load_pruned   surgery and one-call reload
    export_onnx, benchmark                 deployment and measured speed
    prune, finetune, load_config           the whole pipeline
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load": ("models", "load"),
    "load_task": ("data", "load_task"),
    "get_task": ("data", "get_task"),
    "list_tasks": ("data", "list_tasks"),
    "get_adapter": ("arch", "get_adapter"),
    "Gates": ("gates", "Gates"),
    "score": ("scoring", "score"),
    "ProximalPrior": ("proximal", "ProximalPrior"),
    "attach_spectral_norm": ("spectral", "attach"),
    "fold_spectral_norm": ("spectral", "fold"),
    "select": ("selection", "select"),
    "PruningPlan": ("plan", "PruningPlan"),
    "Unit": ("units", "Unit"),
    "apply_plan": ("surgery", "apply_plan"),
    "save_pruned": ("surgery", "save_pruned"),
    "load_pruned": ("surgery", "load_pruned"),
    "export_onnx": ("export", "export_onnx"),
    "benchmark": ("bench", "benchmark"),
    "train": ("train", "train"),
    "evaluate": ("evaluate", "evaluate"),
    "prune": ("pipeline", "prune"),
    "finetune": ("pipeline", "finetune"),
    "load_config": ("config", "load_config"),
    "RunConfig": ("config", "RunConfig"),
    "IdpriorError": ("errors", "IdpriorError"),
    "SnipTrainer": ("hf", "SnipTrainer"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'idprior' has no attribute {name!r}")


def __dir__():
    return __all__
