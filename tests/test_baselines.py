"""Baselines: every method reaches the target within one unit (one layer for layer drops), is
deterministic, respects the protections, and ranks a unit that was made a no-op first.

Tiny random models (BERT, GPT-2, Llama with GQA); calibration batches are random tokens with some
padding, class labels for BERT and next-token labels for the decoders.
"""

from __future__ import annotations

import pytest
import torch

from idprior.arch import get_adapter
from idprior.baselines import METHODS, get_method
from idprior.baselines.gradients import gate_gradient_stats
from idprior.baselines.layerdrop import block_influence
from idprior.errors import IdpriorError
from idprior.method.gates import Gates
from idprior.method.plan import measure_of, measure_total, own_cost, sublayer_cost
from idprior.method.units import Unit
from idprior.model.surgery import apply_plan, count_params
from tiny_models import VOCAB, tiny_bert, tiny_gpt2, tiny_llama

BUILDERS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
LAYER_METHODS = {"shortgpt", "top-layers"}
TINY_TARGET = 1e-4  # removes exactly one unit (or one layer)


def batches(family: str, n: int = 2, size: int = 3, seq: int = 10) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (size, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq - 3:] = 0  # right padding in the first example
        labels = torch.randint(0, 3, (size,), generator=g) if family == "bert" else ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def max_step(adapter, measure: str, seq_len: int, layers: bool) -> float:
    """The largest amount one removal can add: a whole layer, or a unit plus its sub-layer's rest."""
    m = lambda cost: measure_of(cost, measure, seq_len)  # noqa: E731
    steps = []
    for layer in range(adapter.num_layers):
        attn, ffn = sublayer_cost(adapter, "attn", layer), sublayer_cost(adapter, "ffn", layer)
        if layers:
            steps.append(m(attn) + m(ffn))
        else:
            steps.append(m(adapter.unit_cost("head", layer)) + m(adapter.unit_cost("attn", layer)))
            steps.append(m(adapter.unit_cost("neuron", layer)) + m(adapter.unit_cost("ffn", layer)))
    return max(steps)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("name", list(METHODS))
def test_reaches_target_deterministic_and_protected(family, name):
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    calib = batches(family)
    method = get_method(name)
    for target, measure in ((0.3, "encoder_params"), (0.5, "encoder_params"), (0.5, "flops")):
        plan = method.plan(model, adapter, calib, target=target, measure=measure, seq_len=16, seed=0)
        again = get_method(name).plan(model, adapter, calib, target=target, measure=measure, seq_len=16, seed=0)
        assert plan.method == name
        assert plan.units == again.units, "same seed must give the same plan"
        before = plan.measures["before"][measure]
        removed = before - plan.measures["after"][measure]
        assert removed >= target * before
        assert removed - max_step(adapter, measure, 16, name in LAYER_METHODS) < target * before
        assert any(row["head_units"] > 0 for row in plan.structure), "never remove every attention sub-layer"
        assert any(row["ffn"] > 0 for row in plan.structure), "never remove every FFN sub-layer"
        if name in LAYER_METHODS:
            layers = {u.layer for u in plan.units}
            assert set(plan.units) == {Unit(k, la) for la in layers for k in ("attn", "ffn")}
    # the plan is one the surgery accepts, and its parameter count is exact
    expected = plan.measures["after"]["total_params"]
    assert count_params(apply_plan(model, plan.units, adapter)) == expected


def test_random_seed_changes_the_plan():
    model = tiny_bert()
    adapter = get_adapter(model)
    method = get_method("random")
    a, b = (method.plan(model, adapter, [], target=0.3, seed=s) for s in (0, 1))
    assert a.units != b.units


