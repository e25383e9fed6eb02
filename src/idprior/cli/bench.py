"""`idprior bench`: measured latency and throughput of a dense model vs its pruned version(s).

Every model runs in one process on the same random token batch, in PyTorch eager (fp32,
inference mode) and in ONNX Runtime (CPU), at every batch size x sequence length. The report
puts the measured speed-up beside the FLOPs-ideal one (dense FLOPs / pruned FLOPs) and records
the machine (CPU, cores, threads, library versions, load average). A shape whose repeats are too
spread is timed again and, if it stays so, marked NOISY in the table (--max-iqr-fraction,
--max-speedup-gap, --retime-rounds). Writes OUT/bench.json and OUT/bench.md.
"""

from __future__ import annotations

import argparse
import sys

from .common import ATTENTION_HELP


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(sub):
    p = sub.add_parser(
        "bench", help="measure the speed of a dense model vs pruned model folder(s)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: idprior bench --dense minilm-l6 --pruned runs/sst2/pruned --threads 2 --out runs/sst2/bench",
    )
    p.add_argument("--dense", required=True, metavar="MODEL",
                   help="the unpruned model: alias (minilm-l6, smollm2-135m), local HF folder or .gguf file; "
                        "loaded with the same kind of head as the pruned model (same number of labels)")
    p.add_argument("--pruned", required=True, action="append", metavar="PRUNED_DIR",
                   help="folder written by idprior (RUN/pruned); repeat to compare several")
    p.add_argument("--batch-sizes", type=_int_list, default=(1, 32), metavar="B1,B2", help="default 1,32")
    p.add_argument("--seq-lens", type=_int_list, default=(128, 512), metavar="T1,T2", help="default 128,512")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and ONNX Runtime intra-op threads (default: torch's default, usually the core count)")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model and shape (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    p.add_argument("--no-onnx", action="store_true", help="PyTorch eager only (no ONNX export / ONNX Runtime)")
    p.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo", help="ONNX exporter (default dynamo)")
    p.add_argument("--attention", choices=("auto", "fused", "eager"), default="auto", help=ATTENTION_HELP)
    p.add_argument("--max-iqr-fraction", type=float, default=0.10, metavar="F",
                   help="noise guard: a model's IQR above F x its median marks a timing as too spread (default 0.10)")
    p.add_argument("--max-speedup-gap", type=float, default=0.08, metavar="F",
                   help="noise guard: the speed-up from the fastest repeats more than F (relative) from the one from "
                        "the medians marks it too (default 0.08)")
    p.add_argument("--retime-rounds", type=int, default=2, metavar="N",
                   help="noise guard: time a too spread shape again up to N more rounds before marking it NOISY (default 2)")
    p.add_argument("--processes", type=int, default=1, metavar="N",
                   help="time in N fresh processes, one after another, and report the median over them (a whole "
                        "process can run slow on a shared machine; default 1: this process)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder for bench.json and bench.md (replaced only if idprior bench wrote them)")
    return p


def dense_for(spec: str, pruned_folder: str):
    """The dense model with the head of the pruned model in `pruned_folder` (a picklable loader for
    `bench.benchmark_processes`)."""
    from .export import load_with_head

    return load_dense_like(spec, load_with_head(pruned_folder)[0])


def load_dense_like(spec: str, pruned):
    """The dense model with the same head as `pruned` (classifier with as many labels, or LM)."""
    from ..data.tasks import Task
    from ..errors import IdpriorError
    from ..model import load as models

    config = pruned.config
    dense_labels = _labels_in_config(spec)
    if dense_labels is not None and "ForSequenceClassification" in type(pruned).__name__ and \
            dense_labels != config.num_labels:
        raise IdpriorError(f"--dense {spec} has a {dense_labels}-label head and the pruned model {config.num_labels} "
                           "labels, so it is not the model that was pruned; give that one as --dense")
    if "ForSequenceClassification" in type(pruned).__name__:
        kind = "regression" if config.problem_type == "regression" else "classification"
        labels = () if kind == "regression" else tuple(str(config.id2label[i]) for i in range(config.num_labels))
        task = Task(name="bench", kind=kind, labels=labels, metrics=(), text_fields=("text",), description="benchmark head")
        model, _ = models.load(spec, task)
    else:
        model, _ = models.load(spec)
    return model.eval()


def _labels_in_config(spec: str) -> int | None:
    """The label count of a classifier folder's config.json, None for anything else (an alias, a GGUF file, an LM)."""
    import json
    from pathlib import Path

    try:
        config = json.loads((Path(spec).expanduser() / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not any("ForSequenceClassification" in a for a in config.get("architectures") or []):
        return None
    return len(config.get("id2label") or {}) or config.get("num_labels")


def check_out(out: str):
    """(bench.json, bench.md) under --out, checked before any model loads: a folder idprior can write
    into, and no file there that idprior bench did not write (io.check_owned)."""
    from pathlib import Path

    from .. import io
    from ..errors import IdpriorError

    folder = Path(out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise IdpriorError(f"--out {folder} is a file; give a folder for bench.json and bench.md")
    paths = (folder / "bench.json", folder / "bench.md")
    for path in paths:
        problem = io.writable_problem(path, "--out")
        if problem:
            raise IdpriorError(problem)
        io.check_owned(path, "bench", "choose another --out, or remove it yourself")
    return paths


def run(args) -> int:
    import functools
    from pathlib import Path

    from .. import io
    from ..errors import IdpriorError
    from ..pipeline.bench import (
        NoiseGuard,
        benchmark,
        benchmark_processes,
        check_pruned_from,
        format_bench_markdown,
    )
    from .export import load_with_head

    for flag, value, ok, need in (("--repeats", args.repeats, args.repeats >= 1, ">= 1"),
                                  ("--warmup", args.warmup, args.warmup >= 0, ">= 0"),
                                  ("--threads", args.threads, args.threads is None or args.threads >= 1, ">= 1"),
                                  ("--max-iqr-fraction", args.max_iqr_fraction, args.max_iqr_fraction > 0, "> 0"),
                                  ("--max-speedup-gap", args.max_speedup_gap, args.max_speedup_gap > 0, "> 0"),
                                  ("--retime-rounds", args.retime_rounds, args.retime_rounds >= 0, ">= 0")):
        if not ok:  # NaN fails every comparison, so it is refused too
            raise IdpriorError(f"{flag} must be {need}, got {value}")
    if args.no_onnx:
        for flag, value, default in (("--exporter", args.exporter, "dynamo"), ("--attention", args.attention, "auto")):
            if value != default:
                print(f"idprior: warning: {flag} {value} does nothing here: --no-onnx times PyTorch only (no ONNX "
                      "export); drop one of them", file=sys.stderr)
    if args.processes < 1:
        raise IdpriorError(f"--processes must be >= 1, got {args.processes}")
    json_path, md_path = check_out(args.out)
    folders = {}  # table name -> pruned folder
    for folder in args.pruned:
        name = Path(folder).resolve().name
        folders[str(folder) if name in folders or name == "dense" else name] = folder
    pruned = {name: load_with_head(folder)[0] for name, folder in folders.items()}  # checks every folder first
    dense = load_dense_like(args.dense, next(iter(pruned.values())))
    for name, model in pruned.items():  # a speed-up between unrelated models means nothing
        check_pruned_from(dense, model, args.dense, folders[name])
    timing = dict(batch_sizes=args.batch_sizes, seq_lens=args.seq_lens, threads=args.threads, repeats=args.repeats,
                  warmup=args.warmup, onnx=not args.no_onnx, exporter=args.exporter, attention=args.attention,
                  noise=NoiseGuard(args.max_iqr_fraction, args.max_speedup_gap, args.retime_rounds))
    if args.processes > 1:
        del dense, pruned  # each process loads its own copies
        loaders = {"dense": functools.partial(dense_for, args.dense, args.pruned[0]),
                   **{name: functools.partial(load_with_head, folder) for name, folder in folders.items()}}
        result = benchmark_processes(loaders, args.processes, **timing)
    else:
        result = benchmark({"dense": dense, **pruned}, **timing)
    result["command"] = command_line(args)
    result["inputs"] = {"dense": args.dense, "pruned": list(args.pruned)}
    md = format_bench_markdown(result)
    io.write_json(json_path, io.marked(result, "bench"))
    io.write_text(md_path, f"`{result['command']}`\n\n{md}\n{io.md_marker('bench')}")
    print(md, end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def command_line(args) -> str:
    """`idprior bench ...` with every option at the value this run used, defaults included, so the
    recorded line reproduces the run even after a default changes (quoted for a POSIX shell)."""
    import shlex

    parts = ["--dense", args.dense]
    for folder in args.pruned:
        parts += ["--pruned", folder]
    parts += ["--batch-sizes", ",".join(map(str, args.batch_sizes)), "--seq-lens", ",".join(map(str, args.seq_lens))]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    parts += ["--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    if args.no_onnx:
        parts.append("--no-onnx")
    parts += ["--exporter", args.exporter, "--attention", args.attention, "--max-iqr-fraction", str(args.max_iqr_fraction),
              "--max-speedup-gap", str(args.max_speedup_gap), "--retime-rounds", str(args.retime_rounds), "--processes", str(args.processes),
              "--out", args.out]
    return shlex.join(["idprior", "bench", *parts])
