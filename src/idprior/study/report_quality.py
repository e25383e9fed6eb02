"""The quality report: tables and plots from a `bench-quality` results JSONL.

    rows = load_rows("benchmarks/results/quality_paired.jsonl")
    write_quality_report(rows, "benchmarks/results", name="quality_minilm")

Tables give mean ± std over seeds (sample std, ddof=1; 0 when n=1) with n in parentheses, one
column per task plus an average column, for each target; the best pruned method per column is in
bold (the dense row is the reference and is never bolded). The average column is the mean of the
per-task means; its ± is the std over seeds of the per-seed task average, counting only seeds
that have every task. Plots: metric vs measured compression, kept structure per layer of one
plan, function-norm distributions of the snip-family fine-tunes, and stage wall times.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from .. import io
from ..pipeline.report import plot_structure, pyplot, save_figure

SNIP_FAMILY = ("snip", "snip-no-sn", "snip-no-prior", "snip-no-sn-no-prior")
STAGE_ORDER = ("finetune", "score", "select", "surgery", "recover", "evaluate")


def load_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a results JSONL; a torn line (from a killed sweep) is skipped; later rows win per key."""
    rows: dict[str, dict] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows[row["key"]] = row
    return list(rows.values())


def mean_std(values: list[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 or 0.0 for one value, n)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(values) / n
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, s, n


def value(row: dict, split: str, stage: str = "pruned") -> float:
    return float(row[stage][split][row["main_metric"]])


def _order(names, preferred) -> list[str]:
    names = set(names)
    return [m for m in preferred if m in names] + sorted(names - set(preferred))


def methods_of(rows: list[dict]) -> list[str]:
    from .quality import baseline_names

    return _order({r["method"] for r in rows} - {"dense"}, (*SNIP_FAMILY, *baseline_names()))


def tasks_of(rows: list[dict]) -> list[str]:
    """Task names in alphabetical order (rows of concurrent shards arrive in no fixed order)."""
    return sorted({r["task"] for r in rows})


def aggregate(rows: list[dict], *, split: str = "test", stage: str = "pruned") -> dict:
    """{(target, method): {task or "average": (mean, std, n)}}; the dense rows appear under
    every target with method "dense"."""
    tasks = tasks_of(rows)
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    per: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        try:
            v = value(r, split, stage)
        except KeyError:
            continue
        for t in (targets if r["method"] == "dense" else [r["target"]]):
            per[(t, r["method"])][r["task"]][r["seed"]] = v
    out: dict[tuple, dict] = {}
    for key, by_task in per.items():
        cells = {task: mean_std(list(by_task[task].values())) for task in tasks if by_task.get(task)}
        if len(cells) == len(tasks):
            means = [cells[t][0] for t in tasks]
            full_seeds = set.intersection(*(set(by_task[t]) for t in tasks))
            per_seed = [sum(by_task[t][s] for t in tasks) / len(tasks) for s in sorted(full_seeds)]
            _, sd, n = mean_std(per_seed)
            cells["average"] = (sum(means) / len(means), sd if n else math.nan, n)
        out[key] = cells
    return out


def _cell(ms: tuple | None, bold: bool, scale: float) -> str:
    if ms is None or ms[2] == 0:
        return "–"
    m, s, n = ms
    if n == 1:  # no spread to show from one seed
        text = f"{m * scale:.1f} (1)" if scale != 1 else f"{m:.4f} (1)"
    else:
        text = f"{m * scale:.1f} ± {s * scale:.1f} ({n})" if scale != 1 else f"{m:.4f} ± {s:.4f} ({n})"
    return f"**{text}**" if bold else text


def _best(values: list[float], higher_is_better: bool) -> float | None:
    return (max if higher_is_better else min)(values) if values else None


def metric_table(rows: list[dict], target: float, *, split: str = "test", stage: str = "pruned",
                 higher_is_better: bool = True, scale: float = 100.0, methods: list[str] | None = None,
                 label: str = "method") -> list[str]:
    """Markdown lines: one row per method (dense first; `methods` fixes the order), one column per
    task + average; best in bold."""
    agg = aggregate(rows, split=split, stage=stage)
    cols = [*tasks_of(rows), "average"]
    methods = methods if methods is not None else methods_of(rows)
    best = {c: _best([agg[(target, m)][c][0] for m in methods if c in agg.get((target, m), {})], higher_is_better)
            for c in cols}
    lines = [f"| {label} | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for m in ["dense", *methods]:
        cells = agg.get((target, m))
        if cells is None:
            continue
        text = [_cell(cells.get(c), m != "dense" and c in cells and cells[c][0] == best[c], scale) for c in cols]
        lines.append(f"| {m} | " + " | ".join(text) + " |")
    return lines


def summary_table(rows: list[dict], *, split: str = "test", stage: str = "pruned",
                  higher_is_better: bool = True, scale: float = 100.0) -> list[str]:
    """Markdown lines: one row per method, one column per target holding the task average
    (mean of the per-task means; ± over seeds of the per-seed task average); best in bold."""
    agg = aggregate(rows, split=split, stage=stage)
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    methods = methods_of(rows)
    best = {t: _best([agg[(t, m)]["average"][0] for m in methods if "average" in agg.get((t, m), {})], higher_is_better)
            for t in targets}
    lines = ["| method | " + " | ".join(f"{t:.0%} removed" for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for m in ["dense", *methods]:
        cells = [agg.get((t, m), {}).get("average") for t in targets]
        if all(c is None for c in cells):
            continue
        text = [_cell(c, m != "dense" and c is not None and c[0] == best[t], scale) for c, t in zip(cells, targets)]
        lines.append(f"| {m} | " + " | ".join(text) + " |")
    return lines


def head_to_head(rows: list[dict], method: str = "snip", *, split: str = "test", stage: str = "pruned",
                 higher_is_better: bool = True, scale: float = 100.0) -> list[str]:
    """Markdown lines: `method` against every other pruned method over the (task, target) cells both
    have: wins / ties / losses of the mean over seeds, and the mean difference in points."""
    agg = aggregate(rows, split=split, stage=stage)
    tasks = tasks_of(rows)
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    sign = 1.0 if higher_is_better else -1.0
    lines = [f"| {method} vs | wins | ties | losses | mean difference (points) |", "|---|---|---|---|---|"]
    for other in methods_of(rows):
        if other == method:
            continue
        diffs = []
        for t in targets:
            mine, theirs = agg.get((t, method), {}), agg.get((t, other), {})
            diffs += [sign * (mine[k][0] - theirs[k][0]) * scale for k in tasks if k in mine and k in theirs]
        if not diffs:
            continue
        eps = 1e-9
        wins, losses = sum(d > eps for d in diffs), sum(d < -eps for d in diffs)
        lines.append(f"| {other} | {wins} | {len(diffs) - wins - losses} | {losses} | {sum(diffs) / len(diffs):+.1f} |")
    return lines


def variant_table(rows: list[dict], *, split: str = "test") -> list[str]:
    """The un-pruned fine-tune of each variant (plain / sn / prior / sn+prior): does SN or the prior
    cost accuracy before anything is removed? One value per (task, seed, variant)."""
    vals: dict[tuple, dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        if split in r.get("dense", {}):
            vals[(r["variant"], r["task"])][r["seed"]] = float(r["dense"][split][r["main_metric"]])
    tasks = tasks_of(rows)
    variants = [v for v in ("plain", "sn", "prior", "sn+prior") if any((v, t) in vals for t in tasks)]
    lines = ["| fine-tune variant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for v in variants:
        cells = [_cell(mean_std(list(vals[(v, t)].values())) if (v, t) in vals else None, False, 100.0) for t in tasks]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def compression_table(rows: list[dict]) -> list[str]:
    """Measured removed fraction (mean over every cell of a method and target) by every measure."""
    acc: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["method"] != "dense":
            acc[(r["target"], r["method"])].append(r["compression"])
    measures = ("encoder_params", "linear_params", "flops", "total_params")
    lines = ["| target | method | " + " | ".join(measures) + " | cells |", "|---|---|" + "---|" * (len(measures) + 1)]
    for (t, m) in sorted(acc, key=lambda k: (k[0], methods_of(rows).index(k[1]))):
        cs = acc[(t, m)]
        vals = [sum(c[k]["removed_fraction"] for c in cs) / len(cs) for k in measures]
        lines.append(f"| {t:.0%} | {m} | " + " | ".join(f"{v:.1%}" for v in vals) + f" | {len(cs)} |")
    return lines


def removed_table(rows: list[dict]) -> list[str]:
    """Mean count of removed units of each kind per method and target."""
    acc: dict[tuple, list[dict]] = defaultdict(list)
    kinds: set[str] = set()
    for r in rows:
        if r["method"] != "dense":
            acc[(r["target"], r["method"])].append(r.get("removed") or {})
            kinds |= set(r.get("removed") or {})
    kinds_l = sorted(kinds)
    lines = ["| target | method | " + " | ".join(kinds_l) + " |", "|---|---|" + "---|" * len(kinds_l)]
    for (t, m) in sorted(acc, key=lambda k: (k[0], methods_of(rows).index(k[1]))):
        cs = acc[(t, m)]
        lines.append(f"| {t:.0%} | {m} | " + " | ".join(f"{sum(c.get(k, 0) for c in cs) / len(cs):.0f}" for k in kinds_l) + " |")
    return lines


def wall_means(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Mean wall seconds per stage for each method (finetune: the shared fine-tune of its variant)."""
    acc: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for stage, s in r.get("wall_s", {}).items():
            acc[r["method"]][stage].append(float(s))
    return {m: {k: sum(v) / len(v) for k, v in st.items()} for m, st in acc.items()}


def wall_table(rows: list[dict]) -> list[str]:
    means = wall_means(rows)
    stages = [s for s in STAGE_ORDER if any(s in v for v in means.values())]
    lines = ["| method | " + " | ".join(stages) + " |", "|---|" + "---|" * len(stages)]
    for m in ["dense", *methods_of(rows)]:
        if m in means:
            lines.append(f"| {m} | " + " | ".join(f"{means[m][s]:.1f}" if s in means[m] else "–" for s in stages) + " |")
    return lines


# ---- plots --------------------------------------------------------------------------------------

def plot_tradeoff(rows: list[dict], path: Path, *, split: str = "test") -> Path:
    """Metric after recovery vs measured encoder-parameter compression, one panel per task + average."""
    plt = pyplot()
    tasks = tasks_of(rows)
    panels = [*tasks, "average"]
    agg = aggregate(rows, split=split)
    comp: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        comp[(r["target"], r["method"])].append(r["compression"]["encoder_params"]["removed_fraction"])
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    ncol = min(3, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.3 * nrow), squeeze=False)
    metric = rows[0]["main_metric"]
    for ax, panel in zip(axes.flat, panels):
        for i, m in enumerate(methods_of(rows)):
            pts = [(sum(comp[(t, m)]) / len(comp[(t, m)]), *agg[(t, m)][panel][:2])
                   for t in targets if (t, m) in agg and panel in agg[(t, m)]]
            if pts:
                xs, ys, es = zip(*pts)
                style = "-o" if m in SNIP_FAMILY else "--s"
                ax.errorbar(xs, ys, yerr=es, fmt=style, ms=4, capsize=2, label=m, color=f"C{i % 10}",
                            lw=2.2 if m == "snip" else 1.0)
        dense = [agg[(t, "dense")][panel][0] for t in targets if (t, "dense") in agg and panel in agg[(t, "dense")]]
        if dense:
            ax.axhline(dense[0], color="k", lw=0.8, ls=":", label="dense")
        ax.set_title(panel)
        ax.set_xlabel("encoder params removed (measured)")
        ax.set_ylabel(f"{split} {metric}")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 6)))
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_norm_distributions(scores: dict[str, dict[str, float]], path: Path, title: str = "") -> Path:
    """Step histograms of log10 function norms per unit kind, one line per snip-family fine-tune."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.3))
    for ax, kind in zip(axes, ("head", "neuron")):
        for i, (name, norms) in enumerate(scores.items()):
            vals = [math.log10(max(v, 1e-12)) for k, v in norms.items() if k.startswith(kind + ":")]
            if vals:
                ax.hist(vals, bins=40, histtype="step", lw=1.6, color=f"C{i}", label=name)
        ax.set_title(f"{kind} function norms {title}".strip())
        ax.set_xlabel("log10 ||f_u||")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_wall_times(rows: list[dict], path: Path) -> Path:
    """Stacked mean wall seconds per stage for each method (the fine-tune is shared across cells)."""
    plt = pyplot()
    means = wall_means(rows)
    methods = [m for m in ["dense", *methods_of(rows)] if m in means]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.35 * len(methods)))
    left = [0.0] * len(methods)
    for i, stage in enumerate(STAGE_ORDER):
        secs = [means[m].get(stage, 0.0) for m in methods]
        if any(secs):
            ax.barh(methods, secs, left=left, color=f"C{i}", label=stage + (" (shared)" if stage == "finetune" else ""))
            left = [a + b for a, b in zip(left, secs)]
    ax.invert_yaxis()
    ax.set_xlabel("mean wall time per cell (s)")
    ax.legend(fontsize=8)
    ax.set_title("stage wall times")
    save_figure(fig, path)
    plt.close(fig)
    return path


# ---- the report ---------------------------------------------------------------------------------

def _cell_folder(row: dict, runs: Path | None) -> Path | None:
    if not row.get("cell_dir"):
        return None
    root = runs or (Path(row["out_dir"]) if row.get("out_dir") else None)
    return root / row["cell_dir"] if root else None


def write_quality_report(rows: list[dict], out: str | os.PathLike, *, name: str = "quality", runs: str | os.PathLike | None = None,
                         plan_key: str | None = None, command: str | None = None, title: str | None = None,
                         notes: str | None = None) -> Path:
    """NAME.md plus NAME_*.png in `out`; `runs` is the bench-quality --out folder (for plans and scores)."""
    from ..pipeline.metrics import greater_is_better

    if not rows:
        raise ValueError("no result rows")
    out = Path(out)
    runs = Path(runs) if runs else None
    metric = rows[0]["main_metric"]
    hib = greater_is_better(metric)
    targets = sorted({r["target"] for r in rows if r["method"] != "dense"})
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"# {title or 'Quality benchmark'}", ""]
    if notes:
        lines += [notes.strip(), ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    r0 = rows[0]
    lines += [f"Model `{r0['model']}`; tasks {', '.join(tasks_of(rows))}; seeds {seeds}; {len(rows)} rows "
              f"(versions: {r0.get('versions', {})}). Split sizes of the first row: {r0.get('sizes')}.",
              f"Cells show {metric} × 100 as mean ± std over seeds (sample std), n seeds in parentheses; "
              "best pruned method per column in **bold**; average = mean of the task means.", ""]
    lines += ["## Summary: test, after recovery, average over tasks", ""]
    lines += summary_table(rows, higher_is_better=hib) + [""]
    if "snip" in {r["method"] for r in rows}:
        lines += ["## SNIP head to head (test, after recovery, one comparison per task and target)", ""]
        lines += head_to_head(rows, "snip", higher_is_better=hib) + [""]
    lines += ["## Summary: validation, after recovery, average over tasks", ""]
    lines += summary_table(rows, split="validation", higher_is_better=hib) + [""]
    for split in ("test", "validation"):
        for t in targets:
            lines += [f"## {split}, {t:.0%} of encoder parameters removed, after recovery", ""]
            lines += metric_table(rows, t, split=split, higher_is_better=hib) + [""]
    for t in targets:
        lines += [f"## test, {t:.0%} removed, before recovery (surgery only)", ""]
        lines += metric_table(rows, t, split="test", stage="pruned_no_recovery", higher_is_better=hib) + [""]
    lines += ["## Dense accuracy of each fine-tune variant (before pruning, test)", "",
              "plain: no SN, no prior (the baselines, snip-no-sn-no-prior and the dense row); sn: snip-no-prior; "
              "prior: snip-no-sn; sn+prior: snip.", ""] + variant_table(rows) + [""]
    lines += ["## Measured compression (mean removed fraction)", ""] + compression_table(rows) + [""]
    lines += ["## Units removed (mean count)", ""] + removed_table(rows) + [""]
    lines += ["## Mean wall time per cell (s)", "", "finetune is the shared fine-tune of the method's variant "
              "(made once per task and seed, reused by every target).", ""] + wall_table(rows) + [""]

    plots = [("Metric vs compression", plot_tradeoff(rows, out / f"{name}_tradeoff.png"))]
    cell_rows = [r for r in rows if r["method"] != "dense"]
    mid = targets[len(targets) // 2] if targets else None
    chosen = next((r for r in cell_rows if r["key"] == plan_key), None) if plan_key else \
        next((r for r in cell_rows if r["method"] == "snip" and r["target"] == mid), cell_rows[0] if cell_rows else None)
    folder = _cell_folder(chosen, runs) if chosen else None
    if folder and (folder / "plan.json").is_file():
        plan = io.read_json(folder / "plan.json")
        if plan.get("structure"):
            plots.append((f"Kept structure, {chosen['key']}", plot_structure(plan, out / f"{name}_structure.png")))
    if chosen:
        same = {r["method"]: r for r in cell_rows if (r["task"], r["seed"], r["target"]) == (chosen["task"], chosen["seed"], chosen["target"])
                and r["method"] in SNIP_FAMILY}
        scores = {}
        for m in SNIP_FAMILY:
            f = _cell_folder(same[m], runs) if m in same else None
            if f and (f / "scores.json").is_file():
                scores[f"{m} ({same[m]['variant']})"] = io.read_json(f / "scores.json")["norms"]
        if scores:
            tag = f"{chosen['task']}, seed {chosen['seed']}"
            plots.append((f"Function norms with and without SN / prior, {tag}",
                          plot_norm_distributions(scores, out / f"{name}_norms.png", title=f"({tag})")))
    plots.append(("Stage wall times", plot_wall_times(rows, out / f"{name}_walltimes.png")))
    lines += ["## Plots", ""] + [f"{t}:\n\n![{t}]({p.name})\n" for t, p in plots]
    path = out / f"{name}.md"
    io.write_text(path, "\n".join(lines) + "\n" + io.md_marker("report"))
    return path