@torch.no_grad()
def _zero_head(family: str, model, layer: int, unit: int, hd: int) -> None:
    """Zero every weight a head unit owns (Q/K/V rows, O columns), by hand per family."""
    rows = slice(unit * hd, (unit + 1) * hd)
    if family == "bert":
        attn = model.bert.encoder.layer[layer].attention
        for lin in (attn.self.query, attn.self.key, attn.self.value):
            lin.weight[rows] = 0
        attn.output.dense.weight[:, rows] = 0
    elif family == "gpt2":
        attn = model.transformer.h[layer].attn
        d = attn.c_attn.weight.shape[0]
        for part in range(3):
            attn.c_attn.weight[:, part * d + rows.start: part * d + rows.stop] = 0
        attn.c_proj.weight[rows] = 0
    else:  # llama, unit = KV group g: query heads 2g, 2g+1 (4 heads, 2 KV heads)
        attn = model.model.layers[layer].self_attn
        q_rows = slice(2 * unit * hd, (2 * unit + 2) * hd)
        attn.q_proj.weight[q_rows] = 0
        attn.k_proj.weight[rows] = 0
        attn.v_proj.weight[rows] = 0
        attn.o_proj.weight[:, q_rows] = 0


@torch.no_grad()
def _zero_neuron(family: str, model, layer: int, j: int) -> None:
    if family == "bert":
        block = model.bert.encoder.layer[layer]
        block.intermediate.dense.weight[j] = 0
        block.output.dense.weight[:, j] = 0
    elif family == "gpt2":
        mlp = model.transformer.h[layer].mlp
        mlp.c_fc.weight[:, j] = 0
        mlp.c_proj.weight[j] = 0
    else:
        mlp = model.model.layers[layer].mlp
        mlp.gate_proj.weight[j] = 0
        mlp.up_proj.weight[j] = 0
        mlp.down_proj.weight[:, j] = 0


@pytest.mark.parametrize("family", list(BUILDERS))
def test_magnitude_removes_zeroed_units_first(family):
    for unit in (Unit("head", 2, 1), Unit("neuron", 1, 7)):
        model = BUILDERS[family]()
        adapter = get_adapter(model)
        if unit.kind == "head":
            _zero_head(family, model, unit.layer, unit.index, adapter.head_dim)
        else:
            _zero_neuron(family, model, unit.layer, unit.index)
        plan = get_method("magnitude").plan(model, adapter, [], target=TINY_TARGET)
        assert plan.units == [unit]


def test_magnitude_per_query_head_slots():
    """In slot mode a head unit owns no K/V rows: zeroing a slot's Q rows and O columns is enough."""
    model = tiny_llama()
    adapter = get_adapter(model, per_query_head=True)
    hd = adapter.head_dim
    attn = model.model.layers[3].self_attn
    with torch.no_grad():
        for q in (1, 3):  # slot 1 = query head 1 of each of the 2 groups
            attn.q_proj.weight[q * hd:(q + 1) * hd] = 0
            attn.o_proj.weight[:, q * hd:(q + 1) * hd] = 0
    plan = get_method("magnitude").plan(model, adapter, [], target=TINY_TARGET)
    assert plan.units == [Unit("head", 3, 1)]


@pytest.mark.parametrize("family", list(BUILDERS))
def test_head_share_splits_a_baselines_budget(family):
    """Raw magnitudes rank every head above every neuron, so a global ranking takes neurons only;
    with selection "share", `head_share` of the budget comes from heads (to within one head)."""
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    plain = get_method("magnitude").plan(model, adapter, [], target=0.3)
    shared = get_method("magnitude", selection="share", head_share=0.3).plan(model, adapter, [], target=0.3)
    assert plain.counts()["head"] == 0
    head_cost = lambda layer: measure_of(own_cost(adapter, "head", layer), "encoder_params", 128)  # noqa: E731
    from_heads = sum(head_cost(u.layer) for u in shared.units if u.kind == "head")
    budget = 0.3 * measure_total(adapter, "encoder_params", 128)
    assert 0.3 * budget <= from_heads < 0.3 * budget + max(head_cost(i) for i in range(adapter.num_layers))
    assert shared.selection == "share" and shared.method == "magnitude"


