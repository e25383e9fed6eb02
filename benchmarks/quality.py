"""Quality benchmark: SNIP vs its ablations and the baselines, resumable (thin wrapper).

    python benchmarks/quality.py benchmarks/quality_minilm.yaml --out runs/quality_minilm \
        --results benchmarks/results/quality_minilm.jsonl --threads 2 --resume
    idprior report benchmarks/results/quality_minilm.jsonl --runs runs/quality_minilm

Same as `idprior bench-quality`; see idprior.quality for the grid format and semantics.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from idprior.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench-quality", *sys.argv[1:]]))
