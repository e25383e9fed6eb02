"""Task metrics, computed as GLUE computes them (scikit-learn and scipy).

- accuracy; f1 = binary F1 of the positive class (label id 1), as GLUE's MRPC/QQP;
- macro_f1 = unweighted mean of per-class F1 over the classes present in labels or predictions
  (scikit-learn's default, so a subsampled evaluation set does not count absent classes as 0);
- matthews = Matthews correlation (CoLA); pearson / spearman (STS-B);
- perplexity = exp(mean token negative log-likelihood), computed by the evaluation loop with
  `perplexity(total_nll, n_tokens)`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from idprior.data.tasks import Task

LOWER_IS_BETTER = frozenset({"perplexity", "loss"})


def main_metric(task: Task) -> str:
    """The metric that selects models and fills the headline of reports."""
    return task.metrics[0]


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def compute_metrics(task: Task, predictions, labels) -> dict[str, float]:
    """Every metric of `task` as a float.

    Classification `predictions` are class ids, or logits/probabilities of shape (n, k) (argmax is
    taken); regression predictions are scores of shape (n,) or (n, 1).
    """
    if task.kind == "lm":
        raise ValueError(
            "language-modelling tasks report perplexity(total_nll, n_tokens), not compute_metrics"
        )
    preds = np.asarray(_to_numpy(predictions))
    gold = np.asarray(_to_numpy(labels))
    if task.kind == "classification" and preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if task.kind == "regression" and preds.ndim == 2 and preds.shape[1] == 1:
        preds = preds[:, 0]
    if preds.shape != gold.shape or preds.ndim != 1:
        raise ValueError(f"predictions {preds.shape} and labels {gold.shape} must be 1-D and of equal length")
    if len(gold) == 0:
        raise ValueError("cannot compute metrics on zero examples")
    if task.kind == "classification":
        preds, gold = preds.astype(np.int64), gold.astype(np.int64)
    else:
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
    return {name: float(_METRICS[name](preds, gold)) for name in task.metrics}


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(total negative log-likelihood / number of predicted tokens); inf on overflow."""
    if n_tokens <= 0:
        raise ValueError("perplexity needs at least one predicted token")
    mean = float(total_nll) / n_tokens
    return math.exp(mean) if mean < 709.0 else math.inf


def _to_numpy(x):
    if hasattr(x, "detach"):  # torch tensors, without importing torch here
        return x.detach().cpu().float().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return x


def _accuracy(preds, gold) -> float:
    return float((preds == gold).mean())


def _f1(preds, gold) -> float:
    from sklearn.metrics import f1_score

    return f1_score(gold, preds, pos_label=1, average="binary", zero_division=0)


def _macro_f1(preds, gold) -> float:
    from sklearn.metrics import f1_score

    return f1_score(gold, preds, average="macro", zero_division=0)


def _matthews(preds, gold) -> float:
    from sklearn.metrics import matthews_corrcoef

    return matthews_corrcoef(gold, preds)


def _correlation(fn):
    def metric(preds, gold) -> float:
        # A constant input has no defined correlation: report nan rather than a warning storm.
        if len(gold) < 2 or np.all(preds == preds[0]) or np.all(gold == gold[0]):
            return math.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(preds, gold)[0]

    return metric


def _pearson(preds, gold) -> float:
    from scipy.stats import pearsonr

    return _correlation(pearsonr)(preds, gold)


def _spearman(preds, gold) -> float:
    from scipy.stats import spearmanr

    return _correlation(spearmanr)(preds, gold)


_METRICS = {
    "accuracy": _accuracy,
    "f1": _f1,
    "macro_f1": _macro_f1,
    "matthews": _matthews,
    "pearson": _pearson,
    "spearman": _spearman,
}
