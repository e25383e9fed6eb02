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
    "load": ("model.load", "load"),
    "load_task": ("data", "load_task"),
    "get_task": ("data", "get_task"),
    "list_tasks": ("data", "list_tasks"),
    "get_adapter": ("arch", "get_adapter"),
    "Gates": ("method.gates", "Gates"),
    "score": ("method.scoring", "score"),
    "ProximalPrior": ("method.proximal", "ProximalPrior"),
    "attach_spectral_norm": ("method.spectral", "attach"),
    "fold_spectral_norm": ("method.spectral", "fold"),
    "select": ("method.selection", "select"),
    "PruningPlan": ("method.plan", "PruningPlan"),
    "Unit": ("method.units", "Unit"),
    "apply_plan": ("model.surgery", "apply_plan"),
    "save_pruned": ("model.surgery", "save_pruned"),
    "load_pruned": ("model.surgery", "load_pruned"),
    "export_onnx": ("model.export", "export_onnx"),
    "benchmark": ("pipeline.bench", "benchmark"),
    "train": ("pipeline.train", "train"),
    "evaluate": ("pipeline.evaluate", "evaluate"),
    "prune": ("pipeline.stages", "prune"),
    "finetune": ("pipeline.stages", "finetune"),
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
