"""The per-run report: report.md with accuracy, compression by every measure, speed, stage times
and plots (kept structure per layer, function-norm distributions, stage wall times)."""

from __future__ import annotations

import math
from pathlib import Path

from .. import io

METHOD_NOTE = ("SNIP (spectral-normalized identity prior), reconstructed from the abstract of Lin et al., "
               "Findings of EMNLP 2020; the method details are idprior's own design, not the paper's.")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Save a plot atomically, marked as idprior's (so `report --out` may replace it later)."""
    meta = io.PNG_METADATA | {"kind": "report"}
    io.write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata=meta))


def plot_structure(plan: dict, path: Path) -> Path:
    """Heatmap-style bars: kept head units and FFN width per layer, as fractions of the original."""
    plt = pyplot()
    rows = plan["structure"]
    layers = [r["layer"] for r in rows]
    heads = [r["head_units"] / r["head_units_before"] if r["head_units_before"] else 0 for r in rows]
    ffn = [r["ffn"] / r["ffn_before"] if r["ffn_before"] else 0 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.25 * len(layers)))
    ax.imshow([[h, f] for h, f in zip(heads, ffn)], aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for i, r in enumerate(rows):
        ax.text(0, i, f"{r['head_units']}/{r['head_units_before']}", ha="center", va="center", fontsize=8,
                color="k" if heads[i] > 0.6 else "w")  # readable on the bright end of viridis
        ax.text(1, i, f"{r['ffn']}/{r['ffn_before']}", ha="center", va="center", fontsize=8,
                color="k" if ffn[i] > 0.6 else "w")
    ax.set_xticks([0, 1], ["head units kept", "FFN neurons kept"])
    ax.set_yticks(range(len(layers)), [f"layer {x}" for x in layers])
    ax.set_title("kept structure per layer")
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_norms(norms: dict[str, float], path: Path, removed: set[str] | None = None) -> Path:
    """Histogram of log10 function norms per unit kind, kept and removed units stacked on shared bins
    (units at the identity, norm 0, sit at 1e-12)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    removed = removed or set()
    for ax, kind in zip(axes, ("head", "neuron")):
        units = {k: math.log10(max(v, 1e-12)) for k, v in norms.items() if k.startswith(kind + ":")}
        if units:
            lo, hi = min(units.values()), max(units.values())
            bins = [lo + (hi - lo + 1e-9) * i / 40 for i in range(41)]  # shared, so removed bars are visible
            kept = [v for k, v in units.items() if k not in removed]
            gone = [v for k, v in units.items() if k in removed]
            ax.hist([kept, gone], bins=bins, stacked=True, color=["tab:blue", "tab:red"], alpha=0.75,
                    label=[f"kept ({len(kept)})", f"removed ({len(gone)})"])
            ax.legend(fontsize=8)
        ax.set_title(f"{kind} function norms")
        ax.set_xlabel("log10 ||f_u||  (0 shown at -12)")
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_stage_times(stages: dict, path: Path) -> Path:
    plt = pyplot()
    names = [k for k in stages if k != "report" and not stages[k].get("skipped")]
    secs = [stages[k].get("wall_s", 0) for k in names]
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(names)))
    ax.barh(names, secs, color="tab:gray")
    ax.invert_yaxis()
    ax.set_xlabel("wall time (s)")
    ax.set_title("stage wall times")
    save_figure(fig, path)
    plt.close(fig)
    return path


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.4f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


UNIT_NAMES = {"head": ("head", "heads"), "neuron": ("FFN neuron", "FFN neurons"),
              "attn": ("attention sub-layer", "attention sub-layers"), "ffn": ("FFN sub-layer", "FFN sub-layers")}


def _counts(counts: dict, names: dict | None = None) -> str:
    """{'train': 48, 'test': 24} -> 'train 48, test 24'; with `names` ({'head': ('head', 'heads')}):
    '3 heads, 1 FFN sub-layer' (a report, not a Python dict repr)."""
    parts = []
    for k, v in counts.items():
        if names is None:
            parts.append(f"{k} {_fmt(v)}")
        else:
            one, many = names.get(k, (k, k))
            parts.append(f"{_fmt(v)} {one if v == 1 else many}")
    return ", ".join(parts)


def _stage_time(info: dict) -> str:
    """Seconds, or why the stage did not run (a skipped benchmark is not a 0.0 s one)."""
    if info.get("skipped"):
        reason = str(info["skipped"]).replace("bench.enabled is false", "--no-bench")
        return f"skipped ({reason})"
    return f"{info.get('wall_s', 0):.1f}"


def _generations_md(samples: list[dict] | None) -> list[str]:
    """Greedy continuations of fixed prompts, dense vs pruned (LM tasks only)."""
    if not samples:
        return []

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|") or "(nothing)"

    lines = ["", "## Sample generations", "", "Greedy decoding with the KV cache, same prompts for both models.", "",
             "| prompt | dense | pruned |", "|---|---|---|"]
    return lines + [f"| {cell(s['prompt'])} | {cell(s['dense'])} | {cell(s['pruned'])} |" for s in samples]


def write_run_report(out: str | Path) -> Path:
    """report.md (and plots) from the artefacts in a run folder."""
    out = Path(out)
    metrics = io.read_json(out / "metrics.json") if (out / "metrics.json").is_file() else {}
    plan = io.read_json(out / "plan.json") if (out / "plan.json").is_file() else {}
    stages = io.read_json(out / "stages.json")["stages"] if (out / "stages.json").is_file() else {}
    bench_md = (out / "bench.md").read_text(encoding="utf-8") if (out / "bench.md").is_file() else None
    lines = [f"# idprior run: {out.name}", "", METHOD_NOTE, ""]
    if metrics:
        m = metrics["main_metric"]
        lines += [f"Model `{metrics['model']}`, task `{metrics['task']}`, method `{metrics['method']}`, target "
                  f"{metrics['target']:.0%} of {metrics['measure']}, seed {metrics['seed']}. "
                  f"Split sizes: {_counts(metrics['sizes'])}.", "",
                  f"Fine-tune before the cut: {metrics.get('training', 'not recorded')}; recovery after it: "
                  f"{metrics.get('recovery', 'not recorded')}.", "", "## Quality", "",
                  f"| split | dense {m} | pruned, no recovery | pruned |", "|---|---|---|---|"]
        for split, d in metrics["dense"].items():
            lines.append(f"| {split} | {_fmt(d[m])} | {_fmt(metrics['pruned_no_recovery'][split][m])} | {_fmt(metrics['pruned'][split][m])} |")
        if zs := metrics.get("zero_shot"):
            lines.append(f"| zero-shot {zs['task']} {zs['split']} accuracy ({zs['dense']['examples']} examples, "
                         f"label-word likelihood) | {_fmt(zs['dense']['accuracy'])} | "
                         f"{_fmt(zs['pruned_no_recovery']['accuracy'])} | {_fmt(zs['pruned']['accuracy'])} |")
        c = metrics["compression"]
        lines += ["", f"## Compression (FLOPs at sequence length {c['seq_len']})", "",
                  "| measure | dense | pruned | removed |", "|---|---|---|---|"]
        for k in ("encoder_params", "linear_params", "flops", "total_params"):
            lines.append(f"| {k} | {_fmt(c[k]['dense'])} | {_fmt(c[k]['pruned'])} | {c[k]['removed_fraction']:.1%} |")
        lines += ["", f"Units removed: {_counts({k: v for k, v in (metrics.get('plan') or {}).items() if v}, UNIT_NAMES) or 'none'}."]
        lines += _generations_md(metrics.get("generations"))
    if plan.get("warnings"):
        lines += ["", "Warnings: " + "; ".join(plan["warnings"])]
    if bench_md:
        lines += ["", "## Speed", "", bench_md.strip()]
    if stages:
        lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {_stage_time(v)} |" for k, v in stages.items()]
    plots = []
    if plan.get("structure"):
        plots.append(("Kept structure", plot_structure(plan, out / "structure.png")))
    if (out / "scores.json").is_file():
        norms = io.read_json(out / "scores.json")["norms"]
        plots.append(("Function norms", plot_norms(norms, out / "norms.png", set(plan.get("units", [])))))
    if stages:
        plots.append(("Stage wall times", plot_stage_times(stages, out / "stages.png")))
    if plots:
        lines += ["", "## Plots", ""] + [f"![{t}]({p.name})" for t, p in plots]
    path = out / "report.md"
    io.write_text(path, "\n".join(lines) + "\n")
    return path
