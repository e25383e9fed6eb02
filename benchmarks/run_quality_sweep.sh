#!/usr/bin/env bash
# The exact sequence that produced benchmarks/results/quality_minilm.* and tuning.* on a shared,
# heavily loaded 2-core CPU: the grid's bbc slice (seed 0, 50%), then the tuning sweep on bbc
# (sharing the grid's fine-tunes) until the time ran out. Every step is resumable: rerunning
# this script continues where it stopped; drop --tasks to run the rest of the grid.
set -u
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
idprior bench-quality benchmarks/quality_minilm.yaml --out runs/quality_minilm --tasks bbc \
    --results benchmarks/results/quality_minilm.jsonl --threads 2 --resume
idprior bench-quality benchmarks/tuning.yaml --out runs/quality_minilm \
    --results benchmarks/results/tuning.jsonl --threads 2 --resume --stop-after-min "${TUNE_MIN:-24}"
