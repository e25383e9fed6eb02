#!/usr/bin/env bash
# Issue 18: three fresh `idprior prune --config demo` runs, each followed by a standalone `idprior bench`
# of its models at the demo's bench shape (batch 32 x 128) in new processes (three, as the demo's stage
# does since the first run of this script: the median over fresh processes), then the comparison
# (benchmarks/results/demo_agreement.{json,md}) and a batch-1 standalone bench + eager profile of the
# last run. Run it on a quiet machine (nothing else heavy): it is a timing benchmark.
set -eu
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
runs=()
timer=(); [ -x /usr/bin/time ] && timer=(/usr/bin/time -v)  # wall time and peak memory, where installed
for i in 1 2 3; do
  out=runs/demo_rep$i
  "${timer[@]}" idprior prune --config demo --overwrite --out "$out" > "$out.log" 2>&1
  idprior bench --dense "$out/finetuned" --pruned "$out/pruned" --batch-sizes 32 --seq-lens 128 \
      --repeats 5 --warmup 2 --processes 3 --out "$out/bench_standalone" >> "$out.log" 2>&1
  runs+=("$out")
done
python benchmarks/demo_agreement.py "${runs[@]}"
[ "${AGREEMENT_ONLY:-0}" = 1 ] && exit 0  # AGREEMENT_ONLY=1: the agreement alone (batch 1 below measured before)
# batch 1 (not in the demo's own table): both backends, then where eager's time goes
idprior bench --dense runs/demo_rep3/finetuned --pruned runs/demo_rep3/pruned --batch-sizes 1 --seq-lens 128 \
    --out runs/demo_rep3/bench_b1 > runs/demo_rep3_b1.log 2>&1
cp runs/demo_rep3/bench_b1/bench.json benchmarks/results/demo_bench_b1.json
cp runs/demo_rep3/bench_b1/bench.md benchmarks/results/demo_bench_b1.md
python benchmarks/eager_profile.py --dense runs/demo_rep3/finetuned --pruned runs/demo_rep3/pruned --threads 2 \
    --out-dir benchmarks/results --name demo_eager_profile
