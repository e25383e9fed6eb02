"""ONNX export of a dense or pruned model, and a parity check against PyTorch.

Exporter choice. Both torch exporters were tried on BERT with a different number of heads per
layer, a removed attention sub-layer and a removed FFN, and on a GQA Llama pruned the same way;
with the model in eval mode both give logits within 1e-7 of PyTorch at batch sizes and sequence
lengths other than the export ones. The default is the dynamo exporter (`torch.export`): it is
torch's supported path (the TorchScript exporter is deprecated since torch 2.9), its graph has no
traced Python constants (the TorchScript trace bakes in `is_causal` / padding checks of the
transformers mask code, with warnings), and on MiniLM-L6 its graph ran faster in ONNX Runtime.
It is slower to export (about 15 s for MiniLM-L6 on 2 cores). `exporter="legacy"` keeps the
TorchScript exporter as a fallback.

Attention (`attention=`). With the dynamo exporter an encoder's SDPA is exported at opset 23 as
the single ONNX `Attention` operator ("fused"): scores, mask, softmax and the value product in
one ONNX Runtime kernel, and fewer elementwise kernels whose cost does not shrink with pruning
(benchmarks/results/onnx_attention.md). At a lower opset, or with the legacy exporter, the
attention is traced in its eager form ("eager": matmul, additive mask, softmax, matmul), which
ONNX Runtime runs faster than SDPA's opset-18 decomposition (see `_attention_impl`).
Decoders keep their own attention implementation at the exporter's default opset. Running a
fused file needs onnxruntime >= 1.23 (its CPU kernel for the opset-23 `Attention` operator).

The exported file holds plain ONNX operators only: it runs in ONNX Runtime without idprior.
Inputs: `input_ids`, `attention_mask` and, when the model's forward takes it (and the tokenizer
produces it, if one is given), `token_type_ids`; batch and sequence axes are dynamic. The one
output is `logits` (decoders: no KV cache, `use_cache=False`).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import inspect
import io as _stdio
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from .. import io
from ..errors import IdpriorError

EXPORTERS = ("dynamo", "legacy")
ATTENTION = ("auto", "fused", "eager")
FUSED_ATTENTION_OPSET = 23  # first ONNX opset with the Attention operator
PARITY_TOL = 1e-4
INSTALL_HINT = "pip install onnx onnxruntime onnxscript"
ONNX_FILE = "model.onnx"  # names in a deployable folder (Optimum's layout)
QUANTIZED_FILE = "model_quantized.onnx"
QUANTIZE = ("int8",)


def require_onnx(runtime: bool = True) -> None:
    """Raise a one-line IdpriorError if the ONNX packages are missing."""
    names = ["onnx", "onnxscript"] + (["onnxruntime"] if runtime else [])
    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise IdpriorError(f"ONNX export needs {', '.join(missing)}; install them with: {INSTALL_HINT}")


def input_names(model: nn.Module, tokenizer=None) -> list[str]:
    """The ONNX inputs: ids and mask always, token_type_ids when both model and tokenizer use them."""
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    wants_types = "token_type_ids" in params and getattr(model.config, "type_vocab_size", 1) > 1
    if tokenizer is not None:
        wants_types = wants_types and "token_type_ids" in getattr(tokenizer, "model_input_names", [])
    return names + (["token_type_ids"] if wants_types else [])


class LogitsOnly(nn.Module):
    """Positional inputs -> logits tensor: the exporters need a plain tensor signature."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names
        self.is_decoder = is_decoder_model(model)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, inputs))
        if self.is_decoder:
            kwargs["use_cache"] = False
        return self.model(**kwargs).logits


def is_decoder_model(model: nn.Module) -> bool:
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or config.model_type in ("gpt2", "llama", "qwen2", "mistral")


