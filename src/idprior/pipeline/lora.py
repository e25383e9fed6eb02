"""LoRA recovery (`--recover lora`): train low-rank adapters on the pruned model's linear layers instead of
every weight, then merge them in.

Full recovery keeps AdamW state for every weight (about three times the model in memory besides the weights);
LoRA keeps it for the adapters only, which is what lets a large decoder recover on the memory that holds it.
The adapters are merged before pruned/ is saved (`merge`), so pruned/ is a plain pruned model: no adapter keys,
the surgery model's parameter names and shapes, loaded like any idprior folder. peft is imported here only,
and only when LoRA recovery runs.

Targets are resolved here, not by peft's "all-linear": the linear layers (nn.Linear, transformers' Conv1D) of
the Transformer body only, so a classifier head is left out as peft leaves out the LM head, and the same rule
checks `--lora-targets` before a run starts (`preflight.check_lora`, on the model built on the meta device).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..config import ALL_LINEAR, LoraConfig
from ..errors import IdpriorError

LINEAR_TYPES = (nn.Linear, Conv1D)


def body_linears(model: nn.Module) -> dict[str, nn.Module]:
    """{full module name: module} of the linear layers in the model's Transformer body (`base_model`: without the
    task head, lm_head / classifier / score), in module order."""
    body = getattr(model, "base_model", model)
    inside = {id(m) for m in body.modules()}
    return {name: m for name, m in model.named_modules() if id(m) in inside and isinstance(m, LINEAR_TYPES)}


def _matches(name: str, target: str) -> bool:
    """peft's rule for a list of target_modules: the name itself or a dotted suffix of it."""
    return name == target or name.endswith("." + target)


def target_problem(model: nn.Module, targets: str) -> str | None:
    """The one-line error for `lora.targets` on `model` (a name no body linear layer has), or None."""
    names = list(body_linears(model))
    if not names:
        return f"--recover lora: {type(model).__name__} has no linear layers to adapt; use --recover full"
    if targets.strip() == ALL_LINEAR:
        return None
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in wanted if not any(_matches(n, t) for n in names)]
    if not unknown:
        return None
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    return (f"--lora-targets: {', '.join(unknown)} names no linear layer of the model's body; give {ALL_LINEAR} "
            f"or a comma list of {', '.join(leaves)}")


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """Full names of the body linear layers `targets` selects (IdpriorError when a name matches none)."""
    problem = target_problem(model, targets)
    if problem:
        raise IdpriorError(problem)
    names = list(body_linears(model))
    if targets.strip() == ALL_LINEAR:
        return names
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    return [n for n in names if any(_matches(n, t) for t in wanted)]


def wrap(model: nn.Module, cfg: LoraConfig, seed: int):
    """`model` with LoRA adapters on the targeted layers (a peft `PeftModel`; every other weight frozen, so the
    training loop's optimizer gets the adapters alone). Adapter initialisation is seeded with `seed`, so a
    recovery started again (--resume before its first checkpoint) starts from the same adapters."""
    import peft

    names = target_modules(model, cfg.targets)
    conv1d = any(isinstance(model.get_submodule(n), Conv1D) for n in names)  # GPT-2 stores weights [in, out]
    config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names,
                             bias="none", fan_in_fan_out=conv1d)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def merge(model) -> nn.Module:
    """The base model with the adapters added into its weights (W + alpha/r B A), adapter modules removed."""
    return model.merge_and_unload()


def trainable(model: nn.Module) -> int:
    """Parameters the optimizer updates."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
