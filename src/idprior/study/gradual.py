"""Study arm of the quality grid (issue 32): gradual against one-shot removal of the same units.

`fisher-gradual` asks whether the identity-driving phase itself can beat a one-shot cut, whoever chooses
the units. At the start of its phase Fisher scores the model it starts from and plans the cut at the
cell's target (`start_plan.json` in the fine-tune folder); the proximal prior then drives exactly those
units to the identity over the phase (no SN, nothing else pulled), and the cell removes them: the units at
the identity, which are the plan's when the prior got them all there. The cell cuts the start plan itself,
so a unit the prior did not bring down is cut one-shot; the row counts those (`chosen_at_identity` of
`chosen_units`). Its control is the ordinary `fisher` arm: a plain phase of the same length, Fisher's
one-shot cut at its end, the same recovery.

Not a user option: only the grid harness (`quality.py`) builds it, for a method named `fisher-gradual`.
"""

from __future__ import annotations

import math
import shutil

import torch
from torch import nn

from ..arch.base import Adapter
from ..method.gates import Gates
from ..method.plan import PruningPlan
from ..method.proximal import ProximalPrior
from ..method.units import parse_kinds

NAME = "fisher-gradual"


class ChosenUnitsPrior(ProximalPrior):
    """The proximal prior restricted to the units of `plan`: only they are pulled, and its target and head
    share are the plan's own (the fractions of the measure its heads and neurons carry, counted as the prior
    counts them), so each group reaches its share exactly when all its chosen units are at the identity.

    No reweighting by default (gamma 0): it exists to make the free prior choose small units; here the units
    are chosen, and with the default gamma 3 a chosen unit larger than its kind's mean is pulled so weakly
    that the task holds it up (tiny BERT: 3 of 96 chosen neurons at 2-3x the mean norm never fell). The cap
    on λ is raised for the same reason: the last chosen units may need λ above the free prior's 1."""

    def __init__(self, model: nn.Module, adapter: Adapter, gates: Gates, plan: PruningPlan, *, gamma: float = 0.0,
                 lam_max: float = 10.0, **options):
        super().__init__(model, adapter, gates, target=plan.target or 0.5, head_share=0.5, min_keep=0.0, gamma=gamma,
                         lam_max=lam_max, **options)
        self.chosen = chosen_masks(plan, adapter, self.kinds)
        share = self.fractions(self.chosen)
        self.target = share["head"] + share["neuron"] if self.head_share is not None else share["all"]
        if not self.target > 0:
            raise ValueError("the plan removes none of the kinds the prior acts on")
        if self.head_share is not None:
            self.head_share = share["head"] / self.target

    def _adam_scale(self, modules: dict) -> dict[tuple[str, int], torch.Tensor]:
        """The step of each unit is divided by this scale (Adam's metric); an infinite one is no step, so the
        units outside the plan are never pulled."""
        scale = super()._adam_scale(modules)
        return {key: torch.where(self.chosen[key].to(s.device), s, torch.full_like(s, math.inf))
                for key, s in scale.items()}

    def _bound_for_identity(self, steps: float) -> dict[tuple[str, int], torch.Tensor]:
        """No lead: the controller follows the units at the identity. The lead exists so that the free prior
        does not overshoot its target by the units already falling; here no unit outside the plan can fall,
        and a lead that counts the plan's last units (which the loss holds up) as falling would stop raising
        λ before they get there."""
        return self._at_identity()


def chosen_masks(plan: PruningPlan, adapter: Adapter, kinds) -> dict[tuple[str, int], torch.Tensor]:
    """{(kind, layer): [units] bool} of the plan's heads and neurons; a whole sub-layer (the collapse rule's
    "attn:L" / "ffn:L") marks every unit of it."""
    masks = {}
    for layer in range(adapter.num_layers):
        if "head" in kinds:
            masks[("head", layer)] = torch.zeros(adapter.num_head_units(layer), dtype=torch.bool)
        if "neuron" in kinds:
            masks[("neuron", layer)] = torch.zeros(adapter.shape(layer).ffn_dim, dtype=torch.bool)
    for u in plan.units:
        kind = {"attn": "head", "ffn": "neuron"}.get(u.kind, u.kind)
        if (kind, u.layer) in masks:
            masks[(kind, u.layer)][slice(None) if u.index is None else u.index] = True
    return masks


