"""The SNIP method: spectral normalization, identity prior, function norms, thresholding."""

from __future__ import annotations

import pytest
import torch

from idprior.arch import get_adapter
from idprior.errors import IdpriorError
from idprior.method import spectral
from idprior.method.gates import Gates
from idprior.method.plan import measure_of, removed_cost, sublayer_cost
from idprior.method.scoring import score
from idprior.method.selection import select
from idprior.method.units import Unit
from idprior.model.surgery import apply_plan
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

FAMILIES = [tiny_bert, tiny_gpt2, tiny_llama]


def batch(seed: int = 0, b: int = 3, t: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t // 2:] = 0  # padding in the first row
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


# ---- spectral normalization ------------------------------------------------------------------

@pytest.mark.parametrize("make", FAMILIES)
def test_sn_init_bound_leaves_logits_unchanged_and_folds(make):
    model = make()
    b = batch()
    before = logits(model, b)
    n = spectral.attach(model, get_adapter(model))
    assert n > 0
    assert torch.equal(logits(model, b), before)  # step 0: bit-identical
    spectral.fold(model)
    assert not spectral.sn_modules(model)
    torch.testing.assert_close(logits(model, b), before)


def test_sn_keeps_sigma_under_bound_during_training():
    model = tiny_bert()
    adapter = get_adapter(model)
    spectral.attach(model, adapter, bound=2.0)  # a global bound well under the init sigmas
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = dict(batch(), labels=torch.tensor([0, 1, 2]))
    model.train()
    for _ in range(8):
        with torch.nn.utils.parametrize.cached():
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    mods = spectral.sn_modules(model)
    # the bound binds: the raw weights are above it
    raw = [torch.linalg.matrix_norm(m.parametrizations.weight.original.detach(), ord=2) for m, _ in mods]
    assert max(raw) > 2.5
    spectral.fold(model)
    for module, sn in mods:
        w = module.weight.detach()
        sigma = torch.linalg.matrix_norm(w.t() if sn.transpose else w, ord=2)
        assert sigma <= float(sn.bound) * 1.001, (sigma, sn.bound)


def test_sn_fixed_bound_rescales():
    model = tiny_bert()
    spectral.attach(model, get_adapter(model), bound=0.5)
    module, sn = spectral.sn_modules(model)[0]
    for _ in range(30):  # converge the power iteration in train mode
        module.train()
        _ = module.weight
    module.eval()
    sigma = torch.linalg.matrix_norm(module.weight.detach(), ord=2)
    assert sigma == pytest.approx(0.5, rel=1e-3)


def test_sn_under_its_bound_is_the_weight_itself_and_records_binding():
    """Under the bound SN returns the stored weight (no scaled copy: same values, same gradient);
    over it, the weight is rescaled onto the bound and `clipped` (what `sn_stats`' sn_clip_frac counts) is set."""
    model = tiny_bert()
    spectral.attach(model, get_adapter(model))  # bound = each matrix's own sigma at load
    mods = spectral.sn_modules(model)
    module, sn = mods[0]
    model.train()
    original = module.parametrizations.weight.original
    assert module.weight is original and not sn.clipped and spectral.sn_stats(model)["sn_clip_frac"] == 0.0
    with torch.no_grad():
        original.mul_(3.0)  # now well over its bound
    for _ in range(5):
        w = module.weight
    assert sn.clipped and spectral.sn_stats(model)["sn_clip_frac"] == pytest.approx(1 / len(mods))
    sigma = torch.linalg.matrix_norm(w.detach().t() if sn.transpose else w.detach(), ord=2)
    assert float(sigma) == pytest.approx(float(sn.bound), rel=1e-3)


@pytest.mark.parametrize("make", FAMILIES)
def test_open_gates_skip_the_products_but_observers_still_see_every_site(make):
    """With every gate at 1 and none trained, the hooks hand the model and its observers the tensors
    unchanged (bit-identical logits and gradients to the ungated model); a closed or trained gate
    takes the product path."""
    model = make()
    b = batch()
    model.train()
    torch.manual_seed(0)
    ref = model(**b)
    ref.logits.square().mean().backward()
    ref_grad = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    gates = Gates(model)
    seen = []
    gates.observers.append(lambda layer, site, x, module: seen.append((layer, site)))
    torch.manual_seed(0)
    out = model(**b)
    out.logits.square().mean().backward()
    assert torch.equal(out.logits, ref.logits)
    assert all(torch.equal(g, p.grad) for g, p in zip(ref_grad, [p for p in model.parameters() if p.grad is not None]))
    sites = {site for _, site in seen}
    assert sites == {"heads", "attn", "neurons", "ffn"}
    gates.set(Unit("head", 0, 0), 0.0)
    with torch.no_grad():
        closed = model(**b).logits
    assert not torch.equal(closed, ref.logits)  # the closed head now changes the output
    gates.reset()
    gates.requires_grad_()
    model(**b).logits.square().mean().backward()
    assert gates.head[0].grad is not None  # trained gates stay in the graph (Michel et al.)
    gates.detach()


# ---- function norms ----------------------------------------------------------------------------

@pytest.mark.parametrize("make", FAMILIES)
def test_zeroed_unit_scores_zero_and_scores_are_reproducible(make):
    model = make()
    adapter = get_adapter(model)
    b = [batch(1), batch(2)]
    s1 = score(model, b, adapter=adapter)
    s2 = score(model, b, adapter=adapter)
    assert s1 == s2
    # zero the output-projection columns of head unit 1 in layer 0 and neuron 3 in layer 1
    o = adapter.out_weight(adapter.attn_out_proj(0))
    owner = adapter.head_unit_of_query_heads(0)
    dh = adapter.head_dim
    with torch.no_grad():
        for q in (owner == 1).nonzero().flatten().tolist():
            o[:, q * dh:(q + 1) * dh] = 0
        adapter.out_weight(adapter.ffn_out_proj(1))[:, 3] = 0
    s3 = score(model, b, adapter=adapter)
    assert s3[Unit("head", 0, 1)] == pytest.approx(0.0, abs=1e-6)
    assert s3[Unit("neuron", 1, 3)] == pytest.approx(0.0, abs=1e-6)
    assert s3[Unit("head", 0, 0)] > 1e-3


def test_head_norm_matches_explicit_branch_output():
    """||f_h|| from the Gram trick equals the norm of the branch with only head h open."""
    model = tiny_bert()
    adapter = get_adapter(model)
    b = batch()
    scores = score(model, [b], adapter=adapter, kinds=("head", "attn"))
    with Gates(model, adapter) as gates:
        outs = {}
        gates.observers.append(lambda layer, site, x, m: outs.__setitem__((layer, site), x) if site == "attn" else None)
        gates.head[0].zero_()
        gates.head[0][2] = 1
        with torch.no_grad():
            model(**b)
    proj = adapter.attn_out_proj(0)
    branch = outs[(0, "attn")] - proj.bias  # f_h excludes the shared output bias
    mask = b["attention_mask"].bool()
    expected = torch.sqrt((branch[mask] ** 2).sum(-1).mean())
    assert scores[Unit("head", 0, 2)] == pytest.approx(float(expected.detach()), rel=1e-4)


# ---- selection --------------------------------------------------------------------------------

def _scores(model, seed=0):
    return score(model, [batch(seed)], adapter=get_adapter(model))


@pytest.mark.parametrize("measure", ["encoder_params", "linear_params", "flops"])
@pytest.mark.parametrize("mode", ["norm", "norm-per-cost", "energy-per-cost", "relative"])
def test_selection_hits_target_within_one_unit(measure, mode):
    model = tiny_llama()
    adapter = get_adapter(model)
    plan = select(_scores(model), adapter, target=0.4, measure=measure, seq_len=16, mode=mode)
    removed = plan.measures["removed_fraction"][measure]
    total = plan.measures["before"][measure]
    biggest = max(measure_of(sublayer_cost(adapter, k, i), measure, 16) for k in ("attn", "ffn") for i in range(adapter.num_layers))
    assert removed >= 0.4
    assert (removed - 0.4) * total <= biggest  # overshoot of at most one unit (a collapse can take a sub-layer)


def test_auto_selection_is_the_family_default():
    """--selection auto: encoders take 30% of the budget from heads (tuned on validation), decoders
    rank globally by norm; an explicit head_share overrides the family's."""
    from idprior.pipeline.stages import resolve_selection

    bert, llama = get_adapter(tiny_bert()), get_adapter(tiny_llama())
    assert resolve_selection("auto", None, bert) == ("share", 0.3)
    assert resolve_selection("auto", 0.5, bert) == ("share", 0.5)
    assert resolve_selection("auto", None, llama) == ("norm", None)
    assert resolve_selection("auto", None, get_adapter(tiny_gpt2())) == ("norm", None)
    assert resolve_selection("energy-per-cost", None, bert) == ("energy-per-cost", None)
    mode, share = resolve_selection("auto", None, bert)
    plan = select(_scores(bert.model), bert, target=0.5, mode=mode, head_share=share)
    assert plan.counts()["head"] > 0 and plan.counts()["neuron"] > 0 and plan.selection == "share"


def test_selection_is_deterministic_and_matches_surgery():
    model = tiny_bert()
    adapter = get_adapter(model)
    s = _scores(model)
    p1 = select(s, adapter, target=0.5)
    p2 = select(s, adapter, target=0.5)
    assert p1.to_dict() == p2.to_dict()
    apply_plan(model, p1.units, adapter)
    assert sum(p.numel() for p in model.parameters()) == p1.measures["after"]["total_params"]
    assert get_adapter(model).layer_params() == p1.measures["after"]["encoder_params"]


def test_selection_edge_cases():
    model = tiny_bert()
    adapter = get_adapter(model)
    s = _scores(model)
    assert select(s, adapter, target=0.0).units == []
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(IdpriorError):
            select(s, adapter, target=bad)
    with pytest.raises(IdpriorError):
        select(s, adapter, target=0.5, tau=0.1)
    with pytest.raises(IdpriorError, match="no scored units"):
        select({}, adapter, target=0.5)
    # heads only, most of the attention: needs whole-layer collapse, never all attention
    plan = select(s, adapter, target=0.3, kinds=("head",))
    assert plan.counts()["attn"] >= 1
    assert plan.counts()["attn"] < adapter.num_layers
    with pytest.raises(IdpriorError, match="out of reach"):
        select(s, adapter, target=0.49, kinds=("head",))  # attention is under half of the layer parameters


def test_norm_per_cost_never_removes_all_attention():
    model = tiny_bert()
    adapter = get_adapter(model)
    s = {u: v for u, v in _scores(model).items()}
    s.update({u: 1e-9 for u in s if u.kind == "head"})  # heads look worthless
    plan = select(s, adapter, target=0.5, mode="norm-per-cost")
    assert plan.counts()["attn"] == adapter.num_layers - 1
    assert plan.warnings


def test_tau_removes_exactly_the_units_below_it():
    model = tiny_bert()
    adapter = get_adapter(model)
    s = _scores(model)
    neurons = sorted(v for u, v in s.items() if u.kind == "neuron")
    tau = neurons[10]
    plan = select(s, adapter, tau=tau, kinds=("neuron",))
    assert plan.counts()["neuron"] == 10
    assert all(s[u] < tau for u in plan.units)


@pytest.mark.parametrize("head_share", [0.2, 0.7])
def test_share_mode_splits_budget(head_share):
    """Heads (and attention sub-layers) give `head_share` of the removed measure, the rest the FFNs,
    up to one unit's overshoot in each pool (a collapse adds the sub-layer's unowned parts)."""
    model = tiny_llama()
    adapter = get_adapter(model)
    plan = select(_scores(model), adapter, target=0.5, mode="share", head_share=head_share)
    removed = removed_cost(adapter, plan.units).params
    from_heads = removed_cost(adapter, [u for u in plan.units if u.kind in ("head", "attn")]).params
    assert plan.measures["removed_fraction"]["encoder_params"] >= 0.5
    assert removed == plan.measures["before"]["encoder_params"] - plan.measures["after"]["encoder_params"]
    last_unit = max((adapter.unit_cost(kind, i) + adapter.unit_cost(sub, i)).params
                    for kind, sub in (("head", "attn"), ("neuron", "ffn")) for i in range(adapter.num_layers))
    assert abs(from_heads / removed - head_share) <= 2 * last_unit / removed
