"""What the scripts in benchmarks/ share: memory probes, CPU priority, the timing models, publishing.

The scripts import only from idprior (never from each other, never through `sys.path`;
tests/test_code_health.py checks it), so each runs on its own from any directory, and a change
here is seen by every script that uses it.

Memory probes (`rss_mb`, `peak_mb`, `reset_peak`) live in `idprior.memory`.

Timing models: the speed benchmarks time dense models against weight-magnitude plans (idprior's
`magnitude` baseline: no data, no training), since accuracy is not what they measure.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

from .. import io
from ..memory import lifetime_peak_mb, peak_mb, reset_peak, rss_mb, write_proc  # noqa: F401
from ..method.plan import PruningPlan

TIMING_MODELS = ("minilm-l6", "smollm2-135m")  # what `load_for_timing` knows
HEAD_SHARE = 0.3  # the speed benchmarks' "heads+neurons" plan: 30% of the budget from heads


def set_priority(nice: int) -> None:
    """Raise (negative) or lower this process's CPU priority, for timing on a shared machine.

    Called before torch / ONNX Runtime start their worker threads, which inherit it. With the
    kernel's autogroup scheduling on, a thread's nice value only counts inside its session's
    group, so the group's nice (/proc/self/autogroup) is set too.
    """
    try:
        os.nice(nice)
    except OSError as e:
        print(f"warning: could not change the nice value by {nice}: {e}", file=sys.stderr)
    if Path("/proc/self/autogroup").exists():
        try:
            write_proc("autogroup", str(nice))
        except OSError as e:
            print(f"warning: could not set the autogroup nice value to {nice}: {e}", file=sys.stderr)


def publish(out_dir: str | Path, stem: str, result: dict, markdown: str) -> None:
    """Write OUT_DIR/STEM.json and STEM.md (atomically) and print the markdown."""
    out = Path(out_dir)
    io.write_json(out / f"{stem}.json", result)
    io.write_text(out / f"{stem}.md", markdown)
    print(markdown)


def load_for_timing(name: str):
    """A model of TIMING_MODELS in eval mode: MiniLM-L6 with a 2-label head, SmolLM2 as a causal LM."""
    from ..data.tasks import Task
    from ..model import load as models

    if name == "minilm-l6":
        task = Task(name="speed", kind="classification", labels=("neg", "pos"), metrics=(), text_fields=("text",),
                    description="2-label head for timing")
        model, _ = models.load(name, task)
    else:
        model, _ = models.load(name)
    return model.eval()


def magnitude_plan(model, target: float, head_share: float | None = None) -> PruningPlan:
    """The `magnitude` baseline's plan removing `target` of encoder params from heads and neurons: one
    global ranking (FFN neurons in practice: raw magnitudes put every head above every neuron), or,
    with `head_share`, that fraction of the budget from heads and the rest from neurons."""
    from ..arch import get_adapter
    from ..baselines import get_method

    method = get_method("magnitude", selection="norm" if head_share is None else "share", head_share=head_share)
    return method.plan(model, get_adapter(model), [], target=target, kinds=("head", "neuron"))


def pruned_copy(dense, plan: PruningPlan):
    """A physically pruned deep copy of `dense` (the dense model is left as it is)."""
    from ..model.surgery import apply_plan

    model = copy.deepcopy(dense)
    apply_plan(model, plan.units)
    return model


def minilm_timing_models() -> dict:
    """MiniLM-L6 dense and its two 50% magnitude plans (neurons only; heads + neurons), pruned."""
    dense = load_for_timing("minilm-l6")
    return {"dense": dense, "pruned-neurons": pruned_copy(dense, magnitude_plan(dense, 0.5)),
            "pruned-heads+neurons": pruned_copy(dense, magnitude_plan(dense, 0.5, head_share=HEAD_SHARE))}


ATTENTION_MODES = ("eager", "fused")


def export_attention_modes(models: dict, tmp: str | Path, threads: int, info: dict) -> dict:
    """An ONNX Runtime session per (model, attention mode in ATTENTION_MODES); parity and opset go
    into info[model]."""
    from ..model.export import attention_mode, example_inputs, export_onnx, input_names, ort_session, parity

    sessions = {}
    for name, model in models.items():
        check = example_inputs(model, input_names(model), batch=3, seq_len=24, seed=1, pad=True)
        entry = info.setdefault(name, {})
        for mode in ATTENTION_MODES:
            path = export_onnx(model, None, Path(tmp) / f"{name}-{mode}.onnx", attention=mode)
            entry[f"{mode}_opset"] = attention_mode(model, "dynamo", None, mode)[1] or "exporter default"
            entry[f"{mode}_max_abs_diff"] = parity(model, path, check)["max_abs_diff"]
            sessions[(name, mode)] = ort_session(path, threads)
    return sessions


def ort_runners(sessions: dict, dense, batch: int, seq_len: int) -> dict:
    """One zero-argument callable per session, all on the same random [batch, seq_len] tokens."""
    from ..model.export import ort_feed

    ids = torch.randint(0, dense.config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(batch))
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    feeds = {key: ort_feed(s, full) for key, s in sessions.items()}
    return {key: (lambda s=s, f=feeds[key]: s.run(["logits"], f)) for key, s in sessions.items()}


def run_idprior(argv: list[str], threads: int) -> float:
    """Run one `idprior` command in a subprocess (printed first, so it can be repeated by hand) unless
    its `--out` folder already holds metrics.json; returns wall seconds (nan when read back)."""
    import shlex
    import subprocess
    import time

    out = Path(argv[argv.index("--out") + 1])
    if (out / "metrics.json").exists():
        return float("nan")
    t0 = time.perf_counter()
    print("$ idprior " + " ".join(shlex.quote(a) for a in argv), flush=True)
    subprocess.run([sys.executable, "-m", "idprior.cli.main", *argv, "--overwrite"], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return time.perf_counter() - t0
