"""`idprior tasks`: list the built-in tasks (offline and GLUE) and, with --sizes, their split sizes."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("tasks", help="list the built-in tasks", description=__doc__)
    p.add_argument("--sizes", action="store_true", help="load each offline task and print its split sizes")
    return p


def run(args) -> int:
    from ..data import get_task, list_tasks, load_task

    for name in list_tasks():
        t = get_task(name)
        line = f"{t.name:12s} {t.kind:14s} {len(t.labels) or '-':>3} labels  metric {t.metrics[0]:10s} {t.description}"
        if args.sizes and t.description and "GLUE" not in t.description:
            sizes = load_task(name).sizes()
            line += "  " + " ".join(f"{k}={v}" for k, v in sizes.items())
        print(line)
    print("custom       your CSV/TSV/JSONL files: --task custom --data FILE --text-column C --label-column L")
    return 0
