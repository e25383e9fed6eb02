"""Property test: surgery on random plans either works exactly or refuses clearly.

Random subsets of head and neuron units, whole-sub-layer removals, plans that empty a layer (the
collapse rule), plans that remove every attention sub-layer, and plans naming units that do not
exist, on tiny BERT, GPT-2 and Llama (GQA) models. After `apply_plan` the model must agree with
its config (`check_config`), have exactly `predicted_params` parameters and still run; a plan it
cannot apply must raise a one-line IdpriorError and leave the model untouched. Never a silent
mismatch.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from idprior.arch import get_adapter
from idprior.errors import IdpriorError
from idprior.method.units import Unit
from idprior.model.surgery import apply_plan, count_params, predicted_params
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}
_MODELS: dict[str, torch.nn.Module] = {}
MODES = st.sampled_from(["some", "some", "some", "all", "sub-layer"])  # how a layer's heads / neurons go


def _fresh(family: str) -> torch.nn.Module:
    """A new copy of the family's tiny model (built once, deep-copied: surgery works in place)."""
    import copy

    if family not in _MODELS:
        _MODELS[family] = FAMILIES[family](seed=0)
    return copy.deepcopy(_MODELS[family])


@st.composite
def plans(draw):
    """(family, units): per layer, maybe the whole attn / ffn, else a random subset (sometimes all) of
    its heads and neurons; sometimes every attention sub-layer; sometimes a unit that does not exist."""
    family = draw(st.sampled_from(sorted(FAMILIES)))
    adapter = get_adapter(_fresh(family))
    units: list[Unit] = []
    every_attn = draw(st.sampled_from([False] * 9 + [True]))
    for layer in range(adapter.num_layers):
        n_heads, ffn = adapter.num_head_units(layer), adapter.shape(layer).ffn_dim
        mode = "sub-layer" if every_attn else draw(MODES)
        if mode == "sub-layer":
            units.append(Unit("attn", layer))
        else:
            heads = range(n_heads) if mode == "all" else draw(st.sets(st.integers(0, n_heads - 1)))
            units += [Unit("head", layer, h) for h in sorted(heads)]
        mode = draw(MODES)
        if mode == "sub-layer":
            units.append(Unit("ffn", layer))
        else:
            neurons = range(ffn) if mode == "all" else draw(st.sets(st.integers(0, ffn - 1), max_size=24))
            units += [Unit("neuron", layer, j) for j in sorted(neurons)]
    bogus = draw(st.sampled_from(["none"] * 6 + ["head", "layer"]))
    if bogus == "head":
        units.append(Unit("head", draw(st.integers(0, adapter.num_layers - 1)), 99))
    elif bogus == "layer":
        units.append(Unit("ffn", adapter.num_layers + draw(st.integers(0, 3))))
    return family, draw(st.permutations(units))


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(plans())
def test_surgery_matches_config_and_prediction_or_refuses(plan):
    family, units = plan
    model = _fresh(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        expected = predicted_params(model, units)
    except IdpriorError as e:
        event("refused")
        _assert_clear(e)
        with torch.no_grad():
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        try:
            apply_plan(model, units)
        except IdpriorError as e2:
            _assert_clear(e2)
        else:
            raise AssertionError("predicted_params refused the plan but apply_plan accepted it")
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in before.items()}
        return
    apply_plan(model, units)
    adapter = get_adapter(model)
    event(f"applied ({sum(not adapter.shape(i).has_attn for i in range(adapter.num_layers))} attn sub-layers gone)")
    adapter.check_config()  # modules and the recorded per-layer structure agree
    assert count_params(model) == expected
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    assert logits.shape[0] == 2


def _assert_clear(e: IdpriorError) -> None:
    text = str(e)
    assert text and "\n" not in text and "does not exist" in text
