"""Do the demo's own bench table and a standalone `idprior bench` agree? (issue 18)

`bash benchmarks/run_demo_agreement.sh` makes three fresh `idprior prune --config demo` runs (each
with its bench stage, RUN/bench.json) and, after each, a standalone `idprior bench` of the
same two models at the same shape in a new process (RUN/bench_standalone/bench.json). This script
reads them all and, for every backend x batch x sequence length, puts the speed-ups side by side:
per run the stage's and the standalone's, and over all six the largest relative distance from
their median. Done when every one is within `--tolerance` (5%). It also gives each speed-up as a
fraction of its FLOPs-ideal one and flags timings the noise guard marked.

    python benchmarks/demo_agreement.py runs/demo_rep1 runs/demo_rep2 runs/demo_rep3

writes benchmarks/results/demo_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import numpy as np
from scipy.stats import mannwhitneyu

from idprior.study.benchutil import publish


def speedups(bench: dict) -> dict[tuple[str, int, int], dict]:
    """{(backend, batch, seq_len): row} of the pruned model's rows of one bench.json."""
    out = {}
    for row in bench["rows"]:
        if row.get("speedup") is not None and row["model"] != bench.get("reference"):
            out[(row["backend"], row["batch_size"], row["seq_len"])] = row
    return out


def dense_latencies(bench: dict, shape: tuple[str, int, int]) -> list[float] | None:
    """The reference model's median latency in each timing process at `shape` (None for older files)."""
    for row in bench["rows"]:
        if row["model"] == bench.get("reference") and (row["backend"], row["batch_size"], row["seq_len"]) == shape:
            return row.get("process_latency_ms")
    return None


def processes_needed(values: dict[str, dict], tolerance: float, benches: int, draws: int = 4000,
                     counts: tuple[int, ...] = (1, 3, 5, 7, 9, 15)) -> dict[str, float] | None:
    """How many fresh processes a bench needs for `benches` benches to agree within `tolerance`.

    Every bench here times the same two models (the demo is deterministic), so the per-process
    speed-ups of all of them are draws from one distribution: that of this VM. Resampling them
    (bootstrap) gives, per process count n, the probability that `benches` medians of n processes all
    lie within `tolerance` of their own median. None without per-process speed-ups.
    """
    pooled = np.array([x for r in values.values() for x in (r.get("process_speedups") or [])])
    if pooled.size < 4:
        return None
    rng = np.random.default_rng(0)
    out = {}
    for n in counts:
        medians = np.median(rng.choice(pooled, size=(draws, benches, n)), axis=2)  # [draws, benches]
        mid = np.median(medians, axis=1, keepdims=True)
        out[str(n)] = float((np.abs(medians / mid - 1).max(axis=1) <= tolerance).mean())
    return out


def paired_estimator(sources: dict[str, dict], shape: tuple[str, int, int]) -> dict | None:
    """Would pairing cancel the noise? Per timing process, the speed-up as the ratio of the two models'
    median latencies (what the bench reports) and as the median of paired ratios, each dense repeat over
    the pruned repeat of the same alternating round (`bench.time_blocks`), which cancels load that
    drifts slowly within a process. Their relative sd over all processes; None when the raw repeats
    cannot be split by process (older files, or processes that kept different numbers of repeats)."""
    ratio, paired = [], []
    for bench in sources.values():
        rows = {r["model"]: r for r in bench["rows"] if (r["backend"], r["batch_size"], r["seq_len"]) == shape}
        ref = rows.get(bench.get("reference"))
        pruned = next((r for m, r in rows.items() if m != bench.get("reference")), None)
        n = len((pruned or {}).get("process_speedups") or [])
        if ref is None or pruned is None or not n:
            return None
        a, b = ref.get("latency_ms_repeats") or [], pruned.get("latency_ms_repeats") or []
        if len(a) != len(b) or not a or len(a) % n:
            return None
        k = len(a) // n  # repeats per process, in process order
        for p in range(n):
            da, db = a[p * k:(p + 1) * k], b[p * k:(p + 1) * k]
            ratio.append(statistics.median(da) / statistics.median(db))
            paired.append(statistics.median(x / y for x, y in zip(da, db)))
    rel_sd = {name: statistics.stdev(v) / statistics.median(v) for name, v in (("ratio", ratio), ("paired", paired))}
    return {"processes": len(ratio), "ratio_of_medians_sd": rel_sd["ratio"], "median_of_paired_sd": rel_sd["paired"],
            "ratio_of_medians": statistics.median(ratio), "median_of_paired": statistics.median(paired)}


