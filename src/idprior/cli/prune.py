"""`idprior prune`: fine-tune with SN + identity prior, score, select, cut, recover, evaluate, report."""

from __future__ import annotations

from .common import add_run_args, config_from_args


def recipes_text() -> str:
    """The measured defaults per model family and mode, from the one place they are defined."""
    from ..arch.base import PRE_LN_DECODER_RECIPE
    from ..config import RECIPE

    def fmt(d: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in d.items())

    return ("Defaults (the measured recipe; any flag or --set overrides it): SNIP fine-tunes with the identity prior "
            f"({fmt(RECIPE)}; spectral normalization only with --sn); on pre-LN decoders (Llama, Qwen2, GPT-2) fine-tuning uses "
            f"{fmt(PRE_LN_DECODER_RECIPE['finetune'])}, and post-training (--no-train) "
            f"{fmt(PRE_LN_DECODER_RECIPE['posttrain'])}. A baseline (--method) fine-tunes and recovers plainly (no SN, "
            "no prior) unless --set prune.sn=true / prune.prior=true asks for them.")


def add_parser(sub):
    p = sub.add_parser("prune", help="prune a model to a target compression (the whole SNIP pipeline)",
                       description=__doc__ + " Every stage writes its artefact to --out (scores.json, plan.json, "
                       "pruned/, metrics.json, bench.json, report.md); --resume continues an interrupted run.",
                       epilog=recipes_text())
    add_run_args(p, prune=True)
    return p


def run(args) -> int:
    from .. import distributed
    from ..pipeline.stages import prune

    cfg = config_from_args(args)
    out = prune(cfg, resume=args.resume, overwrite=args.overwrite)
    if distributed.is_main():
        print(f"done: pruned model in {out / 'pruned'}, report in {out / 'report.md'}")
    return 0
