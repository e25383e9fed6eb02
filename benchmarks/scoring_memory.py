"""Peak memory of scoring and surgery on SmolLM2-135M: does scoring keep only one layer alive?

    python benchmarks/scoring_memory.py                 # batch sizes 8 and 32, 32 blocks of 128 tokens

Each configuration runs in a fresh process (so peaks never mix): load the model, record its RSS,
reset the high-water mark (idprior.memory.reset_peak), run `idprior.method.scoring.score` over the same 32
calibration blocks of lm-rt training text, and read the peak. "lean" is idprior's default
(use_cache=False and logits for the last position only); "full logits" calls the model the plain
way, which also builds the [B, T, vocab] logits and a KV cache nobody reads. The batch-32 lean
runs then select a 30% plan and apply surgery with the peak reset again, in float32 and bfloat16.
The model is converted from GGUF once to a safetensors folder in a temporary directory first.

RSS overstates live tensors: glibc keeps freed blocks in its heap for reuse (its mmap threshold
rises after large frees), so the peak grows with everything allocated, not only what is alive.
The "exact" rows run with MALLOC_MMAP_THRESHOLD_=131072, which serves every block over 128 kB by
mmap and returns it on free, so their peak is close to the live tensors (and the run is slower).
The weights are memory-mapped by safetensors and only become resident during the first forward,
so "scoring extra" includes the weights (weights MB) plus the activations.
Writes benchmarks/results/scoring_memory.json and .md.
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

from idprior import io
from idprior.arch import get_adapter  # noqa: E402
from idprior.data import get_task, load_task, make_lm_dataloader  # noqa: E402
from idprior.memory import peak_mb, reset_peak, rss_mb  # noqa: E402
from idprior.method import scoring
from idprior.method.selection import select  # noqa: E402
from idprior.model import load as models
from idprior.model.surgery import apply_plan, save_pruned  # noqa: E402
from idprior.pipeline.bench import cpu_model  # noqa: E402

SEQ_LEN = 128
CONFIGS = [  # (batch size, lean, dtype, also measure surgery, exact allocator accounting)
    (8, True, "float32", False, False),
    (32, True, "float32", True, False),
    (8, False, "float32", False, False),
    (32, False, "float32", False, False),
    (32, True, "bfloat16", True, False),
    (8, True, "float32", False, True),
    (32, True, "float32", False, True),
]
EXACT_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def calibration(tokenizer, blocks: int, batch: int) -> list[dict]:
    """The first `blocks` full 128-token blocks of lm-rt training text, in batches of `batch`."""
    examples = load_task("lm-rt").splits["train"][: blocks * 8]  # ~25 tokens per snippet: plenty
    loader = make_lm_dataloader(examples, tokenizer, batch_size=batch, block_size=SEQ_LEN)
    ids = loader.dataset.input_ids[:blocks]  # [blocks, T]
    mask = loader.dataset.attention_mask[:blocks]
    if int(mask.sum()) != blocks * SEQ_LEN:
        raise SystemExit("not enough text for full blocks")
    return [{"input_ids": ids[i:i + batch], "attention_mask": mask[i:i + batch]} for i in range(0, blocks, batch)]


def child(folder: str, batch: int, lean: bool, dtype: str, surgery: bool, blocks: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model, tok = models.load(folder, get_task("lm-rt"), dtype=dtype)
    batches = calibration(tok, blocks, batch)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out = {"batch_size": batch, "lean": lean, "dtype": dtype, "blocks": blocks, "seq_len": SEQ_LEN,
           "exact_alloc": os.environ.get("MALLOC_MMAP_THRESHOLD_") == EXACT_ENV["MALLOC_MMAP_THRESHOLD_"],
           "weights_mb": round(weights_mb, 1), "peak_reset_works": reset_peak()}
    rss0 = rss_mb()
    reset_peak()
    t0 = time.perf_counter()
    scores = scoring.score(model, batches, lean=lean)
    out.update(score_s=round(time.perf_counter() - t0, 1), rss_before_score_mb=round(rss0, 1),
               score_peak_mb=round(peak_mb(), 1), score_extra_mb=round(peak_mb() - rss0, 1))
    if surgery:
        adapter = get_adapter(model)
        plan = select(scores, adapter, target=0.3)
        rss1 = rss_mb()
        reset_peak()
        t0 = time.perf_counter()
        apply_plan(model, plan.units, adapter)
        out.update(surgery_s=round(time.perf_counter() - t0, 2), rss_before_surgery_mb=round(rss1, 1),
                   surgery_peak_mb=round(peak_mb(), 1), surgery_extra_mb=round(peak_mb() - rss1, 1),
                   rss_after_surgery_mb=round(rss_mb(), 1),
                   weights_after_mb=round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
                   dtypes_after=sorted({str(p.dtype) for p in model.parameters()}))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    p.add_argument("--child", nargs=5, metavar=("FOLDER", "BATCH", "LEAN", "DTYPE", "SURGERY"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        folder, batch, lean, dtype, surgery = args.child
        print(json.dumps(child(folder, int(batch), lean == "1", dtype, surgery == "1", args.blocks, args.threads)))
        return 0

    command = "python benchmarks/scoring_memory.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="idprior-mem-") as tmp:
        torch.set_num_threads(args.threads)
        model, tok = models.load("smollm2-135m", get_task("lm-rt"))
        save_pruned(model, tok, Path(tmp) / "smollm2")
        del model
        for batch, lean, dtype, surgery, exact in CONFIGS:
            cmd = [sys.executable, __file__, "--blocks", str(args.blocks), "--threads", str(args.threads), "--child",
                   str(Path(tmp) / "smollm2"), str(batch), str(int(lean)), dtype, str(int(surgery))]
            env = {**os.environ, **(EXACT_ENV if exact else {})}
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"command": command, "model": models.ALIASES["smollm2-135m"].description,
              "machine": {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)), "threads": args.threads,
                          "torch": torch.__version__, "loadavg_start": [round(x, 2) for x in load_start],
                          "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
              "rows": rows}
    out = Path(args.out_dir)
    io.write_json(out / "scoring_memory.json", result)
    io.write_text(out / "scoring_memory.md", render(result))
    print(render(result))
    return 0


def render(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Scoring and surgery memory: {result['model']}", "", "Command:", "", "```", result["command"], "```", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads, torch {m['torch']}; load average "
             f"{m['loadavg_start']} at start, {m['loadavg_end']} at end (times are indicative only on a shared machine; "
             "memory is not affected by load).", "",
             "Peak = high-water RSS during the step (reset just before it); extra = peak minus the RSS just before "
             "the step (weights, libraries and data already resident).", "",
             "| batch | forward | dtype | allocator | weights MB | RSS before MB | scoring peak MB | scoring extra MB "
             "| extra minus weights MB | scoring s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        alloc = "exact (mmap > 128 kB)" if r["exact_alloc"] else "glibc default"
        activations = r["score_extra_mb"] - (r["weights_mb"] if r["dtype"] == "float32" else 0)  # mmap'd fp32 weights
        lines.append(f"| {r['batch_size']} x {r['seq_len']} | {'lean' if r['lean'] else 'full logits + cache'} | "
                     f"{r['dtype']} | {alloc} | {r['weights_mb']} | {r['rss_before_score_mb']} | {r['score_peak_mb']} | "
                     f"{r['score_extra_mb']} | {activations:.1f} | {r['score_s']} |")
    lines += ["", "bfloat16 weights are converted on load (not memory-mapped), so they are resident before scoring "
              "and nothing is subtracted for them."]
    lines += ["", "Surgery (30% of decoder-layer parameters, SNIP function-norm plan from the scores above):", "",
              "| dtype | weights before MB | weights after MB | RSS before MB | surgery peak MB | extra MB | RSS after MB | dtypes after | s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "surgery_peak_mb" in r:
            lines.append(f"| {r['dtype']} | {r['weights_mb']} | {r['weights_after_mb']} | {r['rss_before_surgery_mb']} | "
                         f"{r['surgery_peak_mb']} | {r['surgery_extra_mb']} | {r['rss_after_surgery_mb']} | "
                         f"{', '.join(r['dtypes_after'])} | {r['surgery_s']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
