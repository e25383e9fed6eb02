"""`idprior bench-quality`: run a quality grid (SNIP, ablations, baselines x tasks x targets x seeds).

Fine-tunes once per (task, seed, variant: plain / sn / prior / sn+prior) and prunes every cell
from the shared fine-tune with the same recovery budget. One JSONL line per finished cell
(OUT/results.jsonl unless --results); --resume skips every finished cell and continues an
interrupted one. Turn the results into tables and plots with `idprior report RESULTS.jsonl`.
"""

from __future__ import annotations

import argparse
import time


def add_parser(sub):
    p = sub.add_parser("bench-quality", help="run a resumable quality grid of pruning methods",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: idprior bench-quality benchmarks/quality_paired.yaml --out runs/quality --resume")
    p.add_argument("grid", metavar="GRID.yaml", help="grid file: model, tasks, targets, seeds, methods, budgets")
    p.add_argument("--out", required=True, help="folder for the fine-tunes and cell run folders")
    p.add_argument("--results", default=None, help="results JSONL (default OUT/results.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue a sweep: finished cells are never rerun")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's default)")
    p.add_argument("--stop-after-min", type=float, default=None,
                   help="start no new cell after this many minutes (finish later with --resume)")
    p.add_argument("--tasks", default=None, metavar="T1,T2", help="run only these tasks of the grid")
    p.add_argument("--targets", default=None, metavar="F1,F2",
                   help="run only these targets of the grid (e.g. 0.3,0.7: the secondary targets before the "
                        "primary one is done everywhere)")
    p.add_argument("--seeds", default=None, metavar="S1,S2",
                   help="run only these seeds of the grid (e.g. to split one task's seeds between processes)")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run the I-th of N slices of the (seed, task) pairs, for N processes sharing a machine "
                        "and one results file (e.g. two with --threads 1 --shard 0/2 and --shard 1/2)")
    return p


def run(args) -> int:
    from ..errors import IdpriorError
    from ..study.quality import load_grid, run_grid

    if args.threads is not None and args.threads < 1:
        raise IdpriorError(f"--threads must be >= 1, got {args.threads}")
    if args.stop_after_min is not None and not args.stop_after_min >= 0:
        raise IdpriorError(f"--stop-after-min must be a number of minutes >= 0, got {args.stop_after_min}")
    try:
        shard = tuple(int(x) for x in args.shard.split("/"))
        if len(shard) != 2 or not 0 <= shard[0] < shard[1]:
            raise ValueError
    except ValueError:
        raise IdpriorError(f"--shard {args.shard!r}: use I/N with 0 <= I < N, e.g. 0/2 and 1/2") from None
    grid = load_grid(args.grid)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    try:
        targets = [float(t) for t in args.targets.split(",") if t.strip()] if args.targets else None
    except ValueError:
        raise IdpriorError(f"--targets {args.targets!r}: give fractions of the grid's targets, e.g. 0.3,0.7") from None
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    except ValueError:
        raise IdpriorError(f"--seeds {args.seeds!r}: give seeds of the grid as integers, e.g. 3,4") from None
    check_inputs(grid, args, tasks, targets, seeds)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    deadline = time.time() + 60 * args.stop_after_min if args.stop_after_min is not None else None
    c = run_grid(grid, args.out, results=args.results, resume=args.resume, deadline=deadline, tasks=tasks,
                 targets=targets, seeds=seeds, shard=shard)
    print(f"done: {c['cells']} cells and {c['dense']} dense rows run, {c['finetune']} fine-tunes, "
          f"{c['skipped']} finished earlier and skipped")
    return 0


def check_inputs(grid, args, tasks: list[str] | None, targets: list[float] | None = None,
                 seeds: list[int] | None = None) -> None:
    """Before anything is written: the grid's tasks and model exist, --tasks / --targets / --seeds name those of
    the grid, --out can be written, and a --results file that exists holds results rows (a sweep appends to it; a
    user's JSONL is never appended to). One line per problem."""
    import json
    from pathlib import Path

    from .. import io
    from ..data.tasks import CUSTOM, get_task
    from ..errors import ConfigError, IdpriorError
    from ..model import load as models

    problems = []
    for task in grid.tasks:
        try:
            if task.strip().lower() == CUSTOM:
                raise IdpriorError("a grid runs built-in tasks (idprior tasks lists them), not your own files")
            get_task(task)
        except IdpriorError as e:
            problems.append(f"grid task {task!r}: {e}")
    unknown = [t for t in tasks or [] if t not in grid.tasks]
    if unknown:
        problems.append(f"--tasks {', '.join(unknown)}: not in the grid's tasks ({', '.join(grid.tasks)})")
    odd = [t for t in targets or [] if t not in grid.targets]
    if odd:
        problems.append(f"--targets {', '.join(map(str, odd))}: not in the grid's targets "
                        f"({', '.join(map(str, grid.targets))})")
    odd_seeds = [s for s in seeds or [] if s not in grid.seeds]
    if odd_seeds:
        problems.append(f"--seeds {', '.join(map(str, odd_seeds))}: not in the grid's seeds "
                        f"({', '.join(map(str, grid.seeds))})")
    try:
        models.resolve(grid.model)
    except IdpriorError as e:
        problems.append(f"grid model: {e}")
    out = Path(args.out)
    results = Path(args.results) if args.results else out / "results.jsonl"
    out_problem = io.writable_problem(out / "grid.yaml", "--out")
    problems += [p for p in (out_problem, io.writable_problem(results, "--results") if args.results or not out_problem
                             else None) if p]
    if results.is_file():
        lines = results.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines, start=1):
            try:
                row = json.loads(line) if line.strip() else {"key": ""}
            except ValueError:
                row = {"key": ""} if i == len(lines) else None  # a torn last line from a killed sweep
            if not (isinstance(row, dict) and "key" in row):
                problems.append(f"{results} line {i} is not a result row of idprior bench-quality, so the sweep does "
                                "not append to it: choose another --results (or --out)")
                break
    if problems:
        raise ConfigError(problems)
