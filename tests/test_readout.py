"""`prune.norm_positions: readout`: a classifier's last layer is measured where its head reads.

A BERT classifier reads only position 0 of the last layer, so a last-layer branch's effect on the
output is its output there; earlier layers reach position 0 through attention from every token.
"""

from __future__ import annotations

import torch

from idprior.arch import get_adapter
from idprior.scoring import score
from idprior.units import Unit
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
