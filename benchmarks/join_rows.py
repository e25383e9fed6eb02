"""Join the rows of several paired grids into one results file, so `idprior report` pairs arms across them.

    python benchmarks/join_rows.py --out benchmarks/results/sn_lr_with_grid.jsonl \
        benchmarks/results/sn_lr.jsonl:snip=snip-lr5e-4,snip-no-sn=snip-no-sn-lr5e-4 \
        benchmarks/results/quality_pretrained.jsonl:snip=snip-lr1e-4,snip-no-sn=snip-no-sn-lr1e-4
    idprior report benchmarks/results/sn_lr_with_grid.jsonl --out benchmarks/results --reference snip-no-sn-lr1e-4

Each argument is RESULTS.jsonl:OLD=NEW,...: the rows of those methods, renamed, and only for the (task, seed)
pairs every input has. Rows pair when they are the same (task, seed, target) under the same protocol: the same
examples in the same data order (the from-pretrained grids record it). The output must sit beside the inputs'
prediction stores (the rows point at them by relative path).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from idprior import io
from idprior.study.quality import cell_key


def read(spec: str) -> list[dict]:
    path, _, renames = spec.partition(":")
    names = dict(part.split("=", 1) for part in renames.split(",") if part)
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row | {"method": names[row["method"]],
                   "key": cell_key(row["task"], row["seed"], names[row["method"]], float(row["target"]))}
            for row in rows if row["method"] in names]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="RESULTS.jsonl:OLD=NEW,...")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    parts = [read(spec) for spec in args.inputs]
    common = set.intersection(*({(r["task"], r["seed"]) for r in rows} for rows in parts))
    rows = [r for rows in parts for r in rows if (r["task"], r["seed"]) in common]
    io.write_text(Path(args.out), "".join(json.dumps(r) + "\n" for r in rows))
    print(f"{args.out}: {len(rows)} rows, {len(common)} (task, seed) pairs")


if __name__ == "__main__":
    main()
