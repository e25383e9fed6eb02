"""Pruned-model classes for stock transformers: the modeling file of a folder written by idprior.

`idprior.save_pruned` copies this file into the folder as `modeling_idprior.py` and appends one
class per auto class, named like the stock class it extends (e.g. `BertForSequenceClassification`);
`config.json`'s `auto_map` points at them. With `trust_remote_code=True`, transformers builds the
stock model, and this code then gives every layer the width recorded in `config.idprior_layers`
(attention heads, KV heads, FFN neurons; 0 = the sub-layer was pruned away) before the weights
are loaded, so `from_pretrained` and `pipeline` work without idprior installed.

This file must stay standalone: it imports torch and transformers only (it is copied, not
imported, and the machine loading the model may not have idprior). The weights that the shapes
are cut from here do not matter: from_pretrained overwrites every one of them.

Supported families (config.model_type): BERT-style post-LN encoders (bert, roberta, electra,
xlm-roberta, camembert), gpt2, and Llama-style pre-LN decoders (llama, qwen2, mistral).
"""

import torch
import transformers  # noqa: F401 - the appended classes extend transformers.<Class>
from torch import nn

STRUCTURE_KEY = "idprior_layers"  # per-layer shapes: [{"n_heads", "n_kv_heads", "ffn_dim"}, ...]
OUT_BIAS_KEY = "idprior_out_bias"  # output projections given a bias by idprior: ["attn:3", "ffn:0", ...]
ATTN_KEY = "idprior_attn_implementation"  # the attention kernel the model was saved with


# ---- stand-ins for removed sub-layers -------------------------------------------------------------
class PostNormOnlyOutput(nn.Module):
    """A BERT-style output block whose branch was pruned away: LayerNorm(residual + 0)."""

    def __init__(self, layer_norm):
        super().__init__()
        self.LayerNorm = layer_norm  # same attribute name, so the checkpoint key stays the stock one

    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(input_tensor)


class PostNormOnlyAttention(nn.Module):
    """A BERT-style attention block pruned away: returns (LayerNorm(x), None) like the stock one."""

    def __init__(self, layer_norm):
        super().__init__()
        self.output = PostNormOnlyOutput(layer_norm)

    def forward(self, hidden_states, *args, **kwargs):
        return self.output(None, hidden_states), None


