"""`idprior finetune`: fine-tune a model on a task and evaluate it (no pruning)."""

from __future__ import annotations

import json

from .common import add_run_args, config_from_args


def add_parser(sub):
    p = sub.add_parser("finetune", help="fine-tune and evaluate a model on a task",
                       description=__doc__ + " Writes finetuned/ and metrics.json to --out.")
    add_run_args(p)
    return p


def run(args) -> int:
    from ..pipeline.stages import finetune

    metrics = finetune(config_from_args(args), resume=args.resume, overwrite=args.overwrite)
    if metrics:  # {} on the other ranks of a multi-process launch
        print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("validation", "test"))}, indent=2))
    return 0
