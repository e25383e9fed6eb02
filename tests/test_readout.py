"""Readout positions (`readout=True`, always in the pipeline): a classifier's last layer is measured where
its head reads.

A BERT classifier reads only position 0 of the last layer, so a last-layer branch's effect on the
output is its output there; earlier layers reach position 0 through attention from every token.
"""

from __future__ import annotations

import pytest
import torch

from idprior.arch import get_adapter
from idprior.method.scoring import score
from idprior.method.units import Unit
from test_proximal_prior import batch, capture_inputs, explicit_norms, make_prior, no_dropout
from tiny_models import tiny_bert, tiny_gpt2


def _by_layer(scores: dict[Unit, float]) -> dict[tuple[str, int], list[float]]:
    out: dict[tuple[str, int], list[float]] = {}
    for u, v in sorted(scores.items(), key=lambda kv: kv[0].sort_key()):
        out.setdefault((u.kind, u.layer), []).append(v)
    return out


def test_bert_classifier_last_layer_is_measured_at_cls_only():
    model = tiny_bert()
    adapter = get_adapter(model)
    b = batch()
    seen, handles = capture_inputs(model, adapter)
    everywhere = _by_layer(score(model, [b], adapter=adapter, kinds=("head", "neuron")))
    for h in handles:
        h.remove()
    readout = _by_layer(score(model, [b], adapter=adapter, kinds=("head", "neuron"), readout=True))
    last = adapter.num_layers - 1
    cls = torch.zeros_like(b["attention_mask"])
    cls[:, 0] = 1
    at_cls = explicit_norms(adapter, seen, cls)
    for key, norms in readout.items():
        if key[1] < last:
            assert norms == everywhere[key]  # earlier layers: unchanged, bit for bit
        else:
            assert torch.allclose(torch.tensor(norms, dtype=torch.float64), at_cls[key], rtol=1e-4, atol=1e-7), key
            assert norms != everywhere[key]  # the readout really measured something else


def test_language_model_reads_every_position():
    model = tiny_gpt2()
    b = batch()
    assert score(model, [b], readout=True) == score(model, [b])


def test_proximal_prior_last_layer_shrinks_by_the_cls_norm():
    """With readout, the soft threshold is exact on the [CLS] norm of last-layer units (and on the
    all-token norm elsewhere), so units that only act on other tokens in the last layer go first."""
    model = no_dropout(tiny_bert()).train()
    prior, adapter, _ = make_prior(model, lam0=0.3, gain=0.0, readout=True)
    b = batch()
    seen, handles = capture_inputs(model, adapter)
    with torch.no_grad():
        model(**b)
    for h in handles:
        h.remove()
    last = adapter.num_layers - 1
    cls = torch.zeros_like(b["attention_mask"])
    cls[:, 0] = 1
    before = {**explicit_norms(adapter, seen, b["attention_mask"]),
              **{k: v for k, v in explicit_norms(adapter, seen, cls).items() if k[1] == last}}
    assert prior.recorder.count(last) == b["input_ids"].shape[0]
    assert prior.recorder.count(0) == int(b["attention_mask"].sum())
    prior(model, 0, 10)
    for key, n0 in before.items():
        assert torch.allclose(prior.norms[key].cpu(), (n0 - prior.deltas[key].cpu()).clamp(min=0), rtol=1e-4, atol=1e-7), key


def test_after_ln_norms_follow_the_layernorm_gain_and_leave_raw_norms_alone():
    """`after_ln`: tripling one LayerNorm's gain triples the norms of the branch it follows (the next
    layer sees them 3x larger) and leaves the earlier ones alone; raw norms ignore the gain."""
    model = tiny_bert()
    adapter = get_adapter(model)
    b = batch()
    raw = score(model, [b], adapter=adapter)
    before = score(model, [b], adapter=adapter, after_ln=True)
    with torch.no_grad():
        adapter.branch_out_norm(1, "ffn").weight.mul_(3.0)
    raw_after = score(model, [b], adapter=adapter)
    assert all(raw_after[u] == v for u, v in raw.items() if u.layer <= 1)  # raw norms ignore the gain
    after = score(model, [b], adapter=adapter, after_ln=True)
    for u, v in before.items():
        if u.layer == 1 and u.kind in ("neuron", "ffn"):
            assert after[u] == pytest.approx(3 * v, rel=1e-5), u
        elif u.layer <= 1:
            assert after[u] == pytest.approx(v, rel=1e-6), u  # layers up to 1 see the same inputs
    assert before != raw


def test_after_ln_neuron_norm_matches_an_explicit_computation():
    """‖f_j‖ after LN = ‖γ ⊙ C W2[:, j]‖ · sqrt(mean_t a_jt²) · sqrt(mean_t 1/σ_t²), σ_t the LN input std."""
    model = tiny_bert()
    adapter = get_adapter(model)
    b = batch()
    seen, handles = capture_inputs(model, adapter)
    ln = adapter.branch_out_norm(0, "ffn")
    ln_in = {}
    handles.append(ln.register_forward_pre_hook(lambda m, a: ln_in.__setitem__("x", a[0].detach())))
    scores = score(model, [b], adapter=adapter, kinds=("neuron",), after_ln=True)
    for h in handles:
        h.remove()
    m = b["attention_mask"].bool()
    a = seen[("neuron", 0)][m]  # [N, F]
    w = adapter.out_weight(adapter.ffn_out_proj(0)).detach()
    w_eff = ln.weight.detach()[:, None] * (w - w.mean(0, keepdim=True))
    inv = 1 / (ln_in["x"][m].var(-1, unbiased=False) + ln.eps)
    expected = w_eff.norm(dim=0) * a.pow(2).mean(0).sqrt() * inv.mean().sqrt()
    got = torch.tensor([scores[Unit("neuron", 0, j)] for j in range(w.shape[1])])
    assert torch.allclose(got, expected, rtol=1e-4)


