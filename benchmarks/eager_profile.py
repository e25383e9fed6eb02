"""Where a pruned model's batch-1 eager forward spends its time: per layer, per sub-module, per op.

    python benchmarks/eager_profile.py --dense runs/demo/finetuned --pruned runs/demo/pruned --threads 2
    python benchmarks/eager_profile.py --threads 2    # MiniLM-L6 and speed.py's 50% heads+neurons magnitude plan

Batch 1 in eager stays further from the FLOPs-ideal speed-up than batch 32 (issue 18): a batch-1
forward is short, so costs that do not shrink with pruning (op launches, Python in the
transformers modules, layer norms, residual adds) weigh more. This script shows them. Each model
runs `--repeats` eager forwards (fp32, inference mode, the same random batch, after `--warmup`
untimed ones) under torch.profiler, with a record_function range around every transformer layer
(the adapter's `layers()`) and each of its direct sub-modules. Per forward it reports the CPU
time (inclusive) and the number of top-level aten ops of every range, the layer's FLOPs, the
ops with the most self CPU time, and a line fit of layer time on layer FLOPs over all layers of
all models: its intercept is the fixed cost per layer that pruning does not remove. The
profiler adds overhead, so these times are for comparing parts, not for quoting latency (the
unprofiled median beside them is a rough check; `idprior bench` measures speed). Writes
OUT_DIR/NAME.json and NAME.md.
"""

from __future__ import annotations

import argparse
import collections
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from idprior.arch import get_adapter
from idprior.method.flops import model_flops
from idprior.method.spectral import fold
from idprior.model.export import input_names, is_decoder_model
from idprior.pipeline.bench import environment
from idprior.study import benchutil


def mark_ranges(model) -> tuple[list[str], list]:
    """Wrap every layer of `model` and each of its direct sub-modules in a profiler range
    ("layer3", "layer3.attention", ...). Returns the range names in forward order and the hook
    handles (remove them when done)."""
    names, handles = [], []
    for i, layer in enumerate(get_adapter(model).layers()):
        parts = [(f"layer{i}", layer)] + [(f"layer{i}.{child}", module) for child, module in layer.named_children()]
        for name, module in parts:
            names.append(name)
            handles += _range_hooks(module, name)
    return names, handles


def _range_hooks(module, name: str) -> list:
    open_ranges = []

    def enter(mod, args):
        rf = torch.profiler.record_function(name)
        rf.__enter__()
        open_ranges.append(rf)

    def leave(mod, args, output):
        open_ranges.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def forward_fn(model, batch: int, seq_len: int):
    """A zero-argument eager forward of `model` on a seeded random batch [batch, seq_len], as idprior bench runs it."""
    gen = torch.Generator().manual_seed(1000 * batch + seq_len)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len), generator=gen)  # [B, T]
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    kwargs = {k: full[k] for k in input_names(model)}
    if is_decoder_model(model):
        kwargs["use_cache"] = False

    def run():
        with torch.inference_mode():
            return model(**kwargs).logits

    return run


def profile_model(model, batch: int, seq_len: int, repeats: int, warmup: int, top: int) -> dict:
    """Profile `repeats` forwards; every time is in ms per forward."""
    fold(model)
    model.eval()
    run = forward_fn(model, batch, seq_len)
    for _ in range(warmup):
        run()
    plain = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        plain.append(time.perf_counter() - t0)
    names, handles = mark_ranges(model)
    try:
        t0 = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(repeats):
                run()
        profiled_s = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    flops = model_flops(model, seq_len)["layers"]
    ranges = range_table(prof.events(), names, repeats)
    for i, row in enumerate(flops):
        ranges[f"layer{i}"]["mflops"] = batch * row["total"] / 1e6
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {
        "unprofiled_ms_median": 1000 * float(np.median(plain)),
        "profiled_ms": 1000 * profiled_s / repeats,
        "ranges": ranges,
        "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000 / repeats, "calls": e.count / repeats}
                    for e in ops if e.key.startswith("aten::")][:top],
    }


def range_table(events, names: list[str], repeats: int) -> dict[str, dict]:
    """Per range: inclusive CPU ms and top-level aten ops (an aten op not inside another), per forward."""
    wanted = set(names)
    ms: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for e in events:
        if e.name in wanted:
            ms[e.name] += e.cpu_time_total / 1000
        elif e.name.startswith("aten::") and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")):
            parent = e.cpu_parent
            while parent is not None:  # count the op in every range around it (sub-module and layer)
                if parent.name in wanted:
                    ops[parent.name] += 1
                parent = parent.cpu_parent
    return {n: {"ms": ms[n] / repeats, "aten_ops": ops[n] / repeats} for n in names}


