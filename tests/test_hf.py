"""The Hugging Face Trainer integration: SN attached, the proximal prior after each optimizer step, its terms
logged, everything folded back by finish()."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.utils import parametrize
from transformers import TrainingArguments

from idprior.arch import get_adapter
from idprior.config import PruneConfig, recipe_for
from idprior.errors import IdpriorError
from idprior.hf import SnipTrainer
from idprior.method import spectral
from idprior.method.proximal import RAMP
from idprior.method.scoring import score
from idprior.method.selection import select
from idprior.model.surgery import apply_plan
from tiny_models import tiny_bert


class _Data(torch.utils.data.Dataset):
    def __init__(self, n: int = 16):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 100, (n, 10), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": self.labels[i]}


def _args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=steps, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)


def _batch() -> dict:
    data = _Data(8)
    return {"input_ids": data.ids, "attention_mask": torch.ones_like(data.ids)}


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_snip_trainer_with_sn_alone_trains_and_folds(tmp_path):
    """sn=True, prior=False: SN alone (attached before the optimizer exists, so it trains the originals), no prior
    callback, no prior terms in the logs; finish() folds SN into plain, trained weights."""
    model = tiny_bert().train()
    trainer = SnipTrainer(model=model, args=_args(tmp_path, 3), train_dataset=_Data(), sn=True, prior=False)
    assert spectral.sn_modules(model)  # SN attached before the optimizer exists
    assert trainer.snip_prior is None and trainer.snip_callback is None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert not any(k.startswith("snip_") for h in trainer.state.log_history for k in h)
    model = trainer.finish()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(q, before["bert.encoder.layer.0.attention.self.query.parametrizations.weight.original"])


def test_snip_trainer_proximal_drives_units_to_the_identity(tmp_path):
    """The default prior, with the config's defaults: units reach exactly zero during train(), the
    fraction is logged, finish() changes nothing but the form, and the zeros prune losslessly."""
    model = tiny_bert().train()
    hooks = _hooks(model)
    trainer = SnipTrainer(model=model, args=_args(tmp_path, 8), train_dataset=_Data(), target=0.5)
    prior = trainer.snip_prior
    trainer.train()
    assert prior.opt is not None  # bound at on_train_begin: the default "adam" metric reads it
    logs = [h for h in trainer.state.log_history if "snip_prior_identity_frac" in h]
    assert len(logs) == 8 and "snip_lambda" in logs[-1]
    assert 0 < logs[-1]["snip_prior_identity_frac"] <= 0.5 + 0.1
    # steps counted as train.train counts them (the first is step 0), the ramp reaches the target
    assert logs[0]["snip_prior_schedule"] == pytest.approx(prior.schedule(0, 8))
    assert logs[0]["snip_prior_schedule"] < logs[-1]["snip_prior_schedule"] == 0.5
    zeros = prior.identity_units()
    assert zeros and logs[-1]["snip_prior_identity_frac"] == pytest.approx(prior.fractions()["head"] + prior.fractions()["neuron"])

    model.eval()
    with torch.no_grad():
        out = model(**_batch()).logits
    model = trainer.finish()
    assert not any(parametrize.is_parametrized(m) for m in model.modules()) and _hooks(model) == hooks
    assert not trainer.snip_callback and all(type(c).__name__ != "ProximalCallback" for c in trainer.callback_handler.callbacks)
    with torch.no_grad():
        assert torch.allclose(model(**_batch()).logits, out, atol=1e-5)

    scores = score(model, [_batch()], kinds=("head", "neuron"))
    mean = sum(scores.values()) / len(scores)
    assert all(scores[u] <= 1e-6 * mean for u in zeros)  # exactly removable, measured independently
    pruned = copy.deepcopy(model)
    apply_plan(pruned, zeros)  # removing the units at the identity changes nothing
    with torch.no_grad():
        assert torch.allclose(pruned(**_batch()).logits, out, atol=1e-5)
    adapter = get_adapter(model)
    plan = select(scores, adapter, target=0.5, mode="prior")
    assert set(zeros) <= set(plan.units) or logs[-1]["snip_prior_identity_frac"] >= 0.5  # zeros go first
    n_params = sum(p.numel() for p in model.parameters())
    apply_plan(model, plan.units)
    assert sum(p.numel() for p in model.parameters()) < n_params
    assert model(**_batch()).logits.shape == out.shape


@pytest.mark.parametrize("options, words", [
    ({"prior_gamma": 9.0}, "prior_gamma"),
    ({"target": 1.5}, "target"),
    ({"prior_gama": 2.0}, "prior_gamma"),  # a typo: the close match is named
    ({"prior_lambda": 0.5}, "prior_lambda"),  # an option of the removed loss prior
    ({"selection": "norm"}, "select"),  # a prune field the trainer does not use
])
def test_snip_trainer_refuses_bad_options_in_one_line(tmp_path, options, words):
    with pytest.raises(IdpriorError) as e:
        SnipTrainer(model=tiny_bert(), args=_args(tmp_path, 1), train_dataset=_Data(), **options)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_snip_trainer_takes_the_config_defaults_and_overrides(tmp_path):
    """With no settings the trainer's prior is the one `idprior prune` runs on this family (the resolved
    config: the encoder recipe); `prune=` and keywords (keywords win) override it."""
    want = recipe_for(PruneConfig(), get_adapter(tiny_bert()).recipe)
    trainer = SnipTrainer(model=tiny_bert(), args=_args(tmp_path, 1), train_dataset=_Data())
    prior = trainer.snip_prior
    assert (prior.target, prior.gamma, prior.head_share, prior.min_keep, prior.debias, prior.ramp) == (
        want.target, want.prior_gamma, want.prior_head_share, want.min_keep, want.prior_debias, RAMP)
    assert trainer.snip_config.sn is False and not spectral.sn_modules(trainer.model)  # SN only when asked for
    base = PruneConfig(target=0.3, prior_gamma=1.0)
    trainer = SnipTrainer(model=tiny_bert(), args=_args(tmp_path, 1), train_dataset=_Data(), prune=base, prior_gamma=2.0)
    assert (trainer.snip_prior.target, trainer.snip_prior.gamma) == (0.3, 2.0)  # keywords over prune=
    assert base.prior_gamma == 1.0  # the caller's config is not modified
    trainer = SnipTrainer(model=tiny_bert(), args=_args(tmp_path, 1), train_dataset=_Data(), min_keep=0.25,
                          prior_debias=True)
    assert (trainer.snip_prior.min_keep, trainer.snip_prior.debias) == (0.25, True)  # the prior's floor and debias
