"""Measured speed of dense vs pruned models, beside the speed-up their FLOPs promise.

All models run in one process on the same random token batch (no padding), in PyTorch eager
(fp32, `torch.inference_mode()`) and in ONNX Runtime (CPUExecutionProvider, `threads` intra-op
threads). Repeats are taken in short blocks that alternate over the models (a block of dense,
of pruned, of pruned, of dense, ...; at least `MIN_ROUNDS` rounds), so a change in background
load during the run hits every model alike and the measured ratio stays fair even on a shared
machine; the load average at the start and end is recorded too. Every block starts with untimed
runs for at least `LEAD_IN_S`: each ONNX Runtime session has its own thread pool, and right after
a switch between sessions the next session ran slowly. On 2 cores with six MiniLM-L6 sessions, one
call each in strict alternation put a pruned model's batch-1 latency at 34 ms instead of 9.5 ms
and its batch-32 speed-up at 1.68x instead of 1.77x (benchmarks/results/timing_leadin.md). The
lead-in takes that transient out.

What else the process holds must not leak into the timed calls, so:
- eager is timed first, before any ONNX export or ONNX Runtime session exists in the process (an
  export imports onnxscript and leaves about 50% more Python objects behind; sessions have their
  own thread pools), and the sessions are closed once their timing is done;
- the garbage collector is run before and paused during each timing (as `timeit` does), so a
  collection over everything earlier stages left in the process (the whole of `idprior prune`)
  does not land in one model's repeats;
- models are timed folded (no spectral-norm parametrizations), in eval mode, in inference mode,
  with torch set to `threads` threads (restored afterwards).

Latency is the median over repeats with its inter-quartile range. `NoiseGuard` re-times a shape
whose repeats are too spread and flags it in the table if it stays so.

Alternation cancels load that changes *within* a process, not a state that a whole process keeps.
On the shared 2-core VM the same model's eager latency differed by up to a third between fresh
processes (1225 vs 1690 ms dense at batch 32 x 128), and with it the speed-up of a few processes
(1.79x and 1.68x where every other process gave 1.88-1.97x; benchmarks/results/demo_agreement.md),
with tight repeats inside each, so no in-process check could see it. `benchmark_processes` therefore
times the same models in several fresh processes and reports, per timing, the median over processes
of the speed-up each process measured (`bench.processes`, `idprior bench --processes`). It narrows the
spread, it does not remove it: on another day 36 fresh processes gave 1.63-2.06x for the same models.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import multiprocessing
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import IdpriorError


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": affinity,
        "threads": threads,
        "dtype": "float32",
        "torch": torch.__version__,
        "onnxruntime": _version("onnxruntime"),
        "onnx": _version("onnx"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "niceness": os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else None,
        "autogroup": _read("/proc/self/autogroup"),
    }


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def latency_stats(seconds: list[float], batch: int) -> dict:
    ms = np.asarray(seconds) * 1000.0
    p25, median, p75 = np.percentile(ms, [25, 50, 75])
    return {
        "latency_ms_median": float(median),
        "latency_ms_iqr": float(p75 - p25),
        "latency_ms_p25": float(p25),
        "latency_ms_p75": float(p75),
        "latency_ms_min": float(ms.min()),
        "throughput_seq_per_s": float(batch / (median / 1000.0)),
        "repeats": len(seconds),
    }


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "model"


def _model_info(model: nn.Module, seq_lens: tuple[int, ...]) -> dict:
    from ..arch import get_adapter
    from ..method.flops import model_flops

    adapter = get_adapter(model)
    flops = {T: model_flops(model, T, adapter) for T in seq_lens}
    return {
        "model_type": model.config.model_type,
        "params": sum(p.numel() for p in model.parameters()),
        "encoder_params": adapter.layer_params(),
        "flops": {str(T): f["total"] for T, f in flops.items()},
        "layer_flops": {str(T): f["layers_total"] for T, f in flops.items()},
        "structure": [s.to_dict() for s in adapter.shapes()],
    }


@dataclass(frozen=True)
class NoiseGuard:
    """When to distrust a timing: too spread repeats are re-timed, and flagged if they stay so.

    Two signs of a disturbed timing: a model's inter-quartile range above `max_iqr` of its median,
    and a speed-up from the fastest repeats (reference min / min) more than `max_gap` (relative)
    away from the speed-up from the medians. On a quiet machine the first stayed at or under 6% and
    the second under 5% in every committed speed result but one (ONNX Runtime batch 1: IQR 12%);
    the demo's own bench table in issue 18 had a dense IQR of 116 ms and a median speed-up of 1.54x
    where a standalone bench gave 1.97x. A flagged shape gets up to `retime_rounds` more rounds of
    the same alternating timing; the quietest round is kept, and a shape still flagged after them
    is marked in the table instead of being printed as a confident figure.
    """

    max_iqr: float = 0.10
    max_gap: float = 0.08
    retime_rounds: int = 2

    def spread(self, times: Mapping[str, list[float]], reference: str) -> dict[str, dict[str, float]]:
        """Per model: IQR / median, |speed-up from minima / speed-up from medians - 1|, both speed-ups."""
        ref = np.asarray(times[reference], dtype=float)
        out = {}
        for name, seconds in times.items():
            t = np.asarray(seconds, dtype=float)
            p25, median, p75 = np.percentile(t, [25, 50, 75])
            speedup = float(np.median(ref)) / max(float(median), 1e-12)
            speedup_min = float(ref.min()) / max(float(t.min()), 1e-12)
            out[name] = {"iqr": float(p75 - p25) / max(float(median), 1e-12),
                         "gap": abs(speedup_min / max(speedup, 1e-12) - 1.0), "speedup": speedup, "speedup_min": speedup_min}
        return out

    def reasons(self, times: Mapping[str, list[float]], reference: str) -> dict[str, list[str]]:
        """Per model, why its latency or its speed-up over `reference` is not to be trusted ([]: quiet)."""
        spread = self.spread(times, reference)
        ref_iqr = spread[reference]["iqr"]
        out = {}
        for name, x in spread.items():
            why = []
            if x["iqr"] > self.max_iqr:
                why.append(f"IQR {x['iqr']:.0%} of median")
            if name != reference and ref_iqr > self.max_iqr:
                why.append(f"reference IQR {ref_iqr:.0%} of median")
            if x["gap"] > self.max_gap:
                why.append(f"speed-up from fastest repeats {x['speedup_min']:.2f}x vs {x['speedup']:.2f}x from medians")
            out[name] = why
        return out

    def badness(self, times: Mapping[str, list[float]], reference: str) -> float:
        """The worst spread over the models in units of its threshold: <= 1 is quiet."""
        spread = self.spread(times, reference).values()
        return max(max(x["iqr"] / self.max_iqr, x["gap"] / self.max_gap) for x in spread)


def benchmark(
    models: Mapping[str, nn.Module],
    *,
    batch_sizes: tuple[int, ...] = (1, 32),
    seq_lens: tuple[int, ...] = (128, 512),
    threads: int | None = None,
    repeats: int | Mapping[int, int] = 10,
    warmup: int = 3,
    onnx: bool = True,
    workdir: str | os.PathLike | None = None,
    reference: str | None = None,
    exporter: str = "dynamo",
    attention: str = "auto",
    noise: NoiseGuard | None = None,
) -> dict:
    """Time every model (eager, and ONNX Runtime if `onnx`) at every batch size x sequence length.

    `models` maps a name to a model; `reference` (default: the first) is the model the speed-ups
    are relative to, normally the dense one. `repeats` may map a sequence length to its own
    count (long sequences are slow). `threads` (default: torch's current setting) is used for
    torch and for ONNX Runtime's intra-op pool. ONNX files go to `workdir` (default: a temporary
    folder, deleted afterwards); `exporter` and `attention` as in `export_onnx`. `noise` (default
    `NoiseGuard()`) decides which shapes are re-timed and flagged. Spectral-norm parametrizations
    are folded in place first. Eager is timed before anything ONNX exists (module docstring).
    Returns {"environment", "reference", "models", "noise_guard", "rows"}; every row is one (model,
    backend, batch, seq_len) with latency, throughput, speed-up measured vs FLOPs-ideal, and `noise`
    (the reasons to distrust it, [] if none) after `timing_rounds` rounds.
    """
    from ..method.spectral import fold
    from ..model.export import require_onnx

    reference = _check_models(models, reference, seq_lens)
    shapes = [(int(b), int(t)) for b in batch_sizes for t in seq_lens]
    seq_lens = tuple(int(t) for t in seq_lens)
    if onnx:
        require_onnx()
    guard = noise or NoiseGuard()
    threads = int(threads or torch.get_num_threads())
    started = time.perf_counter()
    result: dict = {"environment": environment(threads), "reference": reference, "models": {},
                    "noise_guard": asdict(guard), "rows": []}
    result["environment"]["loadavg_start"] = loadavg()
    result["environment"]["onnx_exporter"] = exporter
    for model in models.values():
        fold(model)
        model.eval()
    result["models"] = {name: _model_info(model, seq_lens) for name, model in models.items()}
    timing = {"shapes": shapes, "repeats": repeats, "warmup": warmup, "reference": reference, "guard": guard}
    with _torch_threads(threads):
        _time_backend(result, models, {}, "eager", **timing)
        if onnx:
            with _onnx_workdir(workdir) as folder:
                sessions = _onnx_sessions(models, folder, result["models"], threads, exporter, attention)
                try:
                    _time_backend(result, models, sessions, "onnxruntime", **timing)
                finally:
                    sessions.clear()  # closes the sessions and their thread pools now
    _add_speedups(result)
    result["environment"]["loadavg_end"] = loadavg()
    result["environment"]["wall_s"] = round(time.perf_counter() - started, 1)
    return result


def _load_and_time(loaders: Mapping[str, Callable[[], object]], kwargs: dict) -> dict:
    """Child side of `benchmark_processes`: load every model in this fresh process, then `benchmark`."""
    models = {}
    for name, load in loaders.items():
        loaded = load()
        models[name] = loaded[0] if isinstance(loaded, tuple) else loaded  # loaders may return (model, tokenizer)
    return benchmark(models, **kwargs)


def benchmark_processes(loaders: Mapping[str, Callable[[], object]], processes: int = 3, **kwargs) -> dict:
    """`benchmark` run `processes` times, each in a fresh process (one after another, never two at once),
    merged by `merge_processes`. `loaders` maps a model name to a picklable callable that loads it (a
    top-level function or a `functools.partial` of one) returning the model or (model, tokenizer);
    `kwargs` go to `benchmark` (`workdir`, if given, gets one sub-folder per process)."""
    if processes < 1:
        raise IdpriorError(f"bench processes must be >= 1, got {processes}")
    kwargs = dict(kwargs, threads=int(kwargs.get("threads") or torch.get_num_threads()))  # what this process would use
    workdir = kwargs.pop("workdir", None)
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of this process's state
    results, synced = [], []
    for i in range(processes):
        child = dict(kwargs, workdir=None if workdir is None else Path(workdir) / f"process{i}")
        synced.append(flush_writes())
        # an executor, not a Pool: its shutdown joins the worker and frees its semaphores (a Pool left as a
        # context manager is terminated and the resource tracker warns about leaked semaphores at exit)
        with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            results.append(pool.submit(_load_and_time, dict(loaders), child).result())
    merged = merge_processes(results, kwargs.get("noise") or NoiseGuard())
    merged["environment"]["sync_s"] = synced
    return merged


def flush_writes() -> float | None:
    """`os.sync()` before a timing process starts; returns the seconds it took (None where there is none).

    Why: inside `idprior prune` the first timing process starts right after the run wrote its models
    (hundreds of MB of safetensors), and the kernel's writeback of those dirty pages then runs beside the
    timed calls; in 2 of 3 demo runs that process timed the dense model ~20% slower than the other
    processes (benchmarks/results/demo_agreement.md). The recorded seconds show how much was pending:
    1-4 ms in every process of the next three demo runs, so pending writes were not the cause; kept,
    as it costs nothing and rules that cause out in every bench.
    """
    if not hasattr(os, "sync"):
        return None
    start = time.perf_counter()
    os.sync()
    return round(time.perf_counter() - start, 3)


def merge_processes(results: list[dict], guard: NoiseGuard) -> dict:
    """One result from the same benchmark timed in several processes.

    Per timing: speed-up = the median of the speed-ups the processes measured (each within one process,
    so a process that runs everything slower cancels out of its own ratio), latency = the median of the
    processes' medians (IQR and quartiles likewise), min = the fastest repeat of any process. A timing is
    flagged when fewer than a majority of processes measured a speed-up within `guard.max_gap` of that
    median (the processes do not agree), or when a majority of processes flagged it themselves.
    """
    out = copy.deepcopy(results[0])
    if len(results) == 1:
        return out
    def key(r: dict) -> tuple:
        return r["model"], r["backend"], r["batch_size"], r["seq_len"]

    by_process = [{key(r): r for r in res["rows"]} for res in results]
    majority = len(results) // 2 + 1
    for row in out["rows"]:
        rows = [p[key(row)] for p in by_process]
        speedups = [r["speedup"] for r in rows]
        speedup = float(np.median(speedups))
        for k in ("latency_ms_median", "latency_ms_iqr", "latency_ms_p25", "latency_ms_p75"):
            row[k] = float(np.median([r[k] for r in rows]))
        row["latency_ms_min"] = min(r["latency_ms_min"] for r in rows)
        row["throughput_seq_per_s"] = row["batch_size"] / (row["latency_ms_median"] / 1000.0)
        row["repeats"] = sum(r["repeats"] for r in rows)
        row["timing_rounds"] = max(r.get("timing_rounds", 1) for r in rows)
        row["latency_ms_repeats"] = [x for r in rows for x in r["latency_ms_repeats"]]
        row["speedup"] = speedup
        row["speedup_min"] = float(np.median([r["speedup_min"] for r in rows]))
        row["fraction_of_ideal"] = speedup / row["flops_ideal_speedup"]
        row["process_speedups"] = speedups
        row["process_latency_ms"] = [r["latency_ms_median"] for r in rows]
        agree = sum(abs(s / max(speedup, 1e-12) - 1.0) <= guard.max_gap for s in speedups)
        noise = []
        if agree < majority:
            noise.append("processes disagree: speed-ups " + ", ".join(f"{s:.2f}x" for s in speedups))
        flagged = [r["noise"] for r in rows if r.get("noise")]
        if len(flagged) >= majority:
            noise += list(dict.fromkeys(reason for reasons in flagged for reason in reasons))
        row["noise"] = noise
    env = out["environment"]
    env["processes"] = len(results)
    env["loadavg_end"] = results[-1]["environment"].get("loadavg_end")
    env["wall_s"] = round(sum(r["environment"].get("wall_s", 0.0) for r in results), 1)
    return out


@contextlib.contextmanager
def _torch_threads(threads: int):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _onnx_workdir(workdir: str | os.PathLike | None):
    """`workdir` as a Path, or a temporary folder deleted afterwards."""
    if workdir is not None:
        yield Path(workdir)
        return
    with tempfile.TemporaryDirectory(prefix="idprior-bench-") as tmp:
        yield Path(tmp)


def _time_backend(result: dict, models: Mapping[str, nn.Module], sessions: dict, backend: str, *, shapes, repeats,
                  warmup: int, reference: str, guard: NoiseGuard) -> None:
    """Time every shape on one backend (guarded, see `time_guarded`) and append a row per model."""
    bar = tqdm(shapes, desc=f"bench {backend}")
    for batch, seq_len in bar:
        bar.set_postfix_str(f"b={batch} T={seq_len}")
        n_rep = int(repeats[seq_len] if isinstance(repeats, Mapping) else repeats)
        runners = _runners(models, sessions, backend, batch, seq_len)
        times, rounds = time_guarded(runners, n_rep, warmup, reference, guard)
        reasons = guard.reasons(times, reference)
        for name in models:
            result["rows"].append({"model": name, "backend": backend, "batch_size": batch, "seq_len": seq_len,
                                   **latency_stats(times[name], batch), "timing_rounds": rounds, "noise": reasons[name],
                                   "latency_ms_repeats": [round(1000.0 * x, 4) for x in times[name]]})


def _check_models(models: Mapping[str, nn.Module], reference: str | None, seq_lens) -> str:
    """The reference model's name (default: the first); refuses lengths beyond a model's positions."""
    if not models:
        raise IdpriorError("benchmark needs at least one model")
    names = list(models)
    reference = reference or names[0]
    if reference not in models:
        raise IdpriorError(f"reference {reference!r} is not one of the models ({', '.join(names)})")
    for name, model in models.items():
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and max(int(t) for t in seq_lens) > limit:
            raise IdpriorError(f"sequence length {max(int(t) for t in seq_lens)} exceeds {name}'s "
                               f"max_position_embeddings {limit}; lower --seq-lens")
    return reference


def check_pruned_from(dense: nn.Module, pruned: nn.Module, dense_name: str, pruned_name: str) -> None:
    """Refuse to time `pruned` against a `dense` model it cannot have been pruned from: a speed-up
    between unrelated models (a GPT-2 against a pruned BERT) would be printed as if it were pruning's.

    Pruning narrows a model and keeps the rest: the same model type, layer count (a removed sub-layer
    is a width of 0), hidden size and vocabulary, and per layer no more heads, KV heads or FFN
    neurons than the dense model (the widths surgery records in config.json's idprior_layers)."""
    from ..arch import get_adapter

    def differ(what: str, d, p) -> str:
        return f"{what} {p} vs {d} in the dense model"

    reasons = []
    d_type, p_type = dense.config.model_type, pruned.config.model_type
    if d_type != p_type:
        reasons.append(differ("model type", d_type, p_type))
    else:
        da, pa = get_adapter(dense), get_adapter(pruned)
        for what, d, p in (("layers", da.num_layers, pa.num_layers), ("hidden size", da.hidden_size, pa.hidden_size),
                           ("vocabulary", getattr(dense.config, "vocab_size", None),
                            getattr(pruned.config, "vocab_size", None))):
            if d != p:
                reasons.append(differ(what, d, p))
        if not reasons:
            for i, (ds, ps) in enumerate(zip(da.shapes(), pa.shapes())):
                wider = [f"{ps_v} {name}" for name, ds_v, ps_v in (("heads", ds.n_heads, ps.n_heads),
                                                                   ("KV heads", ds.n_kv_heads, ps.n_kv_heads),
                                                                   ("FFN neurons", ds.ffn_dim, ps.ffn_dim)) if ps_v > ds_v]
                if wider:
                    reasons.append(f"layer {i} has {', '.join(wider)}, more than the dense model")
                    break
    if reasons:
        raise IdpriorError(f"--pruned {pruned_name} is not a pruned version of --dense {dense_name} ({'; '.join(reasons)}), "
                           "so a speed-up between them would mean nothing; give the model it was pruned from as --dense")


def _onnx_sessions(models: Mapping[str, nn.Module], workdir: Path, info: dict, threads: int, exporter: str,
                   attention: str) -> dict:
    """Export each model to workdir/NAME.onnx, check parity, open an ONNX Runtime session; the export's
    time, size, attention form and parity go into `info[name]`."""
    from ..model.export import attention_mode, example_inputs, export_onnx, input_names, ort_session, parity

    sessions = {}
    for name, model in tqdm(models.items(), desc="export onnx", leave=False):
        path = workdir / f"{_safe_name(name)}.onnx"
        t0 = time.perf_counter()
        export_onnx(model, None, path, exporter=exporter, attention=attention)
        row = info[name]
        row["onnx_export_s"] = round(time.perf_counter() - t0, 2)
        row["onnx_attention"], row["onnx_opset"] = attention_mode(model, exporter, None, attention)
        row["onnx_mb"] = round(path.stat().st_size / 2**20, 2)
        parity_batch = example_inputs(model, input_names(model), batch=3, seq_len=24, seed=1, pad=True)
        check = parity(model, path, parity_batch)
        row["onnx_max_abs_diff"] = check["max_abs_diff"]
        row["onnx_max_abs_logit"] = check["max_abs_logit"]  # scale of the difference
        sessions[name] = ort_session(path, threads)
    return sessions


def _runners(models: Mapping[str, nn.Module], sessions: dict, backend: str, batch: int, seq_len: int) -> dict:
    """One zero-argument call per model on the same seeded random batch [batch, seq_len]."""
    from ..model.export import input_names, ort_feed

    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(1000 * batch + seq_len)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)  # [B, T], same for every model
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    runners = {}
    for name, model in models.items():
        if backend == "eager":
            runners[name] = _eager_runner(model, {k: full[k] for k in input_names(model)})
        else:
            session = sessions[name]
            feed = ort_feed(session, full)
            runners[name] = (lambda s=session, f=feed: s.run(["logits"], f))
    return runners


