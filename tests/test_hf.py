"""The Hugging Face Trainer integration: SN attached, prior in compute_loss, folded by finish()."""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from transformers import TrainingArguments

from idprior import spectral
from idprior.hf import SnipTrainer
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


def test_snip_trainer_adds_prior_and_folds(tmp_path):
    model = tiny_bert().train()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = SnipTrainer(model=model, args=args, train_dataset=_Data(), prior_lambda=0.5)
    assert spectral.sn_modules(model)  # SN attached before the optimizer exists
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "snip_prior" in h]
    assert logs and all(h["snip_prior"] > 0 for h in logs)
    model = trainer.finish()
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    q = model.bert.encoder.layer[0].attention.self.query.weight
    assert not torch.equal(q, before["bert.encoder.layer.0.attention.self.query.parametrizations.weight.original"])
