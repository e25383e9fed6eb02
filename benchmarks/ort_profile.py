"""Where ONNX Runtime spends its time on dense vs pruned MiniLM-L6, with and without the
SkipLayerNormFusion that idprior's sessions turn off (idprior.model.export.DISABLED_ORT_FUSIONS).

    python benchmarks/ort_profile.py --threads 1

Exports the dense model and the 50% weight-magnitude heads + neurons plan of benchmarks/speed.py,
runs each in ONNX Runtime with profiling on (batch 32 x 128, `--repeats` timed runs after 2
warm-ups), and sums kernel time per operator type. Writes benchmarks/results/ort_profile.{json,md}.
Profiling adds overhead, so the totals are for comparing operators, not for quoting latency.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from idprior.model.export import DISABLED_ORT_FUSIONS, export_onnx
from idprior.pipeline.bench import environment
from idprior.study.benchutil import HEAD_SHARE, load_for_timing, magnitude_plan, pruned_copy, publish


def profile(path: Path, threads: int, repeats: int, disabled: tuple[str, ...], prefix: str) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if disabled:
        options.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(disabled))
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = prefix
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(0, 30000, (32, 128)).astype(np.int64)  # [B, T]
    feed = {i.name: ids if i.name == "input_ids" else (np.ones_like(ids) if i.name == "attention_mask" else np.zeros_like(ids))
            for i in session.get_inputs()}
    for _ in range(2):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t0)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            calls[e["args"]["op_name"]] += 1
    runs = repeats + 2
    return {"median_ms": 1000 * float(np.median(times)),
            "ms_per_run": {op: us / runs / 1000 for op, us in per_op.most_common()},
            "calls_per_run": {op: calls[op] // runs for op in per_op}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    command = "python benchmarks/ort_profile.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(args.threads)
    dense = load_for_timing("minilm-l6")
    pruned = pruned_copy(dense, magnitude_plan(dense, 0.5, head_share=HEAD_SHARE))
    result = {"command": command, "environment": environment(args.threads), "batch": 32, "seq_len": 128, "profiles": {}}
    with tempfile.TemporaryDirectory(prefix="idprior-ortprof-") as tmp:
        for name, model in (("dense", dense), ("pruned", pruned)):
            path = export_onnx(model, None, Path(tmp) / f"{name}.onnx")
            for label, disabled in (("default", ()), ("idprior", DISABLED_ORT_FUSIONS)):
                result["profiles"][f"{name}/{label}"] = profile(path, args.threads, args.repeats, disabled,
                                                                str(Path(tmp) / f"{name}_{label}"))
    publish(args.out_dir, "ort_profile", result, render(result))
    return 0


def render(result: dict) -> str:
    env = result["environment"]
    lines = ["# ONNX Runtime operator profile: MiniLM-L6, dense vs 50% pruned (heads + neurons)", "", "Command:", "",
             "```", result["command"], "```", "",
             f"Machine: {env['cpu']}, {env['usable_cores']} usable cores; {env['threads']} intra-op threads; fp32; "
             f"onnxruntime {env['onnxruntime']}; batch {result['batch']} x {result['seq_len']} tokens. `default`: every "
             "ONNX Runtime graph optimization; `idprior`: the same without SkipLayerNormFusion. Kernel time per run "
             "(ms) by operator, from ONNX Runtime's profiler (which adds overhead), and the median run time.", ""]
    profiles = result["profiles"]
    ops = sorted({op for p in profiles.values() for op in p["ms_per_run"]},
                 key=lambda op: -max(p["ms_per_run"].get(op, 0.0) for p in profiles.values()))
    lines += ["| operator | " + " | ".join(profiles) + " |", "|---|" + "---|" * len(profiles)]
    for op in ops:
        cells = []
        for prof in profiles.values():
            ms = prof["ms_per_run"].get(op)
            cells.append("–" if ms is None else f"{ms:.1f} ({prof['calls_per_run'][op]} calls)")
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines.append("| **median run (ms)** | " + " | ".join(f"{p['median_ms']:.1f}" for p in profiles.values()) + " |")
    d, q = profiles["dense/idprior"]["median_ms"], profiles["pruned/idprior"]["median_ms"]
    d0, q0 = profiles["dense/default"]["median_ms"], profiles["pruned/default"]["median_ms"]
    lines += ["", f"Dense / pruned run-time ratio: {d0 / q0:.2f}x with the default optimizations, {d / q:.2f}x with "
              "idprior's (profiled runs; see speed_minilm.md for the unprofiled timing)."]
    for name in ("dense", "pruned"):
        prof = profiles[f"{name}/default"]
        skip = prof["ms_per_run"].get("SkipLayerNormalization")
        if skip:
            share = skip / sum(prof["ms_per_run"].values())
            lines.append(f"SkipLayerNormalization in {name}/default: {skip:.1f} ms per run, {share:.0%} of kernel time, "
                         f"{skip / prof['calls_per_run']['SkipLayerNormalization']:.2f} ms per call.")
    for name in ("dense", "pruned"):
        prof = profiles[f"{name}/idprior"]
        ln = prof["ms_per_run"].get("LayerNormalization")
        if ln:
            lines.append(f"LayerNormalization in {name}/idprior: {ln / prof['calls_per_run']['LayerNormalization']:.2f} ms per call.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
