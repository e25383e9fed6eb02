"""Is the prior's accuracy cost its choice of units or its training phase? Apply the units a
method's cell removed to the plain continuation (the model fisher prunes) and score that model on
validation before recovery, next to fisher's own plan and the method's own result.

    python benchmarks/prior_selection_swap.py snip-prox-h15,snip > benchmarks/results/prior_selection_swap.md

Reads benchmarks/results/quality_paired.jsonl and prior_tuning.jsonl and the cell folders under
runs/quality_paired (rows record them); seeds 0-1, 50%. Numbers are validation accuracy x 100.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from idprior import pipeline
from idprior.config import load_run_config
from idprior.evaluate import evaluate
from idprior.surgery import apply_plan

ROOT = Path("runs/quality_paired")
RESULTS = ["benchmarks/results/quality_paired.jsonl", "benchmarks/results/prior_tuning.jsonl"]


def rows() -> dict:
    out = {}
    for f in RESULTS:
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            if r["target"] == 0.5:
                out[(r["task"], r["seed"], r["method"])] = r
    return out


def main(methods: list[str]) -> None:
    torch.set_num_threads(1)
    found = rows()
    table = {m: [] for m in ["fisher", *[f"{m} on plain" for m in methods], *methods]}
    print("| cell | fisher | " + " | ".join(f"{m}'s units on the plain model | {m}" for m in methods) + " |")
    print("|---|---|" + "---|---|" * len(methods))
    for task in ["rt-polarity", "subj", "r8", "20ng"]:
        for seed in [0, 1]:
            fisher = found.get((task, seed, "fisher"))
            if fisher is None:
                continue
            run = pipeline.Run(load_run_config(ROOT / fisher["cell_dir"] / "config.yaml"), resume=True)
            try:
                cols = [100 * fisher["pruned_no_recovery"]["validation"]["accuracy"]]
                table["fisher"].append(cols[0])
                for m in methods:
                    r = found[(task, seed, m)]
                    plan = json.loads((ROOT / r["cell_dir"] / "plan.json").read_text())
                    model, tok = run.load_model(pipeline.finetuned_spec(run))
                    apply_plan(model, plan["units"])
                    swapped = 100 * evaluate(model, run.task, run.loader("validation", tok, train=False))["accuracy"]
                    own = 100 * r["pruned_no_recovery"]["validation"]["accuracy"]
                    table[f"{m} on plain"].append(swapped)
                    table[m].append(own)
                    cols += [swapped, own]
            finally:
                run.close()
            print(f"| {task}/{seed} | " + " | ".join(f"{c:.1f}" for c in cols) + " |", flush=True)
    order = ["fisher", *[k for m in methods for k in (f"{m} on plain", m)]]
    print("| mean | " + " | ".join(f"{statistics.mean(table[k]):.2f}" for k in order if table[k]) + " |")


if __name__ == "__main__":
    main(sys.argv[1].split(","))