def example_inputs(model: nn.Module, names: list[str], batch: int, seq_len: int, seed: int = 0,
                   pad: bool = False) -> dict[str, torch.Tensor]:
    """Random token batch [batch, seq_len]; with `pad`, row 0 is padded to half length
    (on the left for decoders, on the right for encoders, as their tokenizers do)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)  # [B, T]
    mask = torch.ones_like(ids)
    if pad and seq_len > 1:
        keep = max(1, seq_len // 2)
        if is_decoder_model(model):
            mask[0, : seq_len - keep] = 0
        else:
            mask[0, keep:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        out["token_type_ids"] = torch.zeros_like(ids)
    return {n: out[n] for n in names}


@contextlib.contextmanager
def _quiet():
    """The exporters print progress lines and many warnings; keep the CLI output readable."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(_stdio.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _attention_impl(model: nn.Module, attention: str):
    """Trace the attention implementation that `attention` names, then restore the model's own.

    "fused": SDPA, which the dynamo exporter writes as one ONNX `Attention` node at opset >= 23.
    "eager": the plain attention (matmul, additive mask, softmax, matmul). Below opset 23 SDPA
    decomposes into a graph that masks every head's scores with `Where` and adds a NaN guard
    (`IsNaN` + `Where`); on MiniLM-L6 (batch 32, length 128, 2 threads) the eager graph ran 12%
    (dense) to 16% (pruned) faster than that in ONNX Runtime, with the same 1e-8 parity.
    "native": whatever the model is set to.
    """
    want = {"fused": "sdpa", "eager": "eager"}.get(attention)
    old = getattr(model.config, "_attn_implementation", None)
    switch = want is not None and old != want and hasattr(model, "set_attn_implementation")
    if switch:
        try:
            model.set_attn_implementation(want)
        except (ValueError, ImportError) as e:
            raise IdpriorError(f"{type(model).__name__} cannot use {want} attention for export ({e}); "
                               "try --attention auto") from e
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(old)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def attention_mode(model: nn.Module, exporter: str, opset: int | None, attention: str = "auto") -> tuple[str, int | None]:
    """Resolve `attention` ("auto" / "fused" / "eager") and the opset to export at.

    "auto" is "fused" for encoders with the dynamo exporter when `opset` is unset or at least 23,
    else "eager"; decoders keep their own attention ("native") unless "fused" or "eager" is asked for.
    """
    if attention not in ATTENTION:
        raise IdpriorError(f"unknown attention mode {attention!r}; use one of {', '.join(ATTENTION)}")
    fused_ok = exporter == "dynamo" and (opset is None or opset >= FUSED_ATTENTION_OPSET)
    if attention == "fused" and not fused_ok:
        fix = "exporter='dynamo' (--exporter dynamo)" if exporter != "dynamo" else f"opset >= {FUSED_ATTENTION_OPSET} or no --opset"
        raise IdpriorError(f"attention='fused' needs the dynamo exporter and opset >= {FUSED_ATTENTION_OPSET} "
                           f"(got exporter={exporter!r}, opset={opset}); use {fix}, or attention='eager' (--attention eager)")
    if attention == "auto":
        attention = "native" if is_decoder_model(model) else ("fused" if fused_ok else "eager")
    if attention == "fused":
        return attention, opset or FUSED_ATTENTION_OPSET
    return attention, opset


def export_onnx(model: nn.Module, tokenizer, out_path: str | os.PathLike, *, opset: int | None = None,
                seq_len: int = 16, exporter: str = "dynamo", attention: str = "auto") -> Path:
    """Export `model` (encoder classifier or decoder LM, dense or pruned) to `out_path`, atomically.

    Spectral-norm parametrizations are folded into plain weights first, in place (an exported
    model never contains SN code). The example batch is [2, seq_len]: neither axis may be 1,
    because the dynamo exporter specializes size-1 dimensions. `attention` picks how attention
    is exported (see the module docstring and `attention_mode`).
    """
    require_onnx(runtime=False)
    if exporter not in EXPORTERS:
        raise IdpriorError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    attention, opset = attention_mode(model, exporter, opset, attention)
    out_path = Path(out_path)
    check_replaceable_file(out_path)
    if seq_len < 2:
        raise IdpriorError(f"seq_len must be at least 2 for export (got {seq_len}); size-1 axes would not stay dynamic")
    from ..method import spectral

    spectral.fold(model)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    if size > 1.9 * 2**30:
        raise IdpriorError(f"the model has {size / 2**30:.1f} GiB of weights; a single-file ONNX model is limited to "
                           "2 GiB (protobuf), so export a smaller or further pruned model")
    names = input_names(model, tokenizer)
    inputs = example_inputs(model, names, batch=2, seq_len=seq_len)
    wrapper = LogitsOnly(model, names).eval()
    with _eval_mode(model), _attention_impl(model, attention), torch.inference_mode(False), torch.no_grad(), _quiet(), \
            io.atomic_path(out_path) as tmp:
        try:
            if exporter == "dynamo":
                _export_dynamo(wrapper, inputs, tmp, opset)
            else:
                _export_legacy(wrapper, inputs, tmp, opset)
        except IdpriorError:
            raise
        except OSError:  # the disk or a path, not the exporter: the CLI prints it as one line, without an exporter hint
            raise
        except Exception as e:  # noqa: BLE001 - exporter failures become one-line user errors
            if "No space left on device" in str(e):  # an exporter that wrapped the disk's error
                raise OSError(errno.ENOSPC, "No space left on device", str(out_path)) from e
            other = "legacy" if exporter == "dynamo" else "dynamo"
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            fix = ("attention='eager' (CLI: --attention eager)" if attention == "fused"
                   else f"exporter={other!r} (CLI: --exporter {other})")
            raise IdpriorError(f"ONNX export with the {exporter} exporter failed ({first}); try {fix}") from e
        _add_metadata(tmp, model, exporter, attention)
    return out_path


