"""Physical removal of units, and saving / loading the pruned model as a normal HF folder.

A plan is a set of units removed from the model *as it is now* (indices refer to its current
heads / neurons). A layer that loses every head unit loses its attention sub-layer; one that loses
every neuron loses its FFN (the collapse rule), so no zero-width Linear ever exists.

Saved folder = `config.json` (with `idprior_layers`, the per-layer shapes) + `model.safetensors`
(+ tokenizer, + `plan.json`), + `modeling_idprior.py` / `auto_map`, `README.md` and the
`idprior.json` manifest (see model_folder.py). `load_pruned` (no remote code) rebuilds the
full-size architecture from the config, reshapes it to `idprior_layers` and loads the weights
strictly; stock transformers with `trust_remote_code=True` does the same through the folder's
modeling file.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import STRUCTURE_KEY, Adapter, LayerShape, get_adapter
from ..errors import IdpriorError
from ..io import atomic_dir, read_json, write_json, write_text
from ..method.plan import layer_removals, removed_cost
from ..method.units import Unit

ATTN_IMPL_KEY = "idprior_attn_implementation"  # config attribute: attention kernel the model was saved with
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")


# ---- plans ----------------------------------------------------------------------------------------
def count_params(model: nn.Module) -> int:
    """Parameters of the model, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def predicted_params(model: nn.Module, removed_units: Iterable[Unit | str], adapter: Adapter | None = None) -> int:
    """Number of parameters the model will have after `apply_plan(model, removed_units)`."""
    adapter = adapter if adapter is not None else get_adapter(model)
    return count_params(model) - removed_cost(adapter, removed_units, strict=True).params


def _refuse_parametrizations(model: nn.Module, action: str) -> None:
    names = [name or "<model>" for name, module in model.named_modules() if parametrize.is_parametrized(module)]
    if names:
        raise RuntimeError(
            f"cannot {action}: {len(names)} modules have parametrizations (e.g. {names[0]}); fold spectral "
            "normalization first with torch.nn.utils.parametrize.remove_parametrizations(module, 'weight', "
            "leave_parametrized=True)"
        )


def apply_plan(model: nn.Module, removed_units: Iterable[Unit | str], adapter: Adapter | None = None) -> nn.Module:
    """Remove `removed_units` physically, in place; returns `model` with its config synced."""
    _refuse_parametrizations(model, "prune")
    adapter = adapter if adapter is not None else get_adapter(model)
    plans = layer_removals(adapter, removed_units, strict=True)  # validates everything before the first change
    for layer in sorted(plans):
        plan = plans[layer]
        if plan.attn:
            adapter.remove_attn(layer)
        elif plan.heads:
            adapter.prune_heads(layer, sorted(set(range(adapter.num_head_units(layer))) - plan.heads))
        if plan.ffn:
            adapter.remove_ffn(layer)
        elif plan.neurons:
            adapter.prune_neurons(layer, sorted(set(range(adapter.shape(layer).ffn_dim)) - plan.neurons))
    adapter.sync_config()
    adapter.check_config()
    return model


