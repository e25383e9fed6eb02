"""Peak memory of a post-training `idprior prune` of SmolLM2-135M, float32 and bfloat16, against the weights.

    python benchmarks/posttrain_memory.py                  # both dtypes, 20% target, 1 thread

Each dtype runs in a fresh child process (so one run's allocator state cannot lower or raise the
other's peaks) the real pipeline with the post-training defaults:

    idprior prune --model smollm2-135m --task lm-rt --no-train --target 0.2 --recover-epochs 0 --no-bench \
        --dtype DTYPE --max-eval N

Around every stage the high-water RSS (VmHWM) is reset and read (`idprior.memory`), so each stage's peak is
its own, and the run's peak is the largest of them (getrusage's ru_maxrss cannot be used: resetting VmHWM
hides the earlier peaks from it). The issue's goal is a peak at most 1.5x the
weights in that dtype. Two ratios are given: the peak against the weights, and the peak minus the process's
RSS just before the pipeline starts (Python, torch and transformers imported, nothing loaded: a fixed cost
of the runtime, not of the model) against the weights.
Writes benchmarks/results/posttrain_memory.json and .md; the run folders are temporary.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def prune_args(args, dtype: str, out: Path) -> list[str]:
    return ["prune", "--model", args.model, "--task", args.task, "--no-train", "--target", str(args.target),
            "--recover-epochs", "0", "--no-bench", "--dtype", dtype, "--max-eval", str(args.max_eval),
            "--out", str(out)]


def child(args) -> dict:
    """One pipeline run in this process; returns its memory record."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline RSS is read: part of the fixed cost)

    from idprior import io
    from idprior.cli.common import config_from_args
    from idprior.cli.main import build_parser
    from idprior.memory import peak_mb, reset_peak, rss_mb
    from idprior.pipeline import stages as pipeline

    torch.set_num_threads(args.threads)
    stage_mem: dict[str, float] = {}

    @contextlib.contextmanager
    def peak_of(stage: str):
        reset_peak()
        yield
        stage_mem[stage] = round(peak_mb(), 1)

    with tempfile.TemporaryDirectory(prefix="idprior-mem-") as tmp:
        out = Path(tmp) / "run"
        cli = prune_args(args, args.child, out)
        cfg = config_from_args(build_parser().parse_args(cli))
        base = rss_mb()
        t0 = time.perf_counter()
        pipeline.prune(cfg, observe=peak_of)
        wall = time.perf_counter() - t0
        metrics = io.read_json(out / "metrics.json")
        stages = io.read_json(out / "stages.json")["stages"]
        from idprior.model.surgery import load_pruned_with_tokenizer

        dense, _ = load_pruned_with_tokenizer(out / "finetuned")
        weights_mb = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**20
        dtype = str(next(dense.parameters()).dtype).removeprefix("torch.")
    cli_text = "idprior " + " ".join(shlex.quote(a) for a in cli).replace(shlex.quote(str(out)), "runs/posttrain")
    return {"dtype": args.child, "weights_dtype": dtype, "command": cli_text, "weights_mb": round(weights_mb, 1),
            "baseline_rss_mb": round(base, 1), "wall_s": round(wall, 1),
            "stages": {k: {"wall_s": v.get("wall_s"), "peak_rss_mb": stage_mem.get(k)} for k, v in stages.items()},
            "peak_rss_mb": max(stage_mem.values()),
            "perplexity": {w: metrics[w]["test"]["perplexity"] for w in ("dense", "pruned")}}


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# Peak memory of a post-training prune (SmolLM2-135M)", "", "Command:", "", "```", r["command"], "```", "",
             f"Model: {r['model'] or 'the packaged GGUF file, dequantized on load'}.", "",
             f"Machine: {m['cpu']}, {m['threads']} torch thread(s), torch {m['torch']}; load average {m['loadavg']} "
             "at the start (memory, not time, is what this measures). Each dtype ran in its own process; each stage's "
             "peak RSS is its own (VmHWM reset before the stage).", ""]
    for run in r["runs"]:
        w, base, peak = run["weights_mb"], run["baseline_rss_mb"], run["peak_rss_mb"]
        lines += [f"## {run['dtype']}", "", "```", run["command"], "```", "",
                  f"Weights {w:.0f} MB ({run['weights_dtype']}); RSS before the pipeline (Python + torch + transformers "
                  f"imported) {base:.0f} MB. Peak {peak:.0f} MB = **{peak / w:.2f}x the weights**; above the "
                  f"pre-pipeline RSS {peak - base:.0f} MB = **{(peak - base) / w:.2f}x the weights**. Test perplexity "
                  f"dense {run['perplexity']['dense']:.2f}, "
                  f"pruned {run['perplexity']['pruned']:.2f}. Wall {run['wall_s']:.0f} s.", "",
                  "| stage | wall s | peak RSS MB | peak / weights | (peak - before) / weights |", "|---|---|---|---|---|"]
        for name, s in run["stages"].items():
            p = s["peak_rss_mb"]
            ratio = f"{p / w:.2f}" if p else ""
            above = f"{(p - base) / w:.2f}" if p else ""
            lines.append(f"| {name} | {s['wall_s']} | {p} | {ratio} | {above} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a decoder alias or folder (a tiny folder for a smoke run)")
    p.add_argument("--task", default="lm-rt")
    p.add_argument("--target", type=float, default=0.2)
    p.add_argument("--max-eval", type=int, default=200, help="examples per evaluation split")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--stem", default="posttrain_memory")
    p.add_argument("--safetensors", action="store_true",
                   help="first convert --model to a safetensors folder (in its own process), then prune that folder: "
                        "the common case of a Hugging Face checkpoint, memory-mapped on load (a GGUF file is "
                        "dequantized whole before the model is built)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one dtype in this process, print JSON
    p.add_argument("--convert-to", help=argparse.SUPPRESS)  # internal: write --model as a safetensors folder
    args = p.parse_args(argv)
    if args.convert_to:
        from idprior.model import load as models
        from idprior.model.surgery import save_pruned

        model, tok = models.load(args.model)
        save_pruned(model, tok, args.convert_to)
        return 0
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    from idprior import io
    from idprior.pipeline.bench import cpu_model

    argv = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/posttrain_memory.py " + " ".join(shlex.quote(a) for a in argv)
    import torch

    result = {"command": command.strip(), "model": None, "machine": {"cpu": cpu_model(), "threads": args.threads,
                                                      "torch": torch.__version__,
                                                      "loadavg": [round(x, 2) for x in os.getloadavg()]}, "runs": []}
    with tempfile.TemporaryDirectory(prefix="idprior-mem-model-") as tmp:
        child_argv = [a for a in argv if a != "--safetensors"]
        if args.safetensors:
            folder = str(Path(tmp) / "model")
            subprocess.run([sys.executable, __file__, *child_argv, "--convert-to", folder], check=True)
            child_argv += ["--model", folder]
            result["model"] = f"{args.model}, converted to a safetensors folder first"
        for dtype in args.dtypes:
            proc = subprocess.run([sys.executable, __file__, *child_argv, "--child", dtype], capture_output=True,
                                  text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                return proc.returncode
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            run = json.loads(line.removeprefix("RESULT "))
            if args.safetensors:
                run["command"] = run["command"].replace(folder, "MODEL_DIR")
            result["runs"].append(run)
    md = render(result)
    io.write_json(Path(args.out_dir) / f"{args.stem}.json", result)
    io.write_text(Path(args.out_dir) / f"{args.stem}.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