def check_replaceable_file(path: Path) -> None:
    """Refuse to overwrite a file that is not an ONNX model idprior exported (its metadata says so;
    `io.check_owned`)."""
    if path.is_dir():
        raise IdpriorError(f"{path} is a folder; pass a file path such as {path / ONNX_FILE}, or use --onnx-dir")
    io.check_owned(path, "export", "write to another path or move that file away first")


def export_onnx_dir(model: nn.Module, tokenizer, out_dir: str | os.PathLike, *, quantize: str | None = None,
                    **kwargs) -> Path:
    """Write a deployable folder in Hugging Face Optimum's ONNX layout, atomically.

    `model.onnx` (see `export_onnx`, which gets `kwargs`), `config.json`, the tokenizer files
    (+ `generation_config.json` for decoders), and with `quantize="int8"` also
    `model_quantized.onnx` (dynamic int8 weights, ONNX Runtime's `quantize_dynamic`), the name
    Optimum's quantizer gives it. The folder runs with onnxruntime and a tokenizer alone. An existing
    `out_dir` is replaced only if it is an ONNX folder idprior wrote (see model_folder).
    """
    from .folder import ONNX, check_replaceable, write_manifest

    if quantize not in (None, *QUANTIZE):
        raise IdpriorError(f"unknown quantization {quantize!r}; use one of {', '.join(QUANTIZE)} or none")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, ONNX, "export to a new or empty folder, or move those files away first")
    with io.atomic_dir(out_dir) as tmp:
        export_onnx(model, tokenizer, tmp / ONNX_FILE, **kwargs)
        if quantize == "int8":
            quantize_int8(tmp / ONNX_FILE, tmp / QUANTIZED_FILE)
        model.config.save_pretrained(tmp)
        generation = getattr(model, "generation_config", None)
        if is_decoder_model(model) and generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp, ONNX)
    return out_dir


