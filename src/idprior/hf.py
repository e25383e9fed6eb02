"""SNIP for users of the Hugging Face `Trainer`: the identity prior applied while `train()` runs (and spectral
normalization attached at construction when `sn=True`), everything folded back by `finish()`.

    trainer = SnipTrainer(model=model, args=args, train_dataset=ds, target=0.5)
    trainer.train()                     # drives `target` of the encoder parameters to the identity
    model = trainer.finish()            # detach (and fold SN): a plain model again
    plan = idprior.select(idprior.score(model, batches), idprior.get_adapter(model), target=0.5, mode="prior")
    idprior.apply_plan(model, plan.units)

The settings are `PruneConfig` fields, given as `prune=` and/or keywords (keywords win), with the
config's defaults (read at call time), validation and the model family's measured recipe for fields left at
None (`config.recipe_for`), so the trainer does what `idprior.prune` does with the same settings:
`proximal.ProximalPrior` (built by `proximal.build_prior`, as the pipeline builds it) runs after every
optimizer step from a callback's `on_step_end`; its options are `PRIOR_OPTIONS`; kinds, sn and sn_bound act
too; sn=True, prior=False trains with SN alone. With gradient accumulation the prior's activation moments come from the
last micro-batch of each step. The prior's log terms join the Trainer's logs as `snip_<term>` (snip_lambda,
snip_prior_identity_frac, ...).

Checkpoints: each Trainer checkpoint folder also holds the prior's state (`ProximalPrior.state_dict`: λ, F̄, the
moment averages, the last norms) as snip_prior.safetensors + snip_prior.json, and `train(resume_from_checkpoint=...)`
loads it, so a resumed run continues bit-identically. Under `torchrun --nproc_per_node N` the Trainer's DDP
averages the gradients and the prior sums its activation moments over ranks, so every rank takes the same step.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import io
from .arch import get_adapter
from .config import PRIOR_OPTIONS, PruneConfig, prune_config, recipe_for
from .errors import IdpriorError
from .method import spectral
from .method.proximal import ProximalPrior, build_prior

OPTIONS = ("prior", "kinds", "sn", "sn_bound", *PRIOR_OPTIONS)
PRIOR_STATE = "snip_prior"  # <checkpoint>/snip_prior.safetensors (tensors) + snip_prior.json (plain values)


def save_prior_state(prior: ProximalPrior, folder: str | Path) -> None:
    """The prior's state_dict into `folder` (a Trainer checkpoint), each file written atomically."""
    state = prior.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
    io.write_with(Path(folder) / f"{PRIOR_STATE}.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    io.write_json(Path(folder) / f"{PRIOR_STATE}.json", {k: v for k, v in state.items() if not torch.is_tensor(v)})


def load_prior_state(prior: ProximalPrior, folder: str | Path) -> None:
    folder = Path(folder)
    plain, tensors = folder / f"{PRIOR_STATE}.json", folder / f"{PRIOR_STATE}.safetensors"
    if not plain.is_file() or not tensors.is_file():
        raise IdpriorError(f"checkpoint {folder} holds no state of the identity prior (written by an older idprior, "
                           "or not by SnipTrainer); resume from a checkpoint SnipTrainer wrote, or train afresh")
    prior.load_state_dict({**io.read_json(plain), **load_file(str(tensors))})


def trainer_settings(prune: PruneConfig | None, kwargs: dict) -> tuple[PruneConfig, dict]:
    """(prune settings, the keywords left for `Trainer.__init__`) from SnipTrainer's keywords."""
    own = inspect.signature(Trainer.__init__).parameters
    options = {k: v for k, v in kwargs.items() if k not in own}
    cfg = prune_config(prune, **options)  # unknown names (with a close match) and bad values, one line
    unused = [k for k in options if k not in OPTIONS]
    if unused:
        raise IdpriorError(f"SnipTrainer does not use {', '.join(unused)} (it fine-tunes; selection and surgery "
                           f"options go to idprior.select / apply_plan); its options: {', '.join(OPTIONS)}")
    return cfg, {k: v for k, v in kwargs.items() if k in own}


class ProximalCallback(TrainerCallback):
    """Runs the proximal prior after every optimizer step. The Trainer calls `on_step_end` after
    `optimizer.step()` (and the scheduler step), with `global_step` already counting that step;
    `train.train` passes the steps done before it, so the prior gets `global_step - 1`."""

    def __init__(self, prior: ProximalPrior):
        self.prior, self.terms = prior, {}

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is not None:  # the "adam" metric reads the optimizer's second moments
            self.prior.bind_optimizer(getattr(optimizer, "optimizer", optimizer))  # accelerate's wrapper

    def on_step_end(self, args, state, control, **kwargs):
        with torch.no_grad():
            self.terms = self.prior(self.prior.model, state.global_step - 1, max(1, state.max_steps))

    def on_save(self, args, state, control, **kwargs):
        """Called after the Trainer wrote checkpoint-<global_step>: the prior's state goes beside it."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and folder.is_dir():
            save_prior_state(self.prior, folder)


class SnipTrainer(Trainer):
    """A `Trainer` that fine-tunes with the identity prior (and SN with sn=True; module docstring); `finish()`
    after training."""

    def __init__(self, *args, prune: PruneConfig | None = None, **kwargs):
        cfg, kwargs = trainer_settings(prune, kwargs)
        super().__init__(*args, **kwargs)
        self.snip_adapter = get_adapter(self.model)
        self.snip_config = cfg = recipe_for(cfg, self.snip_adapter.recipe)
        if cfg.sn:  # before the optimizer exists, so that it owns the parametrizations' originals
            spectral.attach(self.model, self.snip_adapter, cfg.sn_bound)
        self.snip_prior: ProximalPrior | None
        self.snip_prior, self.snip_gates = build_prior(cfg, self.model, self.snip_adapter)
        self.snip_callback: ProximalCallback | None = None
        if self.snip_prior is not None:
            self.snip_callback = ProximalCallback(self.snip_prior)
            self.add_callback(self.snip_callback)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; resuming also restores the prior's state from the checkpoint (module docstring)."""
        if resume_from_checkpoint and self.snip_prior is not None:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir) if Path(self.args.output_dir).is_dir() else None
            if folder is not None:  # none: the Trainer says so
                load_prior_state(self.snip_prior, folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with parametrize.cached():  # one power-iteration step per training step
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def log(self, logs: dict, *args, **kwargs) -> None:
        terms = self.snip_callback.terms if self.snip_callback is not None else {}
        if "loss" in logs and terms:  # training logs only; the terms of the step just taken
            logs = {**logs, **{f"snip_{k}": v for k, v in terms.items()}}
        super().log(logs, *args, **kwargs)

    def finish(self):
        """Remove the prior (its callback and hooks) and the gates, fold SN into plain weights; returns the model."""
        if self.snip_callback is not None:
            self.remove_callback(self.snip_callback)
            self.snip_callback = None
        if self.snip_prior is not None:
            self.snip_prior.detach()
            self.snip_gates.detach()
        spectral.fold(self.model)
        return self.model
