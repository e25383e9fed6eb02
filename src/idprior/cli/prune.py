"""`idprior prune`: fine-tune with SN + identity prior, score, select, cut, recover, evaluate, report."""

from __future__ import annotations

from .common import add_run_args, config_from_args


def add_parser(sub):
    p = sub.add_parser("prune", help="prune a model to a target compression (the whole SNIP pipeline)",
                       description=__doc__ + " Every stage writes its artefact to --out (scores.json, plan.json, "
                       "pruned/, metrics.json, bench.json, report.md); --resume continues an interrupted run.")
    add_run_args(p, prune=True)
    return p


def run(args) -> int:
    from ..pipeline import prune

    cfg = config_from_args(args)
    out = prune(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"done: pruned model in {out / 'pruned'}, report in {out / 'report.md'}")
    return 0
