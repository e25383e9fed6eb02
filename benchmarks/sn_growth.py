"""Where spectral normalization could bind: how far each weight's spectral norm moved during a fine-tune.

    python benchmarks/sn_growth.py runs/quality_pretrained runs/sn_lr runs/quality_paired

Bounded SN (`idprior.method.spectral`, bound "init") caps every Q, K, V, O, FFN-in and FFN-out matrix at its
spectral norm when the phase starts. The per-step log (`sn_stats`, the grids' "where SN binds" table) says how
often that cap is hit in the SN arms; this script says, for every fine-tune a quality grid left behind, how far
sigma moved per kind of matrix: sigma(after) / sigma(at the start of the phase). In arms without SN that is the
rescaling SN would have applied (> 1: it would have bound); in SN arms it is at most 1 up to the power-iteration
lag, since the folded weights sit under the bound. The start of a phase is the pretrained model (from-pretrained
protocol) or the shared start (`start.json`, shared-start protocol).

Each fine-tune folder (GRID_OUT/finetune/TASK/seedN/VARIANT-DIGEST/) is grouped by its grid folder, its variant
(plain / sn / prior / sn+prior / gradual) and its learning rate; matrices are named by their place in a layer
(`attention.self.query`, ...) through the model family's adapter. Writes benchmarks/results/sn_growth.{json,md}.
Reads weights only: a few seconds per fine-tune on one thread.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from idprior import io  # noqa: E402
from idprior.arch import get_adapter  # noqa: E402
from idprior.model.load import load  # noqa: E402
from idprior.study.benchutil import publish  # noqa: E402

LAYER = re.compile(r"\.(\d+)\.")


def matrix_sigmas(folder: str) -> dict[str, list[float]]:
    """{role: [sigma per layer]} of the SN target matrices of the model in `folder`; role = the module's
    name without the layer prefix (e.g. "attention.self.query")."""
    model, _ = load(folder)
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, list[float]] = defaultdict(list)
    for layer in range(adapter.num_layers):
        for module, kind in adapter.sn_targets(layer):
            w = module.weight.detach().float()
            w = w.t() if kind == "conv1d" else w  # [out, in]
            role = LAYER.split(names[id(module)], maxsplit=1)[-1]
            out[role].append(float(torch.linalg.matrix_norm(w, ord=2)))
    return dict(out)


def start_of(ft: Path, cfg: dict) -> str:
    """The model the phase started from: the shared start of a continuation, else the configured model."""
    start = ft / "start.json"
    if start.is_file():
        return str((ft / io.read_json(start)["start"] / "finetuned").resolve())
    return cfg["model"]["name"]


def fine_tunes(roots: list[Path]):
    for root in roots:
        for ft in sorted((root / "finetune").glob("*/seed*/*")):
            if (ft / "finetuned").is_dir() and (ft / "config.yaml").is_file():
                yield root, ft


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grids", nargs="+", type=Path, help="grid output folders (bench-quality --out)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--name", default="sn_growth")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    starts: dict[str, dict[str, list[float]]] = {}
    groups: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    folders: dict[tuple, int] = defaultdict(int)
    for root, ft in fine_tunes(args.grids):
        cfg = yaml.safe_load((ft / "config.yaml").read_text())
        variant = ft.name.rsplit("-", 1)[0]
        start = start_of(ft, cfg)
        if start not in starts:
            starts[start] = matrix_sigmas(start)
        after = matrix_sigmas(str(ft / "finetuned"))
        key = (root.name, variant, float(cfg["train"]["lr"]))
        folders[key] += 1
        for role, sig in after.items():
            groups[key][role] += [a / b for a, b in zip(sig, starts[start][role], strict=True)]
        print(f"{ft}: {len(after)} kinds", file=sys.stderr)

    rows = []
    for (grid, variant, lr), by_role in sorted(groups.items()):
        for role, ratios in sorted(by_role.items()):
            t = torch.tensor(ratios)
            rows.append({"grid": grid, "variant": variant, "lr": lr, "fine_tunes": folders[(grid, variant, lr)],
                         "matrix": role, "matrices": len(ratios), "ratio_mean": float(t.mean()),
                         "ratio_max": float(t.max()), "frac_above_1": float((t > 1.0).float().mean()),
                         "frac_above_1_05": float((t > 1.05).float().mean())})
    command = "python benchmarks/sn_growth.py " + shlex.join(str(g) for g in args.grids)
    result = {"command": command, "rows": rows}
    lines = [f"# {args.name}: how far each matrix's spectral norm moved in a fine-tune", "", "```", command, "```", "",
             "sigma(after the phase) / sigma(at its start), per kind of matrix, over the layers of every fine-tune of "
             "the group. Arms without SN: > 1 is where bounded SN (bound = sigma at the start) would have rescaled "
             "the weight. SN arms: the folded weights sit under their bound (<= 1 up to the power-iteration lag).",
             "", "| grid | variant | lr | fine-tunes | matrix | mean | max | share > 1 | share > 1.05 |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['grid']} | {r['variant']} | {r['lr']:g} | {r['fine_tunes']} | {r['matrix']} | {r['ratio_mean']:.3f} | "
              f"{r['ratio_max']:.3f} | {r['frac_above_1']:.2f} | {r['frac_above_1_05']:.2f} |" for r in rows]
    publish(args.out_dir, args.name, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
