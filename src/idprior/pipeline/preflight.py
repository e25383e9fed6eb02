"""Checks before any work starts: every problem with a run's inputs, reported at once.

`preflight(cfg, resume=..., overwrite=...)` runs first in `pipeline.prune` and `pipeline.finetune`.
It reads only small things (config.json, safetensors headers, the task data) and writes nothing,
so a run that would fail on a bad input fails in seconds, before fine-tuning, and leaves no output
folder behind. Problems found together are raised together as one `ConfigError`, one line each.
A check that needs an earlier one to pass (the model's structure needs a readable config.json) is
skipped when that one failed.

What is checked: the config fields (again, for configs built in Python), the method, the model
(found, a Transformer folder of a supported type, safetensors weights that are complete and finite,
a tokenizer, a task head that fits the task and whose label names are the data's, `--max-length`
within its positions), the task data (every error `load_task` raises, and no empty split), `--kinds`,
`--target` and `--protect-first/last` against the model's structure (a target no plan can reach is
refused here instead of after fine-tuning), `--lora-targets` against its linear layers, the output folder (locked by a live run, occupied, a
resume with another config, `--resume` with `--overwrite`, an `--overwrite` that would delete the
inputs or anything that is not an idprior run: `io.check_owned`) and the free disk space (also on
`--resume`, less what the run holds). `check_evaluation` does the model checks for `idprior evaluate`.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import RunConfig, resume_differences, validate
from ..errors import ConfigError, IdpriorError
from ..model import load as models

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
GGUF_EXPANSION = 8  # a 4-bit GGUF file holds about 1/8 of its float32 weights
OVERWRITE_FIX = "--overwrite deletes only an idprior run: choose another --out, or remove those files yourself"


@dataclass
class ModelInfo:
    folder: Path
    gguf: str | None
    config: dict  # config.json ({} for a .gguf file)
    params: int | None  # from the safetensors headers; None when unknown
    file_bytes: int


def preflight(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, prune: bool = True) -> None:
    """Raise one ConfigError listing every problem found with `cfg`'s inputs; write nothing.

    `prune=False` (plain fine-tuning) skips the pruning checks (method, kinds, target).
    """
    problems = list(validate(cfg, raise_=False))
    config_ok = not problems
    if prune:
        problems += check_method(cfg)
        if cfg.lora.enabled:
            problems += check_peft()
    output_problems = check_output(cfg, resume=resume, overwrite=overwrite)
    problems += output_problems
    model_problems, info = check_model(cfg)
    problems += model_problems
    data_problems, data = [], None
    if not (cfg.data.task.strip().lower() == "custom" and not cfg.data.train_file):  # validate() said so already
        data_problems, data = check_data(cfg)
    problems += data_problems
    if info is not None and not model_problems:
        problems += check_max_length(cfg.data.max_length, info)
        problems += check_finite_weights(info)
    if info is not None and data is not None:
        problems += check_head(info, data.task, data)
    if prune and info is not None and config_ok and not model_problems:
        problems += check_structure(cfg, info)
        if cfg.lora.enabled:
            problems += check_lora(cfg, info)
    if info is not None and config_ok and not output_problems:  # an --out that cannot be written has no free space
        problems += check_disk(cfg, info, prune=prune, resume=resume)
    if problems:
        raise ConfigError([_one_line(p) for p in dict.fromkeys(problems)])


# ---- the method -----------------------------------------------------------------------------------

def check_method(cfg: RunConfig) -> list[str]:
    from ..baselines import METHODS

    p = cfg.prune
    known = ["snip", *METHODS]
    if p.method not in known:
        close = difflib.get_close_matches(p.method, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return [f"unknown method {p.method!r}{hint}; use one of {', '.join(known)}"]
    if p.method != "snip" and p.tau is not None:
        return [f"--tau is a threshold on SNIP's function norms; method {p.method!r} takes --target only"]
    return []


# ---- the output folder ----------------------------------------------------------------------------

def check_output(cfg: RunConfig, *, resume: bool, overwrite: bool) -> list[str]:
    """The same rules as `pipeline.Run`, checked before anything is written."""
    from .. import lock

    if resume and overwrite:
        return ["--resume and --overwrite contradict each other (continue the run, or delete it): give one of them"]
    if not cfg.out:
        return []
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        return [f"output folder {out} is a file; choose a folder with --out"]
    busy = lock.in_use(out) if out.is_dir() else None
    if busy:
        return [busy]
    if out.is_dir() and any(p.name != lock.NAME for p in out.iterdir()):
        if overwrite:
            return _overwrite_would_delete_inputs(cfg, out) + _not_owned(out)
        marker = (out / "stages.json").is_file() or (out / "config.yaml").is_file()
        if not resume:
            what = "holds another run" if marker else "is not empty"
            return [f"output folder {out} {what}; pass --resume to continue it, --overwrite to replace it, "
                    "or choose another --out"]
        old = _older_version(out)
        if old:
            return [old]
        saved = _saved_config(out)
        if saved is None:
            return [f"--resume: {out} holds no idprior run (no stages.json or config.yaml); choose the run's "
                    "folder or another --out"]
        changed = resume_differences(saved, cfg)
        edited = [k.split(".", 1)[1] for k in changed if k.startswith("data_files.")]
        if edited:
            return [f"--resume: the {' and '.join(edited)} data file changed since {out} was started (its contents "
                    "differ); restore it, or start afresh with --overwrite or another --out"]
        if changed:
            shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
            return [f"--resume: {out} was started with a different config ({shown} differ); use the same "
                    "options, --overwrite, or another --out"]
        return _missing_outputs(out)
    parent = _existing_ancestor(out)
    if not parent.is_dir():
        return [f"cannot write {out}: {parent} is a file, not a folder; choose another --out"]
    if not os.access(parent, os.W_OK | os.X_OK):
        return [f"cannot write to {parent} (permission denied); choose another --out"]
    from ..io import writable_problem

    problem = writable_problem(out / "stages.json", "--out")  # a probe: read-only file systems and /proc (root passes os.access)
    return [f"{problem.rsplit('; ', 1)[0]}; choose another --out"] if problem else []


# What each finished stage left in the run folder; --resume never redoes a finished stage, so its output must be there
STAGE_OUTPUTS = {"finetune": "finetuned", "score": "scores.json", "select": "plan.json", "surgery": "surgery",
                 "recover": "pruned", "assemble": "pruned", "evaluate": "metrics.json"}


def _missing_outputs(out: Path) -> list[str]:
    """--resume of a run whose finished stage's output was deleted: the run would end "done" without it."""
    try:
        stages = json.loads((out / "stages.json").read_text(encoding="utf-8")).get("stages") or {}
    except (OSError, ValueError, AttributeError):
        return []
    gone = [f"{name}/" if not name.endswith(".json") else name
            for stage, name in STAGE_OUTPUTS.items() if stage in stages and not (out / name).exists()]
    if not gone:
        return []
    return [f"--resume: {out} has finished stages whose output is gone ({', '.join(dict.fromkeys(gone))}); "
            "--resume does not redo a finished stage: start afresh with --overwrite or another --out"]


