"""`idprior report` for paired grids: paired differences with confidence intervals (see `paired.py`).

    NAME.md          primary endpoint (accuracy before recovery, test) of the reference method against
                     every other method and its own dense model, per target; the same on validation
                     (where defaults are chosen) and after recovery; per-task rows; every method against
                     fisher; mean accuracies; whether the prior acted; where SN bound; wall times
    NAME_paired.png  the differences with their 95% t intervals
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from .. import io
from ..pipeline.report import pyplot, save_figure
from .paired import DENSE, Comparison, compare

ENDPOINTS = {"pruned_no_recovery": "before recovery", "pruned": "after recovery"}


def _fmt(x: float, digits: int = 2, sign: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def plural(n: float, word: str) -> str:
    """"1 epoch", "2 epochs", "0.5 epochs"."""
    return f"{n:g} {word}" + ("" if n == 1 else "s")


def _methods(rows: list[dict]) -> list[str]:
    seen: list[str] = []
    for r in rows:
        if r["method"] != "dense" and r["method"] not in seen:
            seen.append(r["method"])
    return seen


def _targets(rows: list[dict]) -> list[float]:
    seen: list[float] = []
    for r in rows:
        if r["method"] != "dense" and float(r["target"]) not in seen:
            seen.append(float(r["target"]))
    return seen


def comparison_table(comps: list[Comparison], n_boot: int) -> list[str]:
    lines = ["| comparison | target | cells | mean diff (pts) | t 95% CI | bootstrap 95% CI | wins / losses / ties "
             "| McNemar sig. wins / losses | MDE (80% power) | task-blocked mean [95% CI] | task-blocked MDE |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    unpaired = []
    for c in comps:
        if c.unpaired:
            unpaired.append(f"{c.a} − {c.b} at {c.target:g}: {', '.join(c.unpaired)}")
        if not c.cells:
            continue
        s = c.summary(n_boot=n_boot)
        b = "its own dense model" if c.b == DENSE else c.b
        lines.append(f"| {c.a} − {b} | {c.target:g} | {s['cells']} | **{_fmt(s['mean'])}** | "
                     f"[{_fmt(s['t_low'])}, {_fmt(s['t_high'])}] | [{_fmt(s['boot_low'])}, {_fmt(s['boot_high'])}] | "
                     f"{s['wins']} / {s['losses']} / {s['ties']} | {s['sig_wins']} / {s['sig_losses']} | "
                     f"{_fmt(s['mde'], sign=False)} | {_fmt(s['block_mean'])} [{_fmt(s['block_low'])}, "
                     f"{_fmt(s['block_high'])}] | {_fmt(s['block_mde'], sign=False)} |")
    if unpaired:
        lines += ["", "Left out, trained from a different start than the other method's row (not paired): "
                  + "; ".join(unpaired) + "."]
    return lines


def accuracy_table(rows: list[dict], split: str) -> list[str]:
    """Mean ± sd over cells of each method's accuracy, before and after recovery, per target."""
    lines = ["| method | target | cells | dense it pruned | before recovery | after recovery |", "|---|---|---|---|---|---|"]
    for t in _targets(rows):
        for m in _methods(rows):
            sel = [r for r in rows if r["method"] == m and math.isclose(float(r["target"]), t)]
            if not sel:
                continue
            cols = []
            for stage in ("dense", "pruned_no_recovery", "pruned"):
                v = [100 * r[stage][split][r["main_metric"]] for r in sel if split in r[stage]]
                cols.append(f"{np.mean(v):.2f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.2f}" if v else "–")
            lines.append(f"| {m} | {t:g} | {len(sel)} | " + " | ".join(cols) + " |")
    return lines


def prior_table(rows: list[dict]) -> list[str]:
    """First and last logged prior terms of the fine-tunes the snip-family cells pruned."""
    lines = ["| method | target | cells | logged terms: first step → last step (mean over cells) |", "|---|---|---|---|"]
    for t in _targets(rows):
        for m in _methods(rows):
            logs = [r["prior_log"] for r in rows if r["method"] == m and math.isclose(float(r["target"]), t) and r.get("prior_log")]
            if not logs:
                continue
            keys = [k for k in logs[0]["first"] if k != "task_loss"]
            parts = []
            for k in keys:
                first = [x["first"].get(k) for x in logs if isinstance(x["first"].get(k), (int, float))]
                last = [x["last"].get(k) for x in logs if isinstance(x["last"].get(k), (int, float))]
                if first and last:
                    parts.append(f"{k} {np.mean(first):.4g} → {np.mean(last):.4g}")
            lines.append(f"| {m} | {t:g} | {len(logs)} | {'; '.join(parts) or '–'} |")
    return lines


