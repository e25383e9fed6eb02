"""`idprior evaluate`: the task metrics of a (pruned or dense) model on one or more splits."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("evaluate", help="evaluate a model folder on a task", description=__doc__)
    p.add_argument("model", help="model folder (e.g. RUN/pruned), .gguf file or alias")
    p.add_argument("--task", required=True, help="task name (idprior tasks)")
    p.add_argument("--split", default="test", help="split(s), comma-separated (default: test)")
    p.add_argument("--data-dir", help="local GLUE folder")
    p.add_argument("--max-eval", type=int, help="evaluate on at most N examples")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", help="folder for metrics.json (default: print only)")
    return p


def run(args) -> int:
    from .. import io, models
    from ..data import load_task, make_dataloader, make_lm_dataloader
    from ..errors import IdpriorError
    from ..evaluate import evaluate

    data = load_task(args.task, data_dir=args.data_dir, max_eval=args.max_eval)
    model, tok = models.load(args.model, data.task)
    results = {}
    for split in [s.strip() for s in args.split.split(",") if s.strip()]:
        if split not in data.splits:
            raise IdpriorError(f"task {data.task.name} has no split {split!r}; splits: {', '.join(data.splits)}")
        ex = data.splits[split]
        if data.task.kind == "lm":
            loader = make_lm_dataloader(ex, tok, batch_size=args.batch_size, block_size=args.max_length)
        else:
            loader = make_dataloader(ex, tok, data.task, batch_size=args.batch_size, max_length=args.max_length, shuffle=False)
        results[split] = evaluate(model, data.task, loader, desc=f"eval {split}")
    out = {"model": args.model, "task": data.task.name, **results}
    if args.out:
        io.write_json(Path(args.out) / "metrics.json", out)
    print(json.dumps(out, indent=2))
    return 0
