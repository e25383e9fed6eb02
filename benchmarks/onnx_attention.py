"""ONNX Runtime latency of MiniLM-L6, dense vs 50% pruned, with attention exported two ways.

    python benchmarks/onnx_attention.py --nice -15

`eager`: the attention traced as matmul, additive mask, softmax, matmul (idprior's export
before opset 23). `fused`: SDPA exported at opset 23 as one ONNX `Attention` node per layer
(idprior's default for encoders now). The dense model and the two 50% weight-magnitude plans of
benchmarks/speed.py (neurons only; heads + neurons: idprior.study.benchutil.minilm_timing_models) are
exported both ways, and all six ONNX Runtime sessions are timed in one process in alternating blocks (same inputs; idprior.pipeline.bench's
scheme), so the two modes are compared on the same machine state. Writes benchmarks/results/onnx_attention.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from idprior.method.flops import model_flops
from idprior.pipeline.bench import environment, latency_stats, loadavg, time_blocks
from idprior.study.benchutil import ATTENTION_MODES as MODES
from idprior.study.benchutil import (
    export_attention_modes,
    minilm_timing_models,
    ort_runners,
    publish,
    set_priority,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="32x128,1x128", help="comma list of BATCHxLENGTH (default 32x128,1x128)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nice", type=int, default=0, help="as in benchmarks/speed.py")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.nice:
        set_priority(args.nice)
    command = "python benchmarks/onnx_attention.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    models = minilm_timing_models()
    dense = models["dense"]
    result = {"command": command, "environment": environment(args.threads), "loadavg_start": loadavg(),
              "models": {}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="idprior-attn-") as tmp:
        sessions = export_attention_modes(models, tmp, args.threads, result["models"])
        for name, model in models.items():
            result["models"][name]["gflops"] = {str(t): model_flops(model, t)["total"] / 1e9 for _, t in shapes}
        for batch, seq_len in shapes:
            times = time_blocks(ort_runners(sessions, dense, batch, seq_len), args.repeats, args.warmup)
            for (name, mode), seconds in times.items():
                result["rows"].append({"model": name, "attention": mode, "batch_size": batch, "seq_len": seq_len,
                                       **latency_stats(seconds, batch)})
    result["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    publish(args.out_dir, "onnx_attention", result, render(result))
    return 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = ["# ONNX Runtime: attention exported eager vs fused (MiniLM-L6, dense vs 50% pruned)", "", "Command:", "",
             "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores; {env['threads']} intra-op threads; fp32; "
             f"torch {env['torch']}, onnxruntime {env['onnxruntime']}, transformers {env['transformers']}. "
             f"Load average at start {result['loadavg_start']}, at end {result['loadavg_end']}; wall {result['wall_s']} s. "
             "All six sessions timed per shape in alternating blocks of 5 after 0.1 s of untimed runs (median of repeats); "
             "same random tokens, no padding.", "",
             "| model | GFLOPs/seq | max abs diff vs PyTorch, eager / fused |", "|---|---|---|"]
    for name, info in result["models"].items():
        gflops = ", ".join(f"{v:.3f} @T={t}" for t, v in info["gflops"].items())
        lines.append(f"| {name} | {gflops} | {info['eager_max_abs_diff']:.1e} / {info['fused_max_abs_diff']:.1e} |")
    lines += ["", "| batch x length | model | eager ms | fused ms | fused / eager | speed-up eager | speed-up fused | "
              "FLOPs-ideal | measured/ideal eager | measured/ideal fused |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows = {(r["batch_size"], r["seq_len"], r["model"], r["attention"]): r["latency_ms_median"] for r in result["rows"]}
    for batch, seq_len in dict.fromkeys((r["batch_size"], r["seq_len"]) for r in result["rows"]):
        for name, info in result["models"].items():
            ms = {m: rows[(batch, seq_len, name, m)] for m in MODES}
            up = {m: rows[(batch, seq_len, "dense", m)] / ms[m] for m in MODES}
            ideal = result["models"]["dense"]["gflops"][str(seq_len)] / info["gflops"][str(seq_len)]
            lines.append(f"| {batch} x {seq_len} | {name} | {ms['eager']:.1f} | {ms['fused']:.1f} | "
                         f"{ms['fused'] / ms['eager']:.2f} | {up['eager']:.2f}x | {up['fused']:.2f}x | {ideal:.2f}x | "
                         f"{up['eager'] / ideal:.0%} | {up['fused'] / ideal:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