def test_proximal_prior_after_ln_uses_the_scoring_norm():
    """The prior's first step measures exactly what `score(after_ln=True)` measures on that batch, and
    soft-thresholds it: norm after = max(0, norm before − δ)."""
    model = no_dropout(tiny_bert())
    b = batch()
    expected = score(model, [b], kinds=("head", "neuron"), after_ln=True)
    prior, adapter, _ = make_prior(model.train(), lam0=0.05, gain=0.0, after_ln=True)
    with torch.no_grad():
        model(**b)
    prior(model, 0, 10)
    checked = 0
    for (kind, layer), n in prior.norms.items():
        before = torch.tensor([expected[Unit(kind, layer, i)] for i in range(n.numel())], dtype=torch.float64)
        assert torch.allclose(n.cpu(), (before - prior.deltas[(kind, layer)].cpu()).clamp(min=0), rtol=1e-4, atol=1e-6)
        checked += n.numel()
    assert checked > 0


def _random_gains(model, seed: int = 0):
    """Norm gains away from 1, so that measuring through them is not a no-op."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                m.weight.copy_(0.2 + 2 * torch.rand(m.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("layer, sub, reader", [(0, "attn", "post_attention_layernorm 0"),
                                                (0, "ffn", "input_layernorm 1"), (-1, "ffn", "final norm")])
def test_pre_ln_branch_is_measured_through_the_next_norm_that_reads_it(layer, sub, reader):
    """Pre-LN (Llama, RMSNorm): ‖f_u‖ after the next norm = ‖γ ⊙ W[:, u] a_u‖ · sqrt(mean_t 1/(ms_t + ε)),
    with ms_t the mean square of that norm's input (the stream after the branch joined it), no centring."""
    from tiny_models import tiny_llama

    model = _random_gains(tiny_llama())
    adapter = get_adapter(model)
    layer = layer % adapter.num_layers
    blocks = model.model.layers
    expected_ln = {"post_attention_layernorm 0": blocks[0].post_attention_layernorm,
                   "input_layernorm 1": blocks[1].input_layernorm, "final norm": model.model.norm}[reader]
    ln = adapter.branch_out_norm(layer, sub)
    assert ln is expected_ln
    b = batch()
    seen, handles = capture_inputs(model, adapter)
    ln_in = {}
    handles.append(ln.register_forward_pre_hook(lambda m, a: ln_in.__setitem__("x", a[0].detach())))
    kind = "head" if sub == "attn" else "neuron"
    scores = score(model, [b], adapter=adapter, kinds=(kind,), after_ln=True)
    raw = score(model, [b], adapter=adapter, kinds=(kind,))
    for h in handles:
        h.remove()
    m = b["attention_mask"].bool()
    w = adapter.out_weight(adapter.attn_out_proj(layer) if sub == "attn" else adapter.ffn_out_proj(layer)).detach()
    seen_w = {(kind, layer): seen[(kind, layer)]}
    inv = 1 / (ln_in["x"][m].pow(2).mean(-1) + ln.variance_epsilon)
    gamma = ln.weight.detach()

    class _GainAdapter:  # explicit_norms on diag(γ) W
        head_dim = adapter.head_dim

        def __getattr__(self, name):
            return getattr(adapter, name)

        def out_weight(self, mod):
            return gamma[:, None] * w

    expected = explicit_norms(_GainAdapter(), seen_w, m)[(kind, layer)] * float(inv.mean().sqrt())
    got = torch.tensor([scores[Unit(kind, layer, i)] for i in range(expected.numel())], dtype=torch.float64)
    assert torch.allclose(got, expected, rtol=1e-4)
    assert not torch.allclose(got, torch.tensor([raw[Unit(kind, layer, i)] for i in range(expected.numel())],
                                                 dtype=torch.float64), rtol=1e-2)


def test_pre_ln_next_norm_skips_a_removed_sub_layer():
    """With layer 1's attention cut out, layer 0's FFN is next read by layer 1's FFN pre-norm."""
    from tiny_models import tiny_llama

    model = tiny_llama()
    adapter = get_adapter(model)
    adapter.remove_attn(1)
    assert adapter.branch_out_norm(0, "ffn") is model.model.layers[1].post_attention_layernorm
    assert get_adapter(tiny_bert()).stream_norms() is None  # post-LN: the LayerNorm each branch joins instead


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_proximal_prior_through_the_next_norm_uses_the_scoring_norm_on_both_layouts(family):
    """Pre-LN as post-LN: the prior's first step soft-thresholds exactly what `score(after_ln=True)` measures."""
    from tiny_models import tiny_llama

    build = {"bert": tiny_bert, "llama": lambda: _random_gains(tiny_llama()), "gpt2": lambda: _random_gains(tiny_gpt2())}
    model = no_dropout(build[family]())
    b = batch()
    expected = score(model, [b], kinds=("head", "neuron"), after_ln=True)
    prior, adapter, _ = make_prior(model.train(), lam0=0.05, gain=0.0, after_ln=True)
    assert len(prior.recorder.out_norms) == 2 * adapter.num_layers
    with torch.no_grad():
        model(**b)
    prior(model, 0, 10)
    for (kind, layer), n in prior.norms.items():
        before = torch.tensor([expected[Unit(kind, layer, i)] for i in range(n.numel())], dtype=torch.float64)
        assert torch.allclose(n.cpu(), (before - prior.deltas[(kind, layer)].cpu()).clamp(min=0), rtol=1e-4, atol=1e-6)
