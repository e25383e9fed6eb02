"""Label ids that follow the model: a classifier with label names keeps its own ids.

Why: a task's label ids are its label names in sorted order (custom data) or a fixed order (built-in
tasks), but each row of a fine-tuned classifier's head already means one label (its `id2label`).
Renaming the rows after the data would make every prediction carry another label's name, so the
data is renumbered onto the model's names instead (exact names first, then ignoring case). Models
whose names are transformers' defaults (`LABEL_0`, `LABEL_1`, ...) or that have no classification
head take the task's names. A label set that does not match is an error listing both sets.
"""

from __future__ import annotations

import dataclasses
import re

from idprior.data.tasks import TaskData
from idprior.errors import IdpriorError

_DEFAULT_NAME = re.compile(r"LABEL_\d+")


def _get(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def model_labels(config) -> tuple[str, ...] | None:
    """Label names of a classifier checkpoint in id order (a config.json dict or a transformers
    config), or None when it has no classification head or only default names."""
    archs = _get(config, "architectures") or []
    if not any("ForSequenceClassification" in a for a in archs) or _get(config, "problem_type") == "regression":
        return None
    try:
        items = sorted((int(k), str(v)) for k, v in (_get(config, "id2label") or {}).items())
    except (TypeError, ValueError):
        return None
    names = tuple(v for _, v in items)
    if [i for i, _ in items] != list(range(len(items))) or all(_DEFAULT_NAME.fullmatch(n) for n in names):
        return None
    return names


def shown_labels(names, limit: int = 12) -> str:
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def align_labels(data: TaskData, names: tuple[str, ...] | None, model: str = "the model") -> TaskData:
    """`data` with its label ids renumbered onto the model's label `names` (see the module docstring)."""
    task = data.task
    if names is None or task.kind != "classification" or tuple(task.labels) == tuple(names):
        return data
    index = {n: i for i, n in enumerate(names)}
    folded: dict[str, int | None] = {}
    for i, n in enumerate(names):
        folded[n.strip().lower()] = None if n.strip().lower() in folded else i  # ambiguous when names differ in case only
    mapping, unknown = {}, []
    for old, name in enumerate(task.labels):
        new = index.get(name, folded.get(name.strip().lower()))
        if new is None:
            unknown.append(name)
        mapping[old] = new
    if unknown or len(names) != len(task.labels) or len(set(mapping.values())) != len(mapping):
        why = (f"{', '.join(map(repr, unknown[:5]))} {'is' if len(unknown) == 1 else 'are'} not among the model's labels"
               if unknown else f"the model has {len(names)} labels and the data {len(task.labels)}")
        raise IdpriorError(
            f"the labels of {model} ({shown_labels(names)}) do not match the labels of task {task.name} "
            f"({shown_labels(task.labels)}): {why}; name the data's labels like the model's, or start from a model "
            "without a classification head"
        )
    new_task = dataclasses.replace(task, labels=tuple(names))
    splits = {s: [dict(ex, label=mapping[ex["label"]]) for ex in examples] for s, examples in data.splits.items()}
    return TaskData(new_task, splits)
