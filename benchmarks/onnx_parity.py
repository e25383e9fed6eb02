"""How close is ONNX Runtime to PyTorch on SmolLM2-135M, next to float32's own rounding noise?

    python benchmarks/onnx_parity.py

The ONNX logits of a 30-layer LM differ from PyTorch's by more than 1e-4 in absolute terms. This
script asks whether that is an export error or float32 rounding: it computes, on the same
batches, the logits of the dense model and of the 30% weight-magnitude plan of
benchmarks/speed.py (neurons only) in

  - PyTorch float64 (the reference "exact" value),
  - PyTorch float32 with 2 threads and with 1 thread (same code, different summation order),
  - ONNX Runtime float32 (the exported file, idprior.model.export.ort_session),

and reports each float32 result's largest absolute difference from float64 and from each other,
over real-token positions only (padded positions are arbitrary). Writes
benchmarks/results/onnx_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from idprior.model.export import LogitsOnly, example_inputs, export_onnx, input_names, ort_feed, ort_session
from idprior.pipeline.bench import environment
from idprior.study.benchutil import TIMING_MODELS, load_for_timing, magnitude_plan, pruned_copy, publish

BATCHES = ((3, 24, True), (1, 33, False))  # (batch, length, left-pad row 0): the shapes `idprior export` checks


def torch_logits(model, names, batch, dtype, threads) -> torch.Tensor:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        wrapper = LogitsOnly(model.to(dtype), names).eval()
        with torch.inference_mode():
            return wrapper(*(batch[n] for n in names)).double()
    finally:
        model.float()
        torch.set_num_threads(old)


def max_diff(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor) -> float:
    return float((a[keep] - b[keep]).abs().max())  # over real tokens: [tokens, V]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", choices=sorted(TIMING_MODELS))
    p.add_argument("--target", type=float, default=0.3)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/onnx_parity.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    started = time.perf_counter()
    torch.set_num_threads(2)
    dense = load_for_timing(args.model)
    pruned = pruned_copy(dense, magnitude_plan(dense, args.target))
    result = {"command": command, "environment": environment(2), "model": args.model, "target": args.target, "rows": []}
    with tempfile.TemporaryDirectory(prefix="idprior-parity-") as tmp:
        for name, model in (("dense", dense), (f"pruned-{args.target:g}", pruned)):
            model.eval()
            names = input_names(model)
            path = export_onnx(model, None, Path(tmp) / f"{name}.onnx")
            session = ort_session(path, 2)
            for b, t, pad in BATCHES:
                batch = example_inputs(model, names, b, t, seed=1, pad=pad)
                keep = batch["attention_mask"].bool()  # [B, T]
                exact = torch_logits(model, names, batch, torch.float64, 2)
                fp32 = torch_logits(model, names, batch, torch.float32, 2)
                fp32_1t = torch_logits(model, names, batch, torch.float32, 1)
                ort = torch.from_numpy(session.run(["logits"], ort_feed(session, batch))[0]).double()
                result["rows"].append({
                    "model": name, "batch": b, "seq_len": t, "padded": pad,
                    "max_abs_logit": float(exact[keep].abs().max()),
                    "torch32_vs_exact": max_diff(fp32, exact, keep),
                    "torch32_1thread_vs_exact": max_diff(fp32_1t, exact, keep),
                    "ort_vs_exact": max_diff(ort, exact, keep),
                    "ort_vs_torch32": max_diff(ort, fp32, keep),
                    "torch32_1thread_vs_2threads": max_diff(fp32_1t, fp32, keep),
                })
    result["wall_s"] = round(time.perf_counter() - started, 1)
    publish(args.out_dir, "onnx_parity", result, render(result))
    return 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = [f"# ONNX parity on {result['model']} against float32 rounding", "", "Command:", "", "```", result["command"],
             "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores; torch {env['torch']}, onnxruntime "
             f"{env['onnxruntime']}, transformers {env['transformers']}; wall {result['wall_s']} s. Largest absolute "
             "logit difference over real-token positions; `exact` is the same model run by PyTorch in float64.", "",
             "| model | batch x length | largest logit | PyTorch fp32 vs exact | PyTorch fp32 (1 thread) vs exact | "
             "ONNX Runtime vs exact | ONNX Runtime vs PyTorch fp32 | PyTorch 1 vs 2 threads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        shape = f"{r['batch']} x {r['seq_len']}" + (" (padded)" if r["padded"] else "")
        lines.append(f"| {r['model']} | {shape} | {r['max_abs_logit']:.1f} | {r['torch32_vs_exact']:.1e} | "
                     f"{r['torch32_1thread_vs_exact']:.1e} | {r['ort_vs_exact']:.1e} | {r['ort_vs_torch32']:.1e} | "
                     f"{r['torch32_1thread_vs_2threads']:.1e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