def _eager_runner(model: nn.Module, inputs: dict[str, torch.Tensor]):
    from ..model.export import is_decoder_model

    kwargs = dict(inputs, use_cache=False) if is_decoder_model(model) else dict(inputs)

    def run():
        with torch.inference_mode():
            return model(**kwargs).logits

    return run


BLOCK = 5  # timed runs per block in `time_blocks`, at most
MIN_ROUNDS = 3  # alternating rounds per shape, at least (when there are that many repeats)
LEAD_IN_S = 0.1  # untimed running before each block (at least one call)


@contextlib.contextmanager
def gc_paused():
    """Collect garbage now, and not again until the block ends (timeit does the same)."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def time_blocks(runners: dict, repeats: int, warmup: int, block: int = BLOCK, lead_in_s: float = LEAD_IN_S,
                min_rounds: int = MIN_ROUNDS, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Warm every runner up, then time `repeats` calls of each in blocks of at most `block`.

    The blocks alternate over the runners, the order reversed every other round, and each block
    starts with untimed calls for `lead_in_s` seconds, at least one (see the module docstring).
    Blocks shrink so that there are at least `min_rounds` rounds: with one block per model (5
    repeats, the demo's setting, used to give exactly that) nothing alternates, and a burst of load
    lands on one model only. The garbage collector is paused throughout (`gc_paused`). `clock`
    (seconds) is for tests.
    """
    block = max(1, min(block, -(-repeats // max(1, min_rounds))))
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    with gc_paused():
        for run in runners.values():
            for _ in range(warmup):
                run()
        for r in range(-(-repeats // block)):  # ceil(repeats / block) rounds
            for name in order if r % 2 == 0 else order[::-1]:
                t0 = clock()
                runners[name]()  # untimed lead-in
                while clock() - t0 < lead_in_s:
                    runners[name]()
                for _ in range(min(block, repeats - len(times[name]))):
                    t0 = clock()
                    runners[name]()
                    times[name].append(clock() - t0)
    return times


def time_guarded(runners: dict, repeats: int, warmup: int, reference: str, guard: NoiseGuard | None = None,
                 **kwargs) -> tuple[dict[str, list[float]], int]:
    """`time_blocks`, then while `guard` finds the timing too spread, up to `guard.retime_rounds`
    more rounds (no warm-up: the lead-in suffices). Returns the quietest round's times and the
    number of rounds run; `kwargs` go to `time_blocks`."""
    guard = guard or NoiseGuard()
    best = time_blocks(runners, repeats, warmup, **kwargs)
    rounds = 1
    while guard.badness(best, reference) > 1.0 and rounds <= guard.retime_rounds:
        again = time_blocks(runners, repeats, 0, **kwargs)
        rounds += 1
        if guard.badness(again, reference) < guard.badness(best, reference):
            best = again
    return best, rounds


def _add_speedups(result: dict) -> None:
    """speedup = reference median latency / median latency (speedup_min: the same with the fastest
    repeats); ideal = reference FLOPs / FLOPs; fraction = speedup / ideal."""
    ref = result["reference"]
    by_key = {(r["model"], r["backend"], r["batch_size"], r["seq_len"]): r for r in result["rows"]}
    for row in result["rows"]:
        base = by_key[(ref, row["backend"], row["batch_size"], row["seq_len"])]
        T = str(row["seq_len"])
        ideal = result["models"][ref]["flops"][T] / result["models"][row["model"]]["flops"][T]
        speedup = base["latency_ms_median"] / row["latency_ms_median"]
        row["flops"] = result["models"][row["model"]]["flops"][T]
        row["speedup"] = speedup
        row["speedup_min"] = base["latency_ms_min"] / row["latency_ms_min"]  # least disturbed runs: a check on load noise
        row["flops_ideal_speedup"] = ideal
        row["fraction_of_ideal"] = speedup / ideal


def format_bench_markdown(result: dict) -> str:
    """A markdown summary: environment, model sizes, one row per timing, and the noise guard's verdicts."""
    env = result["environment"]
    lines = [
        f"Machine: {env['cpu']}, {env['usable_cores']} usable cores ({env['logical_cores']} logical); "
        f"{env['threads']} threads; {env['dtype']}; torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
        f"transformers {env['transformers']}, Python {env['python']}.",
        f"Load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}; "
        f"benchmark wall time {env.get('wall_s')} s.",
        f"Inputs: the same random token batch for every model, no padding. Repeats in at least {MIN_ROUNDS} alternating "
        f"rounds of blocks of at most {BLOCK} per model, each after {LEAD_IN_S:g} s (at least one call) of untimed runs; "
        "garbage collector paused while timing; eager timed before any ONNX export.",
    ]
    onnx_modes = sorted({(i["onnx_attention"], i["onnx_opset"]) for i in result["models"].values() if "onnx_attention" in i},
                        key=str)
    if onnx_modes:
        modes = "; ".join(f"attention {a}, opset {o or 'exporter default'}" for a, o in onnx_modes)
        lines.append(f"ONNX export: {env.get('onnx_exporter', 'dynamo')} exporter, {modes}; ONNX Runtime CPU provider, "
                     "all graph optimizations except idprior.model.export.DISABLED_ORT_FUSIONS.")
    if env.get("processes", 1) > 1:
        lines.append(f"Timed in {env['processes']} fresh processes, one after another: each figure is the median over "
                     "processes (a speed-up is measured within one process; the table's check also flags processes that "
                     "disagree by more than the noise guard's speed-up gap).")
    guard = result.get("noise_guard")
    if guard:
        lines.append(f"Noise guard: a shape is timed again (up to {guard['retime_rounds']} more rounds, the quietest kept) "
                     f"when a model's IQR exceeds {guard['max_iqr']:.0%} of its median or the speed-up from the fastest "
                     f"repeats differs from the one from the medians by more than {guard['max_gap']:.0%}.")
    lines.append("")
    lines += _models_table(result)
    lines += [
        "",
        f"Speed-up is relative to `{result['reference']}` on the same backend and shape; FLOPs-ideal = its FLOPs / "
        "the model's FLOPs; measured/ideal = speed-up / FLOPs-ideal. Speed-up (min) compares the fastest repeats, "
        "a check on background load.",
        "",
    ]
    lines += _timings_table(result["rows"], with_check=bool(guard))
    return "\n".join(lines) + "\n"


def _models_table(result: dict) -> list[str]:
    seq_lens = sorted({r["seq_len"] for r in result["rows"]}) or sorted(int(t) for t in next(iter(result["models"].values()))["flops"])
    header = ("| model | params | encoder params | " + " | ".join(f"GFLOPs/seq @T={t}" for t in seq_lens)
              + " | ONNX max abs diff (largest logit) |")
    lines = [header, "|" + "---|" * (4 + len(seq_lens))]
    for name, info in result["models"].items():
        gflops = " | ".join(f"{info['flops'][str(t)] / 1e9:.3f}" for t in seq_lens)
        diff = info.get("onnx_max_abs_diff")
        parity_text = "n/a" if diff is None else f"{diff:.1e} ({info.get('onnx_max_abs_logit', float('nan')):.3g})"
        lines.append(f"| {name} | {info['params'] / 1e6:.2f}M | {info['encoder_params'] / 1e6:.2f}M | {gflops} | {parity_text} |")
    return lines


def noise_check(row: dict) -> str:
    """The table's verdict on one timing: "ok", "ok after N rounds", or "NOISY: <reasons>"."""
    if row.get("noise"):
        return "NOISY: " + "; ".join(row["noise"])
    rounds = row.get("timing_rounds", 1)
    return "ok" if rounds <= 1 else f"ok after {rounds} rounds"


def _timings_table(rows: list[dict], with_check: bool) -> list[str]:
    """One line per timing; with the noise guard's column (and a warning under the table if a
    timing stayed noisy) when the result has it (results made before the guard do not)."""
    columns = ["backend", "batch", "seq len", "model", "median ms", "IQR ms", "seq/s", "speed-up", "speed-up (min)",
               "FLOPs-ideal", "measured/ideal"] + (["check"] if with_check else [])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    rows = sorted(rows, key=lambda r: (r["backend"], r["batch_size"], r["seq_len"]))
    for r in rows:
        cells = [r["backend"], r["batch_size"], r["seq_len"], r["model"], f"{r['latency_ms_median']:.1f}",
                 f"{r['latency_ms_iqr']:.1f}", f"{r['throughput_seq_per_s']:.1f}", f"{r['speedup']:.2f}x",
                 f"{r['speedup_min']:.2f}x", f"{r['flops_ideal_speedup']:.2f}x", f"{r['fraction_of_ideal']:.0%}"]
        lines.append("| " + " | ".join(str(c) for c in cells + ([noise_check(r)] if with_check else [])) + " |")
    noisy = [r for r in rows if r.get("noise")]
    if noisy:
        lines += ["", f"**Warning: {len(noisy)} of {len(rows)} timings stayed noisy** (NOISY above) after "
                      f"{max(r.get('timing_rounds', 1) for r in noisy)} rounds: the machine was busy or the run was disturbed. "
                      "Their latencies and speed-ups are not to be trusted; run the benchmark again on a quiet machine."]
    return lines