def quantize_int8(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Dynamic int8 quantization of the MatMul / Gemm weights of `src`, written to `dst` atomically.

    Only MatMul and Gemm: ONNX Runtime's quantizer also rewrites nodes named `Attention` into its
    own QAttention, which it gets wrong for the standard opset-23 Attention of a fused export
    (onnxruntime 1.32: "Unrecognized attribute: is_causal for operator QAttention").
    """
    require_onnx()
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs a pre-processing suggestion on every call
    try:
        with io.atomic_path(dst) as tmp:
            quantize_dynamic(str(src), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
    return Path(dst)


def _export_dynamo(wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int | None) -> None:
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("seq")
    dynamic = tuple({0: batch, 1: seq} for _ in inputs)  # one dict per positional input
    program = torch.onnx.export(
        wrapper, tuple(inputs.values()), dynamo=True, input_names=list(inputs), output_names=["logits"],
        dynamic_shapes=(dynamic,), opset_version=opset, external_data=False, verbose=False,
    )
    program.save(str(path), external_data=False)


def _export_legacy(wrapper: nn.Module, inputs: dict[str, torch.Tensor], path: Path, opset: int | None) -> None:
    axes = {name: {0: "batch", 1: "seq"} for name in inputs}
    axes["logits"] = {0: "batch", 1: "seq"} if wrapper.is_decoder else {0: "batch"}
    torch.onnx.export(
        wrapper, tuple(inputs.values()), str(path), dynamo=False, input_names=list(inputs), output_names=["logits"],
        dynamic_axes=axes, opset_version=opset or 17,
    )


def _add_metadata(path: Path, model: nn.Module, exporter: str, attention: str) -> None:
    """Record what was exported (idprior version, per-layer structure) in the ONNX metadata."""
    import onnx

    from ..arch import STRUCTURE_KEY

    proto = onnx.load(str(path))
    meta = {
        "producer": "idprior",
        "exporter": exporter,
        "attention": attention,
        "model_type": model.config.model_type,
        STRUCTURE_KEY: json.dumps(getattr(model.config, STRUCTURE_KEY, None)),
    }
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


# ONNX Runtime graph rewrites we turn off on CPU. SkipLayerNormFusion merges "residual add +
# LayerNorm" into one SkipLayerNormalization kernel; in onnxruntime 1.32 (fp32, CPU) that kernel
# took 7.8 ms per call on a [32, 128, 384] MiniLM-L6 activation vs 0.8 ms for the plain
# LayerNormalization it replaces, i.e. 9% of the dense and 15% of the 50%-pruned model's kernel
# time (benchmarks/results/ort_profile.md, 1 thread). The cost does not shrink with pruning, so it
# capped the pruned model's speed-up; without the fusion both models are faster, same outputs.
DISABLED_ORT_FUSIONS = ("SkipLayerNormFusion",)

# Session config entries beyond the defaults. By default a session's intra-op worker threads go on
# spinning for a while after its Run() returns: on 2 cores, after 200 runs of a tiny BERT the worker
# of a 2-thread session burnt about 50 ms of CPU in the next idle 0.5 s (its /proc CPU ticks), taken
# from whatever runs next (another model's session, the eager timing of `idprior bench`, the next
# request). "session.force_spinning_stop" keeps the spinning during a Run, where it saves wake-ups,
# and stops it as the Run returns: 0 ticks in the same check.
ORT_CONFIG = {"optimization.disable_specified_optimizers": ",".join(DISABLED_ORT_FUSIONS),
              "session.force_spinning_stop": "1"}


def ort_session(onnx_path: str | os.PathLike, threads: int | None = None, *,
                optimized_path: str | os.PathLike | None = None):
    """A CPUExecutionProvider session; `threads` sets intra-op threads (inter-op 1, sequential).

    All graph optimizations are on except `DISABLED_ORT_FUSIONS` (slower on CPU, see there), and the
    worker threads stop spinning when a Run returns (`ORT_CONFIG`). `optimized_path` also writes the
    graph ONNX Runtime actually runs (for inspection).
    """
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    for key, value in ORT_CONFIG.items():
        options.add_session_config_entry(key, value)
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def ort_feed(session, batch: dict[str, torch.Tensor]) -> dict:
    """The session's inputs taken from a tokenized batch, as int64 numpy arrays."""
    feed = {}
    for inp in session.get_inputs():
        if inp.name not in batch:
            raise IdpriorError(f"the ONNX model needs input {inp.name!r} but the batch has only {', '.join(batch)}")
        feed[inp.name] = batch[inp.name].to(torch.int64).cpu().numpy()
    return feed


def parity(model: nn.Module, onnx_path: str | os.PathLike, batch: dict[str, torch.Tensor]) -> dict:
    """ONNX Runtime vs PyTorch logits on `batch` (a dict of [B, T] tensors):
    {"max_abs_diff", "max_abs_logit"}.

    For 3-D (decoder) logits only real-token positions count: padded positions of a left-padded
    batch attend to nothing and their values are arbitrary in either runtime.
    """
    session = ort_session(onnx_path)
    feed = ort_feed(session, batch)
    names = [i.name for i in session.get_inputs()]
    wrapper = LogitsOnly(model, names).eval()
    with _eval_mode(model), torch.inference_mode():
        ref = wrapper(*(batch[n] for n in names)).float()
    got = torch.from_numpy(session.run(["logits"], feed)[0]).float()
    if got.shape != ref.shape:
        raise RuntimeError(f"ONNX logits have shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
    if ref.dim() == 3 and "attention_mask" in batch:
        keep = batch["attention_mask"].bool()  # [B, T]
        got, ref = got[keep], ref[keep]  # [real tokens, V]
    if not ref.numel():
        return {"max_abs_diff": 0.0, "max_abs_logit": 0.0}
    return {"max_abs_diff": float((got - ref).abs().max()), "max_abs_logit": float(ref.abs().max())}


def check_onnx(model: nn.Module, onnx_path: str | os.PathLike, batch: dict[str, torch.Tensor]) -> float:
    """Max |logits_onnx - logits_torch| on `batch`; an exported classifier should be within 1e-4.

    Large LMs pass 1e-4 from float32 rounding alone (SmolLM2-135M, logits up to ~34: 1e-4 to
    6e-4 depending on the batch, i.e. tens of ulps, also with ONNX Runtime's graph optimizations
    off), so callers that accept any model compare against the logit scale too (see `parity`).
    """
    return parity(model, onnx_path, batch)["max_abs_diff"]
