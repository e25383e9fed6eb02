"""`idprior export`: write a (pruned or dense) model as ONNX and check it against PyTorch.

The ONNX file has inputs input_ids, attention_mask (and token_type_ids for BERT-style models)
with dynamic batch and sequence axes, and one output, logits; it runs in ONNX Runtime without
idprior. With --onnx-dir the output is a folder in Hugging Face Optimum's ONNX layout
(model.onnx, config.json, tokenizer files; with --quantize int8 also model_quantized.onnx).
An existing file or folder is replaced only if idprior export wrote it. After export the logits
of ONNX Runtime and PyTorch are compared on two random batches of other shapes than the export
one (one of them padded); the command fails if they differ by more than --tol (1e-4) times
max(1, largest |logit|): absolute for classifiers, relative for LMs, whose logits are large
enough for float32 rounding alone to reach 1e-4.
"""

from __future__ import annotations

import argparse

from .common import ATTENTION_HELP


def add_parser(sub):
    p = sub.add_parser(
        "export", help="export a pruned (or dense) model folder to ONNX and check parity",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples: idprior export runs/sst2/pruned --onnx runs/sst2/model.onnx\n"
               "          idprior export runs/sst2/pruned --onnx-dir runs/sst2/onnx --quantize int8",
    )
    p.add_argument("model", metavar="MODEL_DIR",
                   help="folder written by idprior (RUN/pruned), any local HF folder with a task head, "
                        "a .gguf file or an alias such as smollm2-135m")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--onnx", metavar="OUT.onnx", help="where to write the ONNX file (atomically)")
    out.add_argument("--onnx-dir", metavar="OUT_DIR",
                     help="write a deployable folder in Hugging Face Optimum's layout instead: model.onnx, config.json "
                          "and the tokenizer files (atomically)")
    p.add_argument("--quantize", choices=("int8",), default=None,
                   help="with --onnx-dir: also write model_quantized.onnx, dynamic int8 weights (onnxruntime "
                        "quantize_dynamic); its outputs differ from model.onnx by more than --tol")
    p.add_argument("--opset", type=int, default=None,
                   help="ONNX opset: 18-23 with the dynamo exporter, 13-20 with legacy (default: encoders 23, "
                        "else the exporter's own)")
    p.add_argument("--seq-len", type=int, default=16,
                   help="sequence length of the example batch used for tracing (default 16); every length works afterwards")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                   help="torch.export-based exporter (default) or the older TorchScript one, as a fallback")
    p.add_argument("--attention", choices=("auto", "fused", "eager"), default="auto", help=ATTENTION_HELP)
    p.add_argument("--tol", type=float, default=1e-4,
                   help="largest allowed |logits difference| / max(1, largest |logit|) (default 1e-4)")
    return p


def load_with_head(spec: str):
    """(model, tokenizer) for a folder (pruned or not) or an alias; refuses models without logits."""
    from pathlib import Path

    from ..errors import IdpriorError
    from ..model import load as models

    path = Path(spec).expanduser()
    if path.is_dir():
        from ..model.surgery import load_pruned_with_tokenizer

        models.resolve(str(path))  # a run folder is not a model: its message points to RUN/pruned

        model, tok = load_pruned_with_tokenizer(path)
    else:
        model, tok = models.load(spec)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and not any(n in type(model).__name__ for n in ("ForSequenceClassification", "ForCausalLM", "LMHead")):
        raise IdpriorError(
            f"{spec} loads as {type(model).__name__}, which has no task head (no logits); export a fine-tuned "
            "classifier or a causal LM (e.g. the pruned/ folder of an idprior run)"
        )
    return model.eval(), tok


OPSETS = {"dynamo": (18, 23), "legacy": (13, 20)}
"""Opsets each exporter writes correctly (torch 2.13): the dynamo exporter builds opset 18 and converts
up to 23, and below 18 its converter may fall back to 18 without saying so; the TorchScript exporter
needs 13 for BERT's dynamic slicing and goes up to 20."""


