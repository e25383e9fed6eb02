"""ONNX export parity (dense and pruned BERT, dynamic axes), the FLOPs count, and the benchmark."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
from torch.nn.utils import parametrize

from idprior.arch import get_adapter
from idprior.errors import IdpriorError
from idprior.method import spectral
from idprior.method.flops import model_flops
from idprior.method.plan import model_cost
from idprior.model.surgery import apply_plan, save_pruned
from tiny_folder import make_tiny_bert_folder
from tiny_models import tiny_bert

# tiny_bert: 4 layers, hidden 32, 4 heads of 8, FFN 64, 3 labels.
# Layer 0 keeps 3 heads, layer 1 keeps 2 heads and 60 neurons, layer 2 loses its attention
# sub-layer, layer 3 its FFN: heads per layer are non-uniform and two sub-layers are gone.
PLAN = ["head:0:1", "head:1:0", "head:1:2", "neuron:1:3", "neuron:1:10", "neuron:1:11", "neuron:1:40", "attn:2", "ffn:3"]


def pruned_bert():
    model = tiny_bert()
    apply_plan(model, PLAN)
    return model


def _batch(model, batch: int, seq_len: int, pad: bool):
    from idprior.model.export import example_inputs, input_names

    return example_inputs(model, input_names(model), batch, seq_len, seed=3, pad=pad)


@pytest.mark.parametrize("pruned,attention", [(False, "auto"), (True, "auto"), (True, "eager")],
                         ids=["dense", "pruned", "pruned-eager-attention"])
def test_onnx_parity_dynamic_axes(tmp_path, pruned, attention):
    pytest.importorskip("onnxruntime", reason="ONNX export checks need onnxruntime (pip install onnx onnxruntime onnxscript)")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    import onnx

    from idprior.model.export import check_onnx, export_onnx

    model = pruned_bert() if pruned else tiny_bert()
    if pruned:  # an SN-parametrized model must be folded by the export itself
        spectral.attach(model, get_adapter(model))
        assert any(parametrize.is_parametrized(m) for m in model.modules())
    path = export_onnx(model, None, tmp_path / "m.onnx", seq_len=16, attention=attention)  # traced at [2, 16]
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # atomic: no temporary left behind

    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input_ids", "attention_mask", "token_type_ids"]
    for inp in proto.graph.input:  # both axes symbolic
        assert all(d.dim_param and not d.dim_value for d in inp.type.tensor_type.shape.dim)
    assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}  # standard operators only: no idprior code
    # encoders: one fused Attention node per kept attention sub-layer by default, none in eager form
    n_attention = sum(node.op_type == "Attention" for node in proto.graph.node)
    assert n_attention == (0 if attention == "eager" else 3 if pruned else 4)
    assert {m.key: m.value for m in proto.metadata_props}["attention"] == ("eager" if attention == "eager" else "fused")
    # other batch sizes and lengths than the export, with right padding in row 0
    for batch, seq_len, pad in [(3, 7, True), (5, 33, True), (1, 50, False)]:
        assert check_onnx(model, path, _batch(model, batch, seq_len, pad)) <= 1e-4


def test_fused_attention_needs_dynamo_and_opset_23():
    from idprior.model.export import attention_mode

    model = tiny_bert()
    assert attention_mode(model, "dynamo", None) == ("fused", 23)
    assert attention_mode(model, "dynamo", 18) == ("eager", 18)  # an explicit older opset falls back
    assert attention_mode(model, "legacy", None) == ("eager", None)
    with pytest.raises(IdpriorError, match="attention='fused' needs the dynamo exporter"):
        attention_mode(model, "legacy", None, "fused")
    with pytest.raises(IdpriorError, match="unknown attention mode"):
        attention_mode(model, "dynamo", None, "flash")


def test_ort_session_skips_the_slow_skip_layernorm_fusion(tmp_path):
    """Our sessions run residual add + LayerNorm unfused (faster on CPU, see DISABLED_ORT_FUSIONS);
    a default session fuses them, so the check can fail if the option stops taking effect."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnx onnxruntime onnxscript)")
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    import onnx
    import onnxruntime as ort

    from idprior.model.export import export_onnx, ort_session

    path = export_onnx(tiny_bert(), None, tmp_path / "m.onnx", seq_len=16)
    ort_session(path, optimized_path=tmp_path / "ours.onnx")
    default = ort.SessionOptions()
    default.optimized_model_filepath = str(tmp_path / "default.onnx")
    ort.InferenceSession(str(path), default, providers=["CPUExecutionProvider"])

    def ops(name):
        return {n.op_type for n in onnx.load(str(tmp_path / name)).graph.node}

    assert "SkipLayerNormalization" in ops("default.onnx")
    assert "SkipLayerNormalization" not in ops("ours.onnx")
    assert "LayerNormalization" in ops("ours.onnx")


