"""The identity prior's norms over FSDP2 row shards, in two CPU processes (gloo).

This torch build (2.13, CPU) runs FSDP2 (`torch.distributed.fsdp.fully_shard`) on CPU with gloo: forward,
backward and an AdamW step, every parameter and its Adam state a DTensor sharded on dim 0. FSDP1
(`FullyShardedDataParallel`) does not: "FSDP needs a non-CPU accelerator device".

Cases, each reduced result equal on both ranks bit for bit:
  * `unit_sq_norms` and `distributed.row_mean` on rows cut as FSDP2 cuts dim 0 (D = 5: 3 + 2 rows; D = 32):
    neurons and GQA head units, plain, with γ (RMSNorm) and with γ and centring (LayerNorm), and Adam's column
    means, equal the whole matrix's to 1e-12; without the reduction, or with the centring's mean taken per
    shard, they do not. The cut is checked against fully_shard's own on a 5-row Linear;
  * a GPT-2 Conv1D weight under fully_shard (stored [in, out], so its units are sharded) is refused in one line;
  * tiny BERT (after-LN norms, LayerNorm γ sharded with the weights, hidden 27: 14 + 13 rows) and tiny Llama (GQA)
    wrapped with fully_shard, two training steps with the prior (each rank half of every batch): the unit norms,
    Adam scales, λ, F̄ and the gathered output projections equal one process's on the whole batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from transformers import BertConfig, BertForSequenceClassification

from idprior import distributed
from idprior.arch import get_adapter
from idprior.errors import IdpriorError
from idprior.method.gates import Gates
from idprior.method.proximal import ProximalPrior, unit_sq_norms
from tiny_models import INIT_STD, VOCAB, _build, tiny_gpt2, tiny_llama

WORLD = 2
COLS, DH, PERM = 12, 3, torch.tensor([0, 2, 1, 3])  # 4 query heads of 3 columns; units {0, 2} and {1, 3} (GQA)
CASES = [(d, kind, ln) for d in (5, 32) for kind in ("neuron", "head") for ln in (None, "rms", "layer")]


def _inputs(d: int) -> dict[str, torch.Tensor]:
    """Seeded float64 weights [d, COLS] (offset, so the centring matters), γ, moments and Adam's v."""
    g = torch.Generator().manual_seed(d)
    a = torch.randn(2, 2 * DH, 2 * DH, generator=g, dtype=torch.float64)
    return {"w": torch.randn(d, COLS, generator=g, dtype=torch.float64) + 0.7,
            "gamma": torch.rand(d, generator=g, dtype=torch.float64) + 0.5,
            "m_neuron": torch.rand(COLS, generator=g, dtype=torch.float64),
            "m_head": a @ a.transpose(1, 2),  # [units, 2·DH, 2·DH], positive semi-definite
            "v": torch.rand(d, COLS, generator=g, dtype=torch.float64) * 1e-4}


def _sq(w, x, kind, ln, rows=None, group=None, gamma=None):
    m = x["m_head"] if kind == "head" else x["m_neuron"]
    heads = (PERM, 2, DH) if kind == "head" else None
    return unit_sq_norms(w, m, heads=heads, ln_weight=gamma if ln else None, centre=ln == "layer", rows=rows, group=group)


def _manual_shards(group) -> dict:
    out = {}
    for d, kind, ln in CASES:
        x = _inputs(d)
        rows = distributed.shard_rows(d, group)
        w, gamma = x["w"][rows], x["gamma"][rows]
        out[(d, kind, ln)] = {
            "reduced": _sq(w, x, kind, ln, d, group, gamma),
            "unreduced": _sq(w, x, kind, ln, gamma=gamma),
            # the final sum reduced, but the columns centred on this shard's own mean
            "local_mean": _sq(w - w.mean(0), x, kind, "rms" if ln else None, d, group, gamma),
            "adam": distributed.row_mean(x["v"][rows].sqrt(), d, group),
            "adam_unreduced": x["v"][rows].sqrt().mean(0)}
    lin = nn.Linear(COLS, 5, dtype=torch.float64)
    whole = lin.weight.detach().clone()
    fully_shard(lin)
    out["cut"] = (tuple(lin.weight.to_local().shape), torch.equal(lin.weight.to_local(), whole[distributed.shard_rows(5, group)]))
    return out


def tiny_bert_27(dtype: torch.dtype = torch.float64) -> BertForSequenceClassification:
    """A post-LN model whose hidden size (27) two ranks split unevenly, without dropout."""
    config = BertConfig(vocab_size=VOCAB, hidden_size=27, num_hidden_layers=2, num_attention_heads=3,
                        intermediate_size=20, max_position_embeddings=64, num_labels=3, attn_implementation="eager",
                        initializer_range=INIT_STD, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _build(BertForSequenceClassification, config, 0, dtype)


MODELS = {"bert": tiny_bert_27, "llama": tiny_llama}


def _batch(name: str, step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(3, VOCAB, (4, 10), generator=g)
    if name == "llama":  # no padding: each half holds the same number of label tokens
        return {"input_ids": ids, "labels": ids}
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=g)}