def _older_version(out: Path) -> str | None:
    """The refusal for a run folder written by an earlier idprior (its options changed; CHANGELOG.md)."""
    from ..config import CONFIG_VERSION

    try:
        version = json.loads((out / "stages.json").read_text(encoding="utf-8")).get("version", 1)
    except (OSError, ValueError, AttributeError):
        return None
    if version == CONFIG_VERSION:
        return None
    return (f"--resume: {out} was written by an earlier idprior (run format {version}, this one reads "
            f"{CONFIG_VERSION}; options changed, see CHANGELOG.md); start it afresh with --overwrite or another --out")


def _saved_config(out: Path) -> dict | None:
    """The config a run folder was started with: stages.json, else config.yaml (written first)."""
    try:
        if (out / "stages.json").is_file():
            return dict(json.loads((out / "stages.json").read_text(encoding="utf-8")).get("config") or {})
        if (out / "config.yaml").is_file():
            saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8")) or {}
            saved.pop("bench", None)
            return saved
    except (OSError, ValueError, yaml.YAMLError, AttributeError):
        return None
    return None


def _not_owned(out: Path) -> list[str]:
    """--overwrite deletes only a run folder that holds nothing but the run's files (io.check_owned)."""
    from ..io import check_owned

    try:
        check_owned(out, "run", OVERWRITE_FIX)
    except IdpriorError as e:
        return [f"output folder {e}"]
    return []


