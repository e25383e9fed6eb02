"""Scores and selection options for pre-LN decoders (issue 15): `--score residual` divides by the RMS
of the residual stream each branch writes into, `min_keep` keeps a fraction of every layer, and
`protect_first` / `protect_last` keep whole layers, for SNIP and for every baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from idprior.arch import get_adapter
from idprior.baselines import METHODS, get_method
from idprior.errors import IdpriorError
from idprior.method.scoring import score
from idprior.method.selection import protected_layers, select
from idprior.method.units import Unit
from test_baselines import LAYER_METHODS, batches
from tiny_models import tiny_bert, tiny_llama


def _rms_inputs(model, adapter, calib, layer: int) -> tuple[float, float]:
    """RMS over real tokens of the layer input and of the FFN's residual stream, by hand."""
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, []).append(kwargs.get("hidden_states", args[0] if args else None).detach())
        return hook

    handles = [adapter.layers()[layer].register_forward_pre_hook(grab("x"), with_kwargs=True),
               adapter.ffn_residual(layer).register_forward_pre_hook(grab("h"), with_kwargs=True)]
    with torch.no_grad():
        for b in calib:
            model(**{k: v for k, v in b.items() if k != "labels"})
    for h in handles:
        h.remove()
    rms = {}
    for name, xs in seen.items():
        real = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(xs, calib)]).double()  # [N, D]
        rms[name] = float((real**2).sum(-1).mean().sqrt())
    return rms["x"], rms["h"]


@pytest.mark.parametrize("family,build", [("llama", tiny_llama), ("bert", tiny_bert)])
def test_residual_score_divides_by_the_stream_each_branch_writes_into(family, build):
    model = build()
    adapter = get_adapter(model)
    calib = batches(family)
    absolute = score(model, calib)
    relative = score(model, calib, relative=True)
    residual = score(model, calib, residual=True)
    for layer in range(adapter.num_layers):
        x, h = _rms_inputs(model, adapter, calib, layer)
        if family == "llama":  # pre-LN: the FFN's stream is not the layer input, so the check means something
            assert abs(h - x) > 0.01 * x
        for u in (Unit("head", layer, 1), Unit("attn", layer)):
            assert residual[u] == pytest.approx(absolute[u] / x, rel=1e-5)
            assert residual[u] == pytest.approx(relative[u], rel=1e-9)
        for u in (Unit("neuron", layer, 3), Unit("ffn", layer)):
            assert residual[u] == pytest.approx(absolute[u] / h, rel=1e-5)


def test_min_keep_keeps_a_fraction_of_every_layer():
    model = tiny_llama()  # 2 KV-group head units and 64 neurons per layer
    adapter = get_adapter(model)
    scores = score(model, batches("llama"))
    free = select(scores, adapter, target=0.4)
    assert min(row["ffn"] for row in free.structure) < 32  # the plain ranking cuts some layer deeper
    plan = select(scores, adapter, target=0.4, min_keep=0.5)
    assert plan.measures["removed_fraction"]["encoder_params"] >= 0.4
    for row in plan.structure:
        assert row["ffn"] >= 32 and row["head_units"] >= 1
    assert not any(u.kind in ("attn", "ffn") for u in plan.units)  # nothing collapses
    # 0.3 * 10 = 3.0000000000000004 must not round up to 4
    assert select(scores, adapter, target=0.01, min_keep=0.5, kinds=("head",)).structure[0]["head_units"] >= 1
    with pytest.raises(IdpriorError, match="min_keep"):
        select(scores, adapter, target=0.7, min_keep=0.5)
    with pytest.raises(IdpriorError, match=r"\[0, 1\)"):
        select(scores, adapter, target=0.3, min_keep=1.0)


def test_protected_layers_are_untouched():
    model = tiny_llama()
    adapter = get_adapter(model)
    assert protected_layers(4, 1, 1) == {0, 3} and protected_layers(4, 0, 0) == set()
    assert protected_layers(4, 9, 0) == {0, 1, 2, 3}
    scores = score(model, batches("llama"))
    plan = select(scores, adapter, target=0.3, protect={0, 3}, kinds=("head", "neuron", "attn", "ffn"))
    assert plan.units and not any(u.layer in (0, 3) for u in plan.units)
    assert plan.measures["removed_fraction"]["encoder_params"] >= 0.3


@pytest.mark.parametrize("name", list(METHODS))
def test_every_baseline_honours_protect_and_min_keep(name):
    model = tiny_llama()
    adapter = get_adapter(model)
    calib = batches("llama")
    protect = {0, 3}
    plan = get_method(name, protect=protect, min_keep=0.25).plan(model, adapter, calib, target=0.3, seed=0)
    assert plan.units and not any(u.layer in protect for u in plan.units)
    if name not in LAYER_METHODS:  # layer drops remove whole layers by design
        assert all(row["ffn"] >= 16 for row in plan.structure)


def test_prune_cli_residual_min_keep_protect(tmp_path):
    from idprior.cli.main import main
    from tiny_decoder_folder import make_tiny_decoder_folder

    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    out = tmp_path / "run"
    args = ["prune", "--model", str(folder), "--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16",
            "--max-length", "32", "--calib-size", "16", "--recover-epochs", "0", "--no-bench", "--target", "0.3",
            "--score", "residual", "--min-keep", "0.25", "--protect-first", "1", "--protect-last", "1",
            "--out", str(out)]
    assert main(args) == 0
    assert json.loads((out / "scores.json").read_text())["score"] == "residual"
    plan = json.loads((out / "plan.json").read_text())
    rows = plan["structure"]
    assert rows[0]["ffn"] == rows[0]["ffn_before"] and rows[-1]["ffn"] == rows[-1]["ffn_before"]
    assert rows[0]["head_units"] == rows[0]["head_units_before"]
    assert all(row["ffn"] >= math.ceil(0.25 * row["ffn_before"]) for row in rows)
    assert plan["measures"]["removed_fraction"]["encoder_params"] >= 0.3
