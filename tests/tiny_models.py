"""Tiny seeded random models, one per supported family, for fast offline tests.

Each function returns an eval-mode model with 4 layers, eager attention and a vocabulary of 100.
Weights use a larger init scale than the default 0.02 so that every branch visibly changes the
output (an equivalence test on near-zero branches would prove little) and greedy decoding has no ties.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 100
LAYERS = 4
INIT_STD = 0.2


def _build(model_cls, config, seed: int, dtype: torch.dtype):
    """Seeded model; biases are randomized too (HF inits them to 0), so bias slicing is exercised.

    Built directly in `dtype` the way from_pretrained(dtype=...) does it (rotary buffers stay fp32).
    """
    torch.manual_seed(seed)
    model = model_cls._from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, INIT_STD)
    return model


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
        attn_implementation="eager", initializer_range=INIT_STD,
    )
    return _build(BertForSequenceClassification, config, seed, dtype)


def tiny_roberta(seed: int = 0, dtype: torch.dtype = torch.float32) -> RobertaForSequenceClassification:
    config = RobertaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=72, num_labels=3, pad_token_id=1,
        attn_implementation="eager", initializer_range=INIT_STD,
    )
    return _build(RobertaForSequenceClassification, config, seed, dtype)


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=4, n_inner=64, n_positions=64,
        bos_token_id=0, eos_token_id=0,
        attn_implementation="eager", initializer_range=INIT_STD,
    )
    return _build(GPT2LMHeadModel, config, seed, dtype)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager", initializer_range=INIT_STD,
    )
    return _build(LlamaForCausalLM, config, seed, dtype)


def tiny_qwen2(seed: int = 0, dtype: torch.dtype = torch.float32) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_implementation="eager", initializer_range=INIT_STD,
    )
    return _build(Qwen2ForCausalLM, config, seed, dtype)


TINY_MODELS = {
    "bert": tiny_bert,
    "roberta": tiny_roberta,
    "gpt2": tiny_gpt2,
    "llama": tiny_llama,
    "qwen2": tiny_qwen2,
}
