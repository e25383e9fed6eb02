"""SNIP's prior phase on the LM loss for SmolLM2-135M, against the decoder baselines with the same
training budget (issue 15).

    python benchmarks/smollm2_prior.py                 # 20% of decoder-layer parameters, 2 threads
    python benchmarks/smollm2_prior.py --task lm-20ng --max-train 150 --max-eval 40 --control run \
        --runs-dir runs/smollm2_prior_lm20ng --name smollm2_prior_lm20ng \
        --only "fisher + recovery" --only "snip (prior phase, kind scale, floor, no SN, debias, after-ln)"

Every arm gets one epoch of LM training on the same --task texts (lm-rt by default; the first
--max-train, packed into 128-token blocks; batch 8, lr 5e-5; 150 lm-20ng texts are about as many
characters as 2,000 lm-rt ones), run as `idprior` CLI commands in subprocesses (printed, so each
can be repeated by hand; a finished run is read back, not redone):

  snip (prior phase, kind scale, floor, no SN, debias, after-ln)
                           the method proper with the pre-LN decoder recipe: the epoch is SNIP's fine-tune
                           with the identity prior driving the target to the identity on the LM loss,
                           measured through the next norm, then the cut (no recovery: the epoch was the
                           training). The other prior arms of issue 15 left with their study (docs/history.md);
  snip post-training       no prior: function norms relative to the residual stream, at least 25% of each
                           layer kept (the best post-training SNIP of smollm2_decoder_grid_20.md), then the
                           epoch as recovery;
  fisher / flap / wanda-sp / shortgpt
                           post-training baselines, then the epoch as recovery;
  dense control            the dense model fine-tuned for the same epoch, read from a committed results
                           file whose control ran exactly the same `idprior finetune` command (default:
                           smollm2_recovery.py's, lm-rt seed 0 one epoch), or run here with --control run.

One seed per call (--seed, default 0). Writes benchmarks/results/smollm2_prior.{json,md} (or --name).
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

CONTROL = "dense + the same epoch (control)"


def _normal(cli: list[str]) -> list:
    """A command's arguments without its output folder, numbers as numbers ("1.0" is "1")."""
    def value(a: str):
        try:
            return float(a)
        except ValueError:
            return a
    return [value(a) for i, a in enumerate(cli) if a != "--out" and (i == 0 or cli[i - 1] != "--out")]


def committed_control(path: Path, cli: list[str], error) -> dict:
    """The dense control of an earlier results file (this script's, or smollm2_recovery.py's), if it was
    run with exactly the command this call would run (same task, seed, budget, data sizes; the output
    folder aside); otherwise `error` says to pass --control run."""
    if not path.is_file():
        error(f"--control {path}: no such results file; pass a committed results JSON or 'run'")
    runs = json.loads(path.read_text()).get("runs", {})
    control = runs.get(CONTROL) or runs.get("dense+finetune (control)")
    if control is None:
        error(f"--control {path}: the file holds no dense control; pass another results JSON or 'run'")
    if _normal(shlex.split(control.get("command", ""))) != _normal(["idprior", *cli]):
        error(f"--control {path}: its control ran `{control['command']}`, not this call's budget and data; "
              "use --control run")
    return control


