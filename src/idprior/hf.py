"""SNIP for users of the Hugging Face `Trainer`: spectral normalization attached at construction,
the identity prior added in `compute_loss`, everything folded back by `finish()`.

    trainer = SnipTrainer(model=model, args=args, train_dataset=ds, prior_lambda=0.1)
    trainer.train()
    trainer.finish()                    # fold SN, remove hooks: a plain model again
    scores = idprior.score(model, batches)
"""

from __future__ import annotations

from torch.nn.utils import parametrize
from transformers import Trainer

from . import spectral
from .arch import get_adapter
from .gates import Gates
from .prior import IdentityPrior
from .units import parse_kinds


class SnipTrainer(Trainer):
    def __init__(self, *args, prior_lambda: float = 0.1, prior_kinds: str = "head,neuron", prior_weight: str = "uniform",
                 prior_warmup: float = 0.1, sn: bool = True, sn_bound: str | float = "init", **kwargs):
        super().__init__(*args, **kwargs)
        self.snip_adapter = get_adapter(self.model)
        if sn:
            spectral.attach(self.model, self.snip_adapter, sn_bound)
        self.snip_gates = Gates(self.model, self.snip_adapter)
        self.snip_prior = IdentityPrior(self.model, self.snip_adapter, self.snip_gates, parse_kinds(prior_kinds),
                                        lam=prior_lambda, weight=prior_weight, warmup=prior_warmup)
        self._snip_terms: dict[str, float] = {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with parametrize.cached():  # one power-iteration step per training step
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
            if model.training:
                extra, terms = self.snip_prior(model, inputs, self.state.global_step, max(1, self.state.max_steps))
                loss = loss + extra.to(loss.device)
                self._snip_terms = terms
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs and self._snip_terms:
            logs = {**logs, "snip_prior": self._snip_terms.get("prior"), "snip_lambda": self._snip_terms.get("lambda")}
        super().log(logs, *args, **kwargs)

    def finish(self):
        """Remove the prior's hooks and fold SN into plain weights; returns the model."""
        self.snip_prior.detach()
        self.snip_gates.detach()
        spectral.fold(self.model)
        return self.model