def removed_table(rows: list[dict]) -> list[str]:
    lines = ["| method | target | heads removed | neurons removed | attention sub-layers | FFN sub-layers |", "|---|---|---|---|---|---|"]
    for t in _targets(rows):
        for m in _methods(rows):
            sel = [r["removed"] for r in rows if r["method"] == m and math.isclose(float(r["target"]), t)]
            if sel:
                cols = [f"{np.mean([s.get(k, 0) for s in sel]):.1f}" for k in ("head", "neuron", "attn", "ffn")]
                lines.append(f"| {m} | {t:g} | " + " | ".join(cols) + " |")
    return lines


def sn_table(rows: list[dict]) -> list[str]:
    """Where spectral normalization bound during the fine-tunes the cells pruned (`quality._sn_log_summary`)."""
    lines = ["| method | target | cells | matrices clipped: last step | mean over steps | max over steps "
             "| σ/bound, mean over matrices at the last step | σ/bound, max over matrices and steps |",
             "|---|---|---|---|---|---|---|---|"]
    for t in _targets(rows):
        for m in _methods(rows):
            logs = [r["sn_log"] for r in rows if r["method"] == m and math.isclose(float(r["target"]), t) and r.get("sn_log")]
            if logs:
                lines.append(f"| {m} | {t:g} | {len(logs)} | {np.mean([x['clip_frac_last'] for x in logs]):.3f} | "
                             f"{np.mean([x['clip_frac_mean'] for x in logs]):.3f} | "
                             f"{max(x['clip_frac_max'] for x in logs):.3f} | "
                             f"{np.mean([x['ratio_mean_last'] for x in logs]):.3f} | {max(x['ratio_max'] for x in logs):.3f} |")
    return lines if len(lines) > 2 else ["No fine-tune of these cells used SN, or their rows predate its logging."]


# The SN x prior 2x2 (quality.SNIP_METHODS): each factor's effect with and without the other, as paired differences
SN_PRIOR_EFFECTS = (("SN, with the prior", "snip", "snip-no-sn"),
                    ("SN, without the prior", "snip-no-prior", "snip-no-sn-no-prior"),
                    ("the prior, with SN", "snip", "snip-no-prior"),
                    ("the prior, without SN", "snip-no-sn", "snip-no-sn-no-prior"))


def sn_prior_sections(cells: list[dict], root: Path, n_boot: int) -> list[str]:
    """Each factor of the SN x prior 2x2 with the other on and off, test, before and after recovery; [] unless
    the grid has all four corners."""
    if not {m for _, a, b in SN_PRIOR_EFFECTS for m in (a, b)} <= set(_methods(cells)):
        return []
    lines: list[str] = []
    for endpoint, words in ENDPOINTS.items():
        comps = [compare(cells, a, b, target=t, endpoint=endpoint, root=root)
                 for t in _targets(cells) for _, a, b in SN_PRIOR_EFFECTS]
        comps = [c for c in comps if c.cells]
        if comps:
            lines += [f"## The SN × prior 2×2 ({words}, test)", "",
                      "Rows in order: " + "; ".join(f"{what}: {a} − {b}" for what, a, b in SN_PRIOR_EFFECTS)
                      + " (only the cells with both arms).", "", *comparison_table(comps, n_boot), ""]
    return lines


def protocol_check(rows: list[dict]) -> str:
    """The from-pretrained protocol's promise, checked on the rows: per (task, seed) every arm ran the same
    fine-tuning and recovery steps on the same batches in the same order (`data_order`, `steps`)."""
    groups: dict[tuple[str, int], set] = {}
    unknown = 0
    for r in rows:
        if r.get("data_order") is None or None in r["data_order"].values():
            unknown += 1
            continue
        key = (json.dumps(r["steps"], sort_keys=True), json.dumps(r["data_order"], sort_keys=True))
        groups.setdefault((r["task"], r["seed"]), set()).add(key)
    bad = sorted(f"{t}/{s}" for (t, s), keys in groups.items() if len(keys) > 1)
    line = (f"Same steps and same batches in the same order for every arm, in fine-tuning and in recovery: "
            f"{len(groups) - len(bad)} of {len(groups)} (task, seed) pairs")
    line += f"; differing: {', '.join(bad)}." if bad else "."
    return line + (f" {unknown} cells logged no batch digests (rows from before the check)." if unknown else "")


