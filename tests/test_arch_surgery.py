"""Adapters, gates and surgery: a gated model (gate 0) and the physically pruned model must agree.

Families: BERT, RoBERTa (post-LN encoders), GPT-2, Llama, Qwen2 (pre-LN decoders; Llama also with
per-query-head units). Everything runs on tiny random models built from configs.
"""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from idprior.arch import STRUCTURE_KEY, get_adapter, supported_model_types
from idprior.errors import IdpriorError
from idprior.method.gates import Gates
from idprior.method.plan import MEASURE_NAMES, measure_of, model_cost, unit_costs
from idprior.method.units import Unit
from idprior.model.surgery import (
    apply_plan,
    count_params,
    load_pruned,
    load_pruned_with_tokenizer,
    predicted_params,
    save_pruned,
)
from tiny_models import TINY_MODELS, VOCAB, tiny_bert, tiny_llama

DECODERS = {"gpt2", "llama", "qwen2", "llama-slots"}
FAMILIES = ["bert", "roberta", "gpt2", "llama", "qwen2", "llama-slots"]
PAD = 0
NEW_TOKENS = 8


def build(family: str):
    """(model, per_query_head) for a test family id."""
    return TINY_MODELS[family.removesuffix("-slots")](), family.endswith("-slots")


def batch(family: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [2, 9] and an attention mask with padding in row 1 (left for decoders, right for encoders)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    if family in DECODERS:
        mask[1, :3] = 0
    else:
        mask[1, 6:] = 0
    ids[mask == 0] = PAD
    return ids, mask


def outputs(model, ids, mask) -> list[torch.Tensor]:
    """What must match: the logits and the last hidden state, on real (non-padding) tokens only."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    logits = out.logits[real] if out.logits.dim() == 3 else out.logits  # [N, V] tokens or [B, labels]
    return [logits, out.hidden_states[-1][real]]


def greedy(model, ids, mask, **kwargs) -> torch.Tensor:
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        do_sample=False, pad_token_id=PAD, **kwargs,
    )


def random_plan(adapter, rng: random.Random) -> list[Unit]:
    """Per layer: whole attention, every head (collapse), all heads but one, or a random subset;
    likewise for the FFN."""
    units = []
    for layer in range(adapter.num_layers):
        heads, ffn = adapter.num_head_units(layer), adapter.shape(layer).ffn_dim
        r = rng.random()
        if heads == 0:  # already removed
            pass
        elif r < 0.2:
            units.append(Unit("attn", layer))
        elif r < 0.35:
            units += [Unit("head", layer, h) for h in range(heads)]
        elif r < 0.6:
            units += [Unit("head", layer, h) for h in rng.sample(range(heads), heads - 1)]
        else:
            units += [Unit("head", layer, h) for h in rng.sample(range(heads), rng.randint(0, heads - 1))]
        r = rng.random()
        if ffn == 0:
            pass
        elif r < 0.2:
            units.append(Unit("ffn", layer))
        elif r < 0.3:
            units += [Unit("neuron", layer, j) for j in range(ffn)]
        else:
            units += [Unit("neuron", layer, j) for j in rng.sample(range(ffn), rng.randint(0, ffn - 1))]
    return units


def fixed_plan(adapter) -> list[Unit]:
    """Layer 0 loses its attention (the layer transformers asks for the cache length) and FFN,
    layer 1 every head but one unit, layer 2 every head (collapse), layer 3 every neuron (collapse)."""
    last = adapter.num_layers - 1
    units = [Unit("attn", 0), Unit("ffn", 0), Unit("neuron", 1, 5), Unit("neuron", 2, 0)]
    units += [Unit("head", 1, h) for h in range(1, adapter.num_head_units(1))]
    units += [Unit("head", 2, h) for h in range(adapter.num_head_units(2))]
    units += [Unit("neuron", last, j) for j in range(adapter.shape(last).ffn_dim)]
    return units


def gated_and_pruned(family: str, plan_fn):
    """The model gated by the plan (hooks attached) and a pruned deep copy."""
    model, per_query_head = build(family)
    adapter = get_adapter(model, per_query_head=per_query_head)
    plan = plan_fn(adapter)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan, get_adapter(pruned, per_query_head=per_query_head))
    gates = Gates(model, adapter)
    gates.apply_units(plan)
    return model, pruned, gates, plan


def plans_for(seed: int):
    return fixed_plan if seed < 0 else (lambda adapter: random_plan(adapter, random.Random(seed)))


# ---- the core invariant ----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [-1, 1, 2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_gated_equals_pruned(family, seed):
    gated, pruned, gates, plan = gated_and_pruned(family, plans_for(seed))
    ids, mask = batch(family, seed)
    gates.detach()
    dense_out = outputs(gated, ids, mask)
    gates.attach()
    for padded in (torch.ones_like(mask), mask):
        for got, want in zip(outputs(pruned, ids, padded), outputs(gated, ids, padded)):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the plan really changes the function, so the agreement above means something
    assert not torch.allclose(outputs(pruned, ids, mask)[0], dense_out[0], atol=1e-3)
    assert all(p.numel() > 0 for p in pruned.parameters())  # no zero-width Linear


@pytest.mark.parametrize("seed", [-1, 4])
@pytest.mark.parametrize("family", sorted(DECODERS))
def test_generation_with_cache(family, seed):
    gated, pruned, gates, _ = gated_and_pruned(family, plans_for(seed))
    ids, mask = batch(family, seed)
    tokens_gated = greedy(gated, ids, mask)
    tokens_pruned = greedy(pruned, ids, mask)
    assert tokens_pruned.shape[1] == ids.shape[1] + NEW_TOKENS
    assert torch.equal(tokens_gated, tokens_pruned)
    assert torch.equal(tokens_pruned, greedy(pruned, ids, mask, use_cache=False))


def test_generation_with_every_attention_removed():
    """No attention anywhere: the cache must still track positions (RoPE) through the stub K/V."""
    model = tiny_llama()
    adapter = get_adapter(model)
    apply_plan(model, [Unit("attn", i) for i in range(adapter.num_layers)])
    ids, mask = batch("llama")
    assert torch.equal(greedy(model, ids, mask), greedy(model, ids, mask, use_cache=False))


@pytest.mark.parametrize("family", FAMILIES)
def test_open_gates_change_nothing(family):
    model, per_query_head = build(family)
    ids, mask = batch(family)
    plain = outputs(model, ids, mask)
    with Gates(model, per_query_head=per_query_head) as gates:
        assert gates.attached
        gated = outputs(model, ids, mask)
    assert not gates.attached
    for got, want in zip(gated, plain):
        assert torch.equal(got, want)


# ---- parameter accounting ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_predicted_params_exact(family):
    for seed in (-1, 5, 6, 7):
        model, per_query_head = build(family)
        adapter = get_adapter(model, per_query_head=per_query_head)
        plan = plans_for(seed)(adapter)
        expected = predicted_params(model, plan, adapter)
        apply_plan(model, plan, adapter)
        assert count_params(model) == expected
        # iterative: a second plan on the pruned model, with indices into its current units
        second = random_plan(adapter, random.Random(seed + 100))
        expected = predicted_params(model, second, adapter)
        apply_plan(model, second, adapter)
        assert count_params(model) == expected
        assert getattr(model.config, STRUCTURE_KEY) == [s.to_dict() for s in adapter.shapes()]


def test_collapse_and_layer_params():
    model = tiny_bert()
    adapter = get_adapter(model)
    apply_plan(model, [Unit("head", 0, h) for h in range(4)] + [Unit("neuron", 1, j) for j in range(64)])
    assert not adapter.shape(0).has_attn and adapter.attn_out_proj(0) is None
    assert not adapter.shape(1).has_ffn and adapter.ffn_out_proj(1) is None
    assert adapter.sn_targets(0) == [(adapter._ffn_in(0), "linear"), (adapter.ffn_out_proj(0), "linear")]


@pytest.mark.parametrize("family", FAMILIES)
def test_unit_costs_add_up_to_the_model(family):
    """`plan.unit_costs` (what a cost-weighted prior weighs by): heads and neurons plus the parts no unit
    owns, or the whole sub-layers, add up to the model's cost in every measure; removed sub-layers have none."""
    model, per_query_head = build(family)
    adapter = get_adapter(model, per_query_head=per_query_head)
    apply_plan(model, [Unit("attn", 1), Unit("ffn", 2), Unit("head", 0, 0)], adapter)
    for measure in MEASURE_NAMES:
        full = measure_of(model_cost(adapter), measure, 16)
        members = unit_costs(adapter, ("head", "neuron"), measure, 16)
        unowned = sum(measure_of(adapter.unit_cost(k, i), measure, 16) for k in ("attn", "ffn")
                      for i in range(adapter.num_layers))
        assert sum(n * c for n, c in members.values()) + unowned == full
        whole = unit_costs(adapter, ("attn", "ffn"), measure, 16)
        assert all(n == 1 for n, _ in whole.values()) and sum(c for _, c in whole.values()) == full
    assert ("attn", 1) not in whole and ("ffn", 2) not in whole and members[("head", 0)][0] == adapter.num_head_units(0)


def test_slot_units_share_query_slots_across_groups():
    model = tiny_llama()
    adapter = get_adapter(model, per_query_head=True)
    assert adapter.num_head_units(0) == 2  # 4 query heads in 2 groups -> 2 slots
    apply_plan(model, [Unit("head", 0, 1)], adapter)
    shape = adapter.shape(0)
    assert (shape.n_heads, shape.n_kv_heads) == (2, 2)  # every group kept its KV head and one query
    assert model.model.layers[0].self_attn.num_key_value_groups == 1


# ---- dtype, saving and loading -----------------------------------------------------------------------
def test_bf16_stays_bf16(tmp_path):
    model = tiny_llama(dtype=torch.bfloat16)
    apply_plan(model, fixed_plan(get_adapter(model)))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    save_pruned(model, None, tmp_path / "bf16")
    loaded = load_pruned(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids, mask = batch("llama")
    for got, want in zip(outputs(loaded, ids, mask), outputs(model, ids, mask)):
        assert torch.equal(got, want)
    assert load_pruned(tmp_path / "bf16", dtype="float32").dtype == torch.float32


LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    from idprior.model.surgery import load_pruned
    root = sys.argv[1]
    inputs = load_file(root + "/inputs.safetensors")
    result = {}
    for name in json.loads(sys.argv[2]):
        model = load_pruned(root + "/" + name)
        with torch.no_grad():
            out = model(input_ids=inputs[name + ".ids"], attention_mask=inputs[name + ".mask"])
        result[name] = out.logits.contiguous()
    save_file(result, root + "/logits.safetensors")
    """
)


def test_save_load_fresh_process_bit_identical(tmp_path):
    names = ["bert", "roberta", "gpt2", "llama", "qwen2", "llama-bf16"]
    inputs, want = {}, {}
    for name in names:
        family = name.removesuffix("-bf16")
        dtype = torch.bfloat16 if name.endswith("-bf16") else torch.float32
        model = TINY_MODELS[family](dtype=dtype)
        apply_plan(model, random_plan(get_adapter(model), random.Random(9)))
        save_pruned(model, None, tmp_path / name, plan={"removed": ["head:0:1"]})
        ids, mask = batch(family)
        inputs[f"{name}.ids"], inputs[f"{name}.mask"] = ids, mask
        with torch.no_grad():
            want[name] = model(input_ids=ids, attention_mask=mask).logits
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path), json.dumps(names)], check=True, timeout=120, env=env
    )
    got = load_file(str(tmp_path / "logits.safetensors"))
    for name in names:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(got[name], want[name]), name
    folder = tmp_path / "gpt2"
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors", "plan.json"}
    assert not list(folder.glob("*.bin")) and not list(folder.glob("*.pt"))
    config = json.loads((folder / "config.json").read_text())
    assert len(config[STRUCTURE_KEY]) == config["n_layer"]


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", pad_token="w0")
    model = tiny_bert()
    save_pruned(model, tokenizer, tmp_path / "tok")
    loaded, loaded_tok = load_pruned_with_tokenizer(tmp_path / "tok")
    assert loaded_tok("w5 w7")["input_ids"] == tokenizer("w5 w7")["input_ids"]
    assert load_pruned_with_tokenizer(tmp_path / "tok")[0].config.model_type == "bert"
    save_pruned(model, None, tmp_path / "tok")  # overwrite atomically: the tokenizer files go
    assert load_pruned_with_tokenizer(tmp_path / "tok")[1] is None


def test_load_errors(tmp_path):
    with pytest.raises(IdpriorError, match="not a folder"):
        load_pruned(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdpriorError, match="config.json"):
        load_pruned(tmp_path / "empty")
    save_pruned(tiny_bert(), None, tmp_path / "noweights")
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(IdpriorError, match="safetensors"):
        load_pruned(tmp_path / "noweights")


# ---- errors ---------------------------------------------------------------------------------------------
def test_unsupported_model_type():
    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="t5")
    with pytest.raises(IdpriorError) as err:
        get_adapter(model)
    for model_type in ("bert", "roberta", "electra", "gpt2", "llama", "qwen2", "mistral"):
        assert model_type in str(err.value)
    assert set(supported_model_types()) >= {"bert", "gpt2", "llama"}


def test_surgery_refuses_parametrizations(tmp_path):
    model = tiny_bert()
    adapter = get_adapter(model)
    torch.nn.utils.parametrizations.spectral_norm(adapter.attn_out_proj(0))
    with pytest.raises(RuntimeError, match="fold"):
        apply_plan(model, [Unit("head", 0, 0)])
    with pytest.raises(RuntimeError, match="fold"):
        save_pruned(model, None, tmp_path / "sn")
    assert predicted_params(model, [Unit("head", 0, 0)]) < count_params(model)


def test_bad_units_leave_model_unchanged():
    model = tiny_llama()
    before = count_params(model)
    with pytest.raises(IdpriorError, match="head:1:2"):
        apply_plan(model, [Unit("attn", 0), Unit("head", 1, 2)])  # 2 KV groups: indices 0, 1
    with pytest.raises(IdpriorError, match="layer 7"):
        apply_plan(model, [Unit("ffn", 7)])
    assert count_params(model) == before
    with pytest.raises(IdpriorError):
        Gates(model).set(Unit("neuron", 0, 64), 0.0)


# ---- gates: observers and gradients -----------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_observer_shapes(family):
    model, per_query_head = build(family)
    apply_plan(model, [Unit("attn", 0), Unit("ffn", 1), Unit("neuron", 2, 3)])
    adapter = get_adapter(model, per_query_head=per_query_head)
    seen = {}
    gates = Gates(model, adapter)
    gates.observers.append(lambda layer, site, t, module: seen.__setitem__((layer, site), tuple(t.shape)))
    ids, mask = batch(family)
    gates.token_mask = mask.bool()
    outputs(model, ids, mask)
    d, hd = adapter.hidden_size, adapter.head_dim
    expected = {}
    for layer, shape in enumerate(adapter.shapes()):
        if shape.has_attn:
            expected[(layer, "heads")] = (*ids.shape, shape.n_heads * hd)
            expected[(layer, "attn")] = (*ids.shape, d)
        if shape.has_ffn:
            expected[(layer, "neurons")] = (*ids.shape, shape.ffn_dim)
            expected[(layer, "ffn")] = (*ids.shape, d)
    assert seen == expected
    assert len(gates.head[0]) == 0 and len(gates.neuron[1]) == 0 and len(gates.neuron[2]) == 63


def test_gates_are_differentiable():
    model = tiny_llama()
    gates = Gates(model).requires_grad_()
    ids, mask = batch("llama")
    model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    for gate in gates.tensors():
        assert gate.grad is not None and gate.grad.abs().sum() > 0
    gates.set(Unit.parse("head:0:1"), 0.0)
    gates.set("ffn:2", 0.0)
    assert [str(u) for u in gates.closed_units()] == ["head:0:1", "ffn:2"]
    gates.reset()
    assert gates.closed_units() == []