def commands(args) -> dict[str, list[str]]:
    common = ["--model", "smollm2-135m", "--task", args.task, "--max-train", str(args.max_train), "--max-length", "128",
              "--max-eval", str(args.max_eval), "--set", "train.eval_batch_size=8", "--seed", str(args.seed)]
    train = ["--epochs", f"{args.epochs:g}", "--batch-size", "8", "--lr", str(args.lr)]
    prune = ["prune", *common, "--target", str(args.target), "--measure", "encoder_params", "--calib-size", "64", "--no-bench"]
    posthoc = [*prune, "--no-train", "--recover-epochs", f"{args.epochs:g}", "--set", "recover.batch_size=8", "--set", f"recover.lr={args.lr}"]
    runs = Path(args.runs_dir)
    # seed 0 and one epoch keep the folders' first names
    tail = (f"_s{args.seed}" if args.seed else "") + (f"_e{args.epochs:g}" if args.epochs != 1 else "")
    t = f"t{args.target:g}" + tail
    return {
        # the decoder recipe (the default for pre-LN decoders since issue 34; the flags spell it out so the
        # committed runs' commands stay what they were): the prior measured through the next norm that reads the
        # stream, on the kind's common scale, a quarter of each layer kept, gamma 1, survivors debiased, no SN
        "snip (prior phase, kind scale, floor, no SN, debias, after-ln)": [
            *prune, *train, "--recover-epochs", "0", "--min-keep", "0.25",
            "--set", "prune.prior_gamma=1.0", "--set", "prune.prior_debias=true",
            "--set", "prune.norm_after_ln=true", "--out", str(runs / f"snip_prior_kind_nosn_debias_afterln_{t}")],
        "snip post-training + recovery": [*posthoc, "--score", "residual", "--min-keep", "0.25", "--compensate", "none",
                                          "--out", str(runs / f"snip_posthoc_{t}")],
        "fisher + recovery": [*posthoc, "--method", "fisher", "--out", str(runs / f"fisher_{t}")],
        "flap + recovery": [*posthoc, "--method", "flap", "--out", str(runs / f"flap_{t}")],
        # the other decoder baselines of issue 15 (post-training they trail fisher and FLAP,
        # smollm2_decoder_grid_20.md); wanda-sp with its bias compensation, as FLAP
        "wanda-sp + recovery": [*posthoc, "--method", "wanda-sp", "--out", str(runs / f"wandasp_{t}")],
        "shortgpt + recovery": [*posthoc, "--method", "shortgpt", "--out", str(runs / f"shortgpt_{t}")],
        CONTROL: ["finetune", *common, *train,
                  "--out", str(runs / ("dense_finetune" + tail))],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=float, default=0.2)
    p.add_argument("--task", default="lm-rt", choices=("lm-rt", "lm-20ng"), help="language-modelling task")
    p.add_argument("--max-train", type=int, default=2000)
    p.add_argument("--max-eval", type=int, default=100)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=float, default=1.0,
                   help="the training budget of every arm in epochs (SNIP's phase, the others' recovery, the control)")
    p.add_argument("--seed", type=int, default=0, help="seed of every arm (data order, calibration sample)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs-dir", default="runs/smollm2_prior")
    p.add_argument("--control", default=str(Path(__file__).resolve().parent / "results" / "smollm2_recovery.json"),
                   help="a committed results JSON whose dense control ran exactly this call's control command "
                        "(smollm2_recovery.json: lm-rt, seed 0, one epoch; or an earlier run of this script), "
                        "or 'run' to fine-tune the dense control here")
    p.add_argument("--only", action="append", default=None, metavar="ARM",
                   help="run only this arm (its full name, e.g. 'fisher + recovery'); repeat for several (default: all)")
    p.add_argument("--name", default="smollm2_prior")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2_prior.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    result = {"command": command, "environment": environment(args.threads), "cpu": cpu_model(), "target": args.target,
              "task": args.task, "seed": args.seed, "epochs": args.epochs, "runs": {}}
    arms = commands(args)
    if args.control != "run":
        control = committed_control(Path(args.control), arms[CONTROL], p.error)
        arms.pop(CONTROL)  # read from the file above
    only = set(args.only) if args.only else None
    unknown = sorted(only - set(arms)) if only else []
    if unknown:  # names hold commas, so a list cannot be split on them: each arm is its own --only
        p.error(f"unknown arm(s) {unknown}; the arms are: {'; '.join(arms)}")
    for name, cli in arms.items():
        if only is not None and name not in only and name != CONTROL:
            continue
        wall = run(cli, args.threads)
        out = Path(cli[cli.index("--out") + 1])
        metrics = json.loads((out / "metrics.json").read_text())
        stages = json.loads((out / "stages.json").read_text())["stages"] if (out / "stages.json").exists() else {}
        entry = {"command": "idprior " + " ".join(shlex.quote(a) for a in cli), "wall_s": round(wall, 1),
                 "metrics": metrics, "stage_s": {k: v.get("wall_s") for k, v in stages.items()}}
        if (out / "plan.json").exists():
            plan = json.loads((out / "plan.json").read_text())
            entry["structure"] = plan.get("structure")
            entry["removed"] = plan.get("counts")
        result["runs"][name] = entry
    if args.control != "run":
        result["runs"][CONTROL] = dict(control, wall_s=control.get("wall_s"), read_from=args.control)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    out = Path(args.out_dir)
    io.write_json(out / f"{args.name}.json", result)
    io.write_text(out / f"{args.name}.md", render(result))
    print(render(result))
    return 0


def _epochs(n: float) -> str:
    return "one epoch" if n == 1 else f"{n:g} epochs"


def _ppl(block: dict | None, split: str) -> str:
    return f"{block[split]['perplexity']:.1f}" if block and split in block else "–"


def render(result: dict) -> str:
    env, runs = result["environment"], result["runs"]
    control = runs.get(CONTROL, {}).get("metrics")
    task = result.get("task", "lm-rt")  # files written before --task existed are lm-rt
    # the model as shipped: the dense model of a post-training arm (SNIP's "dense" is its own fine-tune)
    ref = next((r["metrics"]["dense"] for name, r in runs.items() if "recovery" in name), None)
    lines = ["# SmolLM2-135M: SNIP's prior phase on the LM loss vs the baselines, same training budget (issue 15)", "",
             "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores, {env['threads']} threads, float32, torch "
             f"{env['torch']}; script wall {result['wall_s']} s (nan: a run read back from its folder). Target "
             f"{result['target']:.0%} of decoder-layer parameters. Every arm gets {_epochs(result.get('epochs', 1))} of LM training on the same "
             f"{task} texts (SNIP: its SN + identity-prior phase before the cut; the others: recovery after the cut). "
             f"Perplexity on fixed subsets of {task} validation / test; one seed ({result.get('seed', 0)}), so no interval: differences of a few "
             "percent are within what a second seed could move.", "",
             "| arm | pruned, before its epoch (val / test) | final (val / test) | final test × control | wall s |",
             "|---|---|---|---|---|"]
    for name, r in runs.items():
        m = r["metrics"]
        final = m.get("pruned", m)  # the control has no pruned model: its metrics are its own
        before = m.get("pruned_no_recovery") if "recover" in name else None
        ratio = "–"
        if control and "test" in final and "test" in control:
            ratio = f"{final['test']['perplexity'] / control['test']['perplexity']:.2f}x"
        lines.append(f"| {name} | {_ppl(before, 'validation')} / {_ppl(before, 'test')} | {_ppl(final, 'validation')} / "
                     f"{_ppl(final, 'test')} | {ratio} | {r['wall_s']} |")
    if ref:
        lines += ["", f"Dense as shipped: {_ppl(ref, 'validation')} / {_ppl(ref, 'test')}."]
    lines += ["", "Commands:", ""] + [f"- {name}: `{r['command']}`" for name, r in runs.items()]
    lines += ["", "Stage wall times (s):", ""] + [f"- {name}: {r['stage_s']}" for name, r in runs.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
