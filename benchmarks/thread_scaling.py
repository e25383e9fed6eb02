"""Issue 18 diagnostic: is the gap to the FLOPs-ideal speed-up at batch 32 a matter of threads?

The demo's pruned model keeps 50% of the encoder's parameters in narrower matrices (heads and FFN
neurons cut per layer). With two intra-op threads, each GEMM is split between the threads; a
narrower GEMM gives each thread less work for the same fixed costs (packing, synchronisation), so the
pruned model may scale worse from one thread to two than the dense one, and its speed-up fall short
of the FLOPs ratio where a one-thread timing would not. Here the same run's dense and pruned models
are timed with 1 and with 2 threads, alternating, each bench in fresh processes (`idprior bench
--processes`), eager and ONNX Runtime, batch 32 x 128.

    python benchmarks/thread_scaling.py runs/demo_rep1 --rounds 2     # a quiet machine: it is a timing

Writes benchmarks/results/thread_scaling.{json,md}; the benches' own folders go under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from idprior import io
from idprior.bench import cpu_model, environment


def bench(run: str, threads: int, out: Path, processes: int) -> dict:
    """One `idprior bench` at batch 32 x 128 with `threads`; read back when its bench.json exists."""
    argv = ["bench", "--dense", f"{run}/finetuned", "--pruned", f"{run}/pruned", "--batch-sizes", "32",
            "--seq-lens", "128", "--threads", str(threads), "--processes", str(processes), "--repeats", "5",
            "--warmup", "2", "--out", str(out)]
    if not (out / "bench.json").exists():
        print("$ idprior " + " ".join(shlex.quote(a) for a in argv), flush=True)
        subprocess.run([sys.executable, "-m", "idprior.cli.main", *argv], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return json.loads((out / "bench.json").read_text())


def summarise(result: dict) -> dict:
    """Per backend: the pruned row's speed-up, % of ideal, per-process speed-ups, both models' median ms."""
    rows = result["rows"]
    out = {}
    for backend in ("eager", "onnxruntime"):
        dense = next((r for r in rows if r["backend"] == backend and r["model"] == result["reference"]), None)
        pruned = next((r for r in rows if r["backend"] == backend and r["model"] != result["reference"]), None)
        if dense is None or pruned is None:
            continue
        out[backend] = {"speedup": pruned["speedup"], "ideal": pruned["flops_ideal_speedup"],
                        "fraction_of_ideal": pruned["fraction_of_ideal"],
                        "process_speedups": pruned.get("process_speedups", [pruned["speedup"]]),
                        "dense_ms": dense["latency_ms_median"], "pruned_ms": pruned["latency_ms_median"],
                        "noise": pruned.get("noise", [])}
    return out


def render(result: dict) -> str:
    env = result["environment"]
    lines = ["# Speed-up against threads: dense vs pruned demo model, batch 32 x 128 (issue 18)", "",
             "```", result["command"], "```", "",
             f"Machine: {result['cpu']}, {env['usable_cores']} usable cores; fp32; torch {env['torch']}. Each bench: "
             f"`idprior bench` in {result['processes']} fresh processes (median over them), 5 repeats after 2 "
             "warm-up runs per process; benches alternate 1 and 2 threads. Scaling = the model's 1-thread "
             "median latency / its 2-thread one (2.00 would be perfect).", "",
             "| backend | threads | round | speed-up | % of FLOPs ideal | per-process speed-ups | dense ms | pruned ms |",
             "|---|---|---|---|---|---|---|---|"]
    for b in result["benches"]:
        for backend, s in b["summary"].items():
            lines.append(f"| {backend} | {b['threads']} | {b['round']} | {s['speedup']:.2f}x | "
                         f"{s['fraction_of_ideal']:.0%} | {', '.join(f'{x:.2f}' for x in s['process_speedups'])} | "
                         f"{s['dense_ms']:.0f} | {s['pruned_ms']:.0f} |")
    lines += ["", "Medians over rounds:", "",
              "| backend | threads | speed-up | % of ideal | dense ms | pruned ms |", "|---|---|---|---|---|---|"]
    med = result["medians"]
    for backend in ("eager", "onnxruntime"):
        for threads in ("1", "2"):
            m = med.get(backend, {}).get(threads)
            if m:
                lines.append(f"| {backend} | {threads} | {m['speedup']:.2f}x | {m['fraction_of_ideal']:.0%} | "
                             f"{m['dense_ms']:.0f} | {m['pruned_ms']:.0f} |")
    lines += ["", "Scaling from 1 to 2 threads (1-thread ms / 2-thread ms):", "",
              "| backend | dense | pruned |", "|---|---|---|"]
    for backend, by in med.items():
        if "1" in by and "2" in by:
            lines.append(f"| {backend} | {by['1']['dense_ms'] / by['2']['dense_ms']:.2f} | "
                         f"{by['1']['pruned_ms'] / by['2']['pruned_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished `idprior prune` run folder (with finetuned/ and pruned/)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of a 1-thread and a 2-thread bench")
    p.add_argument("--processes", type=int, default=3, help="fresh processes per bench")
    p.add_argument("--work", default="runs/thread_scaling", help="folder for the benches' own outputs")
    p.add_argument("--name", default="thread_scaling")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    if not (Path(args.run) / "pruned").is_dir() or not (Path(args.run) / "finetuned").is_dir():
        p.error(f"{args.run} has no finetuned/ and pruned/ folders; give a finished `idprior prune` run")
    command = "python benchmarks/thread_scaling.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    benches = []
    for r in range(args.rounds):
        for threads in (1, 2):
            load = os.getloadavg()[0]  # before the bench: a busy machine shows here
            res = bench(args.run, threads, Path(args.work) / f"t{threads}_r{r}", args.processes)
            benches.append({"threads": threads, "round": r, "summary": summarise(res), "load_avg_1min": load})
    medians: dict = {}
    for backend in ("eager", "onnxruntime"):
        for threads in (1, 2):
            got = [b["summary"][backend] for b in benches if b["threads"] == threads and backend in b["summary"]]
            if got:
                medians.setdefault(backend, {})[str(threads)] = {
                    k: statistics.median(g[k] for g in got) for k in ("speedup", "fraction_of_ideal", "dense_ms",
                                                                      "pruned_ms")}
    result = {"command": command, "environment": environment(2), "cpu": cpu_model(), "processes": args.processes,
              "benches": benches, "medians": medians, "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out_dir)
    io.write_json(out / f"{args.name}.json", result)
    io.write_text(out / f"{args.name}.md", render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