def shared_finetune_check(rows: list[dict]) -> str:
    """Arms that share a fine-tune (fisher, michel and the plain-fine-tune SNIP ablation share the plain one) must
    prune the same model: their rows must report the same dense scores. A fine-tune rebuilt on another machine
    (or under another library version) is not the same bytes, so a grid resumed there after its fine-tunes were
    lost can pair cells cut from different models; this says so instead of letting it pass silently."""
    scores: dict[tuple[str, int, str], list[str]] = {}  # (task, seed, fine-tune folder) -> each row's dense scores
    for r in rows:
        if r.get("finetune_dir") and r.get("dense") is not None:
            scores.setdefault((r["task"], r["seed"], r["finetune_dir"]), []).append(json.dumps(r["dense"], sort_keys=True))
    shared = {k: v for k, v in scores.items() if len(v) > 1}
    bad = sorted(f"{t}/{s} ({d})" for (t, s, d), v in shared.items() if len(set(v)) > 1)
    line = (f"Arms that share a fine-tune report the same dense model: {len(shared) - len(bad)} of {len(shared)} "
            "shared fine-tunes")
    return line + (f"; differing: {', '.join(bad)}." if bad else ".")


def wall_table(rows: list[dict]) -> list[str]:
    stages: list[str] = []
    for r in rows:
        stages += [s for s in r.get("wall_s", {}) if s not in stages]
    lines = ["| method | cells | " + " | ".join(stages) + " |", "|---|---|" + "---|" * len(stages)]
    for m in ["dense", *_methods(rows)]:
        sel = [r["wall_s"] for r in rows if r["method"] == m]
        if sel:
            lines.append(f"| {m} | {len(sel)} | " + " | ".join(
                f"{np.mean([w[s] for w in sel if s in w]):.1f}" if any(s in w for w in sel) else "–" for s in stages) + " |")
    return lines


