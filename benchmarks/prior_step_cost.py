"""What does SNIP's training phase cost per step? (issue 14 goal: SN + identity prior at most 15% more
per step than a plain step.)

The same training steps (MiniLM-L6 on the task's first examples, AdamW, the pipeline's `train.train`)
run for each variant, interleaved in rounds so that machine load hits every variant alike:

    plain          no SN, no prior
    sn             spectral normalization only
    sn+prox        SN + the proximal identity prior (the defaults: Adam metric, readout norms, ...)
    sn+prox-euclid SN + the proximal prior with its step in the Euclidean metric
    sn+loss        SN + the loss-form identity prior (the first definition)

A variant's value in a round is the median time between consecutive optimizer steps of one
`train` call (its first `--skip` steps dropped); the table gives the median over rounds and each
variant's ratio to plain (median over rounds of the per-round ratio).

    python benchmarks/prior_step_cost.py --threads 2 --batch-size 32 --max-length 64 --steps 24 --rounds 5

writes benchmarks/results/prior_step_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time

import torch

from idprior import spectral
from idprior.arch import get_adapter
from idprior.bench import environment
from idprior.benchutil import publish
from idprior.config import load_config
from idprior.pipeline import Run, prior_hooks
from idprior.train import TrainHook, train

VARIANTS = {
    "plain": ["prune.sn=false", "prune.prior=false"],
    "sn": ["prune.prior=false"],
    "sn+prox": [],
    "sn+prox-euclid": ["prune.prior_metric=euclid"],
    "sn+loss": ["prune.prior_mode=loss"],
}


class StepClock(TrainHook):
    """Last hook of a step: the time at the end of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def after_step(self, model, step, total):
        self.times.append(time.perf_counter())
        return {}


def one_call(base, loader, cfg, skip: int) -> float:
    """Median seconds per step of one `train` call of the variant `cfg` on a copy of `base`."""
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    if cfg.prune.sn:
        spectral.attach(model, adapter, cfg.prune.sn_bound)
    hooks, attached = prior_hooks(cfg.prune, model, adapter)
    clock = StepClock()
    train(model, loader, cfg.train, seed=cfg.seed, hooks=[*hooks, clock], desc=f"{cfg.prune.prior_mode}")
    for obj in attached:
        obj.detach()
    steps = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)][skip:]
    return statistics.median(steps)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="rt-polarity")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24, help="optimizer steps per train call")
    ap.add_argument("--skip", type=int, default=4, help="first steps of each call left out (warm-up)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants (plain always runs)")
    ap.add_argument("--name", default="prior_step_cost", help="output file stem")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    chosen = {"plain", *args.variants.split(",")}
    if unknown := chosen - set(VARIANTS):
        raise SystemExit(f"error: unknown variant(s) {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    variants = {name: extra for name, extra in VARIANTS.items() if name in chosen}
    torch.set_num_threads(args.threads)
    common = [f"data.task={args.task}", f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}",
              f"data.max_train={args.steps * args.batch_size}", "train.epochs=1", "train.eval_each_epoch=false",
              "train.checkpoint_every=0", "prune.target=0.5"]
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = {name: load_config(None, [*common, *extra, f"out={tmp}/{i}"]) for i, (name, extra) in enumerate(variants.items())}
        run = Run(cfgs["plain"])
        base, tok = run.load_model(run.cfg.model.name)
        loader = run.loader("train", tok, train=True)
        per_round = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, cfg in cfgs.items():
                per_round[name].append(one_call(base, loader, cfg, args.skip))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in per_round.items()),
                  file=sys.stderr)
    ratio = {name: statistics.median(v / p for v, p in zip(per_round[name], per_round["plain"], strict=True))
             for name in variants}
    env = environment(args.threads)
    result = {"command": "python benchmarks/prior_step_cost.py " + " ".join(argv), "environment": env,
              "settings": vars(args), "model": run.cfg.model.name, "seconds_per_step": per_round, "ratio_to_plain": ratio}
    lines = [
        "# Per-step cost of SNIP's training phase", "",
        f"Command: `{result['command']}`", "",
        f"{env['cpu']}, {args.threads} thread(s), float32, {run.cfg.model.name} on {args.task}, batch {args.batch_size}, "
        f"sequence length {args.max_length}, {args.steps} steps per call (first {args.skip} dropped), "
        f"{args.rounds} interleaved rounds. Written by benchmarks/prior_step_cost.py.", "",
        "| variant | ms per step (median over rounds) | min – max over rounds | × plain (median of per-round ratios) |",
        "|---|---|---|---|",
    ]
    for name, v in per_round.items():
        lines.append(f"| {name} | {statistics.median(v) * 1e3:.0f} | {min(v) * 1e3:.0f} – {max(v) * 1e3:.0f} | "
                     f"{ratio[name]:.3f} |")
    publish(args.out, args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
