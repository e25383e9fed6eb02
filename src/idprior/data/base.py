"""What a task is (`Task`, `TaskData`) and how its splits are made; the task loaders (offline.py,
glue.py, custom.py) and the registry (tasks.py) build on it.

Every task yields `TaskData` with the splits "train", "validation" and "test" (MNLI adds
"test_mismatched"). Examples are plain dicts: `{"text": str, "label": int}` (classification),
`{"text": str, "text_pair": str, "label": ...}` (pair tasks), `{"text": str, "label": float}`
(regression) or `{"text": str}` (language modelling).

Splits are a property of the data set, not of a run: they are made with the fixed seed
`SPLIT_SEED`, so every machine and every `--seed` sees the same train/validation/test examples.
Only `max_train` subsampling follows the run's `seed`; `max_eval` subsampling uses a fixed seed so
that runs with different seeds are scored on the same evaluation examples.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

SPLIT_SEED = 20200917
"""Seed of every data-set split; fixed so that splits never depend on the run's `--seed`."""

EVAL_SUBSET_SEED = 1234
"""Seed of `max_eval` subsampling; fixed so that every run is scored on the same examples."""

KINDS = ("classification", "regression", "lm")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" | "regression" | "lm"
    labels: tuple[str, ...]  # label names in id order; () for regression / lm
    metrics: tuple[str, ...]  # the first is the main metric
    text_fields: tuple[str, ...]  # ("text",) or ("text", "text_pair")
    description: str

    @property
    def num_labels(self) -> int:
        """Size of the model's output: 1 for regression, 0 for language modelling."""
        if self.kind == "regression":
            return 1
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return "text_pair" in self.text_fields


@dataclass
class TaskData:
    task: Task
    splits: dict[str, list[dict]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: len(examples) for name, examples in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, int]:
        """Examples per label name (classification only), in label-id order."""
        counts = Counter(ex["label"] for ex in self.splits[split])
        return {name: counts.get(i, 0) for i, name in enumerate(self.task.labels)}


SINGLE = ("text",)  # `Task.text_fields` of a single-text task
PAIR = ("text", "text_pair")  # ... and of a pair task


# ----------------------------------------------------------------------------- splitting


def subsample(data: TaskData, *, max_train: int | None, max_eval: int | None, seed: int) -> TaskData:
    """At most `max_train` training and `max_eval` examples per evaluation split, stratified by class."""
    stratify = data.task.kind == "classification"
    splits = {}
    for name, examples in data.splits.items():
        limit, split_seed = (max_train, seed) if name == "train" else (max_eval, EVAL_SUBSET_SEED)
        if limit is not None and limit < len(examples):
            keys = [ex["label"] for ex in examples] if stratify else None
            picked = stratified_sample(keys, len(examples), limit, random.Random(split_seed))
            examples = [examples[i] for i in picked]
        splits[name] = examples
    return TaskData(data.task, splits)


def stratified_sample(keys: Sequence | None, n: int, k: int, rng: random.Random) -> list[int]:
    """Sorted indices of `k` of `n` items; per-key counts proportional to the key frequencies.

    Quotas use largest remainders in integer arithmetic (ties to the smaller key), so the result
    depends only on the keys, `k` and the rng seed. `keys=None` samples uniformly.
    """
    if keys is None:
        keys = [0] * n
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    order = sorted(groups)
    quota = {g: k * len(groups[g]) // n for g in order}
    by_remainder = sorted(order, key=lambda g: -(k * len(groups[g]) % n))  # stable: ties keep key order
    for g in by_remainder[: k - sum(quota.values())]:
        quota[g] += 1
    picked: list[int] = []
    for g in order:
        picked.extend(rng.sample(groups[g], quota[g]))
    return sorted(picked)


def carve(
    examples: list[dict], k: int, *, stratify: bool, seed: int = SPLIT_SEED
) -> tuple[list[dict], list[dict]]:
    """Split off `k` examples chosen with `seed`: returns (rest, carved), both in the input order."""
    keys = [ex["label"] for ex in examples] if stratify else None
    chosen = set(stratified_sample(keys, len(examples), k, random.Random(seed)))
    rest = [ex for i, ex in enumerate(examples) if i not in chosen]
    carved = [ex for i, ex in enumerate(examples) if i in chosen]
    return rest, carved


def tenth(n: int) -> int:
    """10% of n, rounded half up (the share of each carved split)."""
    return (n + 5) // 10


def split_80_10_10(examples: list[dict], *, stratify: bool) -> dict[str, list[dict]]:
    """Fixed train/validation/test split for sources without one: 10% test, then 10% validation."""
    k = tenth(len(examples))
    rest, test = carve(examples, k, stratify=stratify, seed=SPLIT_SEED)
    train, validation = carve(rest, k, stratify=stratify, seed=SPLIT_SEED + 1)
    return {"train": train, "validation": validation, "test": test}


def dedupe(examples: list[dict]) -> list[dict]:
    """Drop exact repeats of (text, text_pair), keeping the first occurrence."""
    seen: set = set()
    kept = []
    for ex in examples:
        key = (ex["text"], ex.get("text_pair"))
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept
