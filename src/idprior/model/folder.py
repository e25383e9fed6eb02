"""What a saved folder holds besides the weights: remote code, a model card, and a manifest.

* `modeling_idprior.py` + `config.json` `auto_map`: stock transformers loads the pruned model with
  `trust_remote_code=True` (and `pipeline(...)` runs it), without idprior. The file is
  `remote.py` plus one class per auto class, named like the stock class it extends, so a
  re-save keeps `config.architectures` pointing at a class transformers itself has (which is what
  `load_pruned`, the no-remote-code path, builds).
* `README.md`: a short model card (what was removed, sizes, how to load it both ways).
* `idprior.json`: the manifest, listing every file idprior wrote. A folder is only ever replaced
  when everything in it is listed there, so a user's own files are never deleted.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .. import __version__, io
from ..errors import IdpriorError
from ..io import MANIFEST, check_owned, folder_files, read_json, write_json, write_text

MODELING_FILE = "modeling_idprior.py"
CARD = "README.md"
PRUNED, ONNX = io.PRUNED, io.ONNX  # manifest kinds (io holds the ownership rule that reads them)

# Class-name ending -> the transformers auto class that builds it (first match wins).
_AUTO_CLASSES = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForTokenClassification", "AutoModelForTokenClassification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice"),
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("Model", "AutoModel"),
)
PIPELINE_TASKS = {"AutoModelForSequenceClassification": "text-classification",
                  "AutoModelForCausalLM": "text-generation",
                  "AutoModelForTokenClassification": "token-classification",
                  "AutoModelForMaskedLM": "fill-mask"}

# ---- remote code --------------------------------------------------------------------------------
def _stock_class(name: str | None):
    import transformers

    cls = getattr(transformers, name, None) if name else None
    return cls if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel) else None


def auto_classes(model) -> dict[str, str]:
    """{auto class: stock class name} for the model's own class and its bare base model.

    Empty when the model's class is not one transformers has (nothing to extend then).
    """
    out: dict[str, str] = {}
    for obj in (model, getattr(model, "base_model", model)):
        name = type(obj).__name__
        if _stock_class(name) is None:
            continue
        auto = next((a for ending, a in _AUTO_CLASSES if name.endswith(ending)), None)
        if auto is not None and auto not in out:
            out[auto] = name
    return out


def render_modeling(class_names: list[str]) -> str:
    """remote.py plus one `class X(PrunedLayersMixin, transformers.X)` per name."""
    text = resources.files("idprior.model").joinpath("remote.py").read_text(encoding="utf-8")
    text = text.replace('"""Pruned-model classes', f'"""Written by idprior {__version__}. Pruned-model classes', 1)
    for name in sorted(set(class_names)):
        text += (f"\n\nclass {name}(PrunedLayersMixin, transformers.{name}):\n"
                 f'    """transformers.{name} with the per-layer widths of config.idprior_layers."""\n')
    return text


def add_remote_code(model, folder: Path) -> dict[str, str]:
    """Write the modeling file into `folder` and point config.json's auto_map at it."""
    classes = auto_classes(model)
    if not classes:
        return {}
    write_text(folder / MODELING_FILE, render_modeling(list(classes.values())))
    config = read_json(folder / "config.json")
    stem = MODELING_FILE.removesuffix(".py")
    config["auto_map"] = {auto: f"{stem}.{name}" for auto, name in classes.items()}
    write_json(folder / "config.json", config)
    return classes


# ---- model card -----------------------------------------------------------------------------------
def _num(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:,}" if float(value).is_integer() else f"{value:,.4g}"


