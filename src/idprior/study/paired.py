"""Paired statistics for the quality benchmark: is method A better than method B, and by how much?

Every cell of a paired grid (see `quality.py`) scores the same evaluation examples, and every
method of a (task, seed) starts from the same fine-tune, so a comparison is a *paired* difference:
per cell d = acc_A - acc_B (in points), and per example whether A and B were right.

    mean difference over cells with two 95% intervals:
      t         Student t over cells (cells are the units of replication; their spread includes
                the evaluation-set noise as well as the seed-to-seed variation);
      bootstrap two-level percentile bootstrap: resample cells, then the examples inside each
                chosen cell (A and B resampled together), `n_boot` times;
    wins / losses / ties over cells, and per cell an exact McNemar test (two-sided binomial on the
    discordant examples) counted as significant wins and losses at 5%;
    the minimum detectable difference at 80% power of a two-sided 5% t-test over these cells:
      MDE = (t_{0.975, n-1} + t_{0.80, n-1}) * sd(d) / sqrt(n);
    the same two, blocked by task ("task-blocked"): the estimand is the mean over THESE tasks (each
      weighted equally) of the mean over seeds, so a task's systematic lead or lag is part of the
      answer, not noise; the noise is the seed-to-seed spread within a task, pooled over tasks:
      s_w^2 = sum_t sum_i (d_ti - mean_t)^2 / (n - T),  se = s_w * sqrt(sum_t 1/n_t) / T,  df = n - T,
      interval mean ± t_{0.975, df} se and MDE = (t_{0.975, df} + t_{0.80, df}) se. With balanced tasks
      the mean equals the plain one; the interval is narrower when tasks differ systematically.

Accuracy only (classification). `B = "@dense"` compares A with the dense model it pruned (each
cell's own fine-tune), e.g. "how much does SNIP lose before recovery".
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import IdpriorError

DENSE = "@dense"


@dataclass
class PairedCell:
    """One (task, seed, target): per-example correctness of A and B on the same examples."""

    task: str
    seed: int
    target: float
    a: np.ndarray  # [N] bool
    b: np.ndarray  # [N] bool

    @property
    def diff(self) -> float:
        """acc_A - acc_B in points."""
        return 100.0 * (float(self.a.mean()) - float(self.b.mean()))

    @property
    def discordant(self) -> tuple[int, int]:
        """(A right and B wrong, A wrong and B right)."""
        return int((self.a & ~self.b).sum()), int((~self.a & self.b).sum())


def t_interval(diffs: Iterable[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of a Student t interval over cells; (mean, nan, nan) for fewer than two."""
    from scipy import stats

    d = np.asarray(list(diffs), dtype=float)
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def blocked_interval(cells: list[PairedCell], level: float = 0.95,
                     power: float = 0.8) -> tuple[float, float, float, float]:
    """(mean, low, high, MDE) with tasks as blocks (module docstring); nan unless every task has at
    least two cells (a task seen once adds no spread, and a pooled variance from one or two
    differences would give an interval of any width)."""
    from scipy import stats

    by_task: dict[str, list[float]] = {}
    for c in cells:
        by_task.setdefault(c.task, []).append(c.diff)
    if not by_task:
        return math.nan, math.nan, math.nan, math.nan
    n, T = sum(len(v) for v in by_task.values()), len(by_task)
    mean = float(np.mean([np.mean(v) for v in by_task.values()]))
    df = n - T
    if min(len(v) for v in by_task.values()) < 2:
        return mean, math.nan, math.nan, math.nan
    within = sum(float(((np.asarray(v) - np.mean(v)) ** 2).sum()) for v in by_task.values()) / df
    se = math.sqrt(within * sum(1.0 / len(v) for v in by_task.values())) / T
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    mde = (float(stats.t.ppf(0.5 + level / 2, df)) + float(stats.t.ppf(power, df))) * se
    return mean, mean - half, mean + half, mde