def stage_vs_standalone(values: dict[str, dict]) -> dict | None:
    """Does the bench stage inside `idprior prune` measure differently from a standalone `idprior bench`?
    Per-process speed-ups of every stage against every standalone bench: medians and a two-sided
    Mann-Whitney U test (no assumption of normality; each process is one draw)."""
    groups = {kind: [x for n, r in values.items() if n.endswith("/" + kind) for x in (r.get("process_speedups") or [])]
              for kind in ("stage", "standalone")}
    if min(len(g) for g in groups.values()) < 3:
        return None
    test = mannwhitneyu(groups["stage"], groups["standalone"], alternative="two-sided")
    return {"stage_median": statistics.median(groups["stage"]), "standalone_median": statistics.median(groups["standalone"]),
            "n": [len(groups["stage"]), len(groups["standalone"])], "p_value": float(test.pvalue)}


def compare(runs: list[Path], tolerance: float) -> dict:
    sources = {}
    for run in runs:
        for kind, rel in (("stage", "bench.json"), ("standalone", "bench_standalone/bench.json")):
            path = run / rel
            if not path.is_file():
                raise SystemExit(f"error: {path} not found; run benchmarks/run_demo_agreement.sh first")
            sources[f"{run.name}/{kind}"] = json.loads(path.read_text())
    shapes = sorted(set.intersection(*(set(speedups(b)) for b in sources.values())))
    syncs = {name: b["environment"].get("sync_s") for name, b in sources.items()}  # os.sync before each process
    rows = []
    for shape in shapes:
        values = {name: speedups(b)[shape] for name, b in sources.items()}
        s = {name: r["speedup"] for name, r in values.items()}
        mid = statistics.median(s.values())
        spread = max(abs(v - mid) / mid for v in s.values())
        rows.append({"backend": shape[0], "batch_size": shape[1], "seq_len": shape[2], "speedups": s,
                     "fraction_of_ideal": {n: r.get("fraction_of_ideal") for n, r in values.items()},
                     "flops_ideal": statistics.median(r["flops_ideal_speedup"] for r in values.values()),
                     "noisy": [n for n, r in values.items() if r.get("noise")],
                     "process_speedups": {n: r.get("process_speedups") for n, r in values.items()},
                     "process_dense_ms": {n: dense_latencies(sources[n], shape) for n in values},
                     "median": mid, "max_rel_dev": spread, "agree": spread <= tolerance,
                     "processes_needed": processes_needed(values, tolerance, len(values)),
                     "paired_estimator": paired_estimator(sources, shape),
                     "stage_vs_standalone": stage_vs_standalone(values)})
    env = next(iter(sources.values()))["environment"]
    env = dict(env, processes=sorted({b["environment"].get("processes", 1) for b in sources.values()}))
    return {"runs": [str(r) for r in runs], "tolerance": tolerance, "environment": env, "rows": rows, "sync_s": syncs,
            "all_agree": all(r["agree"] for r in rows), "command": "python benchmarks/demo_agreement.py " + shlex.join(sys.argv[1:])}


