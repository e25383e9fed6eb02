"""Post-training decoder grid for issue 15: SNIP variants and the decoder baselines, each with no, bias
or least-squares compensation, at several targets, on SmolLM2-135M (or any decoder folder).

    python benchmarks/smollm2_decoder_grid.py                      # 20% and 30%, validation, 2 threads
    python benchmarks/smollm2_decoder_grid.py --split test --zero-shot 500
    python benchmarks/smollm2_decoder_grid.py --task lm-20ng --split test   # the confirmation on a second corpus

Everything starts from the same unpruned model and the same calibration blocks (the first
--calib-blocks blocks of --seq-len training tokens of --task, lm-rt by default). Scores and gradients are computed once
per kind, plans once per (variant, target), and compensation statistics once for the whole grid
(one calibration pass with every output projection's input moments, `compensate.channel_stats`).
Each row is physical surgery on a copy, then --task perplexity on a fixed subset of --split and,
with --zero-shot N, zero-shot rt-polarity accuracy by label-word likelihood on N test examples.
No training anywhere: a post-training screen, one seed. Writes
benchmarks/results/smollm2_decoder_grid.json and .md (or --name).
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from idprior import io
from idprior.arch import get_adapter  # noqa: E402
from idprior.baselines import get_method  # noqa: E402
from idprior.data import get_task, load_task, make_lm_dataloader  # noqa: E402
from idprior.method.compensate import SUBS, channel_stats, fit_compensation  # noqa: E402
from idprior.method.scoring import score  # noqa: E402
from idprior.method.selection import protected_layers, select  # noqa: E402
from idprior.model import load as models
from idprior.model.surgery import apply_plan  # noqa: E402
from idprior.pipeline.bench import cpu_model  # noqa: E402
from idprior.pipeline.evaluate import lm_nll  # noqa: E402

# name -> ("snip", score kind, min_keep, protect first/last) or ("method", baseline name)
VARIANTS = {
    "snip": ("snip", "absolute", 0.0, 0),
    "snip-residual": ("snip", "residual", 0.0, 0),
    "snip-mk25": ("snip", "absolute", 0.25, 0),
    "snip-residual-mk25": ("snip", "residual", 0.25, 0),
    "snip-residual-mk25-p1": ("snip", "residual", 0.25, 1),
    # measured through the next norm that reads the stream (`prune.norm_after_ln`): diag(γ) W / rms
    "snip-afterln": ("snip", "afterln", 0.0, 0),
    "snip-afterln-mk25": ("snip", "afterln", 0.25, 0),
    "flap": ("method", "flap"),
    "wanda-sp": ("method", "wanda-sp"),
    "fisher": ("method", "fisher"),
    "shortgpt": ("method", "shortgpt"),
    "magnitude": ("method", "magnitude"),
    "random": ("method", "random"),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="lm-rt", choices=("lm-rt", "lm-20ng"), help="language-modelling task: "
                   "calibration from its training split, perplexity on --split")
    p.add_argument("--targets", default="0.2,0.3", help="fractions of decoder-layer parameters to remove")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--compensate", default="none,bias,lsq", help="comma list of none, bias, lsq")
    p.add_argument("--ridge", type=float, default=0.01, help="lsq ridge (prune.compensate_ridge)")
    p.add_argument("--calib-blocks", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=100, help="--task snippets of --split (fixed subset)")
    p.add_argument("--split", default="validation", choices=("validation", "test"))
    p.add_argument("--zero-shot", type=int, default=0, metavar="N", help="rt-polarity test examples (0: skip)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="smollm2_decoder_grid")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2_decoder_grid.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    targets = [float(t) for t in args.targets.split(",")]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    comps = [c.strip() for c in args.compensate.split(",") if c.strip()]
    unknown = [v for v in variants if v not in VARIANTS] + [c for c in comps if c not in ("none", "bias", "lsq")]
    if unknown:
        p.error(f"unknown variant or compensation: {', '.join(unknown)}")

    model, tok = models.load(args.model, get_task(args.task))
    adapter = get_adapter(model)
    data = load_task(args.task, max_eval=args.eval_examples)
    train_blocks = make_lm_dataloader(data.splits["train"], tok, batch_size=args.batch, block_size=args.seq_len)
    calib = [b for _, b in zip(range(math.ceil(args.calib_blocks / args.batch)), train_blocks, strict=False)]
    evaluation = make_lm_dataloader(data.splits[args.split], tok, batch_size=args.batch, block_size=args.seq_len)

    def perplexity(m) -> float:
        total, count = lm_nll(m, evaluation)
        return math.exp(total / count)

    def zero_shot(m) -> float | None:
        if not args.zero_shot:
            return None
        from idprior.pipeline.zeroshot import zero_shot_models

        return zero_shot_models({"m": m}, tok, "rt-polarity", max_examples=args.zero_shot,
                                batch_size=args.batch)[0]["m"]["accuracy"]

    dense = {"perplexity": perplexity(model), "zero_shot": zero_shot(model)}
    print("dense", dense, flush=True)
    t = time.perf_counter()
    sites = [(s, i) for i in range(adapter.num_layers) for s in SUBS if adapter.out_proj(i, s) is not None]
    stats = channel_stats(model, adapter, calib, sites, gram=sites if "lsq" in comps else ())
    timings = {"compensation_statistics_s": round(time.perf_counter() - t, 1)}
    scores: dict[str, dict] = {}
    rows = []
    for name in variants:
        spec = VARIANTS[name]
        for target in targets:
            t = time.perf_counter()
            if spec[0] == "snip":
                _, kind, min_keep, n_protect = spec
                if kind not in scores:
                    scores[kind] = score(model, calib, residual=kind == "residual", after_ln=kind == "afterln")
                plan = select(scores[kind], adapter, target=target, min_keep=min_keep,
                              protect=protected_layers(adapter.num_layers, n_protect, n_protect))
            else:
                plan = get_method(spec[1]).plan(model, adapter, calib, target=target, seed=0)
            plan_s = time.perf_counter() - t
            kept_ffn = [r["ffn"] for r in plan.structure]
            for comp_mode in comps:
                t = time.perf_counter()
                pruned = copy.deepcopy(model)
                pruned_adapter = get_adapter(pruned)
                comp = None if comp_mode == "none" else fit_compensation(
                    model, plan.units, None, mode=comp_mode, adapter=adapter, ridge=args.ridge, stats=stats)
                apply_plan(pruned, plan.units, pruned_adapter)
                summary = comp.apply(pruned, pruned_adapter) if comp is not None else {}
                row = {"variant": name, "target": target, "compensate": comp_mode, "perplexity": perplexity(pruned),
                       "zero_shot": zero_shot(pruned), "counts": plan.counts(),
                       "removed": plan.measures["removed_fraction"]["encoder_params"], "min_kept_ffn": min(kept_ffn),
                       "kept_ffn_first_4_layers": kept_ffn[:4], "plan_s": round(plan_s, 1),
                       "row_s": round(time.perf_counter() - t, 1), "notes": summary.get("notes", [])}
                row["ratio"] = row["perplexity"] / dense["perplexity"]
                rows.append(row)
                print({k: row[k] for k in ("variant", "target", "compensate", "perplexity", "ratio", "zero_shot")},
                      flush=True)
                del pruned
    alias = models.ALIASES.get(args.model)
    result = {"command": command, "model": alias.description if alias else args.model,
              "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
                          "torch": torch.__version__, "loadavg_start": load_start,
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "task": args.task, "calib_blocks": args.calib_blocks, "seq_len": args.seq_len, "split": args.split,
              "eval_examples": args.eval_examples, "zero_shot_examples": args.zero_shot, "ridge": args.ridge,
              "dense": dense, "rows": rows, "timings": timings, "wall_s": round(time.perf_counter() - started, 1)}
    out = Path(args.out_dir)
    io.write_json(out / f"{args.name}.json", result)
    io.write_text(out / f"{args.name}.md", render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    zs = r["zero_shot_examples"]
    d = r["dense"]
    task = r.get("task", "lm-rt")  # files written before --task existed are lm-rt
    lines = [f"# Post-training decoder grid: {r['model']}", "", "Command:", "", "```", r["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}, float32; load "
             f"average {m['loadavg_start']} at start, {m['loadavg_end']} at end; wall time {r['wall_s']} s.", "",
             f"Calibration (scores, gradients, compensation): first {r['calib_blocks']} blocks of {r['seq_len']} {task} "
             f"training tokens. Perplexity: {r['eval_examples']} {task} {r['split']} snippets (fixed subset), after "
             f"surgery, no training, one seed. Dense perplexity {d['perplexity']:.2f}"
             + (f", zero-shot rt-polarity accuracy {d['zero_shot']:.3f} on {zs} test examples." if zs else "."), "",
             "| variant | target | compensation | perplexity | x dense | zero-shot acc | removed | units (head / attn / neuron / ffn) | min kept FFN |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        c = row["counts"]
        acc = "" if row["zero_shot"] is None else f"{row['zero_shot']:.3f}"
        lines.append(f"| {row['variant']} | {row['target']:.0%} | {row['compensate']} | {row['perplexity']:.2f} | "
                     f"{row['ratio']:.2f} | {acc} | {row['removed']:.1%} | {c['head']} / {c['attn']} / {c['neuron']} / "
                     f"{c['ffn']} | {row['min_kept_ffn']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
