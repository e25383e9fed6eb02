"""FLAP and Wanda-sp (baselines/flap.py): the channel metrics match a hand computation, heads average
their channels, standardization puts every layer on one scale, a constant channel is FLAP's first
cut and bias compensation then loses nothing, and `prune.compensate: auto` means bias for them.
(Reaching the target, determinism and protections: tests/test_baselines.py runs every method.)"""

from __future__ import annotations

import copy

import pytest
import torch

from idprior.arch import get_adapter
from idprior.baselines import get_method
from idprior.baselines import resolve_compensation as resolve_mode
from idprior.baselines.flap import channel_scores, unit_scores
from idprior.method.compensate import fit_compensation
from idprior.method.units import Unit
from idprior.model.surgery import apply_plan
from test_compensate import calib, hidden
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama


def _inputs(adapter, model, batches, layer: int, sub: str) -> torch.Tensor:
    """The output projection's input on real tokens [N, F], collected by hand."""
    seen = []
    handle = adapter.out_proj(layer, sub).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    return torch.cat([x[b["attention_mask"].bool()] for x, b in zip(seen, batches)]).double()


@pytest.mark.parametrize("metric", ["fluctuation", "wanda"])
def test_channel_metrics_by_hand(metric):
    model = tiny_llama()
    adapter = get_adapter(model)
    batches = calib()
    got = channel_scores(model, adapter, batches, metric)
    for layer, sub in ((1, "ffn"), (2, "attn")):
        x = _inputs(adapter, model, batches, layer, sub)  # [N, F]
        w = adapter.out_proj(layer, sub).weight.double()  # [D, F]
        if metric == "fluctuation":
            want = x.var(0, unbiased=False) * (w**2).sum(0)
        else:
            want = w.abs().mean(0) * (x**2).mean(0).sqrt()
        torch.testing.assert_close(got[(sub, layer)], want)


def test_head_units_average_their_channels_and_layers_share_one_scale():
    model = tiny_llama()  # 4 query heads, 2 KV groups: unit g = query heads 2g, 2g+1
    adapter = get_adapter(model)
    channels = channel_scores(model, adapter, calib())
    raw = unit_scores(adapter, channels, standardize=False)
    hd = adapter.head_dim
    for g in range(2):
        torch.testing.assert_close(torch.tensor(raw[Unit("head", 0, g)], dtype=torch.float64),
                                   channels[("attn", 0)][2 * g * hd:(2 * g + 2) * hd].mean())
    std = unit_scores(adapter, channels)
    for layer in range(adapter.num_layers):
        neurons = torch.tensor([std[Unit("neuron", layer, j)] for j in range(adapter.shape(layer).ffn_dim)])
        assert abs(float(neurons.mean())) < 1e-6 and abs(float(neurons.std()) - 1) < 1e-6
        assert abs(std[Unit("attn", layer)]) < 1e-6  # the mean of standardized channels
    slots = get_adapter(model, per_query_head=True)  # slot s = query heads s and s + 2
    raw = unit_scores(slots, channels, standardize=False)
    want = (channels[("attn", 0)][:hd].mean() + channels[("attn", 0)][2 * hd:3 * hd].mean()) / 2
    torch.testing.assert_close(torch.tensor(raw[Unit("head", 0, 0)], dtype=torch.float64), want)


@pytest.mark.parametrize("build", [tiny_bert, tiny_gpt2], ids=["bert", "gpt2"])
def test_constant_neuron_goes_first_and_bias_compensation_loses_nothing(build):
    """A neuron whose activation is the same on every token (input row 0, bias 1) has zero fluctuation:
    FLAP removes it first, and its mean output moved into the bias restores the dense model exactly.
    Wanda-sp sees its magnitude and keeps it."""
    model = build()
    adapter = get_adapter(model)
    layer, j = 2, 11
    w1, _ = adapter.sn_targets(layer)[-2]  # FFN input matrix (BERT intermediate / GPT-2 c_fc)
    with torch.no_grad():
        if isinstance(w1, torch.nn.Linear):
            w1.weight[j] = 0
        else:
            w1.weight[:, j] = 0  # Conv1D [in, out]
        w1.bias[j] = 1.0
    batches = calib()
    plan = get_method("flap", standardize=False).plan(model, adapter, batches, target=1e-4)
    assert plan.units == [Unit("neuron", layer, j)]
    assert Unit("neuron", layer, j) not in get_method("wanda-sp", standardize=False).plan(
        model, adapter, batches, target=1e-4).units
    comp = fit_compensation(model, plan.units, batches, mode="bias")
    dense = hidden(model, batches)
    pruned = copy.deepcopy(model)
    apply_plan(pruned, plan.units)
    comp.apply(pruned)
    torch.testing.assert_close(hidden(pruned, batches), dense, atol=1e-5, rtol=1e-5)


def test_auto_compensation_is_bias_for_flap_only():
    assert resolve_mode("auto", "flap") == "bias" and resolve_mode("auto", "wanda-sp") == "bias"
    assert resolve_mode("auto", "snip") == "none" and resolve_mode("auto", "fisher") == "none"
    assert resolve_mode("lsq", "flap") == "lsq" and resolve_mode("none", "flap") == "none"
