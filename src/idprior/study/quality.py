"""Quality benchmark: SNIP, its ablations and every baseline on one grid, resumable, one JSONL row per cell.

A grid (YAML) names a model, tasks, targets, seeds and methods. The expensive part, fine-tuning,
is done once per (task, seed, fine-tune variant) and shared by every cell that needs it:

    variant    SN   prior   used by
    plain      no   no      every baseline, snip-no-sn-no-prior, the "dense" row
    sn         yes  no      snip-no-prior
    prior      no   yes     snip-no-sn
    sn+prior   yes  yes     snip

Each cell (task, seed, method, target) is a pipeline run folder whose `finetuned/` is a symlink
to its variant's fine-tuned model, on which the pipeline's own stages run in post-training mode
(score, select, surgery, recover, evaluate): the same code and the same recovery budget for every
method. A finished cell appends one line to the results JSONL; a rerun skips every key
(task/seed/method/target) already there, and an interrupted cell or fine-tune resumes from its
run folder. Loop order is seed, then target (grid order), then task, so a sweep cut short
leaves complete slices (seed 0 of every task and target before seed 1).

    grid = load_grid("benchmarks/quality_paired.yaml")
    run_grid(grid, "runs/quality_paired", results="benchmarks/results/quality_paired.jsonl")

**Paired grids** (`paired: true`, e.g. benchmarks/quality_paired.yaml) remove the between-method
variance that independent fine-tunes add. Per (task, seed) there is one plain fine-tune, the
*shared start* (`train:`); every method continues from it with the same number of further steps
(`continue:`): SNIP its SN + identity-prior phase, its ablations their own phases, every baseline a
plain continuation of equal length (the control). A method with `from: start` is applied post hoc
to the shared start itself (no further steps). Every cell saves its per-example predictions
(one file per grid, RESULTS_preds.safetensors), so `idprior report` compares methods example by example with confidence
intervals (see `paired.py`). Loop order for paired grids is target, then seed, then task, so the
primary target is finished for every (task, seed) before the secondary targets start.

**The from-pretrained protocol** (`protocol: pretrained`, e.g. benchmarks/quality_pretrained.yaml) is
what a user runs: `idprior prune` against `idprior prune --method X`. Per (task, seed) every arm starts
from the pretrained model, fine-tunes `train:` (SNIP with SN and the prior, a baseline plainly, the
ablations their own variant: the unpaired fine-tunes above, so arms that train alike share one), is
cut, and recovers `recover:`: the same data order (the loaders are seeded by the seed alone) and the
same total steps for every arm. Its cells keep per-example predictions and write paired rows, so
`idprior report` gives paired differences; each row records its steps and a hash of the batches it
saw (`data_order`), which the report checks across the arms of a (task, seed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import io
from ..config import (
    PRIOR_OPTIONS,
    RunConfig,
    config_from_saved,
    load_config,
    load_run_config,
    prior_active,
    read_yaml_text,
)
from ..errors import ConfigError, IdpriorError

# snip-family method -> (sn, prior) of the fine-tune it prunes
SNIP_METHODS = {"snip": (True, True), "snip-no-sn": (False, True), "snip-no-prior": (True, False),
                "snip-no-sn-no-prior": (False, False)}
VARIANTS = {(False, False): "plain", (True, False): "sn", (False, True): "prior", (True, True): "sn+prior"}
CELL_STAGES = ("score", "select", "surgery", "recover", "evaluate")
ROW_KEYS = ("key", "task", "seed", "method", "base_method", "target", "variant", "model", "main_metric", "config",
            "versions", "wall_s", "sizes", "dense", "pruned_no_recovery", "pruned", "compression", "removed", "finished_at")
GRID_KEYS = {"model", "tasks", "targets", "seeds", "methods", "max_train", "max_eval", "max_validation", "max_length",
             "train", "recover", "prune", "selection", "set", "dense_row", "paired", "continue", "protocol"}
# how the arms of a (task, seed) start: each from the pretrained model, unpaired rows ("independent"); from one
# shared plain fine-tune ("shared-start", i.e. paired: true); each from the pretrained model with paired rows
# ("pretrained", the user protocol: see the module docstring)
PROTOCOLS = ("independent", "shared-start", "pretrained")
METHOD_KEYS = {"name", "method", "set", "targets", "seeds", "from"}


def baseline_names() -> tuple[str, ...]:
    from ..baselines import METHODS

    return tuple(METHODS)


@dataclass
class MethodSpec:
    """One column of the grid: a method (snip-family or baseline) plus its own dotted overrides."""

    name: str
    method: str
    overrides: dict = field(default_factory=dict)
    targets: list[float] | None = None  # None: every target of the grid
    seeds: list[int] | None = None  # None: every seed of the grid (a variant dropped after a first look)
    start: str = "continued"  # paired grids: "continued" (after the further steps) or "start" (post hoc, no steps)


@dataclass
class Grid:
    model: str
    tasks: list[str]
    targets: list[float]
    seeds: list[int]
    methods: list[MethodSpec]
    overrides: dict = field(default_factory=dict)  # dotted key -> value, applied to every run
    dense_row: bool = True  # false: skip the plain fine-tune's "dense" row (a sweep with no plain variant)
    paired: bool = False  # shared start + equal further steps for every method (see the module docstring)
    continue_train: dict = field(default_factory=dict)  # paired: TrainConfig fields of the further steps
    protocol: str = "independent"  # one of PROTOCOLS ("shared-start" exactly when paired)

    @property
    def paired_rows(self) -> bool:
        """Whether cells keep per-example predictions and write paired rows (`idprior report`'s paired tables)."""
        return self.paired or self.protocol == "pretrained"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_grid(path_or_dict: str | os.PathLike | dict) -> Grid:
    """Parse a grid YAML (or dict); IdpriorError listing every problem at once."""
    if isinstance(path_or_dict, dict):
        raw = path_or_dict
    else:
        path = Path(path_or_dict)
        if not path.is_file():
            raise IdpriorError(f"grid file {path} not found; pass a YAML grid such as benchmarks/quality_paired.yaml")
        raw = read_yaml_text(path)  # keys unique: a second `targets:` would silently replace the first
    if not isinstance(raw, dict):
        raise IdpriorError(f"{path_or_dict}: a grid must be a mapping (model:, tasks:, targets:, seeds:, methods:, ...)")
    problems = [f"unknown grid key {k!r}; valid keys: {', '.join(sorted(GRID_KEYS))}" for k in raw if k not in GRID_KEYS]
    for k in ("tasks", "targets", "seeds", "methods"):
        if not isinstance(raw.get(k), list) or not raw.get(k):
            problems.append(f"grid key {k!r} must be a non-empty list")
    problems += [f"task {t!r}: use letters, digits and . _ + - only (it names a folder)"
                 for t in raw.get("tasks") or [] if not _is_plain_name(str(t))]
    paired = bool(raw.get("paired", False)) or raw.get("protocol") == "shared-start"
    protocol = str(raw.get("protocol", "shared-start" if paired else "independent"))
    if protocol not in PROTOCOLS:
        problems.append(f"protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    elif paired and protocol != "shared-start":
        problems.append(f"paired: true is the shared-start protocol; with protocol: {protocol} drop 'paired:'")
    methods = _grid_methods(raw, paired, problems)
    continue_train = dict(raw.get("continue") or {})
    if paired and not continue_train:
        problems.append("a paired grid needs a 'continue:' section (the further steps every method gets, e.g. {epochs: 1})")
    if continue_train and not paired:
        problems.append("'continue:' is only meaningful with paired: true")
    overrides = _grid_overrides(raw)
    if problems:
        where = "grid" if isinstance(path_or_dict, dict) else f"grid {path_or_dict}"
        raise ConfigError([f"bad {where}: {p}" for p in problems])  # one line per problem
    grid = Grid(model=str(raw.get("model", "minilm-l6")), tasks=[str(t) for t in raw["tasks"]],
                targets=[float(t) for t in raw["targets"]], seeds=[int(s) for s in raw["seeds"]],
                methods=methods, overrides=overrides, dense_row=bool(raw.get("dense_row", True)), paired=paired,
                continue_train=continue_train, protocol=protocol)
    for spec in grid.methods:  # validate every method's config before any work starts
        cfg = cell_config(grid, grid.tasks[0], grid.seeds[0], spec, (spec.targets or grid.targets)[0], out="pending")
        if paired:
            continuation_config(grid, cfg, Path("pending"))
    return grid


def _grid_methods(raw: dict, paired: bool, problems: list[str]) -> list[MethodSpec]:
    """The grid's `methods:` with their `selection:` entries folded in; problems appended."""
    known = (*SNIP_METHODS, *baseline_names())
    methods: list[MethodSpec] = []
    selection = raw.get("selection") or {}
    for m in raw.get("methods") or []:
        spec = _method_spec(m, problems)
        if spec is None or spec.method not in known:
            problems.append(f"method {m!r}: use one of {', '.join(known)} or {{name:, method:, set: {{dotted: value}}}}")
            continue
        if spec.start == "start" and not paired:
            problems.append(f"method {spec.name!r}: 'from: start' needs a paired grid (paired: true)")
        if not _is_plain_name(spec.name):  # it becomes a folder name under OUT/cells
            problems.append(f"method name {spec.name!r}: use letters, digits and . _ + - only (it names a folder)")
        if spec.name == "dense" or any(not _same_column(s, spec) for s in methods if s.name == spec.name):
            problems.append(f"method name {spec.name!r} is reserved or used twice (a name may repeat only with "
                            "the same method, from and set, and other targets: one name, one configuration)")
        sel = selection.get(spec.name, selection.get(spec.method))
        if sel is not None and spec.method not in SNIP_METHODS:
            problems.append(f"selection for {spec.name!r}: baselines use their own selection rule (see idprior.baselines)")
        elif sel is not None:
            spec.overrides = {"prune.selection": sel, **spec.overrides}
        methods.append(spec)
    return methods


def _grid_overrides(raw: dict) -> dict:
    """Dotted overrides for every run: data sizes, the train/recover/prune sections, then `set:`."""
    overrides: dict = {}
    for key in ("max_train", "max_eval", "max_validation", "max_length"):
        if raw.get(key) is not None:
            overrides[f"data.{key}"] = raw[key]
    for section in ("train", "recover", "prune"):
        for k, v in (raw.get(section) or {}).items():
            overrides[f"{section}.{k}"] = v
    overrides.update(raw.get("set") or {})
    return overrides


def _method_spec(m, problems: list[str]) -> MethodSpec | None:
    """A grid `methods:` entry: a name, or {name, method, set, targets, from}."""
    if isinstance(m, str):
        return MethodSpec(m, m)
    if not isinstance(m, dict):
        return None
    problems += [f"method {m.get('name')!r}: unknown key {k!r}; valid keys: {', '.join(sorted(METHOD_KEYS))}"
                 for k in m if k not in METHOD_KEYS]
    start = str(m.get("from", "continued"))
    if start not in ("continued", "start"):
        problems.append(f"method {m.get('name')!r}: from must be 'start' or 'continued', got {start!r}")
    targets, seeds = m.get("targets"), m.get("seeds")
    return MethodSpec(str(m.get("name")), str(m.get("method", m.get("name"))), dict(m.get("set") or {}),
                      [float(t) for t in targets] if targets else None, [int(x) for x in seeds] if seeds else None, start)


def _same_column(a: MethodSpec, b: MethodSpec) -> bool:
    """Two entries of one name are one method run at more targets (say, on fewer seeds there)."""
    return ((a.method, a.overrides, a.start) == (b.method, b.overrides, b.start)
            and a.targets is not None and b.targets is not None and not set(a.targets) & set(b.targets))


def _is_plain_name(name: str) -> bool:
    """A name that is safe as one path component: never '..', never a separator."""
    return bool(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name)) and ".." not in name


# ---- configs ------------------------------------------------------------------------------------

def _overrides(d: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


def cell_config(grid: Grid, task: str, seed: int, spec: MethodSpec, target: float, *, out: str) -> RunConfig:
    """The RunConfig of one cell: post-training mode (prune.finetune_first=false) on its variant's fine-tune."""
    base = {"model.name": grid.model, "data.task": task, "seed": seed, "bench.enabled": False, **grid.overrides,
            "prune.method": "snip" if spec.method in SNIP_METHODS else spec.method, "prune.target": target}
    if spec.method in SNIP_METHODS:
        sn, prior = SNIP_METHODS[spec.method]
        base.update({"prune.sn": sn, "prune.prior": prior})  # a baseline: its own plain training (training_of)
    base.update(spec.overrides)
    base["out"] = out
    from ..pipeline.stages import resolved

    return resolved(load_config(None, _overrides(base)))


prior_on = prior_active  # whether a fine-tune applies an identity prior (as stage_finetune does)


def _prior_fields(p) -> tuple[str, ...]:
    """The prune fields a fine-tune's prior depends on (the prior is driven by the target)."""
    return (*PRIOR_OPTIONS, "kinds")


def variant_of(cfg: RunConfig) -> str:
    """The variant of the fine-tune a cell prunes (as `finetune_config` names it), also for the cell's own
    post-training config (`prior_on` is False without a fine-tune)."""
    p = dataclasses.replace(cfg.prune, finetune_first=True)
    return VARIANTS[(p.sn, prior_on(p))]


def finetune_config(cell: RunConfig, *, out: str) -> tuple[RunConfig, str]:
    """The fine-tune a cell prunes, with every field that does not change the fine-tune reset,
    so cells that need the same model map to the same config; returns (config, folder name)."""
    p = cell.prune
    sn, prior = p.sn, prior_on(p)
    default = RunConfig().prune
    prune = dataclasses.replace(default, sn=sn, prior=prior, finetune_first=True,
                                sn_bound=p.sn_bound if sn else default.sn_bound, **_distill_fields(p),
                                **({k: getattr(p, k) for k in _prior_fields(p)} if prior else {}))
    cfg = dataclasses.replace(cell, prune=prune, recover=dataclasses.replace(RunConfig().recover, epochs=0.0), out=out)
    return cfg, f"{VARIANTS[(sn, prior)]}-{finetune_digest(cell)}"


def _distill_fields(p) -> dict:
    """The prune fields of distillation during the fine-tune (`finetune_distill`), when it is on."""
    if not p.finetune_distill:
        return {}
    return {"finetune_distill": True, "distill_alpha": p.distill_alpha, "distill_temperature": p.distill_temperature}


def finetune_digest(cfg: RunConfig, model_name: str | None = None) -> str:
    """A short hash of exactly the fields that change a fine-tune: model, data, training, seed, the SN /
    prior settings in use and distillation from the start. Selection, recovery and other post-fine-tune
    fields are left out, so a change of default selection no longer splits cells that prune the same
    model (an earlier bug). The prior is driven by the target, so it depends on the target and measure too."""
    p = cfg.prune
    prior = prior_on(p)
    keep: dict = {"sn": p.sn, "prior": prior}
    if p.sn:
        keep["sn_bound"] = p.sn_bound
    if prior:
        keep |= {k: getattr(p, k) for k in _prior_fields(p)}
    keep |= _distill_fields(p)  # omitted when off
    model = dataclasses.asdict(cfg.model) | ({"name": model_name} if model_name is not None else {})
    data = dataclasses.asdict(cfg.data)
    blob = {"model": model, "data": data, "train": dataclasses.asdict(cfg.train),
            "seed": cfg.seed, "prune": keep}
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:8]


def start_config(cell: RunConfig, *, out: str) -> tuple[RunConfig, str]:
    """Paired grids: the shared start of a (task, seed), a plain fine-tune (no SN, no prior)."""
    plain = dataclasses.replace(cell, prune=dataclasses.replace(cell.prune, sn=False, prior=False, finetune_distill=False))
    cfg, name = finetune_config(plain, out=out)
    return cfg, "start-" + name.split("-", 1)[1]


def continuation_config(grid: Grid, cell: RunConfig, start_dir: Path, *, out: str = "pending") -> tuple[RunConfig, str]:
    """Paired grids: the further steps a cell's method gets from the shared start (`continue:` on top
    of `train:`), with the cell's own SN / prior settings; (config, folder name)."""
    ft, name = finetune_config(cell, out=out)
    try:
        train = dataclasses.replace(cell.train, **grid.continue_train)
    except TypeError as e:
        raise IdpriorError(f"grid 'continue:' section: {e}; use TrainConfig fields (epochs, lr, batch_size, ...)") from None
    model = dataclasses.replace(ft.model, name=str(start_dir / "finetuned"))
    cfg = dataclasses.replace(ft, model=model, train=train)
    # the hash names the start by its folder name, not its absolute path, so moved sweeps still match
    return cfg, f"{name.split('-')[0]}-{finetune_digest(cfg, model_name=start_dir.name)}"


def cells(grid: Grid) -> Iterator[tuple[int, str, float, MethodSpec | None]]:
    """(seed, task, target, method) in run order; a dense row opens each (task, seed). Unpaired grids:
    seed, then target (grid order), then task, so a sweep cut short holds whole (seed, target) slices.
    Paired rows (both paired protocols): target first, so the primary target is done for every (seed, task)
    before the rest."""
    pairs = [(i, target, seed) for seed in grid.seeds for i, target in enumerate(grid.targets)]
    if grid.paired_rows:
        pairs.sort(key=lambda p: p[0])  # stable: seeds keep their order within a target
    for i, target, seed in pairs:
        for task in grid.tasks:
            if i == 0 and grid.dense_row:
                yield seed, task, 0.0, None
            for spec in grid.methods:
                if (spec.targets is None or target in spec.targets) and (spec.seeds is None or seed in spec.seeds):
                    yield seed, task, target, spec


def cell_key(task: str, seed: int, method: str, target: float) -> str:
    return f"{task}/{seed}/{method}/{target:g}"


def finished_keys(results: str | os.PathLike) -> set[str]:
    """Keys already in the JSONL (a torn last line from a kill is ignored)."""
    path = Path(results)
    keys = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return keys


def append_row(results: str | os.PathLike, row: dict) -> None:
    """One line per call, synced, so a kill loses at most the line being written."""
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(row, default=io.jsonable) + "\n"
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:  # only the last byte: the file grows by a line per cell
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text  # a torn line from a kill stays on its own line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:  # one write() on an O_APPEND file: lines of concurrent shards never interleave
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def versions() -> dict:
    import torch
    import transformers

    from .. import __version__

    return {"idprior": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


# ---- running ------------------------------------------------------------------------------------

def _finetune_into(cfg: RunConfig, folder: Path, label: str, counter: dict | None) -> Path:
    """Run (or resume) the finetune stage of `cfg` in `folder` unless it finished earlier."""
    from ..pipeline.stages import Run, run_stages

    run = Run(dataclasses.replace(_as_recorded(cfg, folder), out=str(folder)), resume=True)
    try:
        if not run.done("finetune"):
            print(f"== fine-tune {label}")
            run_stages(run, ["finetune"])
            if counter is not None:
                counter["finetune"] = counter.get("finetune", 0) + 1
    finally:
        run.close()  # shared starts: another grid process may need this folder next
    return folder


def _as_recorded(cfg: RunConfig, folder: Path) -> RunConfig:
    """The config `folder` recorded when it computes the same fine-tune as `cfg`, else `cfg` (resuming
    compares whole configs; see `_recorded_if_same`)."""
    return _recorded_if_same(cfg, folder) or cfg


def _recorded_if_same(cfg: RunConfig, folder: Path) -> RunConfig | None:
    """The config a fine-tune folder recorded (stages.json) if it computes the same fine-tune as `cfg`.

    The same fine-tune means the same `finetune_digest`, the fields that change a fine-tune (the
    start compared by folder name). The rest of the config (selection, scoring, the defaults of later
    idprior versions: the proximal prior's became the defaults after most starts were trained) was
    reset to the defaults of the day it was written, so whole configs must not be compared."""
    try:
        recorded = config_from_saved(json.loads((folder / "stages.json").read_text())["config"])
    except (OSError, ValueError, KeyError, IdpriorError):
        return None

    def key(c: RunConfig) -> str:  # epochs: a grid's `1` is recorded and read back as 1.0
        c = dataclasses.replace(c, train=dataclasses.replace(c.train, epochs=float(c.train.epochs)))
        return finetune_digest(c, model_name=_comparable_dict(c)["model"]["name"])

    return recorded if key(recorded) == key(cfg) else None


def weights_sha256(folder: Path) -> str:
    """sha256 of a saved model's weights file (the shared-start check: every continuation of a
    (task, seed) records the start it loaded, and they must all be the same bytes)."""
    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_finetuned(cell: RunConfig, out: Path, counter: dict | None = None, *, grid: Grid | None = None,
                     start_only: bool = False) -> Path:
    """The fine-tuned folder a cell prunes; fine-tunes (or resumes) only what is missing.

    Unpaired grids: one fine-tune per variant from the pretrained model. Paired grids: the shared
    start of (task, seed), then this cell's continuation from it (`start_only`: the start itself)."""
    seed_dir = out / "finetune" / cell.data.task / f"seed{cell.seed}"
    if grid is None or not grid.paired:
        cfg, name = finetune_config(cell, out="pending")
        return _finetune_into(cfg, seed_dir / name, f"{cell.data.task} seed {cell.seed} {name}", counter)
    cfg, name = start_config(cell, out="pending")
    start = _finetune_into(cfg, existing_equivalent(seed_dir, name, cfg), f"{cell.data.task} seed {cell.seed} shared start", counter)
    if start_only:
        return start
    cfg, name = continuation_config(grid, cell, start)
    folder = _finetune_into(cfg, existing_equivalent(seed_dir, name, cfg), f"{cell.data.task} seed {cell.seed} {name} (from the start)",
                            counter)
    if not (folder / "start.json").is_file():
        io.write_json(folder / "start.json", {"start": os.path.relpath(start, folder),
                                              "sha256": weights_sha256(start / "finetuned")})
    return folder


def existing_equivalent(seed_dir: Path, name: str, cfg: RunConfig) -> Path:
    """The finished fine-tune folder of `seed_dir` that computes what `cfg` asks for, else `seed_dir/name`.

    The folder name's digest is only a cache key: a field added to idprior later changes it, and a
    paired grid that then trained a second start for a (task, seed) would pair later methods with a
    different model than its earlier rows. So when `name` is not there, a finished sibling of the same
    variant that computes the same fine-tune (`_recorded_if_same`) is used instead. Several such starts: the one
    most continuations were trained from (their `start.json`), then by name.
    """
    wanted = seed_dir / name
    if (wanted / "stages.json").is_file() or not seed_dir.is_dir():
        return wanted
    found = []
    for folder in sorted(seed_dir.glob(name.split("-", 1)[0] + "-*")):
        try:
            finished = "finetune" in json.loads((folder / "stages.json").read_text()).get("stages", {})
        except (OSError, ValueError):
            continue
        if finished and _recorded_if_same(cfg, folder) is not None:
            found.append(folder)
    if not found:
        return wanted
    uses = Counter(json.loads(p.read_text()).get("start", "") for p in seed_dir.glob("*/start.json"))
    return max(found, key=lambda f: (uses[f"../{f.name}"], f.name == name, f.name))


def _comparable_dict(cfg: RunConfig | dict) -> dict:
    """A config as a dict in which a continuation's model is just its start's folder name (saved
    configs hold the path relative to wherever the grid ran) and `out` is left out."""
    d = json.loads(json.dumps(cfg.to_dict() if isinstance(cfg, RunConfig) else cfg))
    model = Path(d.get("model", {}).get("name", ""))
    if model.name == "finetuned" and model.parent.name.startswith("start-"):
        d["model"]["name"] = model.parent.name
    d.pop("out", None)
    return d


def dense_metrics(ft_dir: Path, with_predictions: bool = False) -> dict:
    """{split: metrics} of a fine-tuned model, evaluated once and kept in its folder (every cell on
    this fine-tune reports the same dense numbers without re-evaluating them); its per-example
    outputs go to dense_predictions.safetensors beside them."""
    from ..pipeline.evaluate import evaluate_with_predictions, save_predictions
    from ..pipeline.stages import Run

    path = ft_dir / "dense_metrics.json"
    if path.is_file() and (not with_predictions or (ft_dir / "dense_predictions.safetensors").is_file()):
        return io.read_json(path)["metrics"]
    run = Run(load_run_config(ft_dir), resume=True)
    try:
        model, tok = run.load_model(str(ft_dir / "finetuned"))
        t0 = time.perf_counter()
        metrics, per = {}, {}
        for s in ["validation", *run.test_splits()]:
            metrics[s], per[f"dense.{s}"] = evaluate_with_predictions(model, run.task, run.loader(s, tok, train=False),
                                                                     f"dense {s}")
        save_predictions(ft_dir / "dense_predictions.safetensors", per)
        io.write_json(path, {"metrics": metrics, "wall_s": round(time.perf_counter() - t0, 2)})
    finally:
        run.close()  # a fine-tune folder is shared between grid processes
    return metrics


def _link_finetuned(cell_dir: Path, ft_dir: Path) -> None:
    link = cell_dir / "finetuned"
    if link.is_symlink() or link.exists():
        return
    os.symlink(os.path.relpath(ft_dir / "finetuned", cell_dir), link, target_is_directory=True)


def predictions_store(results: Path) -> Path:
    """Where a results JSONL keeps its cells' per-example predictions: one file, RESULTS_preds.safetensors,
    beside it (`paired.add_predictions`)."""
    return results.parent / f"{results.stem}_preds.safetensors"


def _keep_predictions(src: Path, results: Path | None, name: str) -> str | None:
    """Add a predictions file to the results' store under `name`; the row records "STORE#name"."""
    from .paired import add_predictions

    if results is None or not src.is_file():
        return None
    return add_predictions(predictions_store(results), name, src)


def _start_info(ft_dir: Path) -> dict:
    start = ft_dir / "start.json"
    if start.is_file():
        info = io.read_json(start)
        return {"start_sha256": info["sha256"], "start_dir": os.path.normpath(os.path.join(ft_dir.name, info["start"]))}
    return {}


def run_cell(grid: Grid, out: Path, task: str, seed: int, spec: MethodSpec, target: float,
             counter: dict | None = None, results: Path | None = None) -> dict:
    """Score/select/surgery/recover/evaluate one cell on its shared fine-tune; returns its JSONL row."""
    from ..pipeline.stages import Run, run_stages, stage_evaluate

    cell_dir = out / "cells" / task / f"seed{seed}" / spec.name / f"t{target:g}"
    cfg = cell_config(grid, task, seed, spec, target, out=str(cell_dir))
    ft_dir = ensure_finetuned(cfg, out, counter, grid=grid, start_only=spec.start == "start")
    # the fine-tune's variant, read before the cell's stages turn finetune_first off
    trained = variant_of(cfg)
    cfg = dataclasses.replace(cfg, prune=post_training(cfg.prune))
    run = Run(cfg, resume=True)
    _link_finetuned(cell_dir, ft_dir)
    dense = dense_metrics(ft_dir, with_predictions=grid.paired_rows)
    run_stages(run, CELL_STAGES, fns={"evaluate": lambda r: stage_evaluate(r, dense_metrics=dense)})
    if counter is not None:
        counter["cells"] = counter.get("cells", 0) + 1
    metrics = io.read_json(run.path("metrics.json"))
    ft_stages = io.read_json(ft_dir / "stages.json")["stages"]
    wall = {"finetune": ft_stages["finetune"]["wall_s"]} | {k: v["wall_s"] for k, v in run.status["stages"].items()}
    variant = "start" if grid.paired and spec.start == "start" else trained
    row = {"key": cell_key(task, seed, spec.name, target), "task": task, "seed": seed, "method": spec.name,
           "base_method": spec.method, "target": target, "variant": variant, "model": grid.model,
           "main_metric": metrics["main_metric"], "config": cfg.to_dict(), "versions": versions(),
           "wall_s": wall, "finetune_shared": True, "sizes": metrics["sizes"], "dense": metrics["dense"],
           "pruned_no_recovery": metrics["pruned_no_recovery"], "pruned": metrics["pruned"],
           "compression": metrics["compression"], "removed": metrics["plan"],
           "finetune_dir": os.path.relpath(ft_dir, out), "cell_dir": os.path.relpath(cell_dir, out),
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "protocol": grid.protocol,
           "steps": {"finetune": ft_stages["finetune"].get("steps", 0),
                     "recover": run.status["stages"].get("recover", {}).get("steps", 0)},
           "data_order": {"finetune": _log_digest(ft_dir / "train_log.jsonl"),
                          "recover": _log_digest(run.path("recover_log.jsonl"))},
           "sn_log": _sn_log_summary(ft_dir)}
    if grid.paired_rows:
        stem = f"{task}/seed{seed}"
        start = {"from": "pretrained"} if grid.protocol == "pretrained" else {"from": spec.start, **_start_info(ft_dir)}
        row |= {"paired": True, **start,
                "predictions": _keep_predictions(run.path("predictions.safetensors"), results,
                                                 f"{stem}/{spec.name}_t{target:g}"),
                "dense_predictions": _keep_predictions(ft_dir / "dense_predictions.safetensors", results,
                                                       f"{stem}/dense_{ft_dir.name}"),
                "prior_log": _prior_log_summary(ft_dir)}
    for heavy in ("surgery", "pruned"):  # keep scores/plan/metrics, drop the model copies (disk)
        shutil.rmtree(run.path(heavy), ignore_errors=True)
    return row


def post_training(p):
    """A cell's prune settings for its stages on the fine-tune it links (prune.finetune_first=false), with
    selection "auto" resolved as `idprior prune` resolves it after that fine-tune: "prior" when the
    fine-tune had the identity prior (`pipeline.resolve_selection`; with finetune_first=false the pipeline
    could no longer tell, and SNIP would be cut by the post-training rule instead)."""
    after_prior = p.selection == "auto" and prior_on(p)
    return dataclasses.replace(p, finetune_first=False, selection="prior" if after_prior else p.selection)


def _prior_log_summary(ft_dir: Path) -> dict | None:
    """First and last logged values of the fine-tune's prior terms (is the prior acting?)."""
    rows = _log_rows(ft_dir / "train_log.jsonl")
    keys = [k for k in (rows[0] if rows else {}) if k not in ("step", "lr", "batch") and not k.startswith("sn_")]
    if not rows or keys == ["task_loss"]:
        return None
    return {"steps": len(rows), "first": {k: rows[0][k] for k in keys}, "last": {k: rows[-1].get(k) for k in keys}}


def _log_rows(log: Path) -> list[dict]:
    """The rows of a training log (train_log.jsonl / recover_log.jsonl); [] when there is none."""
    if not log.is_file():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]


def _sn_log_summary(ft_dir: Path) -> dict | None:
    """Where spectral normalization bound during the fine-tune (`spectral.sn_stats`, logged per step):
    the fraction of SN matrices clipped at the last step, its mean and max over the steps, and sigma /
    bound (mean over matrices at the last step, max over matrices and steps); None without SN."""
    rows = [r for r in _log_rows(ft_dir / "train_log.jsonl") if "sn_ratio_max" in r]
    if not rows:
        return None
    clip = [r["sn_clip_frac"] for r in rows]
    return {"steps": len(rows), "clip_frac_last": clip[-1], "clip_frac_mean": sum(clip) / len(clip),
            "clip_frac_max": max(clip), "ratio_mean_last": rows[-1]["sn_ratio_mean"],
            "ratio_max": max(r["sn_ratio_max"] for r in rows)}


def _log_digest(log: Path) -> str | None:
    """A hash of the batches a training log says were seen, in order (`train.batch_digest` per step): equal
    for two runs exactly when they trained on the same data in the same order; None without a log."""
    rows = _log_rows(log)
    if not rows or any(r.get("batch") is None for r in rows):
        return None
    return hashlib.sha1(" ".join(r["batch"] for r in rows).encode()).hexdigest()[:12]


def run_dense(grid: Grid, out: Path, task: str, seed: int, counter: dict | None = None,
              results: Path | None = None) -> dict:
    """The "dense" row of (task, seed): the plain fine-tune (paired grids: the shared start), evaluated
    on validation and test."""
    from ..pipeline.metrics import main_metric
    from ..pipeline.stages import Run, compression

    cfg = cell_config(grid, task, seed, MethodSpec("dense", "snip-no-sn-no-prior"), 0.5, out="pending")
    ft_dir = ensure_finetuned(cfg, out, counter, grid=grid, start_only=True)
    scores = dense_metrics(ft_dir, with_predictions=grid.paired_rows)
    run = Run(io_config(ft_dir), resume=True)
    model = run.load_model(str(ft_dir / "finetuned"))[0]
    run.close()  # the start is shared between grid processes; only its config and data are read below
    if counter is not None:
        counter["dense"] = counter.get("dense", 0) + 1
    wall = {"finetune": io.read_json(ft_dir / "stages.json")["stages"]["finetune"]["wall_s"],
            "evaluate": io.read_json(ft_dir / "dense_metrics.json")["wall_s"]}
    row = {"key": cell_key(task, seed, "dense", 0.0), "task": task, "seed": seed, "method": "dense",
           "base_method": "dense", "target": 0.0, "variant": "start" if grid.paired else "plain", "model": grid.model,
           "main_metric": main_metric(run.task), "config": run.cfg.to_dict(), "versions": versions(),
           "wall_s": wall, "finetune_shared": True, "sizes": run.data.sizes(), "dense": scores,
           "pruned_no_recovery": scores, "pruned": scores, "compression": compression(model, model, cfg.prune.flops_seq_len),
           "removed": {}, "finetune_dir": os.path.relpath(ft_dir, out), "cell_dir": None,
           "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "protocol": grid.protocol}
    if grid.paired_rows:
        row |= {"paired": True, "dense_predictions": _keep_predictions(
            ft_dir / "dense_predictions.safetensors", results, f"{task}/seed{seed}/dense_{ft_dir.name}")}
    return row


def io_config(ft_dir: Path) -> RunConfig:
    """The config a fine-tune folder was made with (by any idprior version)."""
    return load_run_config(ft_dir)


def run_grid(grid: Grid, out: str | os.PathLike, *, results: str | os.PathLike | None = None,
             resume: bool = True, deadline: float | None = None, tasks: list[str] | None = None,
             targets: list[float] | None = None, seeds: list[int] | None = None,
             shard: tuple[int, int] = (0, 1)) -> dict:
    """Run every unfinished cell in order; returns counters {"cells", "dense", "finetune", "skipped"}.

    `results` defaults to OUT/results.jsonl. `deadline` (a time.time() value): start no new cell
    after it, so a sweep can be sized to a wall-clock budget and continued later with resume.
    `tasks`: run only the cells of these tasks (a slice of the grid; the rest stays for later).
    `targets`: run only the cells of these targets (paired grids run the primary target first; this
    reaches the others sooner). The dense row of a (task, seed) belongs to the primary target.
    `seeds`: run only the cells of these seeds (splits one task's seeds between processes, which
    `shard` cannot do when the processes outnumber the tasks left).
    `shard` (i, n): run only the (seed, task) pairs whose index is i mod n, so n processes (one
    thread each, say) can share a machine and one results file; a fine-tune is never shared
    between shards, because every cell of a (seed, task) pair belongs to the same shard.
    """
    out = Path(out)
    results = Path(results) if results else out / "results.jsonl"
    if not resume and results.is_file() and results.stat().st_size:
        raise IdpriorError(f"{results} already holds results; pass --resume to continue the sweep, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / "grid.yaml", yaml.safe_dump(grid.to_dict(), sort_keys=False))
    done = finished_keys(results)
    counter = {"cells": 0, "dense": 0, "finetune": 0, "skipped": 0}
    unknown = sorted(set(tasks or []) - set(grid.tasks))
    if unknown:
        raise IdpriorError(f"--tasks {', '.join(unknown)}: not in the grid's tasks ({', '.join(grid.tasks)})")
    odd = [t for t in targets or [] if t not in grid.targets]
    if odd:
        raise IdpriorError(f"--targets {', '.join(map(str, odd))}: not in the grid's targets "
                           f"({', '.join(map(str, grid.targets))})")
    odd_seeds = [s for s in seeds or [] if s not in grid.seeds]
    if odd_seeds:
        raise IdpriorError(f"--seeds {', '.join(map(str, odd_seeds))}: not in the grid's seeds "
                           f"({', '.join(map(str, grid.seeds))})")
    index, n_shards = shard
    if not (n_shards >= 1 and 0 <= index < n_shards):
        raise IdpriorError(f"--shard {index}/{n_shards}: use I/N with 0 <= I < N, e.g. --shard 0/2 and --shard 1/2")
    pair_index = {(seed, task): i for i, (seed, task) in enumerate((s, t) for s in grid.seeds for t in grid.tasks)}
    for seed, task, target, spec in cells(grid):
        if (tasks and task not in tasks) or (seeds and seed not in seeds) or pair_index[(seed, task)] % n_shards != index:
            continue
        if targets and (target if spec else grid.targets[0]) not in targets:
            continue
        key = cell_key(task, seed, spec.name if spec else "dense", target)
        if key in done:
            counter["skipped"] += 1
            continue
        if deadline is not None and time.time() > deadline:
            print(f"deadline reached; stopping before {key} (rerun with --resume to continue)")
            counter["stopped_at"] = key
            break
        print(f"=== cell {key}")
        row = (run_dense(grid, out, task, seed, counter, results) if spec is None
               else run_cell(grid, out, task, seed, spec, target, counter, results))
        append_row(results, row)
        done.add(key)
        stale = rebuilt_finetune_rows(results, row)
        if stale:
            print(f"warning: {key} was cut from {row['finetune_dir']} as rebuilt now, but {', '.join(stale)} were cut "
                  f"from an earlier copy with other dense scores (a fine-tune rebuilt on another machine is not the "
                  f"same bytes): delete those rows from {results} and rerun with --resume to pair them again")
    return counter


def rebuilt_finetune_rows(results: str | os.PathLike, row: dict) -> list[str]:
    """Keys of earlier rows that cite `row`'s fine-tune folder but report other dense scores: they were cut
    from a copy of it that has since been lost and rebuilt, so they no longer pair with `row`."""
    if not row.get("finetune_dir") or row.get("dense") is None:
        return []
    mine = json.dumps(row["dense"], sort_keys=True)
    out = []
    for line in Path(results).read_text(encoding="utf-8").splitlines():
        try:
            other = json.loads(line)
        except ValueError:
            continue
        if (isinstance(other, dict) and other.get("key") != row["key"] and other.get("task") == row["task"]
                and other.get("seed") == row["seed"] and other.get("finetune_dir") == row["finetune_dir"]
                and json.dumps(other.get("dense"), sort_keys=True) != mine):
            out.append(other["key"])
    return out
