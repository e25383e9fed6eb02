#!/usr/bin/env bash
# The exact command sequence behind benchmarks/results/quality_pretrained.{jsonl,md,_paired.png} and
# benchmarks/results/quality_pretrained_preds.safetensors: the from-pretrained (user) protocol of the paired
# benchmark (benchmarks/quality_pretrained.yaml) as two one-thread shards sharing one results file, then the
# report. Resumable: rerunning continues where it stopped (finished cells are never redone; an interrupted
# fine-tune resumes from its last epoch). STOP_MIN limits the wall time of this call (the rest is done by the
# next call). TARGETS / TASKS / SEEDS (comma lists) run only that slice of the grid, e.g. TARGETS=0.3,0.7 for the
# secondary targets before every 50% cell is done; SHARDS=1 runs one process instead of two.
set -u
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
mkdir -p runs
extra=()
[ -n "${STOP_MIN:-}" ] && extra=(--stop-after-min "$STOP_MIN")
[ -n "${TARGETS:-}" ] && extra+=(--targets "$TARGETS")
[ -n "${TASKS:-}" ] && extra+=(--tasks "$TASKS")
[ -n "${SEEDS:-}" ] && extra+=(--seeds "$SEEDS")
n=${SHARDS:-2}
for ((i = 0; i < n; i++)); do
  idprior bench-quality benchmarks/quality_pretrained.yaml --out runs/quality_pretrained \
      --results benchmarks/results/quality_pretrained.jsonl --threads 1 --resume --shard "$i/$n" "${extra[@]}" \
      > "runs/quality_pretrained_shard$i.log" 2>&1 &
done
wait
idprior report benchmarks/results/quality_pretrained.jsonl --out benchmarks/results --reference snip-no-sn \
    --command "bash benchmarks/run_quality_pretrained.sh" --notes benchmarks/quality_pretrained_notes.md