# ---- saving and loading -----------------------------------------------------------------------------
def save_pruned(model: nn.Module, tokenizer, out_dir: str | os.PathLike, plan: dict | None = None) -> Path:
    """Write `model` (+ tokenizer, + plan.json) as a Hugging Face folder, atomically, safetensors only.

    The folder also gets `modeling_idprior.py` with an `auto_map` in config.json (so stock
    transformers loads it with `trust_remote_code=True`, no idprior needed), a `README.md` model
    card, and the `idprior.json` manifest. An existing `out_dir` is replaced only if idprior wrote
    everything in it; otherwise IdpriorError, and nothing is deleted.
    """
    from .folder import PRUNED, add_remote_code, check_replaceable, model_card, write_manifest

    _refuse_parametrizations(model, "save")
    out_dir = Path(out_dir)
    check_replaceable(out_dir, PRUNED, "save to a new or empty folder, or move those files away first")
    adapter = get_adapter(model)
    adapter.sync_config()
    setattr(model.config, ATTN_IMPL_KEY, getattr(model.config, "_attn_implementation", None))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if plan is not None:
            write_json(tmp / "plan.json", plan)
        classes = add_remote_code(model, tmp)
        write_text(tmp / "README.md", model_card(model, classes, plan))
        write_manifest(tmp, PRUNED)
    return out_dir


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each in memory of its own (read, not memory-mapped).

    safetensors' `load_file` returns views of one mapping of the whole file, and every page read stays resident
    until the last view is gone. Surgery replaces most matrices by slices while the embeddings and norms still
    view the file, so the old weights stayed resident beside the new ones (about 1.8x the weights at the cut);
    read this way, a replaced matrix is freed at once. Same bytes as `load_file` (tests/test_memory.py).
    """
    if sys.byteorder != "little":  # safetensors stores little-endian; let the library convert
        from safetensors.torch import load_file

        return load_file(file)
    out: dict[str, torch.Tensor] = {}
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            f.seek(8 + size + start)
            got = f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # [numel * itemsize] bytes
            if got != end - start or got != tensor.numel() * tensor.element_size():
                raise IdpriorError(f"{file}: tensor {name} is cut short ({got} of {end - start} bytes); the file is "
                                   "damaged, save the model again")
            out[name] = tensor
    return out


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).is_file():
        return read_safetensors(path / WEIGHTS_NAME)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        shards = sorted(set(read_json(path / WEIGHTS_INDEX_NAME)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(path / shard))
        return state
    raise IdpriorError(
        f"{path} has no {WEIGHTS_NAME}; point to a folder written by idprior.save_pruned (safetensors only)"
    )


def _saved_dtype(state: dict[str, torch.Tensor], config) -> torch.dtype:
    """The dtype most of the saved floating-point weights have (config.dtype if there are none)."""
    counts = Counter()
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] += tensor.numel()
    if counts:
        return counts.most_common(1)[0][0]
    dtype = getattr(config, "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else (dtype or torch.float32)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise IdpriorError(f"unknown dtype {dtype!r}; use e.g. float32, bfloat16 or float16")
    return resolved


def _model_class(config):
    """The class named in config.architectures, looked up in transformers only; None -> AutoModel."""
    import transformers

    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
        return cls
    return None


def _no_init_weights():
    """transformers' context that skips random init (the weights are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older 5.x releases
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _fill_tied_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """save_pretrained stores tied weights once (e.g. no lm_head.weight); give both names the tensor."""
    tied = model.get_expanded_tied_weights_keys(all_submodels=True) if hasattr(model, "get_expanded_tied_weights_keys") else {}
    for target, source in tied.items():
        if target not in state and source in state:
            state[target] = state[source]
        elif source not in state and target in state:
            state[source] = state[target]


def load_pruned(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
) -> nn.Module:
    """Load a folder written by `save_pruned` (or any local HF folder of a supported family).

    The weights keep the dtype they were saved in unless `dtype` is given. The attention kernel is
    the one recorded at save time (so logits are bit-identical) unless `attn_implementation` is given.
    Never runs remote code: only classes from transformers itself are built.
    """
    import transformers

    path = Path(path)
    if not path.is_dir():
        raise IdpriorError(f"{path} is not a folder; pass the folder written by idprior.save_pruned")
    if not (path / "config.json").is_file():
        raise IdpriorError(f"{path} has no config.json; pass the folder written by idprior.save_pruned")
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    state = _read_weights(path)
    target_dtype = _as_dtype(dtype)
    saved_dtype = _saved_dtype(state, config)
    kwargs = {"dtype": saved_dtype}
    attn = attn_implementation or getattr(config, ATTN_IMPL_KEY, None)
    if attn:
        kwargs["attn_implementation"] = attn

    cls = _model_class(config)
    with _no_init_weights():  # every weight is overwritten by the checkpoint below
        if cls is None:
            model = transformers.AutoModel.from_config(config, **kwargs)
        else:
            model = cls._from_config(config, **kwargs)
    adapter = get_adapter(model)
    shapes = getattr(config, STRUCTURE_KEY, None)
    if shapes is not None:
        adapter.reshape_to([LayerShape(**shape) for shape in shapes])
    adapter.add_recorded_out_biases()  # biases added by compensation (config.idprior_out_bias)

    _fill_tied_keys(model, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)  # assign: keep the saved tensors' dtypes
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise IdpriorError(
            f"the weights in {path} do not match its config.json ({first[1].strip() if len(first) > 1 else first[0]}); "
            "re-save the model with idprior.save_pruned"
        ) from None
    model.tie_weights()  # assign=True gave tied names separate Parameters
    adapter.check_config()
    if target_dtype is not None:
        model.to(target_dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def load_pruned_with_tokenizer(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    attn_implementation: str | None = None,
):
    """(model, tokenizer), the tokenizer being None when the folder holds none."""
    from transformers import AutoTokenizer

    model = load_pruned(path, dtype=dtype, device=device, attn_implementation=attn_implementation)
    path = Path(path)
    tokenizer = None
    if any((path / name).is_file() for name in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    return model, tokenizer