def test_ort_session_stops_spinning_when_a_run_returns(tmp_path):
    """Our sessions' worker threads do not spin on after a Run (see export.ORT_CONFIG), where they
    would take CPU from the next model timed; the option must reach the session."""
    pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install onnx onnxruntime onnxscript)")
    from idprior.model.export import DISABLED_ORT_FUSIONS, export_onnx, ort_session

    path = export_onnx(tiny_bert(), None, tmp_path / "m.onnx", seq_len=16, exporter="legacy")
    options = ort_session(path, 2).get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.get_session_config_entry("optimization.disable_specified_optimizers") == ",".join(DISABLED_ORT_FUSIONS)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


def test_require_onnx_names_the_install(monkeypatch):
    from idprior.model import export

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(IdpriorError, match="pip install onnx onnxruntime onnxscript"):
        export.require_onnx()


def test_flops_hand_count():
    T = 10
    dense = tiny_bert()
    f = model_flops(dense, T)
    # per layer, d = 32, 4 heads x head_dim 8, FFN 64:
    #   linear entries Q, K, V, O = 4 * 32 * 32 = 4096; W1, W2 = 2 * 32 * 64 = 4096 -> 8192
    #   linear FLOPs 2 * T * 8192 = 163,840; attention 4 * T^2 * head_dim * heads = 4 * 100 * 8 * 4 = 12,800
    assert [r["total"] for r in f["layers"]] == [176_640] * 4
    # head on the [CLS] token only: pooler 32 * 32 + classifier 32 * 3 = 1120 entries -> 2,240
    assert f["head"] == 2_240 and f["embeddings"] == 0
    assert f["total"] == 4 * 176_640 + 2_240
    assert f["layers_total"] == model_cost(get_adapter(dense)).flops(T)

    pruned = pruned_bert()
    f = model_flops(pruned, T)
    # layer 0, 3 heads: attention linear 4 * 32 * 24 = 3072, FFN 4096 -> 2T * 7168 = 143,360; scores 4*100*8*3 = 9,600
    # layer 1, 2 heads, 60 neurons: 4 * 32 * 16 = 2048 + 2 * 32 * 60 = 3840 -> 2T * 5888 = 117,760; scores 6,400
    # layer 2, no attention: FFN 4096 -> 81,920;  layer 3, 4 heads, no FFN: 4096 -> 81,920 + 12,800
    assert [r["total"] for r in f["layers"]] == [152_960, 124_160, 81_920, 94_720]
    assert [(r["heads"], r["ffn_dim"]) for r in f["layers"]] == [(3, 64), (2, 60), (0, 64), (4, 0)]
    assert f["layers_total"] == model_cost(get_adapter(pruned)).flops(T)
    assert f["total"] == 152_960 + 124_160 + 81_920 + 94_720 + 2_240


