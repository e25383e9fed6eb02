"""Post-training SNIP pruning of SmolLM2-135M on CPU: perplexity, memory, stage times, speed.

    python benchmarks/smollm2.py                        # 30% of decoder-layer parameters, 2 threads

Runs the real `idprior prune` pipeline in this process (the CLI arguments are built below and
printed, so the run can be repeated with the `idprior` command) on the packaged GGUF model:
post-training mode (no fine-tuning, no recovery), calibration on the first 64 blocks of 128
tokens of lm-rt training text, function-norm selection of KV groups and FFN neurons, surgery,
perplexity of dense and pruned on a fixed subset of the lm-rt validation and test splits, greedy
sample generations, and the eager speed benchmark (`idprior.pipeline.bench.benchmark`, ONNX off: its
export of a 135M decoder takes minutes). Around every stage the high-water RSS is reset and read
(idprior.memory), so each stage's peak is its own. Afterwards greedy decoding speed
(KV cache, batch 1) of dense vs pruned is timed round-robin in the same process.
Writes benchmarks/results/smollm2_posttrain.json and .md; the run folder is temporary.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

from idprior import io
from idprior.cli.common import config_from_args  # noqa: E402
from idprior.cli.main import build_parser  # noqa: E402
from idprior.memory import peak_mb, reset_peak  # noqa: E402
from idprior.model import load as models
from idprior.model.surgery import load_pruned_with_tokenizer  # noqa: E402
from idprior.pipeline import stages as pipeline
from idprior.pipeline.bench import cpu_model, format_bench_markdown  # noqa: E402

DECODE_PROMPT = "the movie is"


def prune_args(args, out: Path) -> list[str]:
    """The `idprior prune` arguments this benchmark runs."""
    return ["prune", "--model", args.model, "--task", "lm-rt", "--no-train", "--target", str(args.target),
            "--measure", "encoder_params", "--calib-size", str(args.calib_blocks), "--max-length", str(args.seq_len),
            "--max-eval", str(args.eval_examples), "--recover-epochs", "0",
            "--set", f"train.eval_batch_size={args.batch}", "--set", "bench.batch_sizes=[1,8]",
            "--set", f"bench.seq_lens=[{args.seq_len}]", "--set", f"bench.repeats={args.repeats}",
            "--set", "bench.warmup=1", "--set", f"bench.threads={args.threads}", "--no-onnx", "--out", str(out)]


def time_decoding(dense, pruned, tokenizer, new_tokens: int, repeats: int) -> dict:
    """Greedy generation of `new_tokens` tokens (batch 1, KV cache), round-robin dense/pruned."""
    from transformers import GenerationConfig

    ids = tokenizer(DECODE_PROMPT, return_tensors="pt")["input_ids"]  # [1, T]
    cfg = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    runners = {"dense": dense, "pruned": pruned}
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.inference_mode():
        for model in runners.values():  # warm-up
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        for r in range(repeats):
            for name in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
                t0 = time.perf_counter()
                runners[name].generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
                times[name].append(time.perf_counter() - t0)
    med = {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}
    return {"prompt": DECODE_PROMPT, "new_tokens": new_tokens, "repeats": repeats,
            "median_s": {k: round(v, 3) for k, v in med.items()},
            "tokens_per_s": {k: round(new_tokens / v, 1) for k, v in med.items()},
            "speedup": round(med["dense"] / med["pruned"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="another decoder folder, e.g. for a quick smoke run")
    p.add_argument("--target", type=float, default=0.3, help="fraction of decoder-layer parameters to remove")
    p.add_argument("--calib-blocks", type=int, default=64, help="calibration blocks of --seq-len tokens")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--eval-examples", type=int, default=100, help="lm-rt snippets per evaluation split (fixed subset)")
    p.add_argument("--batch", type=int, default=8, help="batch size of calibration and evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of the speed benchmark")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/smollm2.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]

    stage_mem: dict[str, dict] = {}

    @contextlib.contextmanager
    def peak_of(stage: str):  # around each stage the pipeline runs: its peak RSS
        reset_peak()
        yield
        stage_mem[stage] = {"peak_rss_mb": round(peak_mb(), 1), "loadavg_1min_after": round(os.getloadavg()[0], 2)}

    with tempfile.TemporaryDirectory(prefix="idprior-smollm2-") as tmp:
        out = Path(tmp) / "run"
        cli = prune_args(args, out)
        cfg = config_from_args(build_parser().parse_args(cli))
        pipeline.prune(cfg, observe=peak_of)
        metrics = io.read_json(out / "metrics.json")
        plan = io.read_json(out / "plan.json")
        stages = io.read_json(out / "stages.json")["stages"]
        bench = io.read_json(out / "bench.json")
        reset_peak()
        dense, tok = load_pruned_with_tokenizer(out / "finetuned")
        pruned, _ = load_pruned_with_tokenizer(out / "pruned")
        decode = time_decoding(dense, pruned, tok, args.decode_tokens, args.repeats)
        decode["peak_rss_mb"] = round(peak_mb(), 1)

    cli_text = "idprior " + " ".join(shlex.quote(a) for a in cli).replace(shlex.quote(str(out)), "runs/smollm2-posttrain")
    result = {
        "command": command,
        "equivalent_cli": cli_text,
        "model": models.ALIASES[args.model].description if args.model in models.ALIASES else args.model,
        "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
                    "torch": torch.__version__, "dtype": "float32", "batch": args.batch, "seq_len": args.seq_len,
                    "loadavg_start": load_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "calibration": {"blocks": args.calib_blocks, "seq_len": args.seq_len},
        "perplexity": {which: {split: metrics[which][split]["perplexity"] for split in metrics[which]}
                       for which in ("dense", "pruned")},
        "eval_tokens": {split: v["tokens"] for split, v in metrics["dense"].items()},
        "compression": metrics["compression"],
        "plan_counts": plan["counts"],
        "kept_per_layer": [{"heads": r["head_units"], "ffn": r["ffn"]} for r in plan["structure"]],
        "stages": {k: {"wall_s": v.get("wall_s"), **stage_mem.get(k, {})} for k, v in stages.items()},
        "peak_rss_mb": max(m["peak_rss_mb"] for m in [*stage_mem.values(), decode]),
        "bench": bench,
        "decode": decode,
        "generations": metrics.get("generations", []),
        "script_wall_s": round(time.perf_counter() - started, 1),
    }
    out_dir = Path(args.out_dir)
    io.write_json(out_dir / "smollm2_posttrain.json", result)
    io.write_text(out_dir / "smollm2_posttrain.md", render(result))
    print(render(result))
    return 0


def render(r: dict) -> str:
    m = r["machine"]
    lines = ["# SmolLM2-135M, post-training SNIP pruning on CPU", "", "Command:", "", "```", r["command"], "```", "",
             "Equivalent CLI run (same config):", "", "```", r["equivalent_cli"], "```", "",
             f"Model: {r['model']}. Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch "
             f"{m['torch']}, {m['dtype']}, batch {m['batch']} x seq len {m['seq_len']} for calibration and perplexity. "
             f"Load average (1/5/15 min) {m['loadavg_start']} at start, {m['loadavg_end']} at end; the machine is shared, "
             "so wall times carry that load. Script wall time "
             f"{r['script_wall_s']} s.", "",
             f"Calibration: the first {r['calibration']['blocks']} blocks of {r['calibration']['seq_len']} tokens of lm-rt "
             f"training text. Perplexity: fixed subsets of lm-rt ({r['eval_tokens']} predicted tokens). No fine-tuning "
             "before pruning and no recovery after it. Other selections and the magnitude and random baselines at "
             "the same target: docs/history.md (selection screen).", "",
             "## Quality and size", "", "| split | dense perplexity | pruned perplexity |", "|---|---|---|"]
    for split, ppl in r["perplexity"]["dense"].items():
        lines.append(f"| {split} | {ppl:.2f} | {r['perplexity']['pruned'][split]:.2f} |")
    c = r["compression"]
    lines += ["", "| measure | dense | pruned | removed |", "|---|---|---|---|"]
    for k in ("encoder_params", "linear_params", "flops", "total_params"):
        lines.append(f"| {k} | {c[k]['dense']:,} | {c[k]['pruned']:,} | {c[k]['removed_fraction']:.1%} |")
    lines += ["", f"FLOPs at sequence length {c['seq_len']}. Units removed: {r['plan_counts']}. Kept (KV groups, FFN "
              "neurons) per layer: " + ", ".join(f"({k['heads']}, {k['ffn']})" for k in r["kept_per_layer"]) + ".", "",
              "## Stages", "", "| stage | wall s | peak RSS MB | load (1 min) after |", "|---|---|---|---|"]
    for name, s in r["stages"].items():
        lines.append(f"| {name} | {s.get('wall_s')} | {s.get('peak_rss_mb', '')} | {s.get('loadavg_1min_after', '')} |")
    d = r["decode"]
    lines += ["", f"Peak RSS of the whole run: {r['peak_rss_mb']} MB (the largest stage peak; each stage's high-water "
              "mark is reset before it starts).", "", "## Speed", "", format_bench_markdown(r["bench"]).strip(), "",
              f"Greedy decoding, batch 1, KV cache, {d['new_tokens']} new tokens after {d['prompt']!r} (median of "
              f"{d['repeats']}, round-robin): dense {d['tokens_per_s']['dense']} tokens/s, pruned "
              f"{d['tokens_per_s']['pruned']} tokens/s, speed-up {d['speedup']:.2f}x.", "",
              "## Sample generations (greedy, KV cache)", "", "| prompt | dense | pruned |", "|---|---|---|"]
    for g in r["generations"]:
        cell = [" ".join(g[k].split()).replace("|", "\\|") for k in ("prompt", "dense", "pruned")]
        lines.append(f"| {cell[0]} | {cell[1]} | {cell[2]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