def fixed_cost_fit(profiles: dict) -> dict:
    """Least squares layer ms = fixed + per_gflop * layer GFLOPs over every layer of every model."""
    xs, ys = [], []
    for prof in profiles.values():
        for row in prof["ranges"].values():
            if "mflops" in row:
                xs.append(row["mflops"] / 1000)
                ys.append(row["ms"])
    if len(set(xs)) < 2:
        return {"fixed_ms_per_layer": None, "ms_per_gflop": None, "layers": len(xs)}
    slope, intercept = np.polyfit(xs, ys, 1)
    return {"fixed_ms_per_layer": float(intercept), "ms_per_gflop": float(slope), "layers": len(xs)}


def load_models(args) -> dict:
    if bool(args.dense) != bool(args.pruned):
        raise SystemExit("give both --dense and --pruned, or neither")
    if args.pruned:
        from idprior.cli.bench import load_dense_like
        from idprior.cli.export import load_with_head

        pruned = load_with_head(args.pruned)[0]
        return {"dense": load_dense_like(args.dense, pruned), "pruned": pruned}
    dense = benchutil.load_for_timing("minilm-l6")
    plan = benchutil.magnitude_plan(dense, 0.5, head_share=benchutil.HEAD_SHARE)
    return {"dense": dense, "pruned": benchutil.pruned_copy(dense, plan)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", help="dense model (alias or folder); with --pruned")
    p.add_argument("--pruned", help="pruned model folder (RUN/pruned); with --dense")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--top", type=int, default=15, help="ops listed by self CPU time")
    p.add_argument("--nice", type=int, default=0, help="as in benchmarks/speed.py")
    p.add_argument("--name", default="eager_profile", help="output file stem")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.nice:
        benchutil.set_priority(args.nice)
    command = "python benchmarks/eager_profile.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(args.threads)
    models = load_models(args)
    result = {"command": command, "environment": environment(args.threads), "batch": args.batch,
              "seq_len": args.seq_len, "repeats": args.repeats, "profiles": {}}
    for name, model in models.items():
        result["profiles"][name] = profile_model(model, args.batch, args.seq_len, args.repeats, args.warmup, args.top)
    result["fit"] = fixed_cost_fit(result["profiles"])
    benchutil.publish(args.out_dir, args.name, result, render(result))
    return 0


def render(result: dict) -> str:
    env, profiles = result["environment"], result["profiles"]
    names = list(profiles)
    lines = [f"# Eager forward profile, batch {result['batch']} x {result['seq_len']} tokens", "", "Command:", "",
             "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores; {env['threads']} threads; fp32; torch "
             f"{env['torch']}. torch.profiler over {result['repeats']} forwards per model; times are CPU ms per "
             "forward, inclusive, with the profiler's overhead (compare parts, do not quote them as latency).", ""]
    lines += ["| model | unprofiled median ms | profiled ms | in layers ms | outside layers ms |", "|---|---|---|---|---|"]
    for name, prof in profiles.items():
        in_layers = sum(r["ms"] for k, r in prof["ranges"].items() if "." not in k)
        lines.append(f"| {name} | {prof['unprofiled_ms_median']:.2f} | {prof['profiled_ms']:.2f} | {in_layers:.2f} | "
                     f"{prof['profiled_ms'] - in_layers:.2f} |")
    lines += ["", "| range | " + " | ".join(f"{n} ms | {n} aten ops | {n} MFLOPs" for n in names) + " |",
              "|---|" + "---|---|---|" * len(names)]
    for key in dict.fromkeys(k for prof in profiles.values() for k in prof["ranges"]):
        cells = []
        for prof in profiles.values():
            row = prof["ranges"].get(key)
            mflops = f"{row['mflops']:.1f}" if row and "mflops" in row else ""
            cells.append("– | – | –" if row is None else f"{row['ms']:.3f} | {row['aten_ops']:.0f} | {mflops}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "Ops with the most self CPU time (ms per forward, calls per forward):", "",
              "| op | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    per_model = {n: {o["op"]: o for o in profiles[n]["top_ops"]} for n in names}
    for op in dict.fromkeys(o["op"] for n in names for o in profiles[n]["top_ops"]):
        cells = [f"{per_model[n][op]['self_ms']:.3f} ({per_model[n][op]['calls']:.0f})" if op in per_model[n] else "–"
                 for n in names]
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    fit = result["fit"]
    if fit["fixed_ms_per_layer"] is not None:
        lines += ["", f"Line fit over {fit['layers']} layers: layer ms = {fit['fixed_ms_per_layer']:.3f} + "
                      f"{fit['ms_per_gflop']:.3f} x GFLOPs. The intercept is the per-layer cost that pruning a "
                      "layer's heads and neurons does not remove."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
