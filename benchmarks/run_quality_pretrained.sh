#!/usr/bin/env bash
# The exact command sequence behind benchmarks/results/quality_pretrained.{jsonl,md,_paired.png} and
# benchmarks/results/quality_pretrained_preds.safetensors: the from-pretrained (user) protocol of the paired
# benchmark (benchmarks/quality_pretrained.yaml) as two one-thread shards sharing one results file, then the
# report. Resumable: rerunning continues where it stopped (finished cells are never redone; an interrupted
# fine-tune resumes from its last epoch). STOP_MIN limits the wall time of this call (the rest is done by the
# next call).
set -u
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
mkdir -p runs
stop=()
[ -n "${STOP_MIN:-}" ] && stop=(--stop-after-min "$STOP_MIN")
for i in 0 1; do
  idprior bench-quality benchmarks/quality_pretrained.yaml --out runs/quality_pretrained \
      --results benchmarks/results/quality_pretrained.jsonl --threads 1 --resume --shard "$i/2" "${stop[@]}" \
      > "runs/quality_pretrained_shard$i.log" 2>&1 &
done
wait
idprior report benchmarks/results/quality_pretrained.jsonl --out benchmarks/results --reference snip \
    --command "bash benchmarks/run_quality_pretrained.sh" --notes benchmarks/quality_pretrained_notes.md
