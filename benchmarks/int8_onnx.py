"""Dynamic int8 quantization of a pruned model: accuracy and ONNX Runtime speed of fp32 dense,
fp32 pruned and int8 pruned, side by side in one process (issue 16).

    python benchmarks/int8_onnx.py --dense runs/demo/finetuned --pruned runs/demo/pruned

The run folder (`--run`, default: the folder holding `--pruned`) gives the task, its splits and
max_length (its config.yaml, read as `idprior prune` wrote it). In one process the script
1. exports the dense model with `idprior.model.export.export_onnx_dir` and the pruned one with
   `quantize="int8"`, which writes model.onnx (fp32) and model_quantized.onnx (ONNX Runtime's
   `quantize_dynamic`: int8 MatMul / Gemm weights, activations quantized at run time) side by side
   (the embedding tables are Gather inputs and stay fp32, so the int8 file is not 4x smaller);
2. scores the three ONNX models on the run's test split(s) and validation split, through ONNX Runtime
   over the same batches the pipeline evaluates on, next to the PyTorch dense and pruned models
   (fp32 ONNX must agree with PyTorch: the table says how closely, prediction by prediction);
3. times the three sessions at every `--batch-sizes` x `--seq-lens` (same random tokens, no
   padding) with idprior.pipeline.bench's scheme: alternating blocks after an untimed lead-in, and the
   noise guard that re-times a too-spread shape and flags it if it stays so.
Writes OUT/int8_onnx.json and .md (default benchmarks/results) with the command, the machine and
the load average at the start and end.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from idprior.config import load_run_config
from idprior.model.export import ONNX_FILE, QUANTIZED_FILE, export_onnx_dir, ort_feed, ort_session
from idprior.pipeline import stages as pipeline
from idprior.pipeline.bench import NoiseGuard, environment, latency_stats, loadavg, noise_check, time_guarded
from idprior.pipeline.evaluate import predict
from idprior.pipeline.metrics import compute_metrics, main_metric
from idprior.study.benchutil import ort_runners, publish, set_priority

REFERENCE = "fp32 dense"  # speed-ups are relative to it
SOURCE = {"fp32 dense": "pytorch dense", "fp32 pruned": "pytorch pruned", "int8 pruned": "pytorch pruned"}


def export(dense, pruned, tokenizer, folder: Path) -> dict[str, Path]:
    """ONNX folders for dense (fp32) and pruned (fp32 + int8); the path of each ONNX model."""
    export_onnx_dir(dense, tokenizer, folder / "dense")
    export_onnx_dir(pruned, tokenizer, folder / "pruned", quantize="int8")
    return {"fp32 dense": folder / "dense" / ONNX_FILE, "fp32 pruned": folder / "pruned" / ONNX_FILE,
            "int8 pruned": folder / "pruned" / QUANTIZED_FILE}


def ort_predict(session, loader) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels over a loader through an ONNX Runtime session (idprior.pipeline.evaluate.predict's twin)."""
    logits, labels = [], []
    for batch in loader:
        logits.append(session.run(["logits"], ort_feed(session, batch))[0])  # [B, K]
        labels.append(batch["labels"].numpy())
    return np.concatenate(logits), np.concatenate(labels)


def score(run, tokenizer, torch_models: dict, sessions: dict) -> tuple[dict, dict]:
    """Task metrics per model and split, and per ONNX model how its logits compare with its PyTorch source."""
    metrics, parity = {}, {}
    for split in [*run.test_splits(), "validation"]:
        loader = run.loader(split, tokenizer, train=False)
        out = {name: predict(model, loader, f"{name} {split}") for name, model in torch_models.items()}
        out |= {name: ort_predict(session, loader) for name, session in sessions.items()}
        for name, (logits, labels) in out.items():
            metrics.setdefault(name, {})[split] = compute_metrics(run.task, logits, labels)
        for name in sessions:
            got, ref = out[name][0], out[SOURCE[name]][0]
            parity.setdefault(name, {})[split] = {
                "reference": SOURCE[name], "max_abs_logit_diff": float(np.abs(got - ref).max()),
                "prediction_agreement": float((got.argmax(-1) == ref.argmax(-1)).mean())}
    return metrics, parity


