"""`idprior export`: write a (pruned or dense) model as ONNX and check it against PyTorch.

The ONNX file has inputs input_ids, attention_mask (and token_type_ids for BERT-style models)
with dynamic batch and sequence axes, and one output, logits; it runs in ONNX Runtime without
idprior. After export the logits of ONNX Runtime and PyTorch are compared on two random batches
of other shapes than the export one (one of them padded); the command fails if they differ by
more than --tol (1e-4) times max(1, largest |logit|): absolute for classifiers, relative for
LMs, whose logits are large enough for float32 rounding alone to reach 1e-4.
"""

from __future__ import annotations

import argparse

from .common import ATTENTION_HELP


def add_parser(sub):
    p = sub.add_parser(
        "export", help="export a pruned (or dense) model folder to ONNX and check parity",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: idprior export runs/sst2/pruned --onnx runs/sst2/model.onnx",
    )
    p.add_argument("model", metavar="MODEL_DIR",
                   help="folder written by idprior (RUN/pruned), any local HF folder with a task head, "
                        "a .gguf file or an alias such as smollm2-135m")
    p.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file (atomically)")
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

    from .. import models
    from ..errors import IdpriorError

    path = Path(spec).expanduser()
    if path.is_dir():
        from ..surgery import load_pruned_with_tokenizer

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

    lo, hi = OPSETS[args.exporter]
    if args.opset is not None and not lo <= args.opset <= hi:
        raise IdpriorError(f"--opset {args.opset} is outside what the {args.exporter} exporter writes ({lo} to {hi}); "
                           "choose one in that range, or leave --opset out for the default")
    problem = io.writable_problem(args.onnx, "--onnx")
    if problem:
        raise IdpriorError(problem)


def run(args) -> int:
    from pathlib import Path

    from .. import io
    from ..errors import IdpriorError
    from ..export import example_inputs, export_onnx, input_names, parity, require_onnx

    check_target(args)
    require_onnx()
    model, tok = load_with_head(args.model)
    path = Path(args.onnx)
    created = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    try:
        with io.atomic_path(path) as tmp:  # the file appears only when its parity check passed
            export_onnx(model, tok, tmp, opset=args.opset, seq_len=args.seq_len, exporter=args.exporter,
                        attention=args.attention)
            names = input_names(model, tok)
            shapes = [(3, args.seq_len + 8, True), (1, 2 * args.seq_len + 1, False)]
            checks = [parity(model, tmp, example_inputs(model, names, b, t, seed=1, pad=pad)) for b, t, pad in shapes]
            diff = max(c["max_abs_diff"] for c in checks)
            largest = max(c["max_abs_logit"] for c in checks)
            scale = max(1.0, largest)
            if not diff <= args.tol * scale:
                raise IdpriorError(f"ONNX parity failed: max difference {diff:.2e} > {args.tol:g} x {scale:.3g}; "
                                   "try --exporter legacy, or report the model")
    except BaseException:
        for d in created:  # folders made for the file, now empty again
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    checked = ", ".join(f"[{b}, {t}]" for b, t, _ in shapes)
    print(f"wrote {path} (inputs: {', '.join(names)}; output: logits)")
    print(f"max |onnxruntime - pytorch| logits difference on batches {checked}: {diff:.2e} "
          f"(largest |logit| {largest:.3g})")
    return 0
