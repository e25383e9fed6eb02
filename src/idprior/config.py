"""Typed configuration: dataclasses, YAML presets, dotted overrides, validation of every field at once.

A run is described by one `RunConfig`. It is built from (lowest to highest priority) the
dataclass defaults, a YAML preset (a name of the presets shipped in the package, `idprior/presets/`,
which `configs/` links to, or any YAML path), and dotted overrides such as `train.lr=3e-5` (what the
CLI flags turn into). `validate()` reports every bad field in one `ConfigError` so a user fixes a
config in one go, before any work starts.

Prune fields left at None take the measured recipe of the model's family and mode (`recipe_for`), which
the stages resolve once the model is loaded. Run folders record `CONFIG_VERSION`; a folder written by an
earlier idprior is refused by `--resume` with a one-line error (CHANGELOG.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError, IdpriorError
from .method.units import KINDS

if typing.TYPE_CHECKING:
    from importlib.abc import Traversable

Measure = Literal["encoder_params", "linear_params", "flops"]
Selection = Literal["auto", "norm", "share", "prior"]
ScoreMode = Literal["absolute", "residual"]
Compensation = Literal["auto", "none", "bias", "lsq"]
DType = Literal["float32", "bfloat16", "float16"]
ProblemType = Literal["classification", "regression"]
MEASURES = typing.get_args(Measure)
SELECTIONS = typing.get_args(Selection)
DTYPES = typing.get_args(DType)
COMPENSATIONS = typing.get_args(Compensation)
SCORES = typing.get_args(ScoreMode)
ALL_LINEAR = "all-linear"  # lora.targets: every linear layer of the Transformer body

# Options a study did not adopt, removed in run format 2 (docs/history.md): named, not guessed at, when given.
RETIRED = {f"prune.{k}" for k in ("prior_mode", "prior_lambda", "prior_weight", "prior_warmup", "sn_out_scale",
                                  "prior_metric", "prior_scale", "prior_freeze", "prior_ramp", "prior_lambda0",
                                  "prior_gain", "norm_positions", "compensate_ridge", "recover_epochs", "train")}

# The format of a run folder's recorded config (stages.json "version"): folders of another version do not resume.
CONFIG_VERSION = 2

# SNIP's measured settings for a prune field left at None, when the model family's recipe does not set it
# (`recipe_for`); chosen on validation of the paired grid (docs/results.md, docs/history.md).
RECIPE = {"score": "absolute", "norm_after_ln": False, "prior_gamma": 3.0, "prior_debias": False, "min_keep": 0.0}


@dataclass
class ModelConfig:
    name: str = "minilm-l6"  # alias, local HF folder, or local .gguf file
    dtype: DType = "float32"
    per_query_head: bool = False  # GQA: prune query-head slots uniformly instead of KV groups
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    task: str = "rt-polarity"
    data_dir: str | None = None  # GLUE folder in the official TSV layout
    train_file: str | None = None  # user CSV/TSV/JSONL (task "custom")
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_train: int | None = None  # subset the training split (seeded) for quick runs
    max_eval: int | None = None
    max_validation: int | None = None  # validation only (default: max_eval); test keeps max_eval
    max_length: int = 128  # tokens per example (classification) / block size (LM)
    problem_type: ProblemType | None = None  # task "custom": "classification" or "regression"; None infers it
    # LM tasks: also classify this task's test split zero-shot by label-word likelihood (zeroshot.py),
    # dense vs pruned, e.g. "rt-polarity"; max_zero_shot caps the examples (a fixed subset).
    zero_shot: str | None = None
    max_zero_shot: int | None = None


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    checkpoint_every: int = 200  # steps between mid-epoch checkpoints (0: only at epoch ends)
    eval_each_epoch: bool = True


@dataclass
class PruneConfig:
    method: str = "snip"
    target: float = 0.5  # fraction of `measure` to remove
    measure: Measure = "encoder_params"
    flops_seq_len: int = 128
    tau: float | None = None  # raw function-norm threshold instead of a target
    kinds: str = "head,neuron"
    # "auto": "prior" after the prior phase (the units it brought to the identity go first; chosen on validation,
    # docs/results.md); otherwise the model family's default (its adapter's `default_selection`): for encoders
    # "share" with head_share 0.3, for decoders "norm".
    selection: Selection = "auto"
    head_share: float | None = None  # selection "share": fraction of the budget taken from heads
    # Fields left at None take the measured recipe of the model family and mode (`recipe_for`: `RECIPE`, then the
    # adapter's `recipe`), so `idprior prune` with defaults only runs what was measured for that kind of model.
    # "absolute": the branch's own norm; "residual": divided by the RMS of the residual stream it writes into
    # (pre-LN decoders: the FFN's is the layer input plus the attention output)
    score: ScoreMode | None = None
    # True: branches measured through the next norm (post-LN: the LayerNorm they join, diag(γ) C W; pre-LN:
    # the next sub-layer's pre-norm, diag(γ) W; scaled by that norm's mean 1/σ), so layers are compared on
    # the scale the next layer sees; scoring and the prior
    norm_after_ln: bool | None = None
    calib_size: int = 512
    # The fine-tune's SN and identity prior (`training_of`). SN: off unless asked for (it measured inert: issue 32).
    # Prior: None is the method's own (SNIP trains with it, every baseline plainly, as published); true/false
    # asks for it explicitly (for SNIP false is the ablation)
    sn: bool = False
    sn_bound: str = "init"  # "init" (each matrix's own sigma at load) or a float
    prior: bool | None = None
    # The identity prior (proximal.py): a soft-threshold of each unit's function norm after every optimizer
    # step, its strength driven so that the target fraction of `measure` reaches the identity on a schedule.
    prior_gamma: float | None = None  # reweighting exponent (larger: small units pulled harder; 0: plain)
    prior_head_share: float | None = 0.15  # share of the target taken by heads (None: free)
    prior_debias: bool | None = None  # give the survivors back the prior's shrinkage once the target is reached
    finetune_first: bool = True  # fine-tune first; False: post-training mode (score and cut the model as given)
    iterative: int = 1
    distill: bool = False  # distil from the unpruned model during recovery
    # distil from the model the fine-tune starts from, during the fine-tune (SN + prior phase): only for a
    # start already tuned on the task (a paired grid's shared start, a user's fine-tuned classifier)
    finetune_distill: bool = False
    distill_alpha: float = 0.5
    distill_temperature: float = 2.0
    # After surgery, from calibration activations of the unpruned model (compensate.py): "bias" adds the
    # removed channels' mean output to the output projection's bias (FLAP), "lsq" re-fits the kept
    # columns by ridge regression; "auto": the method's own (bias for flap and wanda-sp; SNIP's recipe).
    compensate: Compensation = "auto"
    min_keep: float | None = None  # fraction of each layer's head units and of its neurons that always stays
    protect_first: int = 0  # the first N layers are never pruned
    protect_last: int = 0  # the last N layers are never pruned


@dataclass
class LoraConfig:
    """Recovery with LoRA adapters instead of full fine-tuning (`pipeline/lora.py`, `--recover lora`): only the
    adapters train, which fits a large decoder in far less memory; they are merged into the weights before
    pruned/ is saved, so the result is a plain pruned model."""

    enabled: bool = False
    rank: int = 16
    alpha: float = 32.0  # the adapter's update is scaled by alpha / rank
    dropout: float = 0.0
    # "all-linear": every linear layer of the Transformer body (the task head is left out, as peft's all-linear
    # leaves out the LM head); or a comma list of module names (q_proj,v_proj), matched like peft's target_modules
    targets: str = ALL_LINEAR


@dataclass
class BenchConfig:
    enabled: bool = True
    batch_sizes: list[int] = field(default_factory=lambda: [32])
    seq_lens: list[int] = field(default_factory=lambda: [128])
    repeats: int = 5
    warmup: int = 2
    onnx: bool = True
    threads: int | None = None
    # noise guard (bench.NoiseGuard): a shape whose repeats are too spread is timed again, up to
    # retime_rounds more rounds, and marked NOISY in bench.md / report.md if it stays so
    max_iqr_fraction: float = 0.10  # a model's IQR / median above this is too spread
    max_speedup_gap: float = 0.08  # |speed-up from the fastest repeats / from the medians - 1| above this too
    retime_rounds: int = 2
    # time in this many fresh processes, one after another, and report the median over them (bench.py
    # docstring: a whole process can run slow, which no in-process check sees); 1 times in the run's process
    processes: int = 1


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recover: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0))  # after surgery
    lora: LoraConfig = field(default_factory=LoraConfig)  # how recovery trains: full (default) or LoRA adapters
    prune: PruneConfig = field(default_factory=PruneConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    seed: int = 0
    out: str = "runs/default"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- building -----------------------------------------------------------------------------------

def presets_dir() -> Traversable:
    """The presets shipped as package data (`configs/` of a source checkout links here), so an
    installed idprior has them too."""
    return resources.files("idprior").joinpath("presets")


def list_presets() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in presets_dir().iterdir() if p.name.endswith(".yaml"))


def resolve_preset(name_or_path: str) -> Path | Traversable:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if p.is_dir():
            raise IdpriorError(f"config file {name_or_path} is a folder; give a YAML file or one of: {', '.join(list_presets())}")
        if not p.is_file():
            raise IdpriorError(f"config file {name_or_path} not found; give a YAML path or one of: {', '.join(list_presets())}")
        return p
    cand = presets_dir().joinpath(f"{name_or_path}.yaml")
    if not cand.is_file():
        close = difflib.get_close_matches(name_or_path, list_presets(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IdpriorError(f"unknown preset {name_or_path!r}{hint}; presets: {', '.join(list_presets())}")
    return cand


def load_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Defaults <- preset YAML <- overrides; raises ConfigError listing every bad field."""
    raw: dict = {}
    problems: list[str] = []
    if preset:
        path = resolve_preset(preset)
        raw = _read_yaml(path)
    if isinstance(overrides, dict):
        overrides = [f"{k}={v}" for k, v in overrides.items()]
    given: dict = {}
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"override {item!r}: write key=value, e.g. train.lr=3e-5")
            continue
        key, value = item.split("=", 1)
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as e:
            problems.append(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote it, "
                            "e.g. key='value'")
            continue
        _set_dotted(given, key.strip(), parsed)
    _merge_raw(raw, given)
    return _build(raw, problems)