def test_benchmark_keys_and_fewer_flops():
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime leg of the benchmark needs onnxruntime")
    from idprior.pipeline.bench import benchmark, format_bench_markdown

    result = benchmark({"dense": tiny_bert(), "pruned": pruned_bert()}, batch_sizes=(2,), seq_lens=(8, 12),
                       threads=1, repeats=2, warmup=1, exporter="legacy")  # legacy: the fast exporter keeps this test short
    assert set(result) >= {"environment", "reference", "models", "rows"}
    assert set(result["environment"]) >= {"cpu", "logical_cores", "threads", "dtype", "torch", "onnxruntime",
                                          "transformers", "loadavg_start", "loadavg_end"}
    assert result["environment"]["threads"] == 1 and result["reference"] == "dense"
    assert len(result["rows"]) == 2 * 2 * 2  # models x backends x lengths
    assert {r["backend"] for r in result["rows"]} == {"eager", "onnxruntime"}
    for row in result["rows"]:
        assert set(row) >= {"model", "backend", "batch_size", "seq_len", "latency_ms_median", "latency_ms_iqr",
                            "throughput_seq_per_s", "speedup", "flops_ideal_speedup", "fraction_of_ideal", "repeats"}
        assert row["latency_ms_median"] > 0 and row["repeats"] == 2
    dense, pruned = result["models"]["dense"], result["models"]["pruned"]
    for T in ("8", "12"):
        assert pruned["flops"][T] < dense["flops"][T]
    assert pruned["params"] < dense["params"] and pruned["onnx_max_abs_diff"] <= 1e-4
    md = format_bench_markdown(result)
    assert "| onnxruntime | 2 | 12 | pruned |" in md and "FLOPs-ideal" in md
    assert "ONNX export: legacy exporter, attention eager" in md


def test_timing_blocks_alternate_and_start_with_an_untimed_run():
    """Each block is an untimed lead-in (here one call) then timed calls; blocks alternate over the
    models, the order reversed every other round; with min_rounds=1 blocks are `block` long."""
    from idprior.pipeline.bench import time_blocks

    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("dense", "pruned")}
    times = time_blocks(runners, repeats=7, warmup=1, block=5, lead_in_s=0.0, min_rounds=1)
    assert {k: len(v) for k, v in times.items()} == {"dense": 7, "pruned": 7}
    expected = (["dense", "pruned"]  # warm-up
                + ["dense"] * 6 + ["pruned"] * 6  # round 0: lead-in + 5 timed each
                + ["pruned"] * 3 + ["dense"] * 3)  # round 1, reversed: lead-in + the 2 left
    assert calls == expected


def test_few_repeats_still_alternate():
    """5 repeats in blocks of 5 were one block per model, so nothing alternated (the demo's bench
    setting): blocks shrink to give at least MIN_ROUNDS = 3 rounds."""
    from idprior.pipeline.bench import MIN_ROUNDS, time_blocks

    calls = []
    runners = {name: (lambda n=name: calls.append(n)) for name in ("dense", "pruned")}
    times = time_blocks(runners, repeats=5, warmup=0, block=5, lead_in_s=0.0)
    assert MIN_ROUNDS == 3 and {k: len(v) for k, v in times.items()} == {"dense": 5, "pruned": 5}
    assert calls == (["dense"] * 3 + ["pruned"] * 3  # lead-in + 2 timed
                     + ["pruned"] * 3 + ["dense"] * 3
                     + ["dense"] * 2 + ["pruned"] * 2)  # lead-in + the 1 left


def test_timing_pauses_the_garbage_collector():
    import gc

    from idprior.pipeline.bench import time_blocks

    seen = []
    time_blocks({"m": lambda: seen.append(gc.isenabled())}, repeats=3, warmup=1, lead_in_s=0.0)
    assert seen and not any(seen) and gc.isenabled()


def test_noise_guard_statistics_on_synthetic_repeats():
    """Quiet repeats pass; a wide IQR (own or the reference's) and a min-based speed-up far from the
    median-based one are each named."""
    from idprior.pipeline.bench import NoiseGuard

    guard = NoiseGuard(max_iqr=0.10, max_gap=0.08)
    quiet = {"dense": [1.00, 1.01, 0.99, 1.02, 1.00], "pruned": [0.50, 0.51, 0.50, 0.49, 0.505]}
    assert guard.reasons(quiet, "dense") == {"dense": [], "pruned": []}
    assert guard.badness(quiet, "dense") <= 1.0

    disturbed = {"dense": [1.0, 1.6, 1.0, 1.7, 1.0, 1.6], "pruned": [0.50, 0.51, 0.50, 0.49, 0.505, 0.50]}
    # dense: quartiles 1.0 and 1.6 around a median of 1.3 (IQR 46%); speed-ups 1.0 / 0.49 and 1.3 / 0.5
    assert guard.reasons(disturbed, "dense") == {
        "dense": ["IQR 46% of median"],
        "pruned": ["reference IQR 46% of median", "speed-up from fastest repeats 2.04x vs 2.60x from medians"]}
    assert guard.badness(disturbed, "dense") > 1.0

    one_fast_dense = {"dense": [1.0, 1.0, 1.0, 1.0, 0.6], "pruned": [0.5] * 5}  # IQR 0, but min/min = 1.2x vs 2.0x
    assert guard.reasons(one_fast_dense, "dense") == {
        "dense": [], "pruned": ["speed-up from fastest repeats 1.20x vs 2.00x from medians"]}


