#!/usr/bin/env bash
# Issue 18: does the spread of eager / ONNX Runtime speed-ups between fresh processes come from where large
# tensors land in memory? This VM has transparent huge pages in `madvise` mode (AnonHugePages 0 kB), so
# PyTorch's CPU allocator uses 4 kB pages unless THP_MEM_ALLOC_ENABLE=1 asks for huge pages on large
# allocations. The same standalone bench of one demo run (batch 32 x 128, 5 fresh processes), alternating
# without and with the variable (REPS rounds, default 1); the per-process speed-ups and their spread go to
# benchmarks/results/thp_spread.{json,md}. Run it on a quiet machine: it is a timing benchmark.
#   bash benchmarks/run_thp_spread.sh [RUN_FOLDER]      (default runs/demo_rep1, from run_demo_agreement.sh)
set -eu
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
run=${1:-runs/demo_rep1}
outs=()
[ "${SUMMARY_ONLY:-0}" = 1 ] && outs=($(ls -d "$run"/bench_thp?_r? | sort -t_ -k3,3 -k2,2))  # re-render only
for rep in $(seq "${REPS:-1}"); do  # REPS=2: each setting twice
  [ "${SUMMARY_ONLY:-0}" = 1 ] && break
  for thp in 0 1; do
    out=$run/bench_thp${thp}_r$rep; rm -rf "$out"
    if [ "$thp" = 1 ]; then export THP_MEM_ALLOC_ENABLE=1; else unset THP_MEM_ALLOC_ENABLE; fi
    idprior bench --dense "$run/finetuned" --pruned "$run/pruned" --batch-sizes 32 --seq-lens 128 \
        --repeats 5 --warmup 2 --processes 5 --out "$out" > "$out.log" 2>&1
    outs+=("$out")
  done
done
unset THP_MEM_ALLOC_ENABLE
python - "${outs[@]}" <<'PY'
import json, statistics, sys
from idprior import io
rows, lines = [], ["# Between-process spread of speed-ups, without and with THP_MEM_ALLOC_ENABLE=1 (issue 18)", "",
                   "```", "bash benchmarks/run_thp_spread.sh", "```", "",
                   "One demo run's models, standalone `idprior bench` at batch 32 x 128, 2 threads, float32, 5 fresh "
                   "processes per bench, benches alternating without / with the variable. Spread: (max - min) / median "
                   "of the 5 per-process speed-ups.", "",
                   "| bench | THP | backend | per-process speed-ups | median | spread |", "|---|---|---|---|---|---|"]
for folder in sys.argv[1:]:
    bench = json.load(open(f"{folder}/bench.json"))
    thp = "on" if "thp1" in folder else "off"
    for r in bench["rows"]:
        if r["model"] == "dense":
            continue
        s = r["process_speedups"]
        med = statistics.median(s)
        spread = (max(s) - min(s)) / med
        rows.append({"bench": folder, "thp": thp, "backend": r["backend"], "process_speedups": s, "median": med,
                     "spread": spread})
        lines.append(f"| {folder.rsplit('/', 1)[-1]} | {thp} | {r['backend']} | {', '.join(f'{x:.2f}' for x in s)} | "
                     f"{med:.2f}x | {spread:.1%} |")
for thp in ("off", "on"):
    for backend in sorted({r["backend"] for r in rows}):
        sel = [r for r in rows if r["thp"] == thp and r["backend"] == backend]
        allv = [x for r in sel for x in r["process_speedups"]]
        if allv:
            meds = ", ".join(f"{r['median']:.2f}x" for r in sel)
            lines.append(f"\nTHP {thp}, {backend}: all {len(allv)} per-process speed-ups {min(allv):.2f}-{max(allv):.2f}x, "
                         f"median {statistics.median(allv):.2f}x, sd {statistics.stdev(allv):.3f}; medians of 5: {meds}.")
io.write_json("benchmarks/results/thp_spread.json", {"rows": rows})
io.write_text("benchmarks/results/thp_spread.md", "\n".join(lines) + "\n")
print("\n".join(lines))
PY