def plot_differences(comps: list[Comparison], path: Path, title: str) -> Path:
    """Mean paired differences with 95% t intervals, one line per comparison."""
    plt = pyplot()
    comps = [c for c in comps if len(c.cells) > 1]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(comps) + 1.4))
    for i, c in enumerate(comps):
        s = c.summary(n_boot=0)
        ax.errorbar(s["mean"], i, xerr=[[s["mean"] - s["t_low"]], [s["t_high"] - s["mean"]]], fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(comps)))
    ax.set_yticklabels([f"{c.a} − {'dense' if c.b == DENSE else c.b} @ {c.target:g}" for c in comps], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy difference (points), mean over cells, 95% t interval")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
    return path


def baseline_sections(cells: list[dict], reference: str, baseline: str, root: Path, n_boot: int) -> list[str]:
    """Every method against `baseline`, and `reference` − `baseline` per task, before and after recovery."""
    methods, targets, tasks = _methods(cells), _targets(cells), sorted({r["task"] for r in cells})
    lines: list[str] = []
    for endpoint, words in ENDPOINTS.items():
        lines += [f"## Every method against {baseline} ({words}, test)", "",
                  *comparison_table([compare(cells, m, baseline, target=t, endpoint=endpoint, root=root)
                                     for t in targets for m in methods if m != baseline], n_boot), ""]
    for endpoint, words in ENDPOINTS.items():
        lines += [f"## Per task: {reference} − {baseline}, {words}, test", "", "| task | " + " | ".join(
            f"target {t:g}: mean [t 95% CI] (cells)" for t in targets) + " |", "|---|" + "---|" * len(targets)]
        per_t = {t: compare(cells, reference, baseline, target=t, endpoint=endpoint, root=root).by_task()
                 for t in targets}
        for task in tasks:
            cols = []
            for t in targets:
                c = per_t[t].get(task)
                s = c.summary(n_boot=0) if c else None
                cols.append(f"{_fmt(s['mean'])} [{_fmt(s['t_low'])}, {_fmt(s['t_high'])}] ({s['cells']})" if s else "–")
            lines.append(f"| {task} | " + " | ".join(cols) + " |")
        lines.append("")
    return lines


def write_paired_report(rows: list[dict], results: str | os.PathLike, out: str | os.PathLike, *, name: str,
                        reference: str = "snip", baseline: str = "fisher", command: str | None = None,
                        notes: str | None = None, n_boot: int = 4000) -> Path:
    """NAME.md + NAME_paired.png from the rows of a paired grid (predictions are read relative to
    the results file's folder)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(results).parent
    cells = [r for r in rows if r.get("paired") and r["method"] != "dense"]
    methods, targets = _methods(cells), _targets(cells)
    if reference not in methods:
        reference = methods[0]
    others = [m for m in methods if m != reference]

    def comps(a: str, bs: list[str], endpoint: str, split: str) -> list[Comparison]:
        return [compare(cells, a, b, target=t, endpoint=endpoint, split=split, root=root)
                for t in targets for b in [*bs, DENSE]]

    primary = comps(reference, others, "pruned_no_recovery", "test")
    tasks = sorted({r["task"] for r in cells})
    seeds = sorted({r["seed"] for r in cells})
    sizes = {r["task"]: r["sizes"] for r in cells}
    cfg = cells[0]["config"]
    pretrained = cells[0].get("protocol") == "pretrained"
    lines = [f"# {name}: paired quality benchmark" + (", from the pretrained model" if pretrained else ""), ""]
    if command:
        lines += ["```", command, "```", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        f"Model {cells[0]['model']}; tasks {', '.join(tasks)}; seeds {', '.join(map(str, seeds))}; "
        f"{len(cells)} cells. "
        + (f"Per (task, seed) every method starts from the pretrained model with the same data order and the same "
           f"steps: a fine-tune of {plural(cfg['train']['epochs'], 'epoch')} (each SNIP arm with the parts its "
           f"name keeps: `snip` SN and the identity prior, `-no-sn` without SN, `-no-prior` without the prior; "
           f"baselines plainly), the cut, {plural(cfg['recover']['epochs'], 'epoch')} of recovery: the user protocol (`idprior prune` against `idprior prune --method X`). Differences are "
           f"paired: same examples, same data order. " if pretrained else
           "Per (task, seed) every method starts from one shared plain fine-tune and gets the same "
           "further steps (SNIP: its SN + identity-prior phase; baselines: a plain continuation), so differences are "
           "paired: same start, same examples. ")
        + "Evaluation sizes per task (validation / test): "
        + "; ".join(f"{t} {sizes[t].get('validation')} / {sizes[t].get('test')}" for t in tasks)
        + f". Max length {cfg['data']['max_length']} tokens, {cfg['data'].get('max_train')} training examples.",
        "",
        "How to read: a difference is reference − other in accuracy points, per cell (task, seed), averaged over "
        "cells. *t 95% CI*: Student t over cells. *Bootstrap*: two-level percentile bootstrap (cells, then examples "
        "within a cell), 4,000 draws. *McNemar*: exact test per cell on the discordant examples, counted at p < 0.05. "
        "*MDE*: the smallest true mean difference this many cells detect with 80% power (two-sided 5% t-test), from "
        "the observed spread of the differences. *Task-blocked*: tasks as blocks (the claim is about these tasks, "
        "each weighted equally); the noise is the seed-to-seed spread within a task, pooled over tasks "
        "(`idprior.study.paired` docstring). Defaults are chosen on validation; test is reported once.",
        "",
        *([f"**Protocol check.** {protocol_check(cells)} {shared_finetune_check(cells)}", ""] if pretrained else []),
        f"## Primary: accuracy before recovery, test ({reference} against every method)", "",
        *comparison_table(primary, n_boot), "",
        f"![paired differences]({name}_paired.png)", "",
        "## Before recovery, validation", "",
        *comparison_table(comps(reference, others, "pruned_no_recovery", "validation"), n_boot), "",
        "## Secondary: after the fixed recovery, test", "",
        *comparison_table(comps(reference, others, "pruned", "test"), n_boot), "",
    ]
    if baseline in methods:
        lines += baseline_sections(cells, reference, baseline, root, n_boot)
    lines += ["## Accuracy per method (mean ± sd over cells, test)", "", *accuracy_table(cells, "test"), "",
              "## Accuracy per method (validation)", "", *accuracy_table(cells, "validation"), "",
              "## Is the prior acting? (logged terms of the fine-tunes the cells pruned)", "", *prior_table(cells), "",
              "## Where spectral normalization binds (fine-tunes the cells pruned, logged every step)", "",
              *sn_table(cells), "", *sn_prior_sections(cells, root, n_boot),
              "## Units removed (mean over cells)", "", *removed_table(cells), "",
              "## Wall time per stage (s, mean over cells; finetune = the fine-tune the cell pruned)", "",
              *wall_table(rows), ""]
    plot_differences(primary, out / f"{name}_paired.png", f"{reference} − other, before recovery, test")
    path = out / f"{name}.md"
    io.write_text(path, "\n".join(lines) + "\n" + io.md_marker("report"))
    return path
