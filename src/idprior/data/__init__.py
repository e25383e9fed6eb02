"""Tasks, data loading and batching.

`list_tasks` / `get_task` / `load_task` need no torch; the data loaders are imported lazily so that
listing tasks stays fast.
"""

from idprior.data.labels import align_labels, model_labels
from idprior.data.tasks import Task, TaskData, get_task, list_tasks, load_task

__all__ = ["Task", "TaskData", "align_labels", "get_task", "list_tasks", "load_task", "make_dataloader",
           "make_lm_dataloader", "model_labels"]


def __getattr__(name: str):
    if name in ("make_dataloader", "make_lm_dataloader"):
        from idprior.data import collate

        return getattr(collate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