def _prior_steps(name: str, sharded: bool) -> dict:
    """Two AdamW steps, each followed by the prior's; then the prior's view of the weights, gathered."""
    model = MODELS[name](dtype=torch.float64).train()
    adapter = get_adapter(model)
    if sharded:
        for layer in adapter.layers():
            fully_shard(layer)
        fully_shard(model)
    prior = ProximalPrior(model, adapter, Gates(model, adapter), target=0.5, after_ln=name == "bert")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prior.bind_optimizer(opt)
    for step in range(2):
        batch = _batch(name, step)
        if sharded:  # each rank half of the batch; FSDP2 averages the gradients of the equal halves
            batch = {k: v.chunk(WORLD)[dist.get_rank()] for k, v in batch.items()}
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        prior(model, step, 8)
    modules = {(k, layer): m for k, layer, m in prior._sites()}
    whole = (lambda t: t.full_tensor()) if sharded else (lambda t: t)
    return {"norms": {key: prior._norm(*key, m)[0] for key, m in modules.items()},
            "adam": prior._adam_scale(modules), "lam": dict(prior.lam), "fbar": dict(prior.fbar),
            "delta": max(float(d.max()) / prior.fbar[k] for (k, _), d in prior.deltas.items()),
            "ema_m": prior.ema_m, "ema_ln": prior.ema_ln,
            "params": {n: whole(p).detach().clone() for n, p in model.named_parameters()},
            "v": {key: whole(opt.state[m.weight]["exp_avg_sq"]).clone() for key, m in modules.items()},
            "rows": {key: m.weight.to_local().shape[0] for key, m in modules.items() if sharded}}


def _unsharded(name: str, got: dict) -> ProximalPrior:
    """One process's prior on the gathered weights, with the moments and Adam state that `got` ended with."""
    model = MODELS[name](dtype=torch.float64).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(got["params"][n])
    adapter = get_adapter(model)
    prior = ProximalPrior(model, adapter, Gates(model, adapter), target=0.5, after_ln=name == "bert")
    prior.ema_m, prior.ema_ln = got["ema_m"], got["ema_ln"]
    modules = {(k, layer): m for k, layer, m in prior._sites()}
    prior.bind_optimizer(SimpleNamespace(state={m.weight: {"exp_avg_sq": got["v"][key]} for key, m in modules.items()}))
    return prior


def _conv1d_refusal() -> str:
    """A GPT-2 Conv1D weight is stored [in, out]: FSDP2 shards its units, which the prior refuses."""
    model = tiny_gpt2(dtype=torch.float64)
    adapter = get_adapter(model)
    for layer in adapter.layers():
        fully_shard(layer)
    prior = ProximalPrior(model, adapter, Gates(model, adapter), target=0.5)
    with pytest.raises(IdpriorError) as err:
        prior._norm("neuron", 0, adapter.ffn_out_proj(0))
    return str(err.value)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {"manual": _manual_shards(dist.group.WORLD), "fsdp": {name: _prior_steps(name, True) for name in MODELS},
               "gpt2": _conv1d_refusal()}
    finally:
        dist.destroy_process_group()
    torch.save(out, Path(out_dir, f"rank{rank}.pt"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_norms_over_fsdp2_shards_are_the_whole_matrix_norms(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in ranks:
        assert "sharded as (Shard(dim=1),)" in r["gpt2"] and "\n" not in r["gpt2"]
    # the manual cut is fully_shard's: 5 rows as 3 + 2, the same values
    assert [r["manual"]["cut"] for r in ranks] == [((3, COLS), True), ((2, COLS), True)]
    for case in CASES:
        d, kind, ln = case
        x = _inputs(d)
        whole = _sq(x["w"], x, kind, ln, gamma=x["gamma"])
        adam = x["v"].sqrt().mean(0)
        got = [r["manual"][case] for r in ranks]
        assert torch.equal(got[0]["reduced"], got[1]["reduced"]), case
        assert torch.equal(got[0]["adam"], got[1]["adam"]), case
        assert _rel(got[0]["reduced"], whole) <= 1e-12, case
        assert _rel(got[0]["adam"], adam) <= 1e-12, case
        for r in got:  # the test can fail: a shard's own sums are not the whole matrix's
            assert _rel(r["unreduced"], whole) > 1e-3, case
            assert _rel(r["adam_unreduced"], adam) > 1e-3, case
            if ln == "layer":
                assert _rel(r["local_mean"], whole) > 1e-3, case
    for name in MODELS:
        two = [r["fsdp"][name] for r in ranks]
        d = two[0]["v"][("neuron", 0)].shape[0]  # every output projection has d rows: 27 (BERT) or 32 (Llama)
        assert [set(r["rows"].values()) for r in two] == [{-(-d // 2)}, {d // 2}], name  # fully_shard's cut
        for r in two:
            assert r["lam"] == two[0]["lam"] and r["fbar"] == two[0]["fbar"], name
            assert all(torch.equal(r[f][key], two[0][f][key]) for f in ("norms", "adam") for key in r["norms"]), name
        # the prior's norms and Adam scales from the shards are the gathered model's
        whole = _unsharded(name, two[0])
        modules = {(k, layer): m for k, layer, m in whole._sites()}
        adam = whole._adam_scale(modules)
        assert two[0]["norms"].keys() == modules.keys()
        for key, m in modules.items():
            assert _rel(two[0]["norms"][key], whole._norm(*key, m)[0]) <= 1e-12, (name, key)
            assert _rel(two[0]["adam"][key], adam[key]) <= 1e-12, (name, key)
        # two steps with the prior under fully_shard are one process's on the whole batches, to the precision of the
        # recorder's float32 per-batch moments (summed over another split of the batch); the prior did shrink
        one = _prior_steps(name, sharded=False)
        assert one["delta"] > 1e-3 and one["lam"] == two[0]["lam"], name
        for kind, fbar in one["fbar"].items():
            assert abs(two[0]["fbar"][kind] - fbar) <= 1e-6 * fbar, name
        for key in one["norms"]:
            assert _rel(two[0]["norms"][key], one["norms"][key]) <= 1e-5, (name, key)
        for n, p in one["params"].items():
            assert all(_rel(r["params"][n], p) <= 1e-5 for r in two), (name, n)
