"""Speed of structurally pruned models vs the dense one: is the FLOPs saving real on a CPU?

    python benchmarks/speed.py                                      # MiniLM-L6, 50% of encoder params
    python benchmarks/speed.py --model smollm2-135m --target 0.3    # SmolLM2-135M (Llama, GQA)

Loads the model (MiniLM-L6 as a 2-label classifier, SmolLM2 as a causal LM), makes pruning plans
that remove `--target` of the encoder (transformer-layer) parameters, applies surgery and times
dense vs pruned in one process, PyTorch eager and ONNX Runtime. Accuracy is not the point here,
so the plans use weight-magnitude scores (idprior's `magnitude` baseline: the Frobenius norm of
the weights a unit owns; no data, no training). Two plan shapes are measured:
  neurons        global ranking over heads and FFN neurons (mode "norm"); raw magnitudes put every
                 head above every neuron, so only FFN neurons go;
  heads+neurons  mode "share" with head_share 0.3: 30% of the budget from heads, the rest from neurons.
`--round-to N` adds a variant of the first plan whose kept FFN width per layer is rounded down to
a multiple of N (the extra neurons removed are the next-lowest by magnitude).
Writes benchmarks/results/speed_<model>.json and .md, with this command and the machine at the top.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from idprior.arch import get_adapter  # noqa: E402
from idprior.baselines.magnitude import magnitude_scores  # noqa: E402
from idprior.method.plan import PruningPlan, measures, normalize, structure_after  # noqa: E402
from idprior.method.units import Unit  # noqa: E402
from idprior.model import load as models
from idprior.pipeline.bench import benchmark, format_bench_markdown  # noqa: E402
from idprior.study.benchutil import (  # noqa: E402
    HEAD_SHARE,
    load_for_timing,
    magnitude_plan,
    pruned_copy,
    publish,
    set_priority,
)

MODELS = {  # name -> (short name for files, default target, batch sizes, seq lens, repeats by seq len)
    "minilm-l6": ("minilm", 0.5, (1, 32), (128, 512), {128: 10, 512: 4}),
    "smollm2-135m": ("smollm2", 0.3, (1, 32), (128,), {128: 4}),
}


def round_neurons(plan: PruningPlan, adapter, scores: dict[Unit, float], multiple: int, total_params: int) -> PruningPlan:
    """Remove more of each layer's lowest-score neurons until its kept FFN width is a multiple of `multiple`."""
    units = set(plan.units)
    for layer in range(adapter.num_layers):
        ffn = adapter.shape(layer).ffn_dim
        if Unit("ffn", layer) in units or ffn == 0:
            continue
        gone = {u for u in units if u.kind == "neuron" and u.layer == layer}
        kept = ffn - len(gone)
        extra = kept % multiple if kept > multiple else 0
        remaining = sorted((j for j in range(ffn) if Unit("neuron", layer, j) not in gone),
                           key=lambda j: (scores[Unit("neuron", layer, j)], j))
        units |= {Unit("neuron", layer, j) for j in remaining[:extra]}
    units = normalize(adapter, units)
    return PruningPlan(units=units, method="magnitude", selection=f"{plan.selection}+round{multiple}",
                       target=plan.target, measure=plan.measure, measures=measures(adapter, units, 128, total_params),
                       structure=structure_after(adapter, units), warnings=plan.warnings)


def plan_summary(plan: PruningPlan) -> dict:
    return {"selection": plan.selection, "counts": plan.counts(), "measures": plan.measures,
            "kept_per_layer": [{"heads": r["head_units"], "ffn": r["ffn"]} for r in plan.structure],
            "warnings": plan.warnings}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l6", choices=sorted(MODELS))
    p.add_argument("--target", type=float, default=None, help="fraction of encoder parameters to remove")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-sizes", default=None, help="comma list (default per model)")
    p.add_argument("--seq-lens", default=None, help="comma list (default per model)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats for every length (default per model)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--round-to", type=int, default=0, help="also measure the neurons plan with FFN widths rounded down to a multiple of N")
    p.add_argument("--nice", type=int, default=0,
                   help="change this process's scheduling priority first (e.g. -15 on a shared machine; negative needs root)")
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.nice:
        set_priority(args.nice)

    short, target, batch_sizes, seq_lens, repeats = MODELS[args.model]
    target = args.target if args.target is not None else target
    batch_sizes = tuple(int(x) for x in args.batch_sizes.split(",")) if args.batch_sizes else batch_sizes
    seq_lens = tuple(int(x) for x in args.seq_lens.split(",")) if args.seq_lens else seq_lens
    repeats = {t: args.repeats or repeats.get(t, 3) for t in seq_lens}
    command = "python benchmarks/speed.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    dense = load_for_timing(args.model)
    load_s = time.perf_counter() - t0
    adapter = get_adapter(dense)
    t0 = time.perf_counter()
    scores = magnitude_scores(adapter)
    total = sum(p.numel() for p in dense.parameters())
    plans = {"neurons": magnitude_plan(dense, target), "heads+neurons": magnitude_plan(dense, target, head_share=HEAD_SHARE)}
    if args.round_to:
        plans[f"neurons-round{args.round_to}"] = round_neurons(plans["neurons"], adapter, scores, args.round_to, total)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pruned = {}
    for name, plan in plans.items():
        pruned[f"pruned-{name}"] = pruned_copy(dense, plan)
    surgery_s = time.perf_counter() - t0

    result = benchmark({"dense": dense, **pruned}, batch_sizes=batch_sizes, seq_lens=seq_lens, threads=args.threads,
                       repeats=repeats, warmup=args.warmup, onnx=not args.no_onnx)
    result["command"] = command
    result["model"] = models.ALIASES[args.model].description
    result["target_encoder_params_removed"] = target
    result["scores"] = ("weight magnitude: Frobenius norm of the weights each unit owns "
                        "(idprior.baselines.magnitude.weight_energies); no data, accuracy not measured")
    result["plans"] = {f"pruned-{k}": plan_summary(v) for k, v in plans.items()}
    result["stage_s"] = {"load": round(load_s, 1), "plans": round(plan_s, 1), "surgery": round(surgery_s, 1),
                         "benchmark": result["environment"]["wall_s"]}
    result["script_wall_s"] = round(time.perf_counter() - started, 1)

    publish(args.out_dir, f"speed_{short}", result, render(result))
    return 0


def render(result: dict) -> str:
    lines = [f"# Speed: {result['model']}, dense vs pruned", "", "Command:", "", "```", result["command"], "```", ""]
    lines += [f"Plans remove {result['target_encoder_params_removed']:.0%} of encoder parameters; scores: {result['scores']}.", ""]
    lines += ["| model | heads removed | FFN neurons removed | attn / ffn sub-layers removed | kept (heads, ffn) per layer |",
              "|---|---|---|---|---|"]
    for name, plan in result["plans"].items():
        c = plan["counts"]
        kept = ", ".join(f"({r['heads']}, {r['ffn']})" for r in plan["kept_per_layer"])
        lines.append(f"| {name} | {c['head']} | {c['neuron']} | {c['attn']} / {c['ffn']} | {kept} |")
    lines += ["", format_bench_markdown(result).rstrip(), "", f"Script wall time {result['script_wall_s']} s "
              f"(stages, s: {result['stage_s']})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