def _overwrite_would_delete_inputs(cfg: RunConfig, out: Path) -> list[str]:
    d = cfg.data
    inputs = {"the model": cfg.model.name, "--data": d.train_file, "--data-validation": d.validation_file,
              "--data-test": d.test_file, "--data-dir": d.data_dir}
    problems = []
    root = out.resolve()
    for what, value in inputs.items():
        if value and Path(value).expanduser().exists():
            path = Path(value).expanduser().resolve()
            if path == root or root in path.parents:
                problems.append(f"--overwrite would delete {what} ({value}), which is inside {out}; "
                                "choose another --out")
    return problems


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


# ---- the model ------------------------------------------------------------------------------------

def check_model(cfg: RunConfig) -> tuple[list[str], ModelInfo | None]:
    """Found, a Transformer folder of a supported type, complete safetensors, a tokenizer."""
    from ..arch import supported_model_types

    try:
        folder, gguf = models.resolve(cfg.model.name)
    except IdpriorError as e:
        return [str(e)], None
    if gguf:
        try:
            models.check_weights(folder, gguf)
        except IdpriorError as e:
            return [str(e)], None
        size = (folder / gguf).stat().st_size
        return [], ModelInfo(folder, gguf, {}, None, size)
    problems: list[str] = []
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return [f"cannot read {folder / 'config.json'} ({_first_line(e)})"], None
    except json.JSONDecodeError as e:
        return [f"{folder / 'config.json'} is not valid JSON ({e}); {folder} is not a Transformer model folder"], None
    if not isinstance(config, dict) or not config.get("model_type"):
        return [f"{folder / 'config.json'} has no model_type; {folder} is not a Hugging Face Transformer model folder"], None
    model_type = config["model_type"]
    if model_type not in supported_model_types():
        problems.append(f"{folder} is a {model_type!r} model, which idprior cannot prune; supported model types: "
                        f"{', '.join(supported_model_types())}")
    try:
        models.check_weights(folder, None)
    except IdpriorError as e:
        problems.append(str(e))
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problems.append(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES[:3])}, ...); save the tokenizer "
                        "into the model folder with tokenizer.save_pretrained(folder)")
    params, size = _safetensors_size(folder) if not problems else (None, 0)
    return problems, ModelInfo(folder, None, config, params, size)


def _safetensors_size(folder: Path) -> tuple[int | None, int]:
    """(parameter count from the headers, bytes on disk) of every *.safetensors file."""
    params, size = 0, 0
    for f in sorted(folder.glob("*.safetensors")):
        size += f.stat().st_size
        try:
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        except (OSError, ValueError):
            return None, size
        for key, value in header.items():
            if key != "__metadata__":
                params += math.prod(value.get("shape", [])) if value.get("dtype") in _ST_DTYPE_BYTES else 0
    return params, size


def check_head(info: ModelInfo, task, data=None) -> list[str]:
    """A model folder with a task head must fit the task; language modelling needs a decoder. A
    classifier with label names must have the data's labels (`data`, renumbered later onto its ids)."""
    from ..arch.bert import BertAdapter
    from ..data.labels import align_labels, model_labels, shown_labels

    config = info.config
    if not config:
        return []
    archs = config.get("architectures") or []
    pruned = "idprior_layers" in config
    has_classifier = any("ForSequenceClassification" in a for a in archs)
    if task.kind == "lm":
        if config.get("model_type") in BertAdapter.model_types:
            return [f"task {task.name} is language modelling, which needs a decoder (gpt2, llama, qwen2, mistral); "
                    f"{info.folder} is a {config['model_type']} encoder"]
        if pruned and has_classifier:
            return [f"{info.folder} is a pruned classifier; task {task.name} needs a language model"]
        return []
    if has_classifier:
        own = model_labels(config)
        if own is not None and data is not None and task.kind == "classification":
            try:
                align_labels(data, own, str(info.folder))
            except IdpriorError as e:
                return [str(e)]
            return []
        n = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        if n != task.num_labels:
            what = f"{task.num_labels} labels" if task.kind == "classification" else "1 output (regression)"
            found = f" (labels found in the data: {shown_labels(task.labels)})" if task.kind == "classification" else ""
            return [f"{info.folder} has a task head with {n} outputs but task {task.name} needs {what}{found}; start "
                    "from the base model (without a task head) or use the task it was fine-tuned on"]
    elif pruned:
        return [f"{info.folder} is a pruned model without a classification head; task {task.name} needs one"]
    return []


