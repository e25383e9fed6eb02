"""Compensation after surgery (compensate.py): it reduces the error against the dense model, it keeps
the core invariant (gated + compensation == pruned + compensation), lsq is exact where it can be and
tends to bias compensation as the ridge grows, and a compensated Llama (bias added to o_proj /
down_proj) saves and reloads, with idprior and with stock transformers + trust_remote_code."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from idprior.arch import OUT_BIAS_KEY, get_adapter
from idprior.errors import IdpriorError
from idprior.method.compensate import fit_compensation
from idprior.method.gates import Gates
from idprior.method.plan import model_cost
from idprior.method.units import Unit
from idprior.model.surgery import apply_plan, count_params, load_pruned, save_pruned
from tiny_models import TINY_MODELS, VOCAB

FAMILIES = ["bert", "gpt2", "llama", "qwen2", "llama-slots"]


def build(family: str):
    model = TINY_MODELS[family.removesuffix("-slots")]()
    return model, get_adapter(model, per_query_head=family.endswith("-slots"))


def calib(n: int = 4, size: int = 4, seq: int = 16, seed: int = 1) -> list[dict]:
    """Random token batches, the first row right-padded (padding must not enter the statistics)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (size, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq - 4:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def half_plan(adapter, seed: int) -> list[Unit]:
    """Half the neurons and one head unit of every layer: every sub-layer stays, every one is cut."""
    rng = random.Random(seed)
    units = []
    for layer in range(adapter.num_layers):
        ffn = adapter.shape(layer).ffn_dim
        units += [Unit("neuron", layer, j) for j in rng.sample(range(ffn), ffn // 2)]
        units.append(Unit("head", layer, rng.randrange(adapter.num_head_units(layer))))
    return units


def collapse_plan(adapter) -> list[Unit]:
    """Layer 0 loses its attention (nothing before it to carry its mean), layer 1 its FFN and a head,
    layer 2 its attention (layer 1's FFN is gone too, so layer 1's attention carries both), layer 3
    a third of its neurons."""
    return [Unit("attn", 0), Unit("ffn", 1), Unit("head", 1, 0), Unit("attn", 2),
            *[Unit("neuron", 3, j) for j in range(0, adapter.shape(3).ffn_dim, 3)]]


def hidden(model, batches) -> torch.Tensor:
    """Last hidden state on real tokens [N, D] (the encoder's classifier sees only [CLS])."""
    with torch.no_grad():
        return torch.cat([model(**b, output_hidden_states=True).hidden_states[-1][b["attention_mask"].bool()]
                          for b in batches])


def pruned_copy(model, units, comp=None, per_query_head: bool = False):
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned, per_query_head=per_query_head)
    apply_plan(pruned, units, adapter)
    if comp is not None:
        comp.apply(pruned, adapter)
    return pruned


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_compensation_reduces_error_against_dense(family, mode):
    model, adapter = build(family)
    batches = calib()
    dense = hidden(model, batches)
    for seed in (0, 1):
        units = half_plan(adapter, seed)
        comp = fit_compensation(model, units, batches, mode=mode, adapter=adapter)
        err_plain = ((hidden(pruned_copy(model, units), batches) - dense) ** 2).mean()
        err_comp = ((hidden(pruned_copy(model, units, comp), batches) - dense) ** 2).mean()
        assert err_comp < 0.95 * err_plain, (float(err_plain), float(err_comp))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_gated_compensated_equals_pruned_compensated(family, mode):
    model, adapter = build(family)
    batches = calib()
    for units in (half_plan(adapter, 3), collapse_plan(adapter)):
        slots = adapter.per_query_head
        gated = copy.deepcopy(model)
        gated_adapter = get_adapter(gated, per_query_head=slots)
        comp = fit_compensation(gated, units, batches, mode=mode, adapter=gated_adapter)
        pruned = pruned_copy(gated, units, comp, per_query_head=slots)
        uncompensated = hidden(pruned_copy(gated, units, per_query_head=slots), batches)
        gates = Gates(gated, gated_adapter)
        gates.apply_units(units)
        comp.apply(gated)
        want = hidden(gated, batches)
        torch.testing.assert_close(hidden(pruned, batches), want, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(want, uncompensated, atol=1e-4)  # the compensation did something
        gates.detach()


def test_removed_sublayer_mean_moves_to_the_branch_before():
    """Pre-LN: a removed sub-layer's mean output goes to the nearest earlier surviving branch's bias;
    with nothing before it (layer 0 attention) it is noted and left out. Post-LN: noted, not moved."""
    model, adapter = build("llama")
    comp = fit_compensation(model, collapse_plan(adapter), calib(), mode="bias")
    # attn:2 -> attn:1 (ffn:1 is removed), ffn:1 -> attn:1, layer 3 neurons -> ffn:3; attn:0 has no carrier
    assert set(comp.biases) == {("attn", 1), ("ffn", 3)}
    assert comp.notes == ["attn:0 removed whole, not compensated (no earlier branch survives)"]
    bert, bert_adapter = build("bert")
    comp = fit_compensation(bert, collapse_plan(bert_adapter), calib(), mode="bias")
    assert set(comp.biases) == {("attn", 1), ("ffn", 3)}  # the partial cuts only
    assert len(comp.notes) == 3 and all("post-LN" in n for n in comp.notes)


def test_bias_compensation_is_the_removed_mean():
    """bias = W[:, R] mean(x_R) over real tokens, checked by hand on one FFN."""
    model, adapter = build("llama")
    batches = calib()
    units = [Unit("neuron", 2, j) for j in (1, 5, 9)]
    comp = fit_compensation(model, units, batches, mode="bias")
    acts = []
    handle = adapter.ffn_out_proj(2).register_forward_pre_hook(lambda m, a: acts.append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    real = torch.cat([a[b["attention_mask"].bool()] for a, b in zip(acts, batches)]).double()  # [N, F]
    want = adapter.ffn_out_proj(2).weight.double()[:, [1, 5, 9]] @ real[:, [1, 5, 9]].mean(0)
    torch.testing.assert_close(comp.biases[("ffn", 2)], want)


def test_lsq_recovers_a_duplicated_neuron_exactly():
    """Neuron 7 duplicates neuron 3 (same gate and up rows): removing 7 loses nothing that the
    re-fit cannot put back into column 3, so the lsq-compensated model equals the dense one."""
    model, adapter = build("llama")
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[7] = mlp.gate_proj.weight[3]
        mlp.up_proj.weight[7] = mlp.up_proj.weight[3]
    batches = calib(n=6)
    dense = hidden(model, batches)
    units = [Unit("neuron", 1, 7)]
    exact = pruned_copy(model, units, fit_compensation(model, units, batches, mode="lsq", ridge=1e-9))
    torch.testing.assert_close(hidden(exact, batches), dense, atol=1e-4, rtol=1e-4)
    bias_only = pruned_copy(model, units, fit_compensation(model, units, batches, mode="bias"))
    assert ((hidden(bias_only, batches) - dense) ** 2).mean() > 1e-4


def test_lsq_with_a_huge_ridge_is_bias_compensation():
    model, adapter = build("gpt2")
    batches = calib()
    units = half_plan(adapter, 5)
    bias = fit_compensation(model, units, batches, mode="bias")
    lsq = fit_compensation(model, units, batches, mode="lsq", ridge=1e9)
    assert set(lsq.biases) == set(bias.biases)
    for site, delta in bias.biases.items():
        torch.testing.assert_close(lsq.biases[site], delta, atol=1e-5, rtol=1e-4)
        kept, new = lsq.weights[site]
        old = adapter.out_weight(adapter.out_proj(site[1], site[0])).detach().double()[:, kept]
        torch.testing.assert_close(new.double(), old, atol=1e-5, rtol=1e-4)


def test_bad_modes_and_shapes():
    model, adapter = build("llama")
    with pytest.raises(IdpriorError, match="bias' or 'lsq"):
        fit_compensation(model, [Unit("neuron", 0, 1)], calib(), mode="magic")
    with pytest.raises(IdpriorError, match="ridge"):
        fit_compensation(model, [Unit("neuron", 0, 1)], calib(), mode="lsq", ridge=0)
    comp = fit_compensation(model, [Unit("neuron", 0, 1)], calib(), mode="lsq")
    other = pruned_copy(model, [Unit("neuron", 0, 1), Unit("neuron", 0, 2)])
    with pytest.raises(IdpriorError, match="neither the dense"):
        comp.apply(other)


CHILD = r'''
import importlib.abc, sys
class NoIdprior(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "idprior":
            raise ImportError("idprior must not be needed to load a pruned folder")
sys.meta_path.insert(0, NoIdprior())
import torch, transformers
from safetensors.torch import load_file, save_file
folder = sys.argv[1]
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
inputs = load_file(folder + "/../inputs.safetensors")
with torch.no_grad():
    save_file({"logits": model(**inputs).logits.contiguous()}, folder + "/../child.safetensors")
'''


@pytest.mark.parametrize("family", ["llama", pytest.param("qwen2", marks=pytest.mark.slow)])
def test_compensated_decoder_saves_and_reloads(tmp_path, family):
    """o_proj / down_proj get biases that stock Llama/Qwen2 do not have: the config lists them, and both
    load paths rebuild them; parameter accounting counts them. Qwen2 is `make test-slow` only (a fresh
    process, ~20 s on 2 cores): its out-biases go through the same code as Llama's."""
    from safetensors.torch import load_file, save_file

    model, adapter = build(family)
    units = collapse_plan(adapter) + [Unit("neuron", 0, 4)]
    comp = fit_compensation(model, units, calib(), mode="lsq")
    before = count_params(model)
    apply_plan(model, units, adapter)
    removed = before - count_params(model)
    summary = comp.apply(model, adapter)
    assert summary["added_bias_params"] == 3 * adapter.hidden_size  # attn:1, ffn:0, ffn:3
    assert count_params(model) == before - removed + summary["added_bias_params"]
    assert adapter.layer_params() == model_cost(adapter).params  # the added biases are costed (unowned)
    folder = save_pruned(model, None, tmp_path / "pruned")
    config = json.loads((folder / "config.json").read_text())
    assert config[OUT_BIAS_KEY] == ["ffn:0", "attn:1", "ffn:3"]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        want = model(**inputs).logits
        assert torch.equal(load_pruned(folder)(**inputs).logits, want)
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(folder)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(load_file(str(tmp_path / "child.safetensors"))["logits"], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["bias", "lsq"])
def test_prune_cli_with_compensation(tmp_path, mode):
    """`idprior prune --compensate MODE` on a tiny Llama folder: the surgery stage records the
    compensation, and the saved model (with its added biases) reloads with the plan's shapes."""
    from idprior.cli.main import main
    from tiny_decoder_folder import make_tiny_decoder_folder

    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    out = tmp_path / "run"
    args = ["prune", "--model", str(folder), "--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16",
            "--max-length", "32", "--calib-size", "16", "--recover-epochs", "0", "--no-bench", "--target", "0.3",
            "--compensate", mode, "--out", str(out)]
    assert main(args) == 0
    surgery = json.loads((out / "stages.json").read_text())["stages"]["surgery"]
    assert surgery["compensation"]["mode"] == mode and surgery["compensation"]["biases"] >= 1
    added = surgery["compensation"]["added_bias_params"]
    assert added > 0  # Llama's down_proj / o_proj had no bias
    plan = json.loads((out / "plan.json").read_text())
    assert count_params(load_pruned(out / "pruned")) == plan["measures"]["after"]["total_params"] + added
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pruned"]["test"]["perplexity"] > 1


def test_shared_statistics_give_the_same_compensation():
    from idprior.method.compensate import SUBS, channel_stats

    model, adapter = build("llama")
    batches = calib()
    sites = [(s, i) for i in range(adapter.num_layers) for s in SUBS]
    shared = channel_stats(model, adapter, batches, sites, gram=sites)
    units = collapse_plan(adapter)
    for mode in ("bias", "lsq"):
        own = fit_compensation(model, units, batches, mode=mode)
        reused = fit_compensation(model, units, None, mode=mode, stats=shared)
        assert own.biases.keys() == reused.biases.keys() and own.weights.keys() == reused.weights.keys()
        for site in own.biases:
            torch.testing.assert_close(own.biases[site], reused.biases[site])
    with pytest.raises(IdpriorError, match="gram"):
        fit_compensation(model, units, None, mode="lsq", stats=channel_stats(model, adapter, batches, sites))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lsq_in_groups_of_layers_is_the_one_pass_fit(monkeypatch, family):
    """A Gram budget of one site per pass gives the same fit as one pass holding every Gram matrix; each pass
    stops after its group's last layer."""
    from idprior.method import compensate

    model, adapter = build(family)
    batches = calib()
    units = [*half_plan(adapter, 3), *collapse_plan(adapter)[:2]]  # partial cuts and sub-layers removed whole
    monkeypatch.setattr(compensate, "GRAM_SHARE", 1e3)
    whole = fit_compensation(model, units, batches, mode="lsq")
    last_layer_calls = []
    handle = adapter.out_proj(adapter.num_layers - 1, "ffn").register_forward_pre_hook(
        lambda m, a: last_layer_calls.append(1))
    monkeypatch.setattr(compensate, "GRAM_SHARE", 1e-12)
    grouped = fit_compensation(model, units, iter(batches), mode="lsq")  # a one-shot iterator is read once per pass
    handle.remove()
    sites = len(grouped.weights)
    assert sites > 2
    assert len(last_layer_calls) < sites * len(batches)  # earlier groups stopped before the last layer
    assert grouped.weights.keys() == whole.weights.keys() and grouped.biases.keys() == whole.biases.keys()
    for site, (kept, new) in whole.weights.items():
        assert torch.equal(grouped.weights[site][0], kept)
        torch.testing.assert_close(grouped.weights[site][1], new, atol=0, rtol=0)
    for site, delta in whole.biases.items():
        torch.testing.assert_close(grouped.biases[site], delta, atol=0, rtol=0)
    assert grouped.notes == whole.notes