class ZeroAttention(nn.Module):
    """A pre-LN attention branch pruned away: it adds nothing to the residual stream.

    Generation reads the past length from the KV cache of a layer, so a layer that never writes
    to its cache would report 0; this one appends a [batch, 1, tokens, 1] zero key/value, which
    no query ever attends to.
    """

    def __init__(self, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")  # the name before transformers 5.x renamed it
        if cache is not None and hasattr(cache, "update"):
            stub = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(stub, stub, self.layer_idx)
        return hidden_states.new_zeros(()), None  # a 0-dim zero: residual + 0 is the residual


class ZeroFeedForward(nn.Module):
    """A pre-LN feed-forward branch pruned away: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states.new_zeros(())


# ---- resizing -------------------------------------------------------------------------------------
def _cut(tensor, dim, spans):
    """The parts [start, start + length) of `tensor` along `dim`, concatenated."""
    return torch.cat([tensor.narrow(dim, start, length) for start, length in spans], dim).clone()


def resize(module, side, spans):
    """Keep the output ("out") or input ("in") features in `spans` of an nn.Linear or a
    transformers Conv1D (which stores its weight as [in, out])."""
    linear = isinstance(module, nn.Linear)
    dim = {("out", True): 0, ("in", True): 1, ("out", False): 1, ("in", False): 0}[side, linear]
    weight = module.weight
    module.weight = nn.Parameter(_cut(weight, dim, spans), requires_grad=weight.requires_grad)
    size = sum(length for _, length in spans)
    if side == "out":
        if module.bias is not None:
            bias = module.bias
            module.bias = nn.Parameter(_cut(bias, 0, spans), requires_grad=bias.requires_grad)
        setattr(module, "out_features" if linear else "nf", size)
    else:
        setattr(module, "in_features" if linear else "nx", size)


def _head_dim(config):
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _bert_layers(model, shapes):
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for layer, shape in zip(model.base_model.encoder.layer, shapes):
        if shape["n_heads"] == 0:
            layer.attention = PostNormOnlyAttention(layer.attention.output.LayerNorm)
        else:
            attn, width = layer.attention.self, shape["n_heads"] * head_dim
            if attn.query.out_features != width:
                for linear in (attn.query, attn.key, attn.value):
                    resize(linear, "out", [(0, width)])
                resize(layer.attention.output.dense, "in", [(0, width)])
                attn.num_attention_heads, attn.all_head_size = shape["n_heads"], width
        if shape["ffn_dim"] == 0:
            layer.intermediate = nn.Identity()
            layer.output = PostNormOnlyOutput(layer.output.LayerNorm)
        elif layer.intermediate.dense.out_features != shape["ffn_dim"]:
            resize(layer.intermediate.dense, "out", [(0, shape["ffn_dim"])])
            resize(layer.output.dense, "in", [(0, shape["ffn_dim"])])


def _gpt2_layers(model, shapes):
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    for block, shape in zip(model.base_model.h, shapes):
        if shape["n_heads"] == 0:
            block.attn, block.ln_1 = ZeroAttention(block.attn.layer_idx), nn.Identity()
        elif block.attn.num_heads != shape["n_heads"]:
            full, width = block.attn.split_size, shape["n_heads"] * head_dim
            resize(block.attn.c_attn, "out", [(part * full, width) for part in range(3)])  # [q | k | v]
            resize(block.attn.c_proj, "in", [(0, width)])
            block.attn.num_heads, block.attn.split_size = shape["n_heads"], width
        if shape["ffn_dim"] == 0:
            block.mlp, block.ln_2 = ZeroFeedForward(), nn.Identity()
        elif block.mlp.c_fc.nf != shape["ffn_dim"]:
            resize(block.mlp.c_fc, "out", [(0, shape["ffn_dim"])])
            resize(block.mlp.c_proj, "in", [(0, shape["ffn_dim"])])


def _llama_layers(model, shapes):
    head_dim = _head_dim(model.config)
    for layer, shape in zip(model.base_model.layers, shapes):
        attn = layer.self_attn
        if shape["n_heads"] == 0:
            layer.self_attn, layer.input_layernorm = ZeroAttention(attn.layer_idx), nn.Identity()
        elif (attn.q_proj.out_features, attn.k_proj.out_features) != (
            shape["n_heads"] * head_dim, shape["n_kv_heads"] * head_dim
        ):
            resize(attn.q_proj, "out", [(0, shape["n_heads"] * head_dim)])
            resize(attn.k_proj, "out", [(0, shape["n_kv_heads"] * head_dim)])
            resize(attn.v_proj, "out", [(0, shape["n_kv_heads"] * head_dim)])
            resize(attn.o_proj, "in", [(0, shape["n_heads"] * head_dim)])
            attn.num_key_value_groups = shape["n_heads"] // shape["n_kv_heads"]
        if shape["ffn_dim"] == 0:
            layer.mlp, layer.post_attention_layernorm = ZeroFeedForward(), nn.Identity()
        elif layer.mlp.down_proj.in_features != shape["ffn_dim"]:
            resize(layer.mlp.gate_proj, "out", [(0, shape["ffn_dim"])])
            resize(layer.mlp.up_proj, "out", [(0, shape["ffn_dim"])])
            resize(layer.mlp.down_proj, "in", [(0, shape["ffn_dim"])])


def _llama_out_proj(model, layer, sub):
    block = model.base_model.layers[layer]
    return block.self_attn.o_proj if sub == "attn" else block.mlp.down_proj


# Families whose output projections can lack a bias that compensation after pruning added.
OUT_PROJ = dict.fromkeys(("llama", "qwen2", "mistral"), _llama_out_proj)


def _add_recorded_biases(model):
    """Zero biases on the output projections listed in config.idprior_out_bias (the checkpoint holds
    their values), so that from_pretrained finds a place for every saved weight."""
    for site in getattr(model.config, OUT_BIAS_KEY, None) or []:
        sub, layer = site.split(":")
        proj = OUT_PROJ[model.config.model_type](model, int(layer), sub)
        if getattr(proj, "bias", None) is None:
            proj.bias = nn.Parameter(proj.weight.new_zeros(proj.weight.shape[0]))  # [out_features]


FAMILIES = {
    **dict.fromkeys(("bert", "roberta", "electra", "xlm-roberta", "camembert"), _bert_layers),
    "gpt2": _gpt2_layers,
    **dict.fromkeys(("llama", "qwen2", "mistral"), _llama_layers),
}


def apply_recorded_structure(model):
    """Give a freshly built stock model the per-layer widths recorded in its config."""
    shapes = getattr(model.config, STRUCTURE_KEY, None)
    if not shapes:
        return
    reshape = FAMILIES.get(model.config.model_type)
    if reshape is None:
        raise ValueError(f"model_type {model.config.model_type!r} has no pruned-layer support in this file")
    with torch.no_grad():
        reshape(model, shapes)
        _add_recorded_biases(model)


class PrunedLayersMixin:
    """Put first in the bases of a stock model class: builds it, then applies the recorded widths."""

    def __init__(self, config, *args, **kwargs):
        # Unless the caller picked an attention kernel, use the one the model was saved with
        # (recorded by idprior), so the logits match idprior.load_pruned's bit for bit.
        recorded = getattr(config, ATTN_KEY, None)
        if recorded in ("eager", "sdpa") and getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = recorded
        super().__init__(config, *args, **kwargs)
        apply_recorded_structure(self)


# ---- the classes of this folder (written by idprior.save_pruned; config.json auto_map) -----------
