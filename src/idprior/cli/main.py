"""`idprior` command line: a thin layer over the Python API.

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`.
User mistakes (`IdpriorError`) print one line to stderr and exit 2; `--debug` shows the
traceback instead. Under a multi-process launch rank 0's error is printed by rank 0 only (the other ranks exit 2
with it, `relayed`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import ConfigError, IdpriorError

SUBCOMMANDS = ("finetune", "evaluate", "prune", "export", "bench", "validate", "tasks", "report", "bench_quality")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="idprior",
        allow_abbrev=False,  # `--data` must never be read as an abbreviation of `--data-dir`, nor the reverse
        description="Structured pruning of Transformers with SNIP (spectral-normalized identity prior), "
        "reconstructed from the abstract of Lin et al., Findings of EMNLP 2020.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        mod = importlib.import_module(f".{name}", __package__)
        p = mod.add_parser(sub)
        p.allow_abbrev = False  # read at parse time: an abbreviated flag is an error, never a guess
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0) if e.code in (0, None) else 2
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        if debug:
            raise
        for line in [] if getattr(e, "relayed", False) else e.problems:
            print(f"idprior: error: {line}", file=sys.stderr)
        return 2
    except IdpriorError as e:
        if debug:
            raise
        if not getattr(e, "relayed", False):
            print(f"idprior: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("idprior: interrupted; rerun with --resume to continue from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