def fp32_matches(metrics: dict) -> bool:
    """Whether both fp32 ONNX models score exactly as their PyTorch source on every split (warns if not)."""
    same = all(metrics[name] == metrics[SOURCE[name]] for name in ("fp32 dense", "fp32 pruned"))
    if not same:
        print("warning: fp32 ONNX metrics differ from PyTorch's; see the parity table", file=sys.stderr)
    return same


def timings(sessions: dict, dense, shapes: list[tuple[int, int]], repeats: int, warmup: int, guard: NoiseGuard) -> list[dict]:
    """One row per (model, batch, seq_len): latency over repeats timed in alternating blocks (idprior.pipeline.bench)."""
    rows = []
    for batch, seq_len in shapes:
        runners = ort_runners(sessions, dense, batch, seq_len)
        times, rounds = time_guarded(runners, repeats, warmup, REFERENCE, guard)
        reasons = guard.reasons(times, REFERENCE)
        for name, seconds in times.items():
            rows.append({"model": name, "batch_size": batch, "seq_len": seq_len, **latency_stats(seconds, batch),
                         "speedup": float(np.median(times[REFERENCE]) / np.median(seconds)), "timing_rounds": rounds,
                         "noise": reasons[name], "latency_ms_repeats": [round(1000.0 * s, 4) for s in seconds]})
        print(f"timed batch {batch} x {seq_len} ({rounds} round(s))", flush=True)
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="the run's dense (fine-tuned) model folder, e.g. runs/demo/finetuned")
    p.add_argument("--pruned", required=True, help="the run's pruned model folder, e.g. runs/demo/pruned")
    p.add_argument("--run", default=None, help="the run folder with config.yaml (default: the folder holding --pruned)")
    p.add_argument("--batch-sizes", default="1,32", help="comma list (default 1,32)")
    p.add_argument("--seq-lens", default="128", help="comma list (default 128)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime and torch (default 2)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model and shape (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nice", type=int, default=0, help="as in benchmarks/speed.py (e.g. -15; negative needs root)")
    p.add_argument("--onnx-dir", default=None, help="keep the ONNX folders here (default: a temporary folder)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="where int8_onnx.json and .md go (default benchmarks/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.nice:
        set_priority(args.nice)
    command = "python benchmarks/int8_onnx.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started, load_start = time.perf_counter(), loadavg()
    torch.set_num_threads(args.threads)
    shapes = [(int(b), int(t)) for b in args.batch_sizes.split(",") for t in args.seq_lens.split(",")]
    run_dir = Path(args.run or Path(args.pruned).parent)
    cfg = load_run_config(run_dir / "config.yaml")
    if Path(cfg.out).resolve() != run_dir.resolve():
        cfg.out = str(run_dir)  # the run folder was moved (or is named from elsewhere)
    run = pipeline.Run(cfg, resume=True)
    try:
        if run.task.kind != "classification":
            raise SystemExit(f"int8_onnx.py measures classification accuracy; {run.task.name} is {run.task.kind}")
        dense, tok = run.load_model(args.dense)
        pruned = run.load_model(args.pruned)[0]
        result = {"command": command, "environment": environment(args.threads), "run": str(run_dir),
                  "dense": args.dense, "pruned": args.pruned, "task": run.task.name, "metric": main_metric(run.task),
                  "model": cfg.model.name, "max_length": cfg.data.max_length, "eval_batch_size": cfg.train.eval_batch_size,
                  "method": cfg.prune.method, "target": cfg.prune.target, "sizes": run.data.sizes()}
        result["environment"].update(loadavg_start=load_start, dtype="float32; int8 pruned: int8 MatMul/Gemm weights")
        with tempfile.TemporaryDirectory(prefix="idprior-int8-") as tmp:
            t0 = time.perf_counter()
            paths = export(dense, pruned, tok, Path(args.onnx_dir or tmp))
            result["export_s"] = round(time.perf_counter() - t0, 1)
            result["onnx_mb"] = {name: round(path.stat().st_size / 2**20, 2) for name, path in paths.items()}
            sessions = {name: ort_session(path, args.threads) for name, path in paths.items()}
            result["metrics"], result["parity"] = score(run, tok, {"pytorch dense": dense, "pytorch pruned": pruned}, sessions)
            result["fp32_matches_pytorch"] = fp32_matches(result["metrics"])
            guard = NoiseGuard()
            result["noise_guard"] = asdict(guard)
            result["rows"] = timings(sessions, dense, shapes, args.repeats, args.warmup, guard)
            sessions.clear()
    finally:
        run.close()
    result["environment"]["loadavg_end"] = loadavg()
    result["wall_s"] = round(time.perf_counter() - started, 1)
    publish(args.out, "int8_onnx", result, render(result))
    return 0


def render(result: dict) -> str:
    env, metric, metrics = result["environment"], result["metric"], result["metrics"]
    splits, sizes = list(metrics[REFERENCE]), result["sizes"]
    lines = [f"# Dynamic int8 quantization: {result['model']} on {result['task']}, fp32 dense vs fp32 pruned vs int8 pruned "
             "(ONNX Runtime)", "", "Command:", "", "```", result["command"], "```", "",
             f"Run {result['run']}: {result['method']}, target {result['target']}; dense {result['dense']}, pruned "
             f"{result['pruned']}. Machine: {env['cpu']}, {env['usable_cores']} usable cores; {env['threads']} threads; "
             f"{env['dtype']}; onnxruntime {env['onnxruntime']}, torch {env['torch']}, transformers {env['transformers']}. "
             f"Load average (1/5/15 min) at start {env['loadavg_start']}, at end {env['loadavg_end']}; wall {result['wall_s']} s "
             f"(export {result['export_s']} s).", "",
             f"Accuracy: {metric} on the run's splits ({', '.join(f'{s} {sizes[s]}' for s in splits)} examples), "
             f"batches of {result['eval_batch_size']} padded to their longest text (at most {result['max_length']} tokens), "
             "as the pipeline evaluates. Timing: ONNX Runtime CPU provider, the same random tokens for every model, no "
             "padding; repeats in alternating blocks after an untimed lead-in (idprior.pipeline.bench.time_guarded), median and "
             "inter-quartile range; a shape whose repeats stay too spread is flagged NOISY in the check column.", ""]
    head = [f"{metric} {s}" for s in splits]
    lines += ["| batch x length | model | " + " | ".join(head) + " | size on disk MB | median ms | IQR ms | speed-up vs "
              f"{REFERENCE} | check |", "|---|---|" + "---|" * (len(head) + 5)]
    for r in result["rows"]:
        acc = " | ".join(f"{metrics[r['model']][s][metric]:.4f}" for s in splits)
        lines.append(f"| {r['batch_size']} x {r['seq_len']} | {r['model']} | {acc} | {result['onnx_mb'][r['model']]:.1f} | "
                     f"{r['latency_ms_median']:.1f} | {r['latency_ms_iqr']:.1f} | {r['speedup']:.2f}x | {noise_check(r)} |")
    lines += ["", "ONNX vs PyTorch on the same batches (PyTorch " + "; ".join(
        f"{name[8:]}: " + ", ".join(f"{s} {metrics[name][s][metric]:.4f}" for s in splits)
        for name in ("pytorch dense", "pytorch pruned")) + "):", "",
        "| ONNX model | reference | " + " | ".join(f"{s}: predictions agreeing, max abs logit diff" for s in splits) + " |",
        "|---|---|" + "---|" * len(splits)]
    for name, per in result["parity"].items():
        cells = " | ".join(f"{per[s]['prediction_agreement']:.2%}, {per[s]['max_abs_logit_diff']:.1e}" for s in splits)
        lines.append(f"| {name} | {per[splits[0]]['reference']} | {cells} |")
    lines += ["", f"fp32 ONNX {metric} equals PyTorch's on every split: "
              f"{'yes' if result['fp32_matches_pytorch'] else '**NO** (see above)'}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
