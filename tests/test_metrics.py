"""Metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from idprior.data import get_task, list_tasks
from idprior.pipeline.metrics import compute_metrics, greater_is_better, main_metric, perplexity

BINARY = get_task("cola")  # ("matthews", "accuracy")
PRED = [1, 0, 1, 1, 0, 1]
GOLD = [1, 0, 0, 1, 1, 1]
# TP = 3 (positions 0, 3, 5), TN = 1 (1), FP = 1 (2), FN = 1 (4).


def test_binary_metrics_by_hand():
    assert compute_metrics(BINARY, PRED, GOLD) == pytest.approx(
        {"matthews": (3 * 1 - 1 * 1) / math.sqrt(4 * 4 * 2 * 2), "accuracy": 4 / 6}  # = 0.25
    )
    # F1 of the positive class: precision 3/4, recall 3/4.
    assert compute_metrics(get_task("mrpc"), PRED, GOLD) == pytest.approx({"f1": 0.75, "accuracy": 4 / 6})
    # rt-polarity: accuracy first, then F1.
    assert list(compute_metrics(get_task("rt-polarity"), PRED, GOLD)) == ["accuracy", "f1"]


def test_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    # class 0: P 1/2 R 1/2 F 1/2; class 1: P 2/3 R 1 F 4/5; class 2: P 1 R 1/2 F 2/3.
    expected = (0.5 + 0.8 + 2 / 3) / 3
    result = compute_metrics(get_task("bbc"), pred, gold)
    assert result == pytest.approx({"accuracy": 4 / 6, "macro_f1": expected})


def test_correlations_by_hand():
    stsb = get_task("stsb")
    # x = 1..4, y = 1, 3, 2, 4: deviations (-1.5, -.5, .5, 1.5) and (-1.5, .5, -.5, 1.5); r = 4 / 5.
    assert compute_metrics(stsb, [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(
        {"pearson": 0.8, "spearman": 0.8}
    )
    # y = x^2: ranks agree (spearman 1); pearson = 25 / sqrt(5 * 129).
    assert compute_metrics(stsb, [1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 16.0]) == pytest.approx(
        {"pearson": 25 / math.sqrt(645), "spearman": 1.0}
    )


def test_inputs_logits_tensors_and_column_vectors():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.0, 3.0], [0.2, 0.1]])
    assert compute_metrics(get_task("sst2"), logits, torch.tensor([1, 0, 0, 0])) == {"accuracy": 0.75}
    scores = np.array([[1.0], [2.0], [3.0], [4.0]])
    assert compute_metrics(get_task("stsb"), scores, [1.0, 3.0, 2.0, 4.0])["pearson"] == pytest.approx(0.8)
    assert compute_metrics(
        get_task("stsb"), torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.bfloat16), [1, 2, 3]
    )["spearman"] == pytest.approx(1.0)


def test_degenerate_inputs():
    constant = compute_metrics(get_task("stsb"), [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(constant["pearson"]) and math.isnan(constant["spearman"])
    assert compute_metrics(BINARY, [0, 0, 0], [1, 0, 1])["matthews"] == 0.0
    assert compute_metrics(get_task("mrpc"), [0, 0], [1, 1])["f1"] == 0.0
    with pytest.raises(ValueError, match="equal length"):
        compute_metrics(BINARY, [0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(BINARY, [], [])
    with pytest.raises(ValueError, match="perplexity"):
        compute_metrics(get_task("lm-rt"), [0], [0])


def test_perplexity():
    assert perplexity(4 * math.log(5.0), 4) == pytest.approx(5.0)
    assert perplexity(0.0, 7) == 1.0
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_main_metric_and_direction():
    assert main_metric(get_task("cola")) == "matthews"
    assert main_metric(get_task("stsb")) == "pearson"
    assert main_metric(get_task("mrpc")) == "f1"
    assert main_metric(get_task("lm-20ng")) == "perplexity"
    assert greater_is_better("accuracy") and not greater_is_better("perplexity")
    for name in list_tasks():
        task = get_task(name)
        if task.kind == "lm":
            continue
        gold = [0.0, 1.0, 2.0] if task.kind == "regression" else [0, 1, 1]
        assert list(compute_metrics(task, gold, gold)) == list(task.metrics)
