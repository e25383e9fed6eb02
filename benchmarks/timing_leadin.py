"""Why `idprior bench` times ONNX Runtime in blocks after a lead-in: the same sessions, timed four ways.

    python benchmarks/timing_leadin.py --nice -15

The six ONNX Runtime sessions of benchmarks/onnx_attention.py (MiniLM-L6 dense and two 50%
weight-magnitude plans, each exported with eager and with fused attention) are timed with:

  - `alternate`: one timed call per session in turn, no untimed call between (idprior's timer
    before this change);
  - `blocks, lead-in L s`: idprior.pipeline.bench.time_blocks, blocks of 5 timed calls per session,
    alternating, each block after untimed calls for L seconds (at least one call). L = 0.1 is
    idprior's default.

If the sessions did not disturb each other, every scheme would give the same medians. Writes
benchmarks/results/timing_leadin.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from idprior.pipeline.bench import environment, loadavg, time_blocks
from idprior.study.benchutil import (
    export_attention_modes,
    minilm_timing_models,
    ort_runners,
    publish,
    set_priority,
)

LEAD_INS = (0.0, 0.05, 0.1, 0.5)


def alternate(runners: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """One timed call per runner per round, order reversed every other round, no lead-in."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict = {name: [] for name in runners}
    order = list(runners)
    for r in range(repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", default="1x128,32x128", help="comma list of BATCHxLENGTH")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--nice", type=int, default=0, help="as in benchmarks/speed.py")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if args.nice:
        set_priority(args.nice)
    command = "python benchmarks/timing_leadin.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    models = minilm_timing_models()
    result = {"command": command, "environment": environment(args.threads), "loadavg_start": loadavg(), "rows": []}
    schemes = {"alternate": lambda r: alternate(r, args.repeats, 2)}
    schemes |= {f"blocks, lead-in {s:g} s": (lambda r, s=s: time_blocks(r, args.repeats, 2, lead_in_s=s)) for s in LEAD_INS}
    with tempfile.TemporaryDirectory(prefix="idprior-leadin-") as tmp:
        sessions = export_attention_modes(models, tmp, args.threads, {})
        for batch, seq_len in shapes:
            runners = ort_runners(sessions, models["dense"], batch, seq_len)
            for scheme, timer in schemes.items():
                times = timer(runners)
                for (name, mode), seconds in times.items():
                    result["rows"].append({"scheme": scheme, "batch_size": batch, "seq_len": seq_len, "model": name,
                                           "attention": mode, "median_ms": 1000 * sorted(seconds)[len(seconds) // 2]})
    result["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    publish(args.out_dir, "timing_leadin", result, render(result))
    return 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = ["# ONNX Runtime timing: strict alternation vs blocks after a lead-in (MiniLM-L6, six sessions)", "",
             "Command:", "", "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores; {env['threads']} intra-op threads per session; "
             f"fp32; onnxruntime {env['onnxruntime']}. Load average at start {result['loadavg_start']}, at end "
             f"{result['loadavg_end']}; wall {result['wall_s']} s. Median latency (ms) of each session; speed-up = dense "
             "/ pruned with the same attention export.", "",
             "| batch x length | scheme | attention | dense ms | pruned-neurons ms | pruned-heads+neurons ms | "
             "speed-up neurons | speed-up heads+neurons |", "|---|---|---|---|---|---|---|---|"]
    ms = {(r["batch_size"], r["seq_len"], r["scheme"], r["attention"], r["model"]): r["median_ms"] for r in result["rows"]}
    keys = dict.fromkeys((r["batch_size"], r["seq_len"], r["scheme"], r["attention"]) for r in result["rows"])
    for b, t, scheme, mode in keys:
        d, n, h = (ms[(b, t, scheme, mode, m)] for m in ("dense", "pruned-neurons", "pruned-heads+neurons"))
        lines.append(f"| {b} x {t} | {scheme} | {mode} | {d:.1f} | {n:.1f} | {h:.1f} | {d / n:.2f}x | {d / h:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