def test_share_without_head_share_is_an_error():
    model = tiny_bert()
    with pytest.raises(IdpriorError, match="head_share"):
        get_method("magnitude", selection="share").plan(model, get_adapter(model), [], target=0.3)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("name", ["michel", "fisher"])
def test_gradient_methods_remove_dead_branches_first(family, name):
    for unit in (Unit("head", 1, 0), Unit("neuron", 2, 5)):
        model = BUILDERS[family]()
        adapter = get_adapter(model)
        hd = adapter.head_dim
        with torch.no_grad():  # zero the branch's output map only: its input stays alive
            if unit.kind == "head":
                q = adapter.head_unit_of_query_heads(unit.layer) == unit.index
                cols = torch.arange(q.numel() * hd).view(-1, hd)[q].flatten()
                adapter.attn_out_proj(unit.layer).weight[:, cols] = 0
            else:
                adapter.ffn_out_proj(unit.layer).weight[:, unit.index] = 0
        calib = batches(family)
        stats = gate_gradient_stats(model, adapter, calib)
        assert stats["abs"][unit] == 0 and stats["sq"][unit] == 0
        assert sum(v == 0 for k, v in stats["abs"].items() if k.kind in ("head", "neuron")) == 1
        plan = get_method(name).plan(model, adapter, calib, target=TINY_TARGET)
        assert plan.units == [unit]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_per_example_gradients_match_autograd(family):
    """With one example per batch, the hook-based gradients equal autograd's on the gates."""
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    calib = [{k: v[:1] for k, v in b.items()} for b in batches(family, n=1)]
    stats = gate_gradient_stats(model, adapter, calib)
    with Gates(model, adapter) as gates:
        gates.requires_grad_(True)
        grads = torch.autograd.grad(model(**calib[0]).loss, [*gates.head, *gates.neuron])
    n = adapter.num_layers
    for layer in range(n):
        for kind, g in (("head", grads[layer]), ("neuron", grads[n + layer])):
            ours = torch.tensor([stats["abs"][Unit(kind, layer, i)] for i in range(len(g))], dtype=torch.float64)
            torch.testing.assert_close(ours, g.abs().double(), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_shortgpt_drops_identity_block_first(family):
    model = BUILDERS[family]()
    adapter = get_adapter(model)
    with torch.no_grad():  # pre-LN block with zero out-projections is exactly the identity
        for proj in (adapter.attn_out_proj(1), adapter.ffn_out_proj(1)):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    calib = batches(family)
    bi = block_influence(model, adapter, calib)
    assert abs(bi[1]) < 1e-5 and min(bi[0], bi[2], bi[3]) > 1e-3
    plan = get_method("shortgpt").plan(model, adapter, calib, target=TINY_TARGET)
    assert plan.units == [Unit("attn", 1), Unit("ffn", 1)]


def test_top_layers_drops_the_last_layers():
    model = tiny_bert()
    adapter = get_adapter(model)
    plan = get_method("top-layers").plan(model, adapter, [], target=0.3)
    assert plan.units == [Unit(k, la) for la in (2, 3) for k in ("attn", "ffn")]


def test_layer_drop_never_removes_every_layer():
    model = tiny_gpt2()
    with pytest.raises(IdpriorError, match="out of reach"):
        get_method("top-layers").plan(model, get_adapter(model), [], target=0.9)


def test_unknown_method_lists_names():
    with pytest.raises(IdpriorError) as err:
        get_method("nope")
    for name in ("random", "magnitude", "michel", "fisher", "shortgpt", "top-layers"):
        assert name in str(err.value)


def test_gradient_methods_need_labels():
    model = tiny_bert()
    calib = [{k: v for k, v in b.items() if k != "labels"} for b in batches("bert")]
    with pytest.raises(IdpriorError, match="labels"):
        get_method("fisher").plan(model, get_adapter(model), calib, target=0.3)
