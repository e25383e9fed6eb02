"""Scoring in two CPU processes (gloo) gives the single-process scores and plan.

`scoring.score` shards the calibration batches by rank and all-reduces the per-unit sums in
float64; each rank must end with the scores one process gets on all the batches (to 1e-9) and
therefore the same plan. Cases: tiny Llama (GQA) and tiny BERT with padded batches and an odd
batch count (ranks see 3 and 2 batches), relative and residual scores, and one batch only (rank 1 sees none).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from idprior.arch import get_adapter
from idprior.method.scoring import score, scores_from_json, scores_to_json
from idprior.method.selection import select
from tiny_models import tiny_bert, tiny_llama

WORLD = 2
CASES = {  # name -> (model builder, number of batches, prune.score)
    "llama": (tiny_llama, 5, "absolute"),
    "llama-relative": (tiny_llama, 5, "relative"),
    "llama-residual": (tiny_llama, 5, "residual"),
    "llama-one-batch": (tiny_llama, 1, "absolute"),
    "bert": (tiny_bert, 5, "absolute"),
}


def _batches(n: int) -> list[dict]:
    """`n` seeded batches [B=3, T=10]; the last sequence of each is padded after 6 tokens."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 100, (3, 10), generator=gen)
        mask = torch.ones_like(ids)
        mask[-1, 6:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


def _run(case: str) -> dict:
    build, n_batches, kind = CASES[case]
    model = build()
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))  # batches this process ran
    scores = score(model, _batches(n_batches), relative=kind == "relative", residual=kind == "residual")
    handle.remove()
    plan = select(scores, get_adapter(model), target=0.3)
    return {"scores": scores_to_json(scores), "plan": plan.to_dict(), "batches_run": len(calls)}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # the same kernels as the single-process reference
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        results = {case: _run(case) for case in CASES}
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results), encoding="utf-8")


def test_two_processes_match_one(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for case in CASES:
        single = _run(case)
        assert single["plan"]["units"], case  # the plan removes something, so equality means something
        for r, result in enumerate(ranks):
            assert result[case]["plan"] == single["plan"], (case, r)
            got, want = scores_from_json(result[case]["scores"]), scores_from_json(single["scores"])
            assert got.keys() == want.keys(), (case, r)
            worst = max(abs(got[u] - want[u]) for u in want)
            assert worst <= 1e-9, (case, r, worst)
        assert ranks[0][case]["scores"] == ranks[1][case]["scores"], case  # bitwise identical across ranks
        n = CASES[case][1]
        assert [result[case]["batches_run"] for result in ranks] == [(n + 1) // 2, n // 2], case  # sharded
