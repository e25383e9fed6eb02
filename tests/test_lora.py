"""LoRA recovery (`idprior prune --recover lora`, pipeline/lora.py): only the adapters train, they are merged
before pruned/ is saved, so pruned/ is a plain pruned model with the surgery model's parameters; bad LoRA
options are refused before anything is written; an interrupted LoRA recovery resumes to the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from idprior import io
from idprior.cli.main import main
from idprior.config import LoraConfig, load_config, resume_differences, resume_key
from idprior.data import get_task
from idprior.model import load as models
from idprior.pipeline import lora
from idprior.pipeline.train import _optimizer, latest_checkpoint
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama

QUICK = ["--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16", "--max-length", "32",
         "--calib-size", "16", "--no-bench", "--target", "0.3", "--recover-epochs", "2",
         "--set", "recover.batch_size=4", "--set", "recover.lr=1e-2", "--set", "recover.checkpoint_every=3"]
LORA = ["--recover", "lora"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_tiny_decoder_folder(tmp_path_factory.mktemp("lora") / "llama", "llama")


@pytest.fixture(scope="module")
def lora_run(llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora-run") / "run"
    assert main(["prune", "--model", str(llama), *QUICK, *LORA, "--out", str(out)]) == 0
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _changed(run: Path) -> set[str]:
    """Tensors of pruned/ that differ from surgery/ (after checking both hold the same names and shapes)."""
    before, after = _weights(run / "surgery"), _weights(run / "pruned")
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    return {k for k in before if not torch.equal(before[k], after[k])}


def _linear_weights(run: Path, leaves: tuple[str, ...]) -> set[str]:
    return {k for k in _weights(run / "surgery") if k.endswith(".weight") and k.split(".")[-2] in leaves}


ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_lora_recovery_saves_a_plain_pruned_model(lora_run):
    after = _weights(lora_run / "pruned")
    assert not [k for k in after if "lora" in k.lower()]
    # every body linear weight was adapted (all-linear) and nothing else moved: embeddings, norms, biases
    assert _changed(lora_run) == _linear_weights(lora_run, ALL)
    assert "model.embed_tokens.weight" in after and any("norm" in k for k in after)
    task = get_task("lm-rt")
    surgery, tok = models.load(str(lora_run / "surgery"), task)
    pruned, _ = models.load(str(lora_run / "pruned"), task)  # loads like any pruned folder
    assert type(pruned) is type(surgery)
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in surgery.parameters())
    ids = tok("the film is good and the story is great", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert not torch.allclose(pruned(input_ids=ids).logits, surgery(input_ids=ids).logits, atol=1e-4)
    stages = json.loads((lora_run / "stages.json").read_text())["stages"]["recover"]
    history = stages["history"]
    assert history[-1]["task_loss"] < history[0]["task_loss"]  # recovery lowered the training loss
    assert 0 < stages["trainable_params"] < sum(p.numel() for p in surgery.parameters())
    metrics = json.loads((lora_run / "metrics.json").read_text())
    assert metrics["recovery"].startswith("LoRA r=16") and "merged" in metrics["recovery"]
    assert metrics["pruned"]["test"]["perplexity"] < metrics["pruned_no_recovery"]["test"]["perplexity"]
    assert metrics["recovery"] in (lora_run / "report.md").read_text()
    assert not [p.name for p in lora_run.iterdir() if p.name.startswith("ckpt")]


def test_named_targets_and_distillation(llama, tmp_path):
    """--lora-targets adapts only the named layers; --distill works with LoRA (the teacher is the dense model)."""
    out = tmp_path / "run"
    assert main(["prune", "--model", str(llama), *QUICK, *LORA, "--lora-targets", "q_proj,down_proj",
                 "--lora-rank", "4", "--distill", "--out", str(out)]) == 0
    assert _changed(out) == _linear_weights(out, ("q_proj", "down_proj"))
    stages = json.loads((out / "stages.json").read_text())["stages"]["recover"]
    assert "distill_loss" in stages["history"][0]
    config = json.loads((out / "stages.json").read_text())["config"]
    assert config["lora"] == {"enabled": True, "rank": 4, "alpha": 32.0, "dropout": 0.0, "targets": "q_proj,down_proj"}


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_bert], ids=["llama", "gpt2-conv1d", "bert"])
def test_merged_model_computes_what_the_adapted_model_did(build):
    plain = build()
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = plain(input_ids=ids).logits
    wrapped = lora.wrap(build(), LoraConfig(enabled=True, rank=4, alpha=8.0), seed=0)
    adapted = {n.rsplit(".", 1)[0] for n, m in wrapped.named_modules() if hasattr(m, "lora_A")}
    assert adapted and not any(head in n for n in adapted for head in ("lm_head", "classifier", "score"))
    # the training loop's optimizer gets the adapters alone
    opt_params = {id(p) for g in _optimizer(wrapped, load_config().recover).param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in wrapped.named_parameters() if "lora_" in n} != set()
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # B starts at 0 (the adapted model is the plain one): give it an effect
                p.normal_(0.0, 0.2)
        before = wrapped(input_ids=ids).logits
        merged = lora.merge(wrapped)
        after = merged(input_ids=ids).logits
    assert type(merged) is type(plain) and not [k for k in merged.state_dict() if "lora" in k]
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert not torch.allclose(before, reference, atol=1e-3)
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("argv, words", [
    ([*LORA, "--recover-epochs", "0"], ["--recover lora", "recover.epochs is 0"]),
    ([*LORA, "--lora-rank", "0"], ["lora.rank", "got 0"]),
    ([*LORA, "--lora-targets", "q_proj,qproj"], ["qproj", "q_proj"]),
    ([*LORA, "--lora-targets", "lm_head"], ["lm_head", "no linear layer"]),
    (["--lora-rank", "8"], ["--lora-rank 8", "--recover lora"]),
    (["--recover", "full", "--set", "lora.enabled=true"], ["--recover full", "lora.enabled=true"]),
])
def test_bad_lora_options_are_refused_before_writing(llama, tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(llama), *QUICK, *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("idprior: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert not out.exists()


def test_lora_without_peft_is_refused_before_writing(llama, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    out = tmp_path / "run"
    assert main(["prune", "--model", str(llama), *QUICK, *LORA, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs the peft package" in err and "--recover full" in err and "Traceback" not in err
    assert not out.exists()


def test_interrupted_lora_recovery_resumes_to_the_same_weights(llama, lora_run, tmp_path, monkeypatch, capsys):
    """Stopped while writing the third recovery checkpoint (step 9 of 24): --resume continues from the second
    (step 6), adapters and optimizer restored, and ends with the uninterrupted run's weights and log."""
    out = tmp_path / "run"
    argv = ["prune", "--model", str(llama), *QUICK, *LORA, "--out", str(out)]
    real, seen = io.write_json, []

    def stop_in_third_checkpoint(path, obj):
        if Path(path).name == "state.json" and "ckpt_recover" in str(path):
            seen.append(path)
            if len(seen) == 3:
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(io, "write_json", stop_in_third_checkpoint)
    assert main(argv) == 130  # the CLI's answer to Ctrl-C
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(io, "write_json", real)
    last = latest_checkpoint(out / "ckpt_recover")
    assert last is not None and last.name == "e0000-s0000006"
    assert any("lora_A" in k for k in load_file(str(last / "model.safetensors")))
    assert not (out / "pruned").exists()
    assert main([*argv, "--resume"]) == 0
    assert "training continues from checkpoint ckpt_recover" in capsys.readouterr().out
    got, ref = _weights(out / "pruned"), _weights(lora_run / "pruned")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert (out / "recover_log.jsonl").read_text() == (lora_run / "recover_log.jsonl").read_text()


def test_full_recovery_folders_resume_whatever_their_lora_section(llama, tmp_path):
    """A run folder written before the lora: section existed (none recorded) resumes with full recovery; asking
    for LoRA on it is a different run."""
    cfg = load_config(None, [f"model.name={llama}", "data.task=lm-rt", f"out={tmp_path}"])
    saved = {k: v for k, v in resume_key(cfg).items() if k != "lora"}
    assert resume_differences(saved, cfg) == []
    lora_cfg = load_config(None, [f"model.name={llama}", "data.task=lm-rt", f"out={tmp_path}", "lora.enabled=true"])
    assert resume_differences(saved, lora_cfg) == ["lora"]
    assert resume_differences(resume_key(lora_cfg), cfg) == ["lora.enabled"]