class FakeClock:
    """Seconds that pass only when a fake runner "runs": timings without a real clock."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fake_runners(clock: FakeClock, slow) -> tuple[dict, dict]:
    """dense costs 1 s a call (3 s when slow(call number) says so), pruned 0.5 s; counts calls."""
    calls = {"dense": 0, "pruned": 0}

    def run(name):
        calls[name] += 1
        clock.now += (3.0 if slow(calls[name]) else 1.0) if name == "dense" else 0.5

    return {name: (lambda n=name: run(n)) for name in calls}, calls


@pytest.mark.parametrize("case", ["quiet", "disturbed-once", "disturbed-always"])
def test_noise_guard_retimes_and_flags(case):
    """6 repeats, warm-up 1, blocks of 2 (3 rounds): 1 + 3 x (lead-in + 2) = 10 calls per model in
    the first timing, 9 in each re-timing. A disturbance in the first timing only is re-timed once
    and the quiet round is kept; one that persists is re-timed `retime_rounds` times and flagged."""
    from idprior.pipeline.bench import NoiseGuard, time_guarded

    clock = FakeClock()
    slow = {"quiet": lambda i: False, "disturbed-once": lambda i: i <= 10 and i % 2 == 0,
            "disturbed-always": lambda i: i % 2 == 0}[case]
    runners, calls = _fake_runners(clock, slow)
    guard = NoiseGuard(retime_rounds=2)
    times, rounds = time_guarded(runners, 6, 1, "dense", guard, lead_in_s=0.0, clock=clock)
    reasons = guard.reasons(times, "dense")
    expect_rounds = {"quiet": 1, "disturbed-once": 2, "disturbed-always": 3}[case]
    assert rounds == expect_rounds
    assert calls == {"dense": 10 + 9 * (rounds - 1), "pruned": 10 + 9 * (rounds - 1)}
    if case == "disturbed-always":
        assert reasons["dense"] == ["IQR 100% of median"] and reasons["pruned"][0] == "reference IQR 100% of median"
    else:
        assert reasons == {"dense": [], "pruned": []} and times["dense"] == [1.0] * 6


def test_benchmark_flags_a_model_that_sleeps_on_every_other_call():
    """A real model whose forward sleeps 30 ms on every other call is re-timed to the limit and
    marked NOISY, with the warning under the table (whatever else loads the machine)."""
    import time

    from idprior.pipeline.bench import NoiseGuard, benchmark, format_bench_markdown

    dense, pruned = tiny_bert(), pruned_bert()
    count = {"n": 0}

    def sleepy(module, args, kwargs):
        count["n"] += 1
        if count["n"] % 2 == 0:
            time.sleep(0.03)

    pruned.register_forward_pre_hook(sleepy, with_kwargs=True)
    guard = NoiseGuard(retime_rounds=2)
    result = benchmark({"dense": dense, "pruned": pruned}, batch_sizes=(2,), seq_lens=(8,), threads=1, repeats=6,
                       warmup=1, onnx=False, noise=guard)
    row = next(r for r in result["rows"] if r["model"] == "pruned")
    assert row["timing_rounds"] == 3 and any(w.startswith("IQR ") for w in row["noise"])
    assert len(row["latency_ms_repeats"]) == 6
    assert result["noise_guard"] == {"max_iqr": 0.10, "max_gap": 0.08, "retime_rounds": 2}
    md = format_bench_markdown(result)
    assert "| eager | 2 | 8 | pruned |" in md and "NOISY: IQR" in md
    assert "timings stayed noisy** (NOISY above) after 3 rounds" in md


def _process_result(speedup: float, dense_ms: float, noise: list[str] | None = None) -> dict:
    """A one-shape benchmark result as one process would return it (dense reference + pruned)."""
    rows = []
    for model, ms, s in (("dense", dense_ms, 1.0), ("pruned", dense_ms / speedup, speedup)):
        rows.append({"model": model, "backend": "eager", "batch_size": 32, "seq_len": 128, "latency_ms_median": ms,
                     "latency_ms_iqr": 0.01 * ms, "latency_ms_p25": 0.995 * ms, "latency_ms_p75": 1.005 * ms,
                     "latency_ms_min": 0.99 * ms, "throughput_seq_per_s": 32 / (ms / 1000), "repeats": 5,
                     "timing_rounds": 1, "noise": list(noise or []) if model == "pruned" else [],
                     "latency_ms_repeats": [ms] * 5, "flops": 1, "speedup": s, "speedup_min": s,
                     "flops_ideal_speedup": 2.0, "fraction_of_ideal": s / 2.0})
    return {"environment": {"wall_s": 10.0, "loadavg_end": [1.0, 1.0, 1.0]}, "reference": "dense", "models": {},
            "rows": rows}


def test_merging_processes_takes_the_median_and_flags_disagreement():
    """Across fresh processes the speed-up is the median of the per-process speed-ups: one process
    that ran slow (a slower dense latency and a lower ratio, as in issue 18's 1.68x next to 1.9x) moves
    nothing and is not flagged; processes that spread with no majority near the median are flagged."""
    from idprior.pipeline.bench import NoiseGuard, format_bench_markdown, merge_processes

    guard = NoiseGuard()
    one_slow = merge_processes([_process_result(1.93, 1000), _process_result(1.68, 1690), _process_result(1.90, 990)], guard)
    row = next(r for r in one_slow["rows"] if r["model"] == "pruned")
    assert row["speedup"] == pytest.approx(1.90) and row["fraction_of_ideal"] == pytest.approx(0.95)
    assert row["process_speedups"] == [1.93, 1.68, 1.90] and row["noise"] == []
    assert row["latency_ms_median"] == pytest.approx(990 / 1.90) and row["repeats"] == 15  # median of 518, 1006, 521 ms
    assert one_slow["environment"]["processes"] == 3 and one_slow["environment"]["wall_s"] == 30.0
    spread = merge_processes([_process_result(1.5, 1000), _process_result(1.9, 1000), _process_result(2.3, 1000)], guard)
    row = next(r for r in spread["rows"] if r["model"] == "pruned")
    assert row["speedup"] == pytest.approx(1.9) and row["noise"] == ["processes disagree: speed-ups 1.50x, 1.90x, 2.30x"]
    env = {**spread["environment"], "cpu": "x", "usable_cores": 2, "logical_cores": 2, "threads": 2, "dtype": "float32",
           "torch": "t", "onnxruntime": "o", "transformers": "t", "python": "p"}
    md = format_bench_markdown(dict(spread, models={}, noise_guard=dataclasses.asdict(guard), environment=env))
    assert "NOISY: processes disagree" in md and "Timed in 3 fresh processes" in md
    # a reason every process saw stays; one that a single process saw does not
    noisy = merge_processes([_process_result(1.9, 1000, ["IQR 20% of median"]), _process_result(1.9, 1000, ["IQR 20% of median"]),
                             _process_result(1.9, 1000)], guard)
    assert next(r for r in noisy["rows"] if r["model"] == "pruned")["noise"] == ["IQR 20% of median"]
    lone = merge_processes([_process_result(1.9, 1000, ["IQR 20% of median"]), _process_result(1.9, 1000),
                            _process_result(1.9, 1000)], guard)
    assert next(r for r in lone["rows"] if r["model"] == "pruned")["noise"] == []


def test_benchmark_times_eager_first_in_a_clean_state(monkeypatch):
    """What the eager timing runs in: no ONNX export yet and no ONNX Runtime session, garbage
    collector paused, the requested thread count (restored after), models folded and in eval and
    inference mode, even if given in train mode with spectral norm attached."""
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime leg of the benchmark needs onnxruntime")
    import gc

    import torch
    from torch.nn.modules.module import register_module_forward_pre_hook

    from idprior.model import export
    from idprior.pipeline.bench import benchmark

    dense, pruned = tiny_bert(), pruned_bert()
    spectral.attach(dense, get_adapter(dense))
    dense.train()
    made = {"exports": 0, "sessions": 0}
    real_export, real_session = export.export_onnx, export.ort_session

    def counting_export(*a, **k):
        made["exports"] += 1
        return real_export(*a, **k)

    def counting_session(*a, **k):
        made["sessions"] += 1
        return real_session(*a, **k)

    monkeypatch.setattr(export, "export_onnx", counting_export)
    monkeypatch.setattr(export, "ort_session", counting_session)
    timed = []

    def record(module, args):
        if (module is dense or module is pruned) and not gc.isenabled():
            timed.append({"model": "dense" if module is dense else "pruned", "training": module.training,
                          "sn": any(parametrize.is_parametrized(m) for m in module.modules()),
                          "inference": torch.is_inference_mode_enabled(), "gc": gc.isenabled(),
                          "threads": torch.get_num_threads(), **made})

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    handle = register_module_forward_pre_hook(record)
    try:
        result = benchmark({"dense": dense, "pruned": pruned}, batch_sizes=(2,), seq_lens=(8,), threads=1, repeats=3,
                           warmup=1, exporter="legacy")
        assert torch.get_num_threads() == 2 and gc.isenabled()
    finally:
        handle.remove()
        torch.set_num_threads(threads)
    eager = [t for t in timed if not t["gc"]]
    assert {t["model"] for t in eager} == {"dense", "pruned"}
    assert all(t == {"model": t["model"], "training": False, "sn": False, "inference": True, "gc": False, "threads": 1,
                     "exports": 0, "sessions": 0} for t in eager)
    assert made["exports"] == 2 and made["sessions"] >= 2  # ONNX came after, and was timed too
    assert {r["backend"] for r in result["rows"]} == {"eager", "onnxruntime"}


@pytest.mark.parametrize("argv", [
    ["--dense", "d", "--pruned", "runs/a b/pruned", "--out", "o"],
    ["--dense", "d", "--pruned", "a", "--pruned", "b", "--batch-sizes", "2,4", "--seq-lens", "8", "--threads", "3",
     "--repeats", "2", "--warmup", "0", "--no-onnx", "--exporter", "legacy", "--attention", "eager",
     "--max-iqr-fraction", "0.123456789", "--max-speedup-gap", "0.2", "--retime-rounds", "0", "--processes", "3",
     "--out", "o"],
])
def test_bench_command_line_records_every_option(argv):
    """bench.json's command parses back to the same options, and names every option that has a value
    (defaults included: a run with the default exporter must say so)."""
    import argparse
    import shlex

    from idprior.cli.bench import add_parser, command_line

    parser = argparse.ArgumentParser()
    bench = add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *argv])
    command = command_line(args)
    words = shlex.split(command)
    assert words[:2] == ["idprior", "bench"]
    assert vars(parser.parse_args(words[1:])) == vars(args)
    for action in bench._actions:
        value = getattr(args, action.dest, None)
        if action.option_strings and value not in (None, False) and action.dest != "help":
            assert action.option_strings[0] in words, action.option_strings[0]


def test_cli_export_and_bench(tmp_path, capsys):
    pytest.importorskip("onnxruntime", reason="idprior export needs onnxruntime")
    from transformers import AutoTokenizer, BertForSequenceClassification

    from idprior.cli.main import main

    dense_dir = make_tiny_bert_folder(tmp_path / "dense")
    model = BertForSequenceClassification.from_pretrained(str(dense_dir)).eval()
    apply_plan(model, ["head:0:1", "ffn:1"])
    save_pruned(model, AutoTokenizer.from_pretrained(str(dense_dir)), tmp_path / "pruned")

    rc = main(["export", str(tmp_path / "pruned"), "--onnx", str(tmp_path / "m.onnx"), "--exporter", "legacy"])
    assert rc == 0 and (tmp_path / "m.onnx").is_file()
    assert "max |onnxruntime - pytorch|" in capsys.readouterr().out

    rc = main(["bench", "--dense", str(dense_dir), "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "1",
               "--seq-lens", "8", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-onnx", "--out", str(tmp_path / "b"),
               "--max-iqr-fraction", "0.3", "--retime-rounds", "0"])
    assert rc == 0
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["dense", "pruned"]
    assert result["noise_guard"] == {"max_iqr": 0.3, "max_gap": 0.08, "retime_rounds": 0}
    assert "--max-iqr-fraction 0.3 --max-speedup-gap 0.08 --retime-rounds 0" in result["command"]
    assert main(["bench", "--dense", str(dense_dir), "--pruned", str(tmp_path / "pruned"), "--retime-rounds", "-1",
                 "--out", str(tmp_path / "c")]) == 2
    assert main(["bench", "--dense", str(dense_dir), "--pruned", str(tmp_path / "pruned"), "--processes", "0",
                 "--out", str(tmp_path / "c")]) == 2
    # two fresh processes, one after another: each loads the folders itself; the figures are their medians
    rc = main(["bench", "--dense", str(dense_dir), "--pruned", str(tmp_path / "pruned"), "--batch-sizes", "1",
               "--seq-lens", "8", "--repeats", "2", "--warmup", "0", "--threads", "1", "--no-onnx", "--processes", "2",
               "--out", str(tmp_path / "p")])
    assert rc == 0
    two = json.loads((tmp_path / "p" / "bench.json").read_text())
    assert two["environment"]["processes"] == 2 and "--processes 2" in two["command"]
    pruned_row = next(r for r in two["rows"] if r["model"] == "pruned")
    assert len(pruned_row["process_speedups"]) == 2 and pruned_row["repeats"] == 4
    assert pruned_row["speedup"] == pytest.approx(sum(pruned_row["process_speedups"]) / 2)
    assert "Timed in 2 fresh processes" in (tmp_path / "p" / "bench.md").read_text()
    assert result["command"].startswith("idprior bench --dense")
    assert (tmp_path / "b" / "bench.md").read_text().startswith("`idprior bench")
    assert main(["export", str(dense_dir / "missing"), "--onnx", str(tmp_path / "x.onnx")]) == 2


def test_eager_profile_script_writes_its_table(tmp_path):
    """benchmarks/eager_profile.py (the batch-1 breakdown for the quiet-machine runs) runs on a tiny
    dense / pruned pair and writes per-layer and per-op tables; a removed attention shows as fewer ops."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer, BertForSequenceClassification

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "eager_profile.py"
    spec = importlib.util.spec_from_file_location("eager_profile", script)
    eager_profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eager_profile)

    dense_dir = make_tiny_bert_folder(tmp_path / "dense")
    model = BertForSequenceClassification.from_pretrained(str(dense_dir)).eval()
    apply_plan(model, ["attn:0", "ffn:1"])
    save_pruned(model, AutoTokenizer.from_pretrained(str(dense_dir)), tmp_path / "pruned")
    out = tmp_path / "out"
    assert eager_profile.main(["--dense", str(dense_dir), "--pruned", str(tmp_path / "pruned"), "--seq-len", "8",
                               "--repeats", "2", "--warmup", "1", "--threads", "1", "--out-dir", str(out)]) == 0
    result = json.loads((out / "eager_profile.json").read_text())
    dense, pruned = (result["profiles"][n]["ranges"] for n in ("dense", "pruned"))
    assert {"layer0", "layer0.attention", "layer1", "layer1.intermediate"} <= set(dense) and set(pruned) == set(dense)
    assert pruned["layer0.attention"]["aten_ops"] < dense["layer0.attention"]["aten_ops"]
    assert pruned["layer1"]["aten_ops"] < dense["layer1"]["aten_ops"]
    assert pruned["layer0"]["mflops"] < dense["layer0"]["mflops"]
    assert result["profiles"]["dense"]["top_ops"] and set(result["fit"]) == {"fixed_ms_per_layer", "ms_per_gflop", "layers"}
    md = (out / "eager_profile.md").read_text()
    assert "| layer0.attention |" in md and "| op | dense | pruned |" in md and "Line fit over 4 layers" in md