def check_target(args) -> None:
    """Refuse, before any work, an opset the exporter cannot write and an --onnx path that cannot be
    written (a folder, a read-only place), so no export ends in a traceback at its last step."""
    from .. import io
    from ..errors import IdpriorError

    if args.seq_len < 2:
        raise IdpriorError(f"--seq-len must be at least 2 (got {args.seq_len}): a size-1 axis would not stay dynamic")
    if not args.tol > 0:  # NaN fails this too
        raise IdpriorError(f"--tol must be a positive number (got {args.tol}): the largest allowed relative logits "
                           "difference, default 1e-4")
    lo, hi = OPSETS[args.exporter]
    if args.opset is not None and not lo <= args.opset <= hi:
        raise IdpriorError(f"--opset {args.opset} is outside what the {args.exporter} exporter writes ({lo} to {hi}); "
                           "choose one in that range, or leave --opset out for the default")
    problem = io.writable_problem(args.onnx, "--onnx") if args.onnx else None
    if problem:
        raise IdpriorError(problem)


def run(args) -> int:
    from pathlib import Path

    from .. import io
    from ..errors import IdpriorError
    from ..model.export import (
        ONNX_FILE,
        QUANTIZED_FILE,
        check_replaceable_file,
        example_inputs,
        export_onnx,
        export_onnx_dir,
        input_names,
        parity,
        require_onnx,
    )

    check_target(args)
    require_onnx()
    if args.quantize and not args.onnx_dir:
        raise IdpriorError("--quantize writes model_quantized.onnx into an ONNX folder; add --onnx-dir OUT_DIR")
    model, tok = load_with_head(args.model)
    limit = next((v for k in ("max_position_embeddings", "n_positions") if isinstance(v := getattr(model.config, k, None), int)),
                 None)
    if limit is not None and 2 * args.seq_len + 1 > limit:  # the parity batches are up to 2 x --seq-len + 1 long
        raise IdpriorError(f"--seq-len {args.seq_len} is too long for {args.model}: its {limit} positions take "
                           f"--seq-len {(limit - 1) // 2} at most (the parity check runs 2 x --seq-len + 1 tokens)")
    options = dict(opset=args.opset, seq_len=args.seq_len, exporter=args.exporter, attention=args.attention)
    names = input_names(model, tok)
    shapes = [(3, args.seq_len + 8, True), (1, 2 * args.seq_len + 1, False)]

    def check(onnx_path) -> tuple[float, float]:
        checks = [parity(model, onnx_path, example_inputs(model, names, b, t, seed=1, pad=pad)) for b, t, pad in shapes]
        diff, largest = max(c["max_abs_diff"] for c in checks), max(c["max_abs_logit"] for c in checks)
        scale = max(1.0, largest)
        if not diff <= args.tol * scale:
            raise IdpriorError(f"ONNX parity failed: max difference {diff:.2e} > {args.tol:g} x {scale:.3g}; "
                               "try --exporter legacy, or report the model")
        return diff, largest

    if args.onnx_dir:
        folder = export_onnx_dir(model, tok, args.onnx_dir, quantize=args.quantize, **options)
        path = folder / ONNX_FILE
        diff, largest = check(path)
        print(f"wrote {folder}: {', '.join(sorted(p.name for p in folder.iterdir()))}")
    else:
        path = Path(args.onnx)
        check_replaceable_file(path)  # before writing: the parity check below runs on a temporary file
        created = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
        try:
            with io.atomic_path(path) as tmp:  # the file appears only when its parity check passed
                export_onnx(model, tok, tmp, **options)
                diff, largest = check(tmp)
        except BaseException:
            for d in created:  # folders made for the file, now empty again
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()
            raise
    checked = ", ".join(f"[{b}, {t}]" for b, t, _ in shapes)
    print(f"wrote {path} (inputs: {', '.join(names)}; output: logits)")
    print(f"max |onnxruntime - pytorch| logits difference on batches {checked}: {diff:.2e} "
          f"(largest |logit| {largest:.3g})")
    if args.quantize:
        quantized = [parity(model, path.with_name(QUANTIZED_FILE), example_inputs(model, names, b, t, seed=1, pad=pad))
                     for b, t, pad in shapes]
        print(f"{QUANTIZED_FILE}: max |int8 onnxruntime - pytorch| logits difference "
              f"{max(c['max_abs_diff'] for c in quantized):.2e} (not held to --tol; measure accuracy on your task)")
    return 0