def bootstrap_interval(cells: list[PairedCell], level: float = 0.95, n_boot: int = 4000,
                       seed: int = 0) -> tuple[float, float]:
    """Two-level percentile bootstrap of the mean difference (points): cells with replacement, then
    examples within each cell. A cell's per-example differences take the values +1, -1 and 0, so
    resampling its examples is one multinomial draw of those three counts."""
    if not cells:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    n = np.array([len(c.a) for c in cells])
    plus_minus = np.array([c.discordant for c in cells], dtype=float)  # [C, 2]
    probs = np.column_stack([plus_minus / n[:, None], 1 - plus_minus.sum(1) / n])  # [C, 3]
    means = np.empty(n_boot)
    for b in range(n_boot):
        pick = rng.integers(0, len(cells), len(cells))
        counts = np.array([rng.multinomial(n[i], probs[i]) for i in pick])  # [C, 3]
        means[b] = np.mean((counts[:, 0] - counts[:, 1]) / n[pick])
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return 100.0 * float(lo), 100.0 * float(hi)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value (binomial test on the discordant examples); 1.0 if none."""
    from scipy import stats

    n10, n01 = int((a & ~b).sum()), int((~a & b).sum())
    if n10 + n01 == 0:
        return 1.0
    return float(stats.binomtest(n10, n10 + n01, 0.5).pvalue)


def min_detectable(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided t-test over `n` cells detects with `power`."""
    from scipy import stats

    if n < 2 or not math.isfinite(sd):
        return math.nan
    return (float(stats.t.ppf(0.5 + level / 2, n - 1)) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)


@dataclass
class Comparison:
    a: str
    b: str
    target: float
    endpoint: str  # "pruned_no_recovery" (before recovery) or "pruned" (after recovery)
    split: str
    cells: list[PairedCell] = field(default_factory=list)
    unpaired: list[str] = field(default_factory=list)  # "task/seed" cells left out: different start weights

    def summary(self, n_boot: int = 4000) -> dict:
        """Every statistic of the module docstring; n_boot=0 skips the bootstrap."""
        d = [c.diff for c in self.cells]
        mean, lo, hi = t_interval(d)
        blo, bhi = bootstrap_interval(self.cells, n_boot=n_boot) if self.cells and n_boot else (math.nan, math.nan)
        sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
        bmean, bl, bh, bmde = blocked_interval(self.cells)
        sig = [(c.diff, mcnemar_p(c.a, c.b)) for c in self.cells]
        return {"a": self.a, "b": self.b, "target": self.target, "endpoint": self.endpoint, "split": self.split,
                "cells": len(d), "mean": mean, "t_low": lo, "t_high": hi, "boot_low": blo, "boot_high": bhi,
                "sd": sd, "mde": min_detectable(sd, len(d)),
                "block_mean": bmean, "block_low": bl, "block_high": bh, "block_mde": bmde,
                "wins": sum(x > 0 for x in d), "losses": sum(x < 0 for x in d), "ties": sum(x == 0 for x in d),
                "sig_wins": sum(x > 0 and p < 0.05 for x, p in sig), "sig_losses": sum(x < 0 and p < 0.05 for x, p in sig),
                "examples": int(sum(len(c.a) for c in self.cells)), "unpaired": len(self.unpaired)}

    def by_task(self) -> dict[str, Comparison]:
        out: dict[str, Comparison] = {}
        for c in self.cells:
            out.setdefault(c.task, Comparison(self.a, self.b, self.target, self.endpoint, self.split)).cells.append(c)
        return out


Loader = Callable[[str], dict[str, dict[str, np.ndarray]]]

# ---- the grid's prediction store ------------------------------------------------------------------
# A paired grid keeps every cell's per-example predictions in ONE safetensors file beside its results
# JSONL (RESULTS_preds.safetensors; a grid has ~1,000 cells, one file each was unwieldy), keyed
# "<task>/seed<k>/<cell>/<stage.split>/<field>". A row points at its entries with "STORE#<task>/seed<k>/<cell>",
# relative to the JSONL's folder; rows of grids from before the store name a file of their own.