def _removed_section(plan: dict | None) -> list[str]:
    if not isinstance(plan, dict):
        return ["No plan was saved with this model (`plan.json` is absent)."]
    lines = []
    counts = plan.get("counts")
    if isinstance(counts, dict):
        names = {"head": "attention head units", "neuron": "FFN neurons", "attn": "whole attention sub-layers",
                 "ffn": "whole FFN sub-layers"}
        lines += ["| removed | count |", "|---|---|"]
        lines += [f"| {names.get(kind, kind)} | {_num(n)} |" for kind, n in counts.items()]
        lines.append("")
    settings = [f"{k} `{plan[k]}`" for k in ("method", "selection", "target", "measure", "tau") if plan.get(k) is not None]
    if settings:
        lines += ["Plan: " + ", ".join(settings) + ".", ""]
    measures = plan.get("measures")
    if isinstance(measures, dict) and isinstance(measures.get("before"), dict) and isinstance(measures.get("after"), dict):
        before, after = measures["before"], measures["after"]
        lines += [f"Sizes predicted by the plan (FLOPs at {measures.get('seq_len', '?')} tokens):", "",
                  "| measure | before | after | removed |", "|---|---|---|---|"]
        for key in before:
            if key in after and isinstance(before[key], (int, float)) and before[key]:
                lines.append(f"| {key} | {_num(before[key])} | {_num(after[key])} | {1 - after[key] / before[key]:.1%} |")
        lines.append("")
    return lines or ["`plan.json` holds the plan this model was pruned with."]


def model_card(model, classes: dict[str, str], plan: dict | None) -> str:
    """A short, factual README.md for the folder."""
    from ..arch import STRUCTURE_KEY

    config = model.config
    shapes = getattr(config, STRUCTURE_KEY, None) or []
    lines = ["---", "library_name: transformers", "tags:", "- idprior", "- pruned", "---", "",
             f"# {type(model).__name__} ({config.model_type}), structurally pruned with idprior {__version__}", "",
             "Attention heads, FFN neurons and whole sub-layers were physically removed, so layers can have "
             "different widths; the widths are recorded in `config.json` under `idprior_layers`.", "",
             "## What was removed", ""]
    lines += _removed_section(plan)
    if shapes:
        lines += ["Widths per layer now (0: the sub-layer was removed):", "",
                  "| layer | query heads | KV heads | FFN neurons |", "|---|---|---|---|"]
        lines += [f"| {i} | {s.get('n_heads')} | {s.get('n_kv_heads')} | {s.get('ffn_dim')} |" for i, s in enumerate(shapes)]
        lines.append("")
    lines += ["## Loading", "", "With idprior (no remote code is run; only classes from transformers itself are built):", "",
              "```python", "import idprior", 'model = idprior.load_pruned("path/to/this/folder")', "```", ""]
    if classes:
        auto = next(iter(classes))
        lines += ["With stock transformers, no idprior needed: `trust_remote_code=True` runs `modeling_idprior.py` "
                  "from this folder (read it first: it only resizes the stock model's layers to the recorded widths).", "",
                  "```python", f"from transformers import {auto}",
                  f'model = {auto}.from_pretrained("path/to/this/folder", trust_remote_code=True)']
        tasks = [PIPELINE_TASKS[a] for a in classes if a in PIPELINE_TASKS]
        if tasks:
            lines += ["", "from transformers import pipeline",
                      f'pipe = pipeline("{tasks[0]}", model="path/to/this/folder", trust_remote_code=True)']
        lines += ["```", ""]
    return "\n".join(lines)


# ---- ownership (the rule itself is io.check_owned) ------------------------------------------------
def write_manifest(folder: Path, kind: str) -> None:
    """List every file in `folder` (written by idprior) in its manifest; call it last."""
    write_json(folder / MANIFEST, {"producer": "idprior", "version": __version__, "kind": kind,
                                   "files": [f for f in folder_files(folder) if f != MANIFEST]})


def check_replaceable(folder: str | os.PathLike, kind: str, fix: str) -> None:
    """Raise IdpriorError unless `folder` is absent, empty, or an idprior folder of the same `kind`
    ("pruned-model", "onnx") holding only files idprior wrote there (`io.check_owned`).

    `fix` ends the one-line message, e.g. "pass another --out". The kind check keeps an export
    from replacing the pruned model it was made from.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise IdpriorError(f"{folder} exists and is not a folder; {fix}")
    check_owned(folder, kind, fix)