def stage_finetune(run) -> dict:
    """The arm's phase (in place of `pipeline.stage_finetune`): Fisher's plan on the starting model, then the
    phase with `ChosenUnitsPrior` on those units; no SN (the arm isolates the prior's gradual removal)."""
    from ..arch import get_adapter
    from ..baselines import get_method
    from ..method.selection import protected_layers
    from ..model.surgery import save_pruned
    from ..pipeline.evaluate import evaluate
    from ..pipeline.metrics import greater_is_better, main_metric
    from ..pipeline.stages import calibration_batches
    from ..pipeline.train import AfterStep, train

    cfg, p = run.cfg, run.cfg.prune
    model, tok = run.load_model(cfg.model.name)
    adapter = get_adapter(model, per_query_head=cfg.model.per_query_head)
    fisher = get_method("fisher", min_keep=p.min_keep,
                        protect=protected_layers(adapter.num_layers, p.protect_first, p.protect_last))
    plan = fisher.plan(model, adapter, calibration_batches(run, tok), target=p.target, measure=p.measure,
                       seq_len=p.flops_seq_len, kinds=parse_kinds(p.kinds), seed=cfg.seed)
    plan.save(run.path("start_plan.json"))
    model.zero_grad(set_to_none=True)  # Fisher's backward passes leave gradients behind
    gates = Gates(model, adapter).attach()
    prior = ChosenUnitsPrior(model, adapter, gates, plan, after_ln=p.norm_after_ln, measure=p.measure,
                             seq_len=p.flops_seq_len, kinds=parse_kinds(p.kinds), debias=p.prior_debias)
    metric, eval_fn = main_metric(run.task), None
    if cfg.train.eval_each_epoch:
        validation = run.loader("validation", tok, train=False)
        eval_fn = lambda m: evaluate(m, run.task, validation, desc="eval validation")  # noqa: E731
    result = train(model, run.loader("train", tok, train=True), cfg.train, seed=cfg.seed,
                   eval_fn=eval_fn, main_metric=metric,
                   higher_is_better=greater_is_better(metric), hooks=[AfterStep(prior)],
                   ckpt_dir=run.path("ckpt_finetune"), resume=run.resume, desc="finetune (fisher-gradual)",
                   log_path=run.path("train_log.jsonl"))
    at_identity = {str(u) for u in prior.identity_units()}
    prior.detach()
    gates.detach()
    save_pruned(model, tok, run.path("finetuned"))
    shutil.rmtree(run.path("ckpt_finetune"), ignore_errors=True)
    chosen = {f"{k}:{layer}:{i}" for (k, layer), m in prior.chosen.items() for i in m.nonzero().flatten().tolist()}
    return {"training": "identity prior on Fisher's units (study arm)", "history": result.history,
            "best_epoch": result.best_epoch, "steps": result.steps, "chosen_units": len(chosen),
            "chosen_at_identity": len(chosen & at_identity), "others_at_identity": len(at_identity - chosen),
            "prior_target": prior.target, "prior_head_share": prior.head_share}


def stage_select(run) -> dict:
    """The cell's cut (in place of `pipeline.stage_select`): Fisher's plan from the start of the phase, kept
    in the fine-tune folder the cell links."""
    plan = PruningPlan.load(run.path("finetuned").resolve().parent / "start_plan.json")
    plan.save(run.path("plan.json"))
    return {"removed": plan.counts(), "removed_fraction": plan.measures["removed_fraction"]}


def cell_overrides() -> dict:
    """The arm's prune settings (dotted): a prior phase without SN (variant "prior"), SNIP's scoring of the
    result, no per-layer floor (Fisher's plan has none); the cut is `stage_select`'s."""
    return {"prune.method": "snip", "prune.sn": False, "prune.prior": True, "prune.selection": "prior",
            "prune.min_keep": 0.0}


def overlap(ft_dir, cell_plan: dict) -> dict | None:
    """How many of Fisher's start units the cell removed (its plan.json), and how many others (a check:
    `stage_select` cuts exactly the start plan)."""
    path = ft_dir / "start_plan.json"
    if not path.is_file():
        return None
    start = PruningPlan.load(path)
    removed = {str(u) for u in PruningPlan.from_dict(cell_plan).units}
    chosen = {str(u) for u in start.units}
    return {"start_units": len(chosen), "removed_of_start": len(chosen & removed), "removed_others": len(removed - chosen),
            "start_removed_fraction": start.measures.get("removed_fraction")}