def markdown(result: dict) -> str:
    env = result["environment"]
    names = list(result["rows"][0]["speedups"]) if result["rows"] else []
    lines = ["# Demo bench stage vs standalone `idprior bench` (issue 18)", "",
             "```", "bash benchmarks/run_demo_agreement.sh", result["command"], "```", "",
             f"Three fresh `idprior prune --config demo` runs; after each, a standalone `idprior bench` of its dense "
             f"and pruned models at the same shape. fp32, {env.get('cpu', '?')}, {env.get('threads', '?')} threads. "
             f"Speed-up = dense median latency / pruned median latency. Agreement: every speed-up within "
             f"{result['tolerance']:.0%} of the median of the six. Fresh processes per bench (the median speed-up over "
             f"them is the bench's figure): {', '.join(map(str, env.get('processes', [1])))}.", "",
             "| backend | batch x seq | " + " | ".join(names) + " | median | max deviation | FLOPs ideal | median % of ideal | verdict |",
             "|---|---|" + "---|" * len(names) + "---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [f"{r['speedups'][n]:.2f}x" + (" (NOISY)" if n in r["noisy"] else "") for n in names]
        frac = r["median"] / r["flops_ideal"]
        lines.append(f"| {r['backend']} | {r['batch_size']} x {r['seq_len']} | " + " | ".join(cells) +
                     f" | {r['median']:.2f}x | {r['max_rel_dev']:.1%} | {r['flops_ideal']:.2f}x | {frac:.0%} | "
                     f"{'agree' if r['agree'] else 'DISAGREE'} |")
    lines += ["", f"**{'All timings agree' if result['all_agree'] else 'Not all timings agree'}** within "
              f"{result['tolerance']:.0%}."]
    needed = [r for r in result["rows"] if r.get("processes_needed")]
    if needed:
        counts = list(needed[0]["processes_needed"])
        lines += ["", "How many fresh processes would make the six agree: the probability that six benches of n processes "
                  f"each all fall within {result['tolerance']:.0%} of their median, resampling the per-process speed-ups "
                  "measured here (all of them time the same two models; `processes_needed` in the script):", "",
                  "| backend | batch x seq | per-process speed-ups: median, sd | " + " | ".join(f"n = {c}" for c in counts) + " |",
                  "|---|---|---|" + "---|" * len(counts)]
        for r in needed:
            pooled = [x for p in r["process_speedups"].values() if p for x in p]
            lines.append(f"| {r['backend']} | {r['batch_size']} x {r['seq_len']} | {statistics.median(pooled):.2f}x, "
                         f"{statistics.stdev(pooled) / statistics.median(pooled):.1%} | "
                         + " | ".join(f"{r['processes_needed'][c]:.0%}" for c in counts) + " |")
    pairs = [r for r in result["rows"] if r.get("paired_estimator")]
    if pairs:
        lines += ["", "Would pairing cancel the noise? Per process, the speed-up as the ratio of median latencies (the "
                  "bench's) and as the median of paired ratios (each dense repeat over the pruned repeat of the same "
                  "alternating round, which cancels load drifting within a process); spread over all processes:", "",
                  "| backend | batch x seq | processes | ratio of medians: median, sd | median of paired ratios: median, sd |",
                  "|---|---|---|---|---|"]
        for r in pairs:
            e = r["paired_estimator"]
            lines.append(f"| {r['backend']} | {r['batch_size']} x {r['seq_len']} | {e['processes']} | "
                         f"{e['ratio_of_medians']:.2f}x, {e['ratio_of_medians_sd']:.1%} | "
                         f"{e['median_of_paired']:.2f}x, {e['median_of_paired_sd']:.1%} |")
    versus = [r for r in result["rows"] if r.get("stage_vs_standalone")]
    if versus:
        lines += ["", "Stage against standalone, every process one draw (two-sided Mann-Whitney U):", "",
                  "| backend | batch x seq | stage: median of processes | standalone: median of processes | processes | p |",
                  "|---|---|---|---|---|---|"]
        for r in versus:
            v = r["stage_vs_standalone"]
            lines.append(f"| {r['backend']} | {r['batch_size']} x {r['seq_len']} | {v['stage_median']:.2f}x | "
                         f"{v['standalone_median']:.2f}x | {v['n'][0]} / {v['n'][1]} | {v['p_value']:.2f} |")
    per_process = [(r, n, p) for r in result["rows"] for n, p in r.get("process_speedups", {}).items() if p]
    if per_process:
        lines += ["", "Per-process speed-ups behind each figure (the figure is their median), the dense model's "
                  "median latency in each process, and the seconds `os.sync()` took before each process (where "
                  "recorded; pending writes of the run's files):", "",
                  "| backend | batch x seq | bench | speed-up per process | dense ms per process | sync s |",
                  "|---|---|---|---|---|---|"]
        for r, n, p in per_process:
            dense, sync = (r.get("process_dense_ms") or {}).get(n), result.get("sync_s", {}).get(n)
            lines.append(f"| {r['backend']} | {r['batch_size']} x {r['seq_len']} | {n} | " + ", ".join(f"{x:.2f}x" for x in p)
                         + " | " + (", ".join(f"{x:.0f}" for x in dense) if dense else "–")
                         + " | " + (", ".join(f"{x:.3f}" for x in sync) if sync else "–") + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="demo run folders (each with bench.json and bench_standalone/)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest relative distance from the median (default 0.05)")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args()
    result = compare(args.runs, args.tolerance)
    publish(args.out_dir, "demo_agreement", result, markdown(result))


if __name__ == "__main__":
    main()
