"""`idprior evaluate`: the task metrics of a (pruned or dense) model on one or more splits.

Your own data works as in `idprior prune`: `--data FILE` (which implies `--task custom`) is read
with the same fixed split seed, so `--split test` is the same 10% test split the run was scored
on; `--data-test FILE` evaluates on a file of its own. A classifier with label names keeps its
ids: the data's labels are matched to them by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("evaluate", help="evaluate a model folder on a task", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: idprior evaluate runs/rt50/pruned --data reviews.csv --split validation,test")
    p.add_argument("model", help="model folder (e.g. RUN/pruned), .gguf file or alias")
    p.add_argument("--task", default=None, help="task name (idprior tasks), or custom with --data (the default then)")
    p.add_argument("--split", default="test", help="split(s), comma-separated (default: test)")
    p.add_argument("--data-dir", help="local GLUE folder")
    p.add_argument("--data", default=None, metavar="FILE", help="your CSV/TSV/JSONL file (implies --task custom)")
    p.add_argument("--data-validation", default=None, metavar="FILE", help="your validation file")
    p.add_argument("--data-test", default=None, metavar="FILE", help="your test file")
    p.add_argument("--text-column", default=None, help="text column of your files (default: text)")
    p.add_argument("--text-pair-column", default=None, help="second text column for pair tasks")
    p.add_argument("--label-column", default=None, help="label column of your files (default: label)")
    p.add_argument("--problem-type", default=None, choices=("classification", "regression"),
                   help="what the label column is (default: inferred)")
    p.add_argument("--max-eval", type=int, help="evaluate on at most N examples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="folder for metrics.json (default: print only); a metrics.json there is replaced only "
                                  "if idprior evaluate wrote it")
    p.add_argument("--zero-shot", default=None, metavar="TASK",
                   help="LM tasks: also classify TASK's test split (rt-polarity, sst2) zero-shot by label-word "
                        "likelihood; --max-eval caps its examples too")
    return p


def _load_data(args, task: str):
    import csv

    from ..data import load_task
    from ..errors import IdpriorError

    files = {k: v for k, v in {"train": args.data, "validation": args.data_validation, "test": args.data_test}.items() if v}
    try:
        return load_task(task, data_dir=args.data_dir, max_eval=args.max_eval, data_files=files or None,
                         text_column=args.text_column, text_pair_column=args.text_pair_column,
                         label_column=args.label_column, problem_type=args.problem_type)
    except (OSError, UnicodeError, csv.Error) as e:  # unreadable files: the user's to fix, not a bug
        raise IdpriorError(f"cannot read the data of task {task!r}: {type(e).__name__}: "
                           f"{(str(e).strip().splitlines() or [''])[0][:200]}") from None


def _metrics_path(args) -> Path | None:
    """--out's metrics.json, checked first: a finished evaluation must not fail at the last write."""
    from .. import io
    from ..errors import IdpriorError

    if not args.out:
        return None
    metrics_path = Path(args.out) / "metrics.json"
    out = metrics_path.parent
    if out.exists() and not out.is_dir():
        raise IdpriorError(f"--out {out} is a file; give a folder for metrics.json")
    if metrics_path.is_dir():
        raise IdpriorError(f"--out {out} holds a folder named metrics.json; remove it or choose another --out")
    problem = io.writable_problem(metrics_path, "--out")
    if problem:
        raise IdpriorError(problem)
    io.check_owned(metrics_path, "evaluate", "choose another --out, or remove it yourself")
    return metrics_path


def run(args) -> int:
    from .. import io
    from ..data import make_dataloader, make_lm_dataloader
    from ..data.labels import align_labels
    from ..errors import ConfigError, IdpriorError
    from ..model import load as models
    from ..pipeline.evaluate import evaluate
    from ..pipeline.preflight import check_evaluation

    for flag, value, least in (("--max-length", args.max_length, 2), ("--batch-size", args.batch_size, 1),
                               ("--max-eval", args.max_eval, 1)):
        if value is not None and value < least:
            raise IdpriorError(f"{flag} must be >= {least}, got {value}")
    task = args.task
    if task is None:
        if not (args.data or args.data_test):
            raise IdpriorError("give --task NAME (idprior tasks lists them), or --data FILE for your own data")
        print("idprior: --data given without --task: using --task custom", file=sys.stderr)
        task = "custom"
    if task.strip().lower() == "custom" and not args.data and args.data_test:
        other = [s.strip() for s in args.split.split(",") if s.strip() and s.strip() != "test"]
        if other:
            raise IdpriorError(f"--split {','.join(other)}: with --data-test alone there is only the test split (the "
                               "whole file); give --data FILE for its validation split, or --split test")
        args.data = args.data_test  # one labelled file to evaluate on: its own train split is not used
    metrics_path = _metrics_path(args)
    data = _load_data(args, task)
    if args.zero_shot is not None:
        from ..pipeline.zeroshot import get_spec

        get_spec(args.zero_shot)  # an unknown task fails before the model loads
        if data.task.kind != "lm":
            raise IdpriorError(f"--zero-shot needs a language-modelling task (e.g. lm-rt), not {data.task.name!r}")
    problems = check_evaluation(args.model, data, args.max_length)
    if problems:
        raise ConfigError(problems)
    data = align_labels(data, models.labels_of_spec(args.model), args.model)
    model, tok = models.load(args.model, data.task)
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    missing = [s for s in splits if s not in data.splits]
    if missing or not splits:
        raise IdpriorError(f"task {data.task.name} has no split {', '.join(map(repr, missing)) or repr(args.split)}; "
                           f"splits: {', '.join(data.splits)}")
    results = {}
    for split in splits:
        ex = data.splits[split]
        if data.task.kind == "lm":
            loader = make_lm_dataloader(ex, tok, batch_size=args.batch_size, block_size=args.max_length)
        else:
            loader = make_dataloader(ex, tok, data.task, batch_size=args.batch_size, max_length=args.max_length, shuffle=False)
        results[split] = evaluate(model, data.task, loader, desc=f"eval {split}")
    out = {"model": args.model, "task": data.task.name, **results}
    if args.zero_shot is not None:
        from ..pipeline.zeroshot import zero_shot_models

        zs, _ = zero_shot_models({"model": model}, tok, args.zero_shot, max_examples=args.max_eval,
                                 batch_size=args.batch_size)
        out["zero_shot"] = {"task": zs["task"], "split": zs["split"], **zs["model"]}
    if metrics_path is not None:
        io.write_json(metrics_path, io.marked(out, "evaluate"))
    print(json.dumps(out, indent=2))
    return 0
