"""Which selection keeps SmolLM2-135M's perplexity at 30% post-training pruning? A quick ablation.

    python benchmarks/smollm2_selection.py

The default pipeline (raw function norm, one global ranking) removes 30% of SmolLM2's
decoder-layer parameters almost only from the first layers' FFNs, whose branches are small in
absolute terms because the residual stream is small there, and perplexity rises about 8x. This
script scores once per score type on the same 64 calibration blocks as benchmarks/smollm2.py,
makes a 30% plan with each selection, and measures perplexity with the plan applied as gates (gate
0 = the unit removed; tests/test_arch_surgery.py checks that gates equal surgery) on a fixed
subset of the lm-rt validation split. Baselines: weight magnitude and random units. One seed, no
recovery: a screen, not a verdict. Writes benchmarks/results/smollm2_selection.json and .md.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from idprior import io, models  # noqa: E402
from idprior.arch import get_adapter  # noqa: E402
from idprior.baselines import get_method  # noqa: E402
from idprior.bench import cpu_model  # noqa: E402
from idprior.data import get_task, load_task, make_lm_dataloader  # noqa: E402
from idprior.evaluate import lm_nll  # noqa: E402
from idprior.gates import Gates  # noqa: E402
from idprior.scoring import score  # noqa: E402
from idprior.selection import select  # noqa: E402

SNIP_VARIANTS = [  # (name, score type, selection mode, head_share)
    ("norm (default)", "absolute", "norm", None),
    ("norm, --score relative", "relative", "norm", None),
    ("relative to sub-layer output", "absolute", "relative", None),
    ("energy-per-cost", "absolute", "energy-per-cost", None),
    ("share, head_share 0.3", "absolute", "share", 0.3),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--eval-examples", type=int, default=100)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2_selection.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]

    model, tok = models.load(args.model, get_task("lm-rt"))
    adapter = get_adapter(model)
    data = load_task("lm-rt", max_eval=args.eval_examples)
    train_blocks = make_lm_dataloader(data.splits["train"], tok, batch_size=args.batch, block_size=args.seq_len)
    calib = [b for _, b in zip(range(math.ceil(args.calib_blocks / args.batch)), train_blocks, strict=False)]
    val = make_lm_dataloader(data.splits["validation"], tok, batch_size=args.batch, block_size=args.seq_len)

    def perplexity(units) -> float:
        with Gates(model, adapter) as gates:
            gates.apply_units(units)
            total, count = lm_nll(model, val)
        return math.exp(total / count)

    dense = perplexity([])
    scores = {kind: score(model, calib, relative=kind == "relative") for kind in ("absolute", "relative")}
    rows = []
    plans = {name: select(scores[kind], adapter, target=args.target, mode=mode, head_share=share)
             for name, kind, mode, share in SNIP_VARIANTS}
    for name in ("magnitude", "random"):
        plans[f"baseline: {name}"] = get_method(name).plan(model, adapter, calib, target=args.target, seed=0)
    for name, plan in plans.items():
        kept_ffn = [r["ffn"] for r in plan.structure]
        rows.append({"selection": name, "perplexity": perplexity(plan.units), "counts": plan.counts(),
                     "removed_encoder_params": plan.measures["removed_fraction"]["encoder_params"],
                     "kept_ffn_first_4_layers": kept_ffn[:4], "min_kept_ffn": min(kept_ffn),
                     "kept_head_units": sum(r["head_units"] for r in plan.structure),
                     "head_units_before": sum(r["head_units_before"] for r in plan.structure)})
        print(rows[-1], flush=True)
    alias = models.ALIASES.get(args.model)
    result = {"command": command, "model": alias.description if alias else args.model,
              "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
                          "torch": torch.__version__, "loadavg_start": load_start,
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "target": args.target, "calib_blocks": args.calib_blocks, "seq_len": args.seq_len,
              "eval_examples": args.eval_examples, "dense_perplexity": dense, "rows": rows,
              "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out_dir)
    io.write_json(out / "smollm2_selection.json", result)
    io.write_text(out / "smollm2_selection.md", render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = [f"# Selection screen: {r['model']}, {r['target']:.0%} of decoder-layer parameters, post-training", "",
             "Command:", "", "```", r["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, float32; load "
             f"average {m['loadavg_start']} at start, {m['loadavg_end']} at end; wall time {r['wall_s']} s.", "",
             f"Calibration: first {r['calib_blocks']} blocks of {r['seq_len']} lm-rt training tokens. Perplexity: "
             f"{r['eval_examples']} lm-rt validation snippets (fixed subset), plan applied as gates, no recovery, "
             f"one seed. Dense perplexity {r['dense_perplexity']:.2f}.", "",
             "| selection | perplexity | removed | units removed (head / attn / neuron / ffn) | head units kept | kept FFN, layers 0-3 | min kept FFN |",
             "|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        c = row["counts"]
        lines.append(f"| {row['selection']} | {row['perplexity']:.2f} | {row['removed_encoder_params']:.1%} | "
                     f"{c['head']} / {c['attn']} / {c['neuron']} / {c['ffn']} | {row['kept_head_units']} / {row['head_units_before']} | "
                     f"{row['kept_ffn_first_4_layers']} | {row['min_kept_ffn']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