def check_evaluation(spec: str, data, max_length: int) -> list[str]:
    """`idprior evaluate`: a readable model with the head the task needs (a classifier for
    classification and regression, a causal LM for language modelling). Any other head would be
    created at random on load, and its scores would mean nothing."""
    task = data.task
    try:
        folder, gguf = models.resolve(spec)
    except IdpriorError as e:
        return [str(e)]
    lm_tasks = "a language-modelling task (lm-rt, lm-20ng)"
    if gguf:
        if task.kind == "lm":
            return []
        return [f"{spec} is a causal language model (.gguf) without a classification head, but task {task.name} "
                f"needs a classifier: evaluate it on {lm_tasks}, or fine-tune it first (idprior finetune)"]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        models.check_weights(folder, None)
    except IdpriorError as e:
        return [str(e)]
    except (OSError, ValueError) as e:
        return [f"cannot read {folder / 'config.json'} ({_first_line(e)}); {folder} is not a Transformer model folder"]
    info = ModelInfo(folder, None, config if isinstance(config, dict) else {}, None, 0)
    problems = check_max_length(max_length, info) + check_finite_weights(info)
    archs = info.config.get("architectures") or []
    name = ", ".join(archs) or str(info.config.get("model_type"))
    classifier = any("ForSequenceClassification" in a for a in archs)
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if task.kind == "lm" and classifier:
        problems.append(f"{folder} is a classifier ({name}), but task {task.name} is language modelling and needs a "
                        "causal language model: evaluate it on a classification task, or give a language model")
    elif task.kind != "lm" and not classifier:
        what = "a causal language model" if causal else "a model without a task head"
        alt = f", or this model on {lm_tasks}" if causal else ""
        problems.append(f"{folder} is {what} ({name}), but task {task.name} needs a fine-tuned classifier (a new "
                        f"head would be random): evaluate a classifier such as RUN/pruned or RUN/finetuned{alt}")
    else:
        problems += check_head(info, task, data)
    return problems


def check_max_length(max_length: int, info: ModelInfo) -> list[str]:
    """`--max-length` within the model's position embeddings (beyond them a forward pass fails with an
    index error, or a rotary model runs outside the lengths it was trained on)."""
    config = info.config
    key = next((k for k in ("max_position_embeddings", "n_positions", "n_ctx")
                if isinstance(config.get(k), int) and not isinstance(config.get(k), bool)), None)
    if key is None:
        return []
    limit = config[key]
    if config.get("model_type") in ("roberta", "xlm-roberta", "camembert"):  # positions start after the pad id
        limit -= int(config.get("pad_token_id") or 1) + 1
    if max_length > limit:
        return [f"--max-length {max_length} is more than {info.folder} can take: it has {limit} positions ({key} "
                f"in config.json); use --max-length {limit} or less"]
    return []


