#!/usr/bin/env bash
# HISTORY: the commands behind the old, unpaired grid (benchmarks/results/quality_minilm.* and
# tuning.*), kept so that those files stay reproducible. Its cells started from independent
# fine-tunes and scored 200 examples, too noisy to see a one-point difference; the paired grid
# (benchmarks/run_quality_paired.sh, benchmarks/quality_paired.yaml) replaces it.
# Note: fine-tune folders are now named by a hash of the fine-tune's own settings only, so a rerun
# fine-tunes again instead of reusing folders of the earlier naming.
set -u
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
for i in 0 1; do
  idprior bench-quality benchmarks/quality_minilm.yaml --out runs/quality_minilm \
      --results benchmarks/results/quality_minilm.jsonl --threads 1 --resume --shard "$i/2" &
done
wait
idprior report benchmarks/results/quality_minilm.jsonl --out benchmarks/results --runs runs/quality_minilm
for i in 0 1; do
  idprior bench-quality benchmarks/tuning.yaml --out runs/quality_minilm \
      --results benchmarks/results/tuning.jsonl --threads 1 --resume --shard "$i/2" &
done
wait
idprior report benchmarks/results/tuning.jsonl --tuning --out benchmarks/results