def add_predictions(store: str | os.PathLike, name: str, src: str | os.PathLike) -> str:
    """Add the predictions file `src` (keys "stage.split/field") to `store` under `name`, replacing
    any entries already there; returns the reference a row records ("STORE#name").

    Read, add, write a temporary file, rename: a crash leaves the old store or the new one. The grid's
    shards add to one store at once, so the read-add-write holds an exclusive lock on its folder."""
    import fcntl

    from safetensors.numpy import load_file, save_file

    from .. import io

    store = Path(store)
    store.parent.mkdir(parents=True, exist_ok=True)
    new = {f"{name}/{k}": np.ascontiguousarray(v) for k, v in load_file(str(src)).items()}
    fd = os.open(store.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries = load_file(str(store)) if store.is_file() else {}
        entries = {k: v for k, v in entries.items() if not k.startswith(f"{name}/")} | new
        io.write_with(store, lambda tmp: save_file(entries, str(tmp)))
    finally:
        os.close(fd)  # releases the lock
    return f"{store.name}#{name}"


@functools.lru_cache(maxsize=4)
def _store(path: str, mtime_ns: int) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """{cell: {stage.split: {field: array}}} of a whole store, read once per version of the file."""
    from safetensors.numpy import load_file

    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for key, value in load_file(path).items():
        cell, entry, fld = key.rsplit("/", 2)
        out.setdefault(cell, {}).setdefault(entry, {})[fld] = value
    return out


def load_predictions_ref(root: str | os.PathLike, ref: str) -> dict[str, dict[str, np.ndarray]]:
    """The per-example predictions a row points to (`ref` relative to `root`, the JSONL's folder):
    {stage.split: {field: array}}."""
    path, _, name = ref.partition("#")
    path = Path(root) / path
    if not name:  # a grid from before the store: one file per cell
        from ..pipeline.evaluate import load_predictions

        return load_predictions(path)
    cells = _store(str(path), path.stat().st_mtime_ns)
    if name not in cells:
        raise IdpriorError(f"{path} holds no predictions for {name!r}, which a results row names: "
                           "use the store that was written with these rows")
    return cells[name]


def correctness(preds: dict[str, dict[str, np.ndarray]], name: str) -> np.ndarray | None:
    """[N] bool (pred == label) of entry `name` ("stage.split") of a predictions file."""
    entry = preds.get(name)
    if entry is None or "label" not in entry:
        return None
    return entry["pred"].astype(np.int64) == entry["label"].astype(np.int64)


def compare(rows: list[dict], a: str, b: str, *, target: float, endpoint: str = "pruned_no_recovery",
            split: str = "test", root: str | Path = ".", load: Loader | None = None) -> Comparison:
    """Pair every (task, seed) cell of method `a` at `target` with method `b` (or with its own dense
    model when b == "@dense"), from the per-example predictions the rows point to (relative to `root`).
    Rows whose recorded start weights differ (`start_sha256`) are not paired; they are listed in
    `unpaired` instead."""
    cache: dict[str, dict] = {}

    def preds(rel: str | None) -> dict:
        if rel is None:
            return {}
        if rel not in cache:
            cache[rel] = (load or (lambda r: load_predictions_ref(root, r)))(rel)
        return cache[rel]

    by_key = {(r["task"], r["seed"], r["method"], float(r["target"])): r for r in rows if r.get("predictions")}
    comp = Comparison(a, b, target, endpoint, split)
    for (task, seed, method, t), row in sorted(by_key.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if method != a or not math.isclose(t, target):
            continue
        ca = correctness(preds(row["predictions"]), f"{endpoint}.{split}")
        if b == DENSE:
            cb = correctness(preds(row.get("dense_predictions")), f"dense.{split}")
        else:
            other = by_key.get((task, seed, b, t))
            if other and row.get("start_sha256") and other.get("start_sha256") and row["start_sha256"] != other["start_sha256"]:
                comp.unpaired.append(f"{task}/{seed}")  # trained from different starts: not a paired cell
                continue
            cb = correctness(preds(other["predictions"]), f"{endpoint}.{split}") if other else None
        if ca is None or cb is None:
            continue
        if ca.shape != cb.shape:
            raise ValueError(f"{task}/{seed}: {a} and {b} were scored on different examples ({ca.shape} vs {cb.shape})")
        comp.cells.append(PairedCell(task, seed, t, ca, cb))
    return comp
