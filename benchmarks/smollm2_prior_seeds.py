"""Paired seed comparison of two arms of smollm2_prior.py runs (issue 15): per seed, the relative test-perplexity
difference A − B (in % of B's perplexity) and the difference in test NLL, then a 95% Student t interval over
seeds (idprior.study.paired.t_interval). Reads committed results JSONs only; runs nothing.

    python benchmarks/smollm2_prior_seeds.py --name smollm2_prior_afterln_30_seeds \\
        --cell benchmarks/results/smollm2_prior_afterln_30.json benchmarks/results/smollm2_prior_30.json \\
        --cell benchmarks/results/smollm2_prior_afterln_30_s1.json benchmarks/results/smollm2_prior_afterln_30_s1.json \\
        --cell benchmarks/results/smollm2_prior_afterln_30_s2.json benchmarks/results/smollm2_prior_afterln_30_s2.json

Each --cell names the file holding arm A and the file holding arm B for one seed; both must be the same seed,
target, task and training budget (else a one-line error).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from idprior import io
from idprior.study.paired import t_interval

SNIP = "snip (prior phase, kind scale, floor, no SN, debias, after-ln)"
FISHER = "fisher + recovery"
SAME = ("seed", "target", "task", "epochs")


def _budget(command: str) -> float:
    """The arm's training epochs: recovery epochs for a post-training arm (--no-train), else its fine-tune's."""
    cli = shlex.split(command)
    flag = "--recover-epochs" if "--no-train" in cli else "--epochs"
    return float(cli[cli.index(flag) + 1]) if flag in cli else 1.0


def _arm(path: Path, arm: str, error) -> tuple[dict, dict]:
    """(the arm's seed, target, task and epochs; its test metrics), or `error` names what is missing."""
    if not path.is_file():
        error(f"--cell {path}: no such results file")
    runs = json.loads(path.read_text()).get("runs", {})
    if arm not in runs:
        error(f"{path} has no arm {arm!r}; its arms: {'; '.join(runs)}")
    metrics = runs[arm]["metrics"]
    head = {"seed": metrics["seed"], "target": metrics["target"], "task": metrics["task"],
            "epochs": _budget(runs[arm]["command"])}
    return head, metrics["pruned"]["test"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", nargs=2, action="append", required=True, metavar=("A_JSON", "B_JSON"),
                   help="results file with arm A and results file with arm B, one seed; repeat per seed")
    p.add_argument("--a", default=SNIP, help="arm A (default: the decoder preset's arm)")
    p.add_argument("--b", default=FISHER, help="arm B (default: fisher + recovery)")
    p.add_argument("--name", default="smollm2_prior_seeds")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2_prior_seeds.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    rows = []
    for a_file, b_file in args.cell:
        head_a, a = _arm(Path(a_file), args.a, p.error)
        head_b, b = _arm(Path(b_file), args.b, p.error)
        if head_a != head_b:
            p.error(f"{a_file} and {b_file} differ in {[k for k in SAME if head_a[k] != head_b[k]]}; pair runs of one seed")
        rows.append({**head_a, "a": a["perplexity"], "b": b["perplexity"],
                     "rel_pct": 100 * (a["perplexity"] - b["perplexity"]) / b["perplexity"], "nll": a["nll"] - b["nll"]})
    rel, nll = t_interval(r["rel_pct"] for r in rows), t_interval(r["nll"] for r in rows)
    result = {"command": command, "a": args.a, "b": args.b, "cells": rows,
              "rel_pct": dict(zip(("mean", "low", "high"), rel)), "nll": dict(zip(("mean", "low", "high"), nll))}
    lines = [f"# Paired seeds: {args.a} − {args.b} (issue 15)", "", "```", command, "```", "",
             "Test perplexity per seed from the committed results files; difference A − B in % of B's perplexity "
             "(negative: A better) and in test NLL; 95% Student t interval over seeds.", "",
             "| seed | target | epochs | A | B | A − B (% of B) | A − B (NLL) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['target']:g} | {r['epochs']:g} | {r['a']:.2f} | {r['b']:.2f} | {r['rel_pct']:+.2f} | "
              f"{r['nll']:+.4f} |" for r in rows]
    lines += ["", f"Mean over {len(rows)} seeds: {rel[0]:+.2f}% [{rel[1]:+.2f}, {rel[2]:+.2f}]; "
              f"NLL {nll[0]:+.4f} [{nll[1]:+.4f}, {nll[2]:+.4f}]."]
    out = Path(args.out_dir)
    io.write_json(out / f"{args.name}.json", result)
    io.write_text(out / f"{args.name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