def check_finite_weights(info: ModelInfo) -> list[str]:
    """No NaN/inf in the weights: one would surface much later as an unrelated error (spectral
    normalization's SVD, NaN scores). Reads each safetensors tensor once; GGUF files are checked
    when they are dequantized (`models.load`)."""
    if info.gguf:
        return []
    import torch
    from safetensors import safe_open

    bad: list[tuple[str, str, int]] = []
    for f in sorted(info.folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                names = h.keys()  # a safetensors handle, not a dict: it cannot be iterated
                for key in names:
                    t = h.get_tensor(key)
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        bad.append((f.name, key, int((~torch.isfinite(t)).sum())))
        except Exception:  # noqa: BLE001 - unreadable files are reported by check_model
            return []
    if not bad:
        return []
    name, key, n = bad[0]
    more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
    return [f"{info.folder / name} holds non-finite weights ({n} NaN/inf values in {key}{more}): the checkpoint is "
            "corrupt or from a diverged fine-tune; use a healthy checkpoint"]


# ---- the data -------------------------------------------------------------------------------------

def check_data(cfg: RunConfig):
    """(problems, TaskData or None): every error of `load_task`, plus empty splits."""
    from ..data import load_task

    d = cfg.data
    files = {k: v for k, v in {"train": d.train_file, "validation": d.validation_file, "test": d.test_file}.items() if v}
    try:
        data = load_task(d.task, data_dir=d.data_dir, max_train=d.max_train, max_eval=d.max_eval, seed=cfg.seed,
                         data_files=files or None, text_column=d.text_column, text_pair_column=d.text_pair_column,
                         label_column=d.label_column, problem_type=d.problem_type)
    except ConfigError as e:
        return list(e.problems), None
    except IdpriorError as e:
        return [str(e)], None
    except (OSError, UnicodeError, csv.Error) as e:  # unreadable files: the user's to fix, not a bug
        return [f"cannot read the data of task {d.task!r}: {type(e).__name__}: {_first_line(e)}"], None
    empty = [s for s, ex in data.splits.items() if not ex]
    if empty:
        return [f"task {data.task.name}: split(s) {', '.join(empty)} are empty; give more data"], None
    return [], data


# ---- kinds and target against the model's structure -----------------------------------------------

def check_structure(cfg: RunConfig, info: ModelInfo) -> list[str]:
    """Kinds the model has none of, and a target no plan can reach (one attention and one FFN
    sub-layer always stay). Uses the layer shapes only: the model is built on the meta device."""
    from ..baselines.layerdrop import ShortGPTMethod, TopLayersMethod
    from ..method.plan import reachable_fraction
    from ..method.units import parse_kinds

    p = cfg.prune
    try:
        adapter = _meta_adapter(info, cfg.model.per_query_head)
    except IdpriorError as e:
        return [str(e)]
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build: one line, not a traceback
        return [f"{info.folder} cannot be built from its config.json ({type(e).__name__}: {_first_line(e)})"]
    if adapter is None:
        return []
    if cfg.model.per_query_head and not any(adapter.shape(i).n_kv_heads < adapter.shape(i).n_heads
                                            for i in range(adapter.num_layers) if adapter.shape(i).has_attn):
        return [f"--per-query-head changes how grouped-query attention is pruned, and {info.folder} has no "
                "grouped-query attention (as many key/value heads as query heads); drop --per-query-head"]
    layer_method = p.method in (ShortGPTMethod.name, TopLayersMethod.name)
    kinds = ("attn", "ffn") if layer_method else parse_kinds(p.kinds)  # layer drops ignore --kinds
    n = adapter.num_layers
    attn_layers = [i for i in range(n) if adapter.shape(i).has_attn]
    ffn_layers = [i for i in range(n) if adapter.shape(i).has_ffn]
    problems = check_protect(p.protect_first, p.protect_last, n, info.folder)
    for kind in kinds:
        layers = attn_layers if kind in ("head", "attn") else ffn_layers
        if not layers:
            sub = "attention" if kind in ("head", "attn") else "feed-forward"
            problems.append(f"--kinds {kind}: {info.folder} has no {sub} sub-layers left, so there is no {kind} "
                            "to prune; choose other kinds")
    if problems or p.tau is not None:
        return problems
    reachable = reachable_fraction(adapter, kinds, p.measure, p.flops_seq_len)
    if p.target > reachable + 1e-12:
        return [f"prune.target {p.target:g} is out of reach: with kinds {','.join(kinds)} at most {reachable:.1%} "
                f"of {p.measure} can be removed (one attention and one FFN sub-layer always stay); lower --target "
                "or add kinds"]
    if not layer_method:
        return _reachable_with_held(cfg, info, adapter, kinds)
    return []


def _reachable_with_held(cfg: RunConfig, info: ModelInfo, adapter, kinds) -> list[str]:
    """A target that min_keep or --protect-first/last put out of reach (selection would say so only after the
    fine-tune, with the run folder half written): selection run on the layer shapes, every unit allowed to go."""
    from ..arch import recipe_of
    from ..baselines.base import present_units
    from ..config import recipe_for
    from ..method.selection import protected_layers, select

    p = recipe_for(cfg.prune, recipe_of(info.config.get("model_type")))
    protect = protected_layers(adapter.num_layers, p.protect_first, p.protect_last)
    if not (p.min_keep or protect):
        return []
    units = present_units(adapter, kinds)
    plan = select({u: 0.0 for u in units}, adapter, target=None, tau=1.0, measure=p.measure, seq_len=p.flops_seq_len,
                  mode="norm", kinds=kinds, min_keep=p.min_keep or 0.0, protect=protect, total_params=0)
    reach = plan.measures["removed_fraction"][p.measure]
    if p.target <= reach + 1e-12:
        return []
    held = ", ".join(f"{k} {v}" for k, v in (("min_keep", p.min_keep), ("protect_first", p.protect_first),
                                             ("protect_last", p.protect_last)) if v)
    return [f"prune.target {p.target:g} is out of reach: with {held} at most {reach:.1%} of {p.measure} can be removed "
            "(the held-back units always stay); lower --target, --min-keep or protect fewer layers"]


def check_protect(first: int, last: int, layers: int, folder) -> list[str]:
    """--protect-first / --protect-last within the model's layers, leaving at least one to prune
    (otherwise selection would fail only after fine-tuning, with the run folder half written)."""
    flags = {"--protect-first (prune.protect_first)": first, "--protect-last (prune.protect_last)": last}
    beyond = [f"{flag} {value}" for flag, value in flags.items() if value > layers]
    if beyond:
        return [f"{' and '.join(beyond)}: {folder} has only {layers} layers; protect at most {layers - 1} of them"]
    if first or last:
        kept = len(set(range(first)) | set(range(layers - last, layers)))
        if kept >= layers:
            return [f"--protect-first {first} and --protect-last {last} protect all {layers} layers of {folder}, so "
                    f"nothing can be pruned; protect fewer layers"]
    return []


def check_peft() -> list[str]:
    """--recover lora needs peft, which idprior imports only then (an optional dependency)."""
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        return ["--recover lora needs the peft package, which is not installed: pip install 'idprior[lora]' "
                "(or peft), or use --recover full"]
    return []


def check_lora(cfg: RunConfig, info: ModelInfo) -> list[str]:
    """--lora-targets names that no linear layer of the model's body has (peft would say so only after the
    fine-tune, scoring and surgery, with the run folder half written)."""
    from .lora import target_problem

    try:
        body = _meta_body(info)
    except Exception as e:  # noqa: BLE001 - check_structure reports a config transformers cannot build
        return [] if not isinstance(e, IdpriorError) else [str(e)]
    problem = None if body is None else target_problem(body, cfg.lora.targets)
    return [problem] if problem else []


def _meta_body(info: ModelInfo):
    """The model's Transformer body (no task head) built from config.json on the meta device (no weights read);
    None for a .gguf file."""
    if info.gguf:
        return None  # the config lives inside the GGUF file; the load itself checks it
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(str(info.folder), local_files_only=True, trust_remote_code=False)
    with torch.device("meta"):
        return transformers.AutoModel.from_config(config)


def _meta_adapter(info: ModelInfo, per_query_head: bool):
    """The model's adapter on the meta device (no weights read), reshaped to a pruned folder's layers."""
    from ..arch import STRUCTURE_KEY, LayerShape, get_adapter

    model = _meta_body(info)
    if model is None:
        return None
    config = model.config
    adapter = get_adapter(model, per_query_head=per_query_head)
    shapes = getattr(config, STRUCTURE_KEY, None)
    if shapes is not None:
        target = [LayerShape(**s) for s in shapes]
        adapter.check_target_shapes(target)
        adapter.reshape_to(target)
    adapter.add_recorded_out_biases()
    return adapter


# ---- disk space -----------------------------------------------------------------------------------

def check_disk(cfg: RunConfig, info: ModelInfo, *, prune: bool, resume: bool = False) -> list[str]:
    """About: weights x (finetuned/ + surgery/ + pruned/ + one being written, per round) + checkpoints.
    On `--resume`, less what the run folder already holds (finished stages are not redone)."""
    if info.params is not None:
        weights = info.params * _DTYPE_BYTES.get(cfg.model.dtype, 4)
    else:
        weights = info.file_bytes * (GGUF_EXPANSION if info.gguf else 1)
    copies = 2 + 3 * cfg.prune.iterative if prune else 2
    training = cfg.train.epochs > 0 and (cfg.prune.finetune_first or not prune) or (prune and cfg.recover.epochs > 0)
    if training:
        copies += 4  # checkpoint: weights, two AdamW moments, best weights
    out = Path(cfg.out).expanduser()
    held = _folder_bytes(out) if resume else 0
    need = weights * copies - held
    where = _existing_ancestor(out)
    free = shutil.disk_usage(where).free
    if need > free:
        less = f", less {_size(held)} the run already holds" if held else ""
        return [f"not enough disk space for {cfg.out}: the run needs about {_size(need)} (model weights {_size(weights)} "
                f"x {copies}: finetuned/, surgery/, pruned/ and checkpoints{less}) but {where} has {_size(free)} free; "
                "free some space or choose another --out"]
    return []


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def _one_line(text: str) -> str:
    """Wrapped whitespace collapsed; a line break inside a value (a path) shown as \\n, not as a space."""
    return " ".join(str(text).replace("\r", "\\r").replace("\n", "\\n").split())
