"""Does a short recovery rescue post-training SNIP pruning of SmolLM2-135M? With a fair control.

    python benchmarks/smollm2_recovery.py            # 30% of decoder-layer parameters, 2 threads

Post-training pruning of SmolLM2-135M to 30% raised lm-rt perplexity about tenfold
(smollm2_posttrain.md). This script runs, as `idprior` CLI commands in subprocesses (printed,
so each can be repeated by hand), on the same data (the first `--max-train` lm-rt training
texts, packed into blocks of 128 tokens):

  1. `prune --no-train` with one recovery epoch (LM loss): perplexity before and after recovery;
  2. the same with `--distill` (recovery also matches the dense model's logits);
  3. control: `finetune` of the *dense* model with the same epochs, data, batch and learning
     rate. Recovery on lm-rt text also adapts the model to that text, so the pruned model
     is compared with a dense model that got the same adaptation, not only with the raw one.

Run folders go to --runs-dir (resumable: a finished run is read back, not redone). Writes
benchmarks/results/smollm2_recovery.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from idprior import io
from idprior.pipeline.bench import cpu_model, environment
from idprior.study.benchutil import run_idprior as run


def commands(args) -> dict[str, list[str]]:
    common = ["--model", "smollm2-135m", "--task", "lm-rt", "--max-train", str(args.max_train), "--max-length", "128",
              "--max-eval", str(args.max_eval), "--set", "train.eval_batch_size=8", "--seed", "0"]
    prune = ["prune", *common, "--no-train", "--target", str(args.target), "--measure", "encoder_params",
             "--calib-size", "64", "--recover-epochs", str(args.epochs), "--set", "recover.batch_size=8",
             "--set", f"recover.lr={args.lr}", "--no-bench"]
    runs = Path(args.runs_dir)
    return {
        "prune+recover": [*prune, "--out", str(runs / "prune_recover")],
        "prune+recover+distill": [*prune, "--distill", "--out", str(runs / "prune_recover_distill")],
        "dense+finetune (control)": ["finetune", *common, "--epochs", str(args.epochs), "--batch-size", "8", "--lr", str(args.lr),
                                     "--out", str(runs / "dense_finetune")],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--max-train", type=int, default=2000, help="lm-rt training texts used for calibration and recovery")
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--epochs", type=float, default=1.0, help="recovery (and control fine-tune) epochs")
    p.add_argument("--lr", type=float, default=5e-5, help="recovery (and control fine-tune) learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/smollm2_recovery")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2_recovery.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    result = {"command": command, "environment": environment(args.threads), "cpu": cpu_model(), "runs": {}}
    for name, cli in commands(args).items():
        wall = run(cli, args.threads)
        out = Path(cli[cli.index("--out") + 1])
        metrics = json.loads((out / "metrics.json").read_text())
        stages = json.loads((out / "stages.json").read_text())["stages"] if (out / "stages.json").exists() else {}
        result["runs"][name] = {"command": "idprior " + " ".join(shlex.quote(a) for a in cli), "wall_s": round(wall, 1),
                                "metrics": metrics, "stage_s": {k: v.get("wall_s") for k, v in stages.items()}}
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out_dir)
    io.write_json(out / "smollm2_recovery.json", result)
    io.write_text(out / "smollm2_recovery.md", render(result))
    print(render(result))
    return 0


def _ppl(block: dict | None, split: str) -> str:
    return f"{block[split]['perplexity']:.1f}" if block and split in block else "–"


def render(result: dict) -> str:
    env = result["environment"]
    runs = result["runs"]
    first = runs["prune+recover"]["metrics"]
    lines = ["# SmolLM2-135M: post-training pruning, then a short recovery, against a dense control", "",
             "Command:", "", "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores, 2 threads, float32, torch {env['torch']}; "
             f"script wall {result['wall_s']} s (nan: a run read back from its folder). Data: the first "
             f"{first['sizes']['train']} lm-rt training texts (packed into 128-token blocks) for calibration and "
             f"recovery; perplexity on fixed subsets of {first['sizes']['validation']} validation / "
             f"{first['sizes']['test']} test texts. One seed.", "",
             "| model | validation perplexity | test perplexity | wall s |", "|---|---|---|---|"]
    lines.append(f"| dense, as shipped | {_ppl(first['dense'], 'validation')} | {_ppl(first['dense'], 'test')} | – |")
    control = runs["dense+finetune (control)"]
    cm = control["metrics"]
    lines.append(f"| dense + the same fine-tune (control) | {_ppl(cm, 'validation')} | {_ppl(cm, 'test')} | "
                 f"{control['wall_s']} |")
    lines.append(f"| pruned {first['target']:.0%}, no recovery | {_ppl(first['pruned_no_recovery'], 'validation')} | "
                 f"{_ppl(first['pruned_no_recovery'], 'test')} | – |")
    for name in ("prune+recover", "prune+recover+distill"):
        m = runs[name]["metrics"]
        label = "pruned + recovery" + (" with distillation" if "distill" in name else "")
        lines.append(f"| {label} | {_ppl(m['pruned'], 'validation')} | {_ppl(m['pruned'], 'test')} | {runs[name]['wall_s']} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in runs.items()]
    lines += ["", "Stage wall times (s):", ""] + [f"- {name}: {r['stage_s']}" for name, r in runs.items()]
    gens = first.get("generations") or []
    if gens:
        lines += ["", "Greedy continuations after recovery (prune+recover run):", "",
                  "| prompt | dense | pruned + recovery |", "|---|---|---|"]
        for g in gens:
            lines.append(f"| {g['prompt']} | {g['dense'].strip()[:90]!r} | {g['pruned'].strip()[:90]!r} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
