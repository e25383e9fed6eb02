"""`idprior report`: tables and plots from a `bench-quality` results JSONL, or a run folder's report.md.

    idprior report benchmarks/results/quality_paired.jsonl --out benchmarks/results --name quality_minilm
    idprior report runs/demo            # rewrite report.md (+ plots) of one `idprior prune` run

For a paired grid's JSONL (bench-quality with `paired: true`): NAME.md with paired differences and
their confidence intervals (reference method against every other, before and after recovery, test and
validation, per task, minimum detectable difference) and NAME_paired.png; see idprior.study.paired.

For another JSONL: NAME.md with mean ± std over seeds per method, task and target (best in bold), and
NAME_tradeoff.png, NAME_structure.png, NAME_norms.png, NAME_walltimes.png. The plan and
function-norm plots read the cell folders of the sweep (--runs, default: the folder each row
records).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import IdpriorError


def add_parser(sub):
    p = sub.add_parser("report", help="markdown tables and plots from quality results (or one run folder)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RESULTS.jsonl|RUN_DIR", help="results of bench-quality, or an idprior prune --out folder")
    p.add_argument("--out", default=None, help="folder for NAME.md and the plots (JSONL input; default: beside it); "
                                               "files there are replaced only if idprior report wrote them")
    p.add_argument("--name", default=None, help="file stem (default: the JSONL's stem)")
    p.add_argument("--runs", default=None, help="the bench-quality --out folder (for plans and function norms)")
    p.add_argument("--plan", default=None, metavar="KEY", help="cell key task/seed/method/target for the structure plot")
    p.add_argument("--title", default=None)
    p.add_argument("--command", default=None, help="the command that produced the results, quoted in the report")
    p.add_argument("--notes", default=None, metavar="FILE", help="markdown file inserted under the title")
    p.add_argument("--reference", default=None,
                   help="paired grids: the method compared against every other one (default snip)")
    p.add_argument("--baseline", default=None,
                   help="paired grids: the baseline every method is also compared with (default fisher)")
    return p


RUN_REPORT_FILES = ("report.md", "structure.png", "norms.png", "stages.png")
# what the tables read from every row of a bench-quality results JSONL (report_quality)
ROW_KEYS = ("task", "seed", "method", "target", "variant", "model", "main_metric", "dense", "pruned_no_recovery",
            "pruned", "compression")


def _read(path: Path, json_: bool = False):
    """A text file the user named (--notes) or a run's JSON, as one line on error instead of a traceback."""
    import json

    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text) if json_ else text
    except FileNotFoundError:
        raise IdpriorError(f"{path} does not exist; check the path") from None
    except IsADirectoryError:
        raise IdpriorError(f"{path} is a folder; give a file") from None
    except UnicodeDecodeError:
        raise IdpriorError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except ValueError as e:
        raise IdpriorError(f"{path} is not valid JSON ({e})") from None


def check_outputs(folder: Path, names: list[str], kind: str) -> None:
    """Before anything is written: `folder` can take the files, and each file that exists there is
    one idprior wrote as `kind` (io.check_owned); otherwise one line and nothing written."""
    from .. import io

    if folder.exists() and not folder.is_dir():
        raise IdpriorError(f"--out {folder} is a file; give a folder for the report")
    problem = io.writable_problem(folder / names[0], "--out")
    if problem:
        raise IdpriorError(problem)
    for name in names:
        io.check_owned(folder / name, kind, "choose another --out or --name, or remove it yourself")


def run(args) -> int:
    from .. import io

    src = Path(args.source)
    if src.is_dir():
        from ..pipeline.report import write_run_report

        if not io.is_run_folder(src):
            raise IdpriorError(f"{src} is not an idprior run folder (it has no stages.json); give the --out folder of "
                               "idprior prune, or a results JSONL")
        metrics = _read(src / "metrics.json", json_=True) if (src / "metrics.json").is_file() else {}
        if not isinstance(metrics, dict) or (metrics and "main_metric" not in metrics):
            raise IdpriorError(f"{src} is not an idprior prune run (its metrics.json is a fine-tune's, or not idprior's): "
                               "report covers prune runs; a fine-tune's results are in its metrics.json")
        check_outputs(src, list(RUN_REPORT_FILES), "run")
        print(f"wrote {write_run_report(src)}")
        return 0
    if not src.is_file():
        raise IdpriorError(f"{src} is neither a results JSONL nor a run folder")
    from ..study.report_quality import load_rows, write_quality_report

    try:
        rows = load_rows(src)
    except UnicodeDecodeError:
        raise IdpriorError(f"{src} is not UTF-8 text; give the results JSONL of idprior bench-quality") from None
    if not rows:
        raise IdpriorError(f"{src} holds no result rows (run idprior bench-quality first)")
    short = next((r for r in rows if not all(k in r for k in ROW_KEYS)), None)
    if short is not None:
        missing = ", ".join(k for k in ROW_KEYS if k not in short)
        raise IdpriorError(f"{src}: the row {str(short.get('key'))[:60]!r} has no {missing}; give the results JSONL of "
                           "idprior bench-quality")
    notes = _read(Path(args.notes)) if args.notes else None
    out, name = Path(args.out or src.parent), args.name or src.stem
    if args.name is not None and (not args.name.strip() or Path(args.name).name != args.name or args.name in (".", "..")):
        raise IdpriorError(f"--name {args.name!r}: give a plain file stem (no folders; the files go to --out)")
    paired = any(r.get("paired") for r in rows)
    if not paired:
        for flag, value in (("--reference", args.reference), ("--baseline", args.baseline)):
            if value is not None:
                print(f"idprior: warning: {flag} {value} does nothing here: it chooses the comparisons of a paired grid, "
                      f"and {src} is not one; drop it", file=sys.stderr)
    plots = ["paired"] if paired else ["tradeoff", "structure", "norms", "walltimes"]
    check_outputs(out, [f"{name}.md", *(f"{name}_{plot}.png" for plot in plots)], "report")
    if paired:
        from ..study.report_paired import write_paired_report

        path = write_paired_report(rows, src, out, name=name, reference=args.reference or "snip",
                                   baseline=args.baseline or "fisher", command=args.command, notes=notes)
        print(f"wrote {path}")
        return 0
    path = write_quality_report(rows, out, name=name, runs=args.runs, plan_key=args.plan, command=args.command,
                                title=args.title, notes=notes)
    print(f"wrote {path}")
    return 0
