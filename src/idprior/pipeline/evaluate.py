"""Evaluation: task metrics for classification/regression, perplexity for language modelling, and
greedy sample generations (to compare a dense and a pruned decoder by eye)."""

from __future__ import annotations

import inspect
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from .metrics import compute_metrics


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict(model: torch.nn.Module, loader, desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader, in eval mode."""
    was_training = model.training
    model.eval()
    device = _device(model)
    logits, labels = [], []
    for batch in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
        logits.append(model(**inputs).logits.float().cpu())
        labels.append(batch["labels"])
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


LOGITS_BUDGET = 64 * 2**20
"""Bytes of float32 logits `lm_nll` lets one forward pass produce: a batch whose [B, T, V] logits would be larger
runs in sub-batches of rows (the same sums; a 128k vocabulary at 2,048 tokens is 1 GB per row, so one row).
The logits are copied to float32 and log-softmaxed, so a pass holds about three times this; at 256 MB the
evaluation of SmolLM2 (25 MB of logits per 128-token row) peaked at 2.9x its float32 weights."""


@torch.no_grad()
def lm_nll(model: torch.nn.Module, loader, desc: str = "perplexity") -> tuple[float, int]:
    """Summed next-token negative log-likelihood and the number of predicted tokens. The batch's logits and
    their log-softmax are its largest tensors, so each forward pass is limited to `LOGITS_BUDGET`."""
    was_training = model.training
    model.eval()
    device = _device(model)
    total, count = 0.0, 0
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    for whole in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True):
        seq = whole["input_ids"].shape[1]
        rows = max(1, LOGITS_BUDGET // max(1, seq * vocab * 4))  # rows whose float32 logits fit the budget
        for start in range(0, whole["input_ids"].shape[0], rows):
            batch = {k: v[start:start + rows].to(device) for k, v in whole.items()}
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, **_no_cache(model)).logits.float()
            labels = batch["labels"][:, 1:]  # [B, T-1]: token t predicts t+1
            mask = labels != -100
            if "attention_mask" in batch:
                mask &= batch["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
            ).view_as(labels)
            del logits
            total += float((nll * mask).sum())
            count += int(mask.sum())
    model.train(was_training)
    return total, count


def _no_cache(model: torch.nn.Module) -> dict:
    """use_cache=False for decoders: a perplexity pass never reuses the KV cache it would build."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


SAMPLE_PROMPTS = ("the movie is", "this film is a", "the acting was", "i would not recommend")
"""Fixed prompts for `generate_samples` (lower case, like the rt-polarity / 20ng texts)."""


@torch.no_grad()
def generate_samples(model: torch.nn.Module, tokenizer, prompts=SAMPLE_PROMPTS, max_new_tokens: int = 24) -> list[dict]:
    """Greedy continuation of each prompt with the KV cache, one prompt at a time (no padding).

    Fixed prompts and greedy decoding make dense and pruned outputs comparable run to run; the
    model's own generation defaults (sampling, temperature) are ignored on purpose.
    """
    from transformers import GenerationConfig

    was_training = model.training
    model.eval()
    device = _device(model)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                               eos_token_id=eos, pad_token_id=pad)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)  # [1, T]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
        new = out[0, ids.shape[1]:]  # [new tokens]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
                        "new_tokens": int(new.numel())})
    model.train(was_training)
    return samples


def evaluate(model: torch.nn.Module, task, loader, desc: str = "evaluate") -> dict[str, float]:
    """The task's metrics on one split (loader built by `data.collate`)."""
    return evaluate_with_predictions(model, task, loader, desc)[0]


def evaluate_with_predictions(model: torch.nn.Module, task, loader,
                              desc: str = "evaluate") -> tuple[dict[str, float], dict[str, np.ndarray] | None]:
    """Metrics plus the per-example outputs behind them, in loader order, so that two models scored
    on the same examples can be compared example by example (paired statistics).

    Classification: {"pred": int16 class ids, "label": int16, "gold_logprob": float32 log p(gold)};
    regression: {"pred": float32, "label": float32}; language modelling: None (perplexity only).
    """
    if task.kind == "lm":
        total, count = lm_nll(model, loader, desc)
        return {"perplexity": math.exp(total / max(1, count)), "nll": total / max(1, count), "tokens": count}, None
    logits, labels = predict(model, loader, desc)
    if task.kind == "regression":
        preds = logits[:, 0]
        per = {"pred": preds.astype(np.float32), "label": labels.astype(np.float32)}
    else:
        preds = logits.argmax(-1)
        logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()  # [N, K]
        gold = labels.astype(np.int64)
        per = {"pred": preds.astype(np.int16), "label": gold.astype(np.int16),
               "gold_logprob": logp[np.arange(len(gold)), gold].astype(np.float32)}
    return compute_metrics(task, preds, labels), per


def save_predictions(path, predictions: dict[str, dict[str, np.ndarray]]) -> None:
    """{name: per-example arrays} -> one safetensors file with keys "name/field" (written atomically)."""
    from safetensors.numpy import save_file

    from .. import io

    flat = {f"{name}/{k}": np.ascontiguousarray(v) for name, arrays in predictions.items() if arrays for k, v in arrays.items()}
    io.write_with(path, lambda tmp: save_file(flat, str(tmp)))


def load_predictions(path) -> dict[str, dict[str, np.ndarray]]:
    """Inverse of `save_predictions`."""
    from safetensors.numpy import load_file

    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(str(path)).items():
        name, field = key.rsplit("/", 1)
        out.setdefault(name, {})[field] = value
    return out