def load_run_config(path: str | Path) -> RunConfig:
    """The config of a run folder (the folder or its config.yaml)."""
    path = Path(path)
    return config_from_saved(_read_yaml(path / "config.yaml" if path.is_dir() else path))


def config_from_saved(saved: dict) -> RunConfig:
    """A RunConfig from a config dict recorded in a run folder (config.yaml, stages.json)."""
    saved = {k: v for k, v in saved.items() if k != "data_files"}
    return _build(saved, [])


# Path fields: a leading "~" is expanded once, here, so that every stage (and --resume) sees the same path
PATH_FIELDS = (("model", "name"), ("data", "data_dir"), ("data", "train_file"), ("data", "validation_file"),
               ("data", "test_file"), (None, "out"))


def _build(raw: dict, problems: list[str]) -> RunConfig:
    cfg = RunConfig()
    _merge(cfg, raw, "", problems)
    for section, name in PATH_FIELDS:
        obj = getattr(cfg, section) if section else cfg
        value = getattr(obj, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(obj, name, os.path.expanduser(value))
    problems += validate(cfg, raise_=False)
    if problems:
        raise ConfigError(problems)
    return cfg


def training_of(p: PruneConfig) -> tuple[bool, bool]:
    """(SN, identity prior) of the fine-tune these prune settings run: what the user set, else the method's
    own: SNIP fine-tunes with the prior, a baseline plainly, as it was published (a baseline trained under
    SNIP's prior would choose among units the prior already zeroed: SNIP against itself). SN only when asked
    for (`prune.sn`, `--sn`): at our learning rates no weight's spectral norm moved more than 1% from its
    pretrained value, so the bound barely acted, and SNIP with and without it measured the same (issue 32)."""
    return p.sn, (p.method == "snip" if p.prior is None else bool(p.prior))


def training_name(p: PruneConfig) -> str:
    """The fine-tune in words, for reports and logs."""
    sn, prior = training_of(p)
    if not p.finetune_first:
        return "none (post-training: the model as given)"
    parts = (["spectral normalization"] if sn else []) + (["the identity prior"] if prior_active(p) else [])
    return "with " + " and ".join(parts) if parts else "plain (no SN, no identity prior)"


def recovery_name(cfg: RunConfig) -> str:
    """The recovery after the cut in words, for reports and logs (metrics.json "recovery")."""
    if cfg.recover.epochs == 0:
        return "none (recover.epochs 0)"
    lo = cfg.lora
    how = (f"LoRA r={lo.rank}, alpha {lo.alpha:g}, dropout {lo.dropout:g}, on {lo.targets} (merged before saving)"
           if lo.enabled else "full fine-tuning")
    return how + (", distilled from the unpruned model" if cfg.prune.distill else "")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a
    second `prune:` section would drop every setting of the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (line {key_node.start_mark.line + 1}), and only the last "
                    "would be read: merge them into one", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def read_yaml_text(path) -> Any:
    """The YAML document in the file `path` (UTF-8), keys unique in every mapping; IdpriorError naming the
    file for unreadable text, bad YAML or a repeated key."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise IdpriorError(f"{path} is not UTF-8 text (byte {e.start}: 0x{e.object[e.start]:02x}): save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.constructor.ConstructorError as e:
        if e.problem and "given twice" in e.problem:
            raise IdpriorError(f"{path}: {e.problem}") from None
        raise IdpriorError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise IdpriorError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _read_yaml(path) -> dict:
    raw = read_yaml_text(path) or {}
    if not isinstance(raw, dict):
        raise IdpriorError(f"{path} must hold a mapping of sections (model:, data:, train:, ...)")
    return raw


def _merge_raw(base: dict, top: dict) -> None:
    """`top` over `base`, section by section. A section the file gives as a scalar (`bench: 3`) stays, so
    validation reports it, instead of being replaced by the overrides of one of its keys without a word."""
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge_raw(base[key], value)
        elif not (isinstance(value, dict) and base.get(key) is not None and not isinstance(base[key], dict)):
            base[key] = value


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            return
    node[parts[-1]] = value


def _merge(obj: Any, raw: dict, prefix: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names and dotted in RETIRED:
            problems.append(f"{dotted} was retired in this version (its study is in docs/history.md, the change in "
                            "CHANGELOG.md): remove it")
            continue
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f"; valid keys: {', '.join(sorted(names))}"
            problems.append(f"unknown config key {dotted!r}{hint}")
            continue
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                problems.append(f"{dotted} must be a section (mapping), got {value!r}")
            else:
                _merge(current, value, dotted + ".", problems)
            continue
        ok, converted = _coerce(value, hints[key])
        if ok:
            setattr(obj, key, converted)
        else:
            problems.append(f"{dotted} must be {_type_name(hints[key])}, got {value!r}")


_FAIL = (False, None)


def _coerce(value: Any, tp: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field type `tp`): YAML scalars as users write them, nothing lossy."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:  # a string here; `validate` checks the choice (one message per field, CLI names too)
        return (True, value) if isinstance(value, str) else _FAIL
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None
        return next((r for a in args if a is not type(None) and (r := _coerce(value, a))[0]), _FAIL)
    if origin is list:
        return _coerce_list(value, args[0])
    scalar = _SCALARS.get(tp)
    return scalar(value) if scalar is not None else (True, value)


def _coerce_list(value: Any, item: Any) -> tuple[bool, Any]:
    """A list of `item`; a lone scalar is a list of one."""
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        return _FAIL
    converted = [_coerce(v, item) for v in value]
    return (True, [c for _, c in converted]) if all(ok for ok, _ in converted) else _FAIL


def _to_int(value: Any) -> tuple[bool, Any]:
    if isinstance(value, int) and not isinstance(value, bool):
        return True, value
    if isinstance(value, float) and value.is_integer():
        return True, int(value)
    return _FAIL


def _to_float(value: Any) -> tuple[bool, Any]:
    if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            return True, float(value)
        except ValueError:
            return _FAIL
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _FAIL
    return True, float(value)


def _to_str(value: Any) -> tuple[bool, Any]:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return True, str(value)
    return _FAIL


_SCALARS = {bool: lambda v: (True, v) if isinstance(v, bool) else _FAIL, int: _to_int, float: _to_float,
            str: _to_str}


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(typing.get_args(tp))
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args:
        return " or ".join(_type_name(a) for a in args) + (" or null" if type(None) in typing.get_args(tp) else "")
    return getattr(tp, "__name__", str(tp))


# ---- validation ---------------------------------------------------------------------------------

def _validate_training(cfg: RunConfig, need) -> None:
    """train: and recover: sections."""
    for sec in ("train", "recover"):
        t: TrainConfig = getattr(cfg, sec)
        need(t.epochs >= 0 and math.isfinite(t.epochs), f"{sec}.epochs must be >= 0, got {t.epochs}")
        need(t.batch_size >= 1, f"{sec}.batch_size must be >= 1, got {t.batch_size}")
        need(t.eval_batch_size >= 1, f"{sec}.eval_batch_size must be >= 1, got {t.eval_batch_size}")
        need(t.lr > 0 and math.isfinite(t.lr), f"{sec}.lr must be > 0, got {t.lr}")
        need(t.weight_decay >= 0, f"{sec}.weight_decay must be >= 0, got {t.weight_decay}")
        need(0 <= t.warmup_ratio < 1, f"{sec}.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        need(t.max_grad_norm >= 0, f"{sec}.max_grad_norm must be >= 0 (0 disables clipping), got {t.max_grad_norm}")
        need(t.checkpoint_every >= 0, f"{sec}.checkpoint_every must be >= 0, got {t.checkpoint_every}")


def _validate_data(d: DataConfig, need) -> None:
    """data: section (zero-shot fields included)."""
    need(d.max_length >= 8, f"data.max_length must be >= 8, got {d.max_length}")
    need(d.max_train is None or d.max_train >= 1, f"data.max_train must be >= 1, got {d.max_train}")
    need(d.max_eval is None or d.max_eval >= 1, f"data.max_eval must be >= 1, got {d.max_eval}")
    need(d.max_validation is None or d.max_validation >= 1, f"data.max_validation must be >= 1, got {d.max_validation}")
    if d.task == "custom":  # the columns default to "text" and "label"
        need(d.train_file is not None, "task 'custom' needs a training file: pass --data FILE (CSV/TSV/JSONL; "
             "data.train_file in a config)")
    for flag, key, value in (("--data", "train_file", d.train_file), ("--data-validation", "validation_file",
                             d.validation_file), ("--data-test", "test_file", d.test_file),
                             ("--data-dir", "data_dir", d.data_dir)):
        need(value is None or bool(str(value).strip()), f"{flag} (data.{key}) is empty: give a path, or leave it out")
    need(d.problem_type is None or d.problem_type in typing.get_args(ProblemType),
         f"--problem-type (data.problem_type) must be classification or regression, got {d.problem_type!r}")
    from .pipeline.zeroshot import SPECS

    need(d.zero_shot is None or d.zero_shot in SPECS,
         f"data.zero_shot must be one of {', '.join(SPECS)} (or null), got {d.zero_shot!r}")
    need(d.max_zero_shot is None or d.max_zero_shot >= 1, f"data.max_zero_shot must be >= 1, got {d.max_zero_shot}")
    if d.zero_shot is not None:  # a classification task is already scored on its own labels
        need(_task_kind(d.task) in ("lm", None), f"--zero-shot (data.zero_shot) classifies with a language model's "
             f"next-token likelihoods, and task {d.task!r} is not a language-model task (lm-rt, lm-20ng, ...); drop it")


def _task_kind(task: str) -> str | None:
    """The kind of a built-in task (classification, regression, lm); user files are never "lm"; None when
    the name is unknown (the data check reports that)."""
    from .data.tasks import CUSTOM, get_task

    if task.strip().lower() == CUSTOM:
        return "classification"
    try:
        return get_task(task).kind
    except IdpriorError:
        return None


def _validate_prune(pr: PruneConfig, need) -> None:
    """prune: section."""
    need(0 < pr.target < 1, f"prune.target must be in (0, 1) (a fraction to remove), got {pr.target}")
    need(pr.measure in MEASURES, f"prune.measure must be one of {', '.join(MEASURES)}, got {pr.measure!r}")
    need(pr.flops_seq_len >= 1, f"prune.flops_seq_len must be >= 1, got {pr.flops_seq_len}")
    need(pr.tau is None or pr.tau >= 0, f"prune.tau must be >= 0, got {pr.tau}")
    kinds = [k.strip() for k in pr.kinds.split(",") if k.strip()]
    need(bool(kinds) and all(k in KINDS for k in kinds), f"prune.kinds must be a comma list of {', '.join(KINDS)}, got {pr.kinds!r}")
    need(pr.selection in SELECTIONS, f"prune.selection must be one of {', '.join(SELECTIONS)}, got {pr.selection!r}")
    need(pr.head_share is None or 0 <= pr.head_share <= 1, f"prune.head_share must be in [0, 1], got {pr.head_share}")
    need(pr.selection != "share" or pr.head_share is not None, "prune.selection 'share' needs prune.head_share (e.g. 0.3)")
    need(pr.score is None or pr.score in SCORES, f"prune.score must be one of {', '.join(SCORES)}, got {pr.score!r}")
    need(pr.calib_size >= 1, f"prune.calib_size must be >= 1, got {pr.calib_size}")
    if pr.sn_bound != "init":
        try:
            need(float(pr.sn_bound) > 0, f"prune.sn_bound must be 'init' or a positive number, got {pr.sn_bound!r}")
        except ValueError:
            need(False, f"prune.sn_bound must be 'init' or a positive number, got {pr.sn_bound!r}")
    need(pr.prior_gamma is None or 0 <= pr.prior_gamma <= 4, f"prune.prior_gamma must be in [0, 4], got {pr.prior_gamma}")
    need(pr.prior_head_share is None or 0 <= pr.prior_head_share <= 1,
         f"prune.prior_head_share must be in [0, 1], got {pr.prior_head_share}")
    need(pr.iterative >= 1, f"prune.iterative must be >= 1, got {pr.iterative}")
    need(0 <= pr.distill_alpha <= 1, f"prune.distill_alpha must be in [0, 1], got {pr.distill_alpha}")
    need(pr.distill_temperature > 0, f"prune.distill_temperature must be > 0, got {pr.distill_temperature}")
    need(not pr.finetune_distill or pr.finetune_first,
         "prune.finetune_distill needs prune.finetune_first=true (it distils during the fine-tune); drop one of them")
    need(pr.compensate in COMPENSATIONS, f"prune.compensate must be one of {', '.join(COMPENSATIONS)}, got {pr.compensate!r}")
    need(pr.min_keep is None or 0 <= pr.min_keep < 1, f"prune.min_keep must be in [0, 1), got {pr.min_keep}")
    need(pr.protect_first >= 0, f"prune.protect_first must be >= 0, got {pr.protect_first}")
    need(pr.protect_last >= 0, f"prune.protect_last must be >= 0, got {pr.protect_last}")


_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)*")


def _validate_lora(cfg: RunConfig, need) -> None:
    """lora: section, and LoRA recovery against the recover: section."""
    lo = cfg.lora
    need(lo.rank >= 1, f"lora.rank (--lora-rank) must be >= 1, got {lo.rank}")
    need(lo.alpha > 0 and math.isfinite(lo.alpha), f"lora.alpha must be > 0, got {lo.alpha}")
    need(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}")
    names = [t.strip() for t in lo.targets.split(",")]
    need(lo.targets.strip() == ALL_LINEAR or (all(names) and all(_MODULE_NAME.fullmatch(t) for t in names)),
         f"lora.targets (--lora-targets) must be {ALL_LINEAR} or a comma list of module names (q_proj,v_proj), "
         f"got {lo.targets!r}")
    need(not lo.enabled or cfg.recover.epochs > 0,
         "--recover lora (lora.enabled) trains adapters during recovery, and recover.epochs is 0, so there is "
         "nothing to train; give --recover-epochs N or drop --recover lora")


def validate(cfg: RunConfig, raise_: bool = True) -> list[str]:
    """Check ranges and choices of every field; return (or raise) one line per problem, all at once."""
    p: list[str] = []

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(cfg.model.dtype in DTYPES, f"model.dtype must be one of {', '.join(DTYPES)}, got {cfg.model.dtype!r}")
    need(bool(str(cfg.model.name).strip()), "--model (model.name) is empty: give a model folder, a .gguf file or an alias")
    _validate_training(cfg, need)
    _validate_data(cfg.data, need)
    _validate_prune(cfg.prune, need)
    _validate_lora(cfg, need)
    need(not cfg.prune.distill or cfg.recover.epochs > 0,
         "--distill (prune.distill) distils during recovery, and recover.epochs is 0; give --recover-epochs or drop --distill")
    p += _bench_problems(cfg.bench)
    need(bool(str(cfg.out).strip()), "out must be a folder path")
    need(0 <= cfg.seed < 2**32, f"seed must be in [0, 2**32 - 1] (NumPy's range), got {cfg.seed}")
    if p and raise_:
        raise ConfigError(p)
    return p


def _bench_problems(b: BenchConfig) -> list[str]:
    """The bench section's part of `validate` (kept apart so that validate stays short)."""
    checks = [
        (all(x >= 1 for x in b.batch_sizes) and bool(b.batch_sizes), f"bench.batch_sizes must be positive integers, got {b.batch_sizes}"),
        (all(x >= 1 for x in b.seq_lens) and bool(b.seq_lens), f"bench.seq_lens must be positive integers, got {b.seq_lens}"),
        (b.repeats >= 1, f"bench.repeats must be >= 1, got {b.repeats}"),
        (b.warmup >= 0, f"bench.warmup must be >= 0, got {b.warmup}"),
        (b.threads is None or b.threads >= 1, f"bench.threads must be >= 1, got {b.threads}"),
        (b.max_iqr_fraction > 0, f"bench.max_iqr_fraction must be > 0, got {b.max_iqr_fraction}"),
        (b.max_speedup_gap > 0, f"bench.max_speedup_gap must be > 0, got {b.max_speedup_gap}"),
        (b.retime_rounds >= 0, f"bench.retime_rounds must be >= 0, got {b.retime_rounds}"),
        (b.processes >= 1, f"bench.processes must be >= 1, got {b.processes}"),
    ]
    return [msg for ok, msg in checks if not ok]


def prune_config(base: PruneConfig | None = None, **options: Any) -> PruneConfig:
    """A copy of `base` (default: `PruneConfig()`, read now) with `options` set, converted and
    checked as a loaded config's prune: section is, for APIs that take the prune settings as
    keywords (`hf.SnipTrainer`); raises ConfigError, one line naming every bad option."""
    cfg = dataclasses.replace(base if base is not None else PruneConfig())
    problems: list[str] = []
    _merge(cfg, options, "prune.", problems)
    _validate_prune(cfg, lambda ok, msg: ok or problems.append(msg))
    if problems:
        raise ConfigError(problems)
    return cfg


def prior_active(p: PruneConfig) -> bool:
    """Whether a fine-tune with these prune settings applies the identity prior."""
    return bool(p.finetune_first and training_of(p)[1])


def proximal_phase(p: PruneConfig) -> bool:
    """Whether the model is fine-tuned with the identity prior before scoring (selection "auto" then means
    "prior"). The same as `prior_active`; named for what selection asks."""
    return prior_active(p)


def recipe_for(p: PruneConfig, family: dict | None = None) -> PruneConfig:
    """`p` with every field left at None set: SNIP's from the model family's measured recipe for the mode
    (`family`: the adapter's `recipe`, {"finetune": {...}, "posttrain": {...}}), then `RECIPE`; SN and the prior
    by `training_of`. A baseline runs as published: only `RECIPE` (its min_keep 0). A copy."""
    mode = "finetune" if p.finetune_first else "posttrain"
    own = (family or {}).get(mode, {}) if p.method == "snip" else {}
    filled = {k: own.get(k, RECIPE[k]) for k in RECIPE if getattr(p, k) is None}
    if p.compensate == "auto" and p.method == "snip":  # resolved once, so that a later resolution in another mode
        filled["compensate"] = own.get("compensate", "none")  # (a grid cell's post-training run) keeps it
    out = dataclasses.replace(p, **filled)
    sn, prior = training_of(out)
    return dataclasses.replace(out, sn=sn, prior=prior)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def resume_key(cfg: RunConfig) -> dict:
    """The config as a run folder records it (stages.json) for `--resume` to compare: everything
    but the benchmark settings, which may change between a run and its resumption."""
    d = cfg.to_dict()
    d.pop("bench", None)
    files = data_fingerprint(cfg.data)
    if files:  # the files' contents, not just their names: a file edited between a run and --resume is another run
        d["data_files"] = files
    return d


def data_fingerprint(d: DataConfig) -> dict[str, str]:
    """{role: sha256 of the file} for the user data files a run reads (a missing file is left to the data check)."""
    import hashlib

    out = {}
    for role, path in (("train", d.train_file), ("validation", d.validation_file), ("test", d.test_file)):
        if path and Path(path).expanduser().is_file():
            h = hashlib.sha256()
            with open(Path(path).expanduser(), "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[role] = h.hexdigest()
    return out


# The prune fields the identity prior reads (`proximal.ProximalPrior.from_config`), besides kinds.
PRIOR_OPTIONS = ("target", "measure", "flops_seq_len", "prior_gamma", "prior_head_share", "prior_debias",
                 "norm_after_ln", "min_keep")


def config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (`out` may change: a run folder can be moved)."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if not (prefix == "" and k in ("out", "bench"))]
    out = []
    for k in keys:
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def resume_differences(saved: dict, cfg: RunConfig) -> list[str]:
    """What `cfg` changes against the resume key a run folder was started with (`--resume` refuses a run
    folder when this is not empty). A data file that is gone is not a difference: the data check names it."""
    d = cfg.data
    gone = {role for role, path in (("train", d.train_file), ("validation", d.validation_file), ("test", d.test_file))
            if path and not Path(path).expanduser().is_file()}

    def kept(key: str) -> bool:
        if key == "data_files":
            return not set(saved.get("data_files") or {}) <= gone
        return not (key.startswith("data_files.") and key.split(".", 1)[1] in gone)
    now = resume_key(cfg)
    if not cfg.lora.enabled and not (saved.get("lora") or {}).get("enabled"):
        # full recovery on both sides: the lora: section is unread (and absent from folders written before it existed)
        saved, now = ({k: v for k, v in d.items() if k != "lora"} for d in (saved, now))
    return [k for k in config_differences(saved, now) if kept(k)]
