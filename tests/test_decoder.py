"""Decoders end to end: `idprior prune --task lm-rt --no-train` on tiny Llama / Qwen2 / GPT-2 folders,
per-query-head pruning, KV-cache generation from a reloaded pruned model, lean scoring, and
in-place bf16 surgery. The real SmolLM2 checks are marked slow."""

from __future__ import annotations

import json
import math

import pytest
import torch

from idprior.arch import get_adapter
from idprior.cli.main import main
from idprior.data import get_task
from idprior.method import scoring
from idprior.method.units import Unit
from idprior.model import load as models
from idprior.model.surgery import apply_plan, load_pruned, predicted_params, save_pruned
from idprior.pipeline.evaluate import SAMPLE_PROMPTS
from tiny_decoder_folder import FAMILIES, make_tiny_decoder_folder
from tiny_models import tiny_llama

QUICK = ["--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16", "--max-length", "32",
         "--calib-size", "16", "--recover-epochs", "0", "--no-bench"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoders")
    return {family: make_tiny_decoder_folder(root / family, family) for family in FAMILIES}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_lm_end_to_end(folders, tmp_path, family):
    out = tmp_path / "run"
    assert main(["prune", "--model", str(folders[family]), *QUICK, "--target", "0.3", "--out", str(out)]) == 0
    for name in ("config.yaml", "stages.json", "scores.json", "plan.json", "metrics.json", "report.md",
                 "finetuned/model.safetensors", "surgery/model.safetensors", "pruned/model.safetensors",
                 "pruned/config.json", "pruned/tokenizer.json"):
        assert (out / name).exists(), name
    plan = json.loads((out / "plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["main_metric"] == "perplexity"
    for which in ("dense", "pruned", "pruned_no_recovery"):
        ppl = metrics[which]["test"]["perplexity"]
        assert math.isfinite(ppl) and ppl > 1
    assert plan["measures"]["removed_fraction"]["encoder_params"] >= 0.3
    # the post-training decoder recipe re-fits the kept columns (lsq), adding the output biases Llama lacks
    added = _compensation(out)
    assert metrics["compression"]["encoder_params"]["pruned"] == plan["measures"]["after"]["encoder_params"] + added
    gens = metrics["generations"]
    assert [g["prompt"] for g in gens] == list(SAMPLE_PROMPTS)
    assert all(isinstance(g["dense"], str) and isinstance(g["pruned"], str) for g in gens)
    assert "## Sample generations" in (out / "report.md").read_text()
    assert _params(load_pruned(out / "pruned")) == plan["measures"]["after"]["total_params"] + added


def _compensation(out) -> int:
    """The output-bias parameters the surgery stage's compensation added; checks it ran the decoder recipe's lsq."""
    comp = json.loads((out / "stages.json").read_text())["stages"]["surgery"]["compensation"]
    assert comp["mode"] == "lsq"
    return comp["added_bias_params"]


def test_per_query_head_end_to_end(folders, tmp_path):
    """Query-head slots go from every KV group alike: KV heads stay, groups stay equal. With one
    recovery epoch (causal-LM loss) on top, so recovery and the separate no-recovery row run too."""
    out = tmp_path / "run"
    rc = main(["prune", "--model", str(folders["llama"]), *QUICK, "--per-query-head", "--kinds", "head",
               "--target", "0.1", "--recover-epochs", "1", "--batch-size", "16", "--out", str(out)])
    assert rc == 0
    recover = json.loads((out / "stages.json").read_text())["stages"]["recover"]
    assert recover["steps"] >= 1 and math.isfinite(recover["history"][0]["task_loss"])
    plan = json.loads((out / "plan.json").read_text())
    heads = [Unit.parse(u) for u in plan["units"] if u.startswith("head:")]
    assert heads and all(u.index < 2 for u in heads)  # 4 query heads / 2 KV heads = 2 slots
    pruned = load_pruned(out / "pruned")
    shapes = [s for s in get_adapter(pruned).shapes() if s.has_attn]
    assert all(s.n_kv_heads == 2 and s.n_heads % s.n_kv_heads == 0 for s in shapes)
    assert any(s.n_heads < 4 for s in shapes)
    assert _params(pruned) == plan["measures"]["after"]["total_params"] + _compensation(out)
    assert math.isfinite(json.loads((out / "metrics.json").read_text())["pruned"]["test"]["perplexity"])


# Layer 0 loses its attention (transformers reads the cache length from layer 0), layer 1 a head
# unit (a KV group, or a query slot with per_query_head) and two neurons, layer 2 its FFN.
DECODE_PLAN = [Unit("attn", 0), Unit("head", 1, 1), Unit("neuron", 1, 3), Unit("neuron", 1, 7), Unit("ffn", 2)]


def _greedy_recompute(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding that reruns the whole sequence every step (no cache): tokens, step logits."""
    seq, logits = ids, []
    with torch.no_grad():
        for _ in range(steps):
            step = model(input_ids=seq, use_cache=False).logits[:, -1]  # [B, V]
            logits.append(step)
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], dim=1)
    return seq, torch.stack(logits, 1)  # [B, T + steps], [B, steps, V]


@pytest.mark.parametrize(("family", "per_query_head"),
                         [(f, False) for f in FAMILIES] + [("llama", True), ("qwen2", True)])  # GPT-2 has no GQA
def test_reloaded_pruned_generation_cache_equals_recompute(folders, tmp_path, family, per_query_head):
    model, tok = models.load(str(folders[family]), get_task("lm-rt"))
    apply_plan(model, DECODE_PLAN, get_adapter(model, per_query_head=per_query_head))
    save_pruned(model, tok, tmp_path / "pruned")
    pruned = load_pruned(tmp_path / "pruned")
    assert not get_adapter(pruned).shape(0).has_attn
    ids = torch.tensor([[4, 15, 9, 5, 20], [6, 7, 8, 9, 10]])  # [B=2, T=5], no padding
    pruned.generation_config.eos_token_id = None  # run all steps, like the recomputation (no EOS masking)
    with torch.no_grad():
        out = pruned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                              do_sample=False, use_cache=True, pad_token_id=0, output_logits=True,
                              return_dict_in_generate=True)
    tokens, logits = _greedy_recompute(pruned, ids, NEW_TOKENS)
    assert torch.equal(out.sequences, tokens)
    torch.testing.assert_close(torch.stack(out.logits, 1), logits, atol=1e-4, rtol=1e-4)


def test_lean_scoring_gives_the_same_norms():
    """Skipping the KV cache and all but the last logits changes no branch the hooks see."""
    model = tiny_llama()
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 100, (2, 12), generator=gen),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(2)]
    assert scoring.lean_forward_kwargs(model) == {"use_cache": False, "logits_to_keep": 1}
    lean = scoring.score(model, batches)
    full = scoring.score(model, batches, lean=False)
    assert lean.keys() == full.keys()
    for unit, value in full.items():
        assert lean[unit] == pytest.approx(value, rel=1e-6, abs=1e-9), unit


def test_bf16_surgery_slices_in_place():
    """apply_plan replaces only the sliced matrices: bf16 stays bf16, every other tensor is the same
    storage (no copy of the model), and the parameter count is the predicted one."""
    model = tiny_llama(dtype=torch.bfloat16)
    adapter = get_adapter(model)
    plan = [Unit("head", 1, 0), Unit("neuron", 1, 2), Unit("ffn", 2)]
    expected = predicted_params(model, plan, adapter)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    apply_plan(model, plan, adapter)
    after = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    untouched = [n for n in after if not n.startswith(("model.layers.1.", "model.layers.2."))]
    assert untouched and all(after[n] == before[n] for n in untouched)
    sliced = ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert all(after[n] != before[n] for n in sliced)
    assert _params(model) == expected
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[5, 6, 7]])).logits.dtype == torch.bfloat16


# ---- the real SmolLM2-135M (GGUF): slow ---------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_gguf_loads_dequantized_and_saves(tmp_path):
    torch.set_num_threads(2)
    model, tok = models.load("smollm2-135m", get_task("lm-rt"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert 134_000_000 < _params(model) < 135_000_000
    assert not hasattr(model.config, "quantization_config") and getattr(model, "hf_quantizer", None) is None
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    apply_plan(model, DECODE_PLAN, get_adapter(model))
    save_pruned(model, tok, tmp_path / "pruned")
    pruned = load_pruned(tmp_path / "pruned")
    ids = tok("the movie is", return_tensors="pt")["input_ids"]
    pruned.generation_config.eos_token_id = None
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
        cached = pruned.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                 do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
    assert torch.equal(cached, _greedy_recompute(pruned, ids, 6)[0])
