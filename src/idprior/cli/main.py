"""`idprior` command line: a thin layer over the Python API.

Each subcommand lives in its own module with `add_parser(subparsers)` and `run(args) -> int`.
User mistakes (`IdpriorError`) print one line to stderr and exit 2; `--debug` shows the
traceback instead. Under a multi-process launch rank 0's error is printed by rank 0 only (the other ranks exit 2
with it, `relayed`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys

from ..errors import ConfigError, IdpriorError

SUBCOMMANDS = ("finetune", "evaluate", "prune", "export", "bench", "validate", "tasks", "report", "bench_quality")
# Arguments that hold paths: a leading "~" is expanded as a shell would. A quoted "~/x" or `--out=~/x` reaches
# idprior unexpanded, and some stages used to write into a literal "~" folder while the checks looked at $HOME.
PATH_ARGS = ("model", "data", "data_validation", "data_test", "data_dir", "out", "config", "onnx", "onnx_dir", "dense",
             "pruned", "source", "notes", "runs", "grid", "results")
# what to do about an OSError of the user's environment (disk, permissions, names), by errno
OS_FIXES = {errno.ENOSPC: "free some disk space or write elsewhere", errno.EDQUOT: "free some disk space or write elsewhere",
            errno.EACCES: "choose a place you can write to", errno.EPERM: "choose a place you can write to",
            errno.EROFS: "choose a place you can write to", errno.ENAMETOOLONG: "use a shorter name",
            errno.EEXIST: "a file is in the way: choose another path", errno.ENOTDIR: "a file is in the way: choose another path",
            errno.EISDIR: "a folder is in the way: choose another path"}


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
    _expand_paths(args)
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        if debug:
            raise
        for line in [] if getattr(e, "relayed", False) else e.problems:
            print(f"idprior: error: {one_line(line)}", file=sys.stderr)
        return 2
    except IdpriorError as e:
        if debug:
            raise
        if not getattr(e, "relayed", False):
            print(f"idprior: error: {one_line(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, permissions or a name: the user's to fix, not a bug (--debug shows where)
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        fix = OS_FIXES.get(e.errno, "check the path and its permissions")
        print(f"idprior: error: {one_line(e.strerror or e)}{one_line(where)}; {fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resumable = args.command in ("prune", "finetune", "bench-quality")
        print("idprior: interrupted; " + ("rerun with --resume to continue from the last checkpoint" if resumable else
                                          "nothing was written (outputs appear only when complete); run it again"),
              file=sys.stderr)
        return 130


def one_line(text) -> str:
    """A message as one line: line breaks (a path may hold one) shown as \\n, terminal colour codes dropped."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    return text.replace("\r", "\\r").replace("\n", "\\n")


def _expand_paths(args: argparse.Namespace) -> None:
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str):
            setattr(args, name, os.path.expanduser(value))
        elif isinstance(value, list):
            setattr(args, name, [os.path.expanduser(v) if isinstance(v, str) else v for v in value])


if __name__ == "__main__":
    sys.exit(main())
