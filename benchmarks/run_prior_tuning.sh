#!/usr/bin/env bash
# The exact command sequence behind benchmarks/results/prior_tuning.{jsonl,md,_paired.png}: the tuning
# cells of benchmarks/prior_tuning{,_posthoc,_r2}.yaml (on the paired grid's shared starts, so they pair with its rows),
# then a paired report of the tuning rows together with the grid's fisher / snip / norm rows of the same
# (task, seed) cells. Decisions read the VALIDATION tables only. Resumable.
set -eu
cd "$(dirname "$0")/.."
command -v idprior >/dev/null || . .venv/bin/activate
mkdir -p runs
for grid in prior_tuning prior_tuning_posthoc prior_tuning_r2 prior_tuning_r3 prior_tuning_r4 prior_tuning_r5 prior_tuning_r6 prior_tuning_r7 prior_tuning_r8 prior_tuning_r9 prior_tuning_r10; do  # round 1, post-hoc criteria, rounds 2-10
  idprior bench-quality "benchmarks/$grid.yaml" --out runs/quality_paired \
      --results benchmarks/results/prior_tuning.jsonl --threads 1 --resume >> runs/tune.log 2>&1
done
python - <<'PY'
import json
keep = {"fisher", "snip", "norm-start", "fisher-start", "michel", "snip-no-sn-no-prior", "snip-prox-h15",
        "snip-no-prior", "snip-prox-tuned-no-sn"}  # the last two: the SN x prior 2x2 of round 4
grid = [json.loads(line) for line in open("benchmarks/results/quality_paired.jsonl")]
tuning = [json.loads(line) for line in open("benchmarks/results/prior_tuning.jsonl")]
cells = {(r["task"], r["seed"]) for r in tuning}
rows = tuning + [r for r in grid if r["method"] in keep and (r["task"], r["seed"]) in cells and r["target"] == 0.5]
with open("runs/prior_tuning_with_grid.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
PY
cp runs/prior_tuning_with_grid.jsonl benchmarks/results/prior_tuning_with_grid.jsonl
idprior report benchmarks/results/prior_tuning_with_grid.jsonl --out benchmarks/results --name prior_tuning \
    --reference all-adam --baseline fisher --command "bash benchmarks/run_prior_tuning.sh" --notes benchmarks/notes/prior_tuning.md
# round 4's SN x prior 2x2, read from the binding-SN arm (SN at 0.8 of the output projections' sigma)
idprior report benchmarks/results/prior_tuning_with_grid.jsonl --out benchmarks/results --name prior_tuning_sn2x2 \
    --reference all-adam-sn80 --baseline fisher --command "bash benchmarks/run_prior_tuning.sh" --notes benchmarks/notes/prior_tuning.md
