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
    p.add_argument("--reference", default="snip",
                   help="paired grids: the method compared against every other one (default snip)")
    p.add_argument("--baseline", default="fisher",
                   help="paired grids: the baseline every method is also compared with (default fisher)")
    return p


RUN_REPORT_FILES = ("report.md", "structure.png", "norms.png", "stages.png")


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
        check_outputs(src, list(RUN_REPORT_FILES), "run")
        print(f"wrote {write_run_report(src)}")
        return 0
    if not src.is_file():
        raise IdpriorError(f"{src} is neither a results JSONL nor a run folder")
    from ..study.report_quality import load_rows, write_quality_report

    rows = load_rows(src)
    if not rows:
        raise IdpriorError(f"{src} holds no result rows (run idprior bench-quality first)")
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else None
    out, name = Path(args.out or src.parent), args.name or src.stem
    paired = any(r.get("paired") for r in rows)
    plots = ["paired"] if paired else ["tradeoff", "structure", "norms", "walltimes"]
    check_outputs(out, [f"{name}.md", *(f"{name}_{plot}.png" for plot in plots)], "report")
    if paired:
        from ..study.report_paired import write_paired_report

        path = write_paired_report(rows, src, out, name=name, reference=args.reference, baseline=args.baseline,
                                   command=args.command, notes=notes)
        print(f"wrote {path}")
        return 0
    path = write_quality_report(rows, out, name=name, runs=args.runs, plan_key=args.plan, command=args.command,
                                title=args.title, notes=notes)
    print(f"wrote {path}")
    return 0
