"""Forward FLOPs of one sequence, counted from the model's current module shapes.

Convention (the same as `units.Cost.flops`, so the layer part equals
`plan.model_cost(adapter).flops(seq_len)` exactly):
  * every linear map costs 2 FLOPs per multiply-accumulate: 2 * weight entries per token it sees;
  * attention costs 4 * T * head_dim per query head per token (2 for Q K^T, 2 for the weighted
    sum of V), i.e. 4 * T^2 * head_dim per query head per sequence, also for causal decoders
    (the kernels compute the full T x T product);
  * element-wise work is not counted: biases, LayerNorm / RMSNorm, softmax, activations,
    residual adds, rotary embeddings;
  * embeddings are lookups: 0;
  * the task head: its linear maps (pooler + classifier, or the LM head). Encoder classifiers
    (post-LN, BERT-style) apply them to the first token only; decoders apply them to every
    position (Hugging Face's decoder classifiers and LM heads do).
Because the count reads the modules (not the config), it is right for pruned models.
"""

from __future__ import annotations

from torch import nn

from ..arch import Adapter, get_adapter


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear or GPT-2's Conv1D (weight [in, out]); both cost 2 * weight entries per token."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _linear_entries(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if _is_linear(m))


def model_flops(model: nn.Module, seq_len: int, adapter: Adapter | None = None) -> dict:
    """Per-layer and total forward FLOPs for one sequence of `seq_len` tokens (see module doc)."""
    adapter = adapter if adapter is not None else get_adapter(model)
    T = int(seq_len)
    layers = []
    for i, layer in enumerate(adapter.layers()):
        shape = adapter.shape(i)
        linear = 2 * T * _linear_entries(layer)
        attention = 4 * T * T * adapter.head_dim * shape.n_heads
        layers.append({
            "layer": i, "heads": shape.n_heads, "kv_heads": shape.n_kv_heads, "ffn_dim": shape.ffn_dim,
            "linear": linear, "attention": attention, "total": linear + attention,
        })
    in_layers = {id(m) for layer in adapter.layers() for m in layer.modules()}
    head_tokens = 1 if adapter.norm_position == "post" else T
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = 0
    for module in model.modules():
        if _is_linear(module) and id(module) not in in_layers:
            tokens = T if module is lm_head else head_tokens
            head += 2 * tokens * module.weight.numel()
    layers_total = sum(row["total"] for row in layers)
    return {
        "seq_len": T,
        "layers": layers,
        "layers_total": layers_total,
        "embeddings": 0,
        "head": head,
        "head_tokens": head_tokens,
        "total": layers_total + head,
        "convention": "2 FLOPs per multiply-accumulate of every linear map, 4*T*head_dim per query head per "
        "token for attention; element-wise ops and embedding lookups not counted",
    }
