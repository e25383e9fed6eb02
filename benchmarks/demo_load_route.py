"""Issue 18 diagnostic: does the way the bench loads the dense model change its eager latency?

The demo's bench stage loads both models with `models.load(folder, task)`; the standalone `idprior bench`
loads the dense model through `cli.bench.dense_for`, which first loads the whole pruned model to copy its
head, then the dense one (another allocation history). The stage's dense model had timed faster in two of
three demo runs (benchmarks/results/demo_agreement.md). Here each route runs in its own fresh process,
alternating, on the same run folder: time dense and pruned eager at batch 32 x 128 (2 threads, warmup 2,
median of 7).

    python benchmarks/demo_load_route.py runs/demo_rep1 --pairs 6     # a quiet machine: it is a timing

Writes benchmarks/results/demo_load_route.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from idprior import io


def child(route: str, run: str, threads: int) -> dict:
    import gc

    import torch

    from idprior import models
    from idprior.data import get_task

    torch.set_num_threads(threads)
    if route == "stage":  # pipeline.stage_bench's loaders
        task = get_task("rt-polarity")
        dense, pruned = models.load(f"{run}/finetuned", task)[0], models.load(f"{run}/pruned", task)[0]
    else:  # cli.bench's loaders
        from idprior.cli.bench import dense_for
        from idprior.cli.export import load_with_head

        dense, pruned = dense_for(f"{run}/finetuned", f"{run}/pruned"), load_with_head(f"{run}/pruned")[0]
    x = torch.randint(1000, 20000, (32, 128), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    out = {"route": route}
    gc.disable()
    for name, m in (("dense", dense), ("pruned", pruned)):
        m.eval()
        with torch.inference_mode():
            for _ in range(2):
                m(input_ids=x, attention_mask=mask)
            times = []
            for _ in range(7):
                t = time.perf_counter()
                m(input_ids=x, attention_mask=mask)
                times.append((time.perf_counter() - t) * 1e3)
        out[f"{name}_ms"] = statistics.median(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a demo run folder (finetuned/ and pruned/)")
    p.add_argument("--pairs", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", choices=("stage", "standalone"), help=argparse.SUPPRESS)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.run, args.threads)))
        return 0
    load_start = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for _ in range(args.pairs):
        for route in ("stage", "standalone"):
            done = subprocess.run([sys.executable, __file__, args.run, "--child", route, "--threads", str(args.threads)],
                                  check=True, capture_output=True, text=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    summary = {}
    for route in ("stage", "standalone"):
        mine = [r for r in rows if r["route"] == route]
        summary[route] = {"dense_ms_median": statistics.median(r["dense_ms"] for r in mine),
                          "pruned_ms_median": statistics.median(r["pruned_ms"] for r in mine),
                          "speedups": [round(r["dense_ms"] / r["pruned_ms"], 3) for r in mine]}
    result = {"command": "python benchmarks/demo_load_route.py " + " ".join(sys.argv[1:]), "threads": args.threads,
              "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
              "rows": rows, "summary": summary}
    lines = ["# Issue 18: does the bench's load route change the dense model's eager latency?", "",
             f"`{result['command']}` (fresh process per row, routes alternating; batch 32 x 128, fp32, "
             f"{args.threads} threads, warmup 2, median of 7; load average {load_start} at start, "
             f"{result['loadavg_end']} at end)", "",
             "| route | dense ms (median over processes) | pruned ms | per-process speed-ups | median speed-up |",
             "|---|---|---|---|---|"]
    for route, s in summary.items():
        lines.append(f"| {route} | {s['dense_ms_median']:.0f} | {s['pruned_ms_median']:.0f} | "
                     f"{', '.join(f'{v:.2f}' for v in s['speedups'])} | {statistics.median(s['speedups']):.2f} |")
    out = Path(args.out_dir)
    io.write_json(out / "demo_load_route.json", result)
    io.write_text(out / "demo_load_route.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
