"""Lean memory on the post-training path: perplexity limits the logits one forward pass produces, evaluation
holds one model at a time, and every stage records its own peak RSS in stages.json."""

from __future__ import annotations

import gc
import json
import sys
import weakref

import pytest
import torch

from idprior.cli.main import main
from idprior.errors import IdpriorError
from idprior.pipeline import evaluate as ev
from idprior.pipeline import stages
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_models import tiny_llama

QUICK = ["--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16", "--max-length", "32",
         "--calib-size", "16", "--no-bench", "--target", "0.3"]


def _batches(model, rows: int, seq: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (rows, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, seq // 2:] = 0  # a padded row
        out.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    return out


def test_lm_nll_sub_batches_keep_the_sums_and_bound_the_logits(monkeypatch):
    model = tiny_llama().eval()
    batches = _batches(model, rows=5, seq=12)
    whole_total, whole_count = ev.lm_nll(model, batches)
    seen_rows = []
    model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen_rows.append(o.shape[0]))
    one_row = 12 * model.config.vocab_size * 4  # bytes of one row's float32 logits
    monkeypatch.setattr(ev, "LOGITS_BUDGET", 2 * one_row)
    total, count = ev.lm_nll(model, batches)
    assert seen_rows == [2, 2, 1, 2, 2, 1]  # each batch of 5 rows in passes of at most 2
    assert count == whole_count
    assert total == pytest.approx(whole_total, rel=1e-6)


def test_evaluate_holds_one_model_at_a_time(tmp_path, monkeypatch):
    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    loaded: list[weakref.ref] = []
    alive_at_load: list[int] = []
    in_evaluate = [False]
    original_load, original_evaluate = stages.Run.load_model, stages.STAGE_FNS["evaluate"]

    def tracking_load(self, spec):
        if in_evaluate[0]:
            gc.collect()
            alive_at_load.append(sum(r() is not None for r in loaded))
        model, tok = original_load(self, spec)
        if in_evaluate[0]:
            loaded.append(weakref.ref(model))
        return model, tok

    def tracking_evaluate(run):
        in_evaluate[0] = True
        try:
            return original_evaluate(run)
        finally:
            in_evaluate[0] = False

    monkeypatch.setattr(stages.Run, "load_model", tracking_load)
    monkeypatch.setitem(stages.STAGE_FNS, "evaluate", tracking_evaluate)
    out = tmp_path / "run"
    assert main(["prune", "--model", str(folder), *QUICK, "--recover-epochs", "1", "--out", str(out)]) == 0
    assert alive_at_load == [0, 0, 0]  # dense, pruned, pruned before recovery: each loaded after the last was freed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["generations"][0]) == {"prompt", "dense", "pruned"}
    assert metrics["compression"]["total_params"]["pruned"] < metrics["compression"]["total_params"]["dense"]
    for which in ("dense", "pruned", "pruned_no_recovery"):
        assert metrics[which]["test"]["perplexity"] > 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM is Linux's")
def test_each_stage_records_its_peak_rss(tmp_path):
    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    out = tmp_path / "run"
    assert main(["prune", "--model", str(folder), *QUICK, "--recover-epochs", "0", "--out", str(out)]) == 0
    recorded = json.loads((out / "stages.json").read_text())["stages"]
    assert {"finetune", "score", "select", "surgery", "recover", "evaluate", "report"} <= set(recorded)
    for name, info in recorded.items():
        assert info["peak_rss_mb"] > 50, name  # at least the interpreter and torch


def test_read_safetensors_matches_load_file_and_owns_each_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from idprior.model.surgery import read_safetensors

    tensors = {"f32": torch.randn(3, 5), "bf16": torch.randn(4, 2).to(torch.bfloat16), "f16": torch.randn(7).half(),
               "i64": torch.arange(6).view(2, 3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    got, ref = read_safetensors(tmp_path / "w.safetensors"), load_file(tmp_path / "w.safetensors")
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v), k
    storages = {got[k].untyped_storage().data_ptr() for k in got if got[k].numel()}
    assert len(storages) == sum(1 for v in got.values() if v.numel())  # no two tensors share memory (load_file's do)
    (tmp_path / "short.safetensors").write_bytes((tmp_path / "w.safetensors").read_bytes()[:-8])
    with pytest.raises(IdpriorError, match="cut short"):
        read_safetensors(tmp_path / "short.safetensors")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_inference_stages_return_freed_memory():
    from idprior import memory

    if memory._glibc() is None:
        pytest.skip("not glibc")
    with memory.returning_freed_memory():
        before = memory.rss_mb()
        blocks = [torch.ones(256, 1024) for _ in range(200)]  # 200 blocks of 1 MB, touched
        assert memory.rss_mb() - before > 150
        del blocks
        assert memory.rss_mb() - before < 20  # each block went back to the system when freed
