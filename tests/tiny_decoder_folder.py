"""Tiny seeded decoders (Llama, Qwen2, GPT-2) saved as Hugging Face folders with a word-level
tokenizer, so `idprior prune --task lm-rt` runs end to end on them in seconds.

The tokenizer is a `tokenizers` WordLevel model (lower-cased, split on whitespace and punctuation)
wrapped in `PreTrainedTokenizerFast`; words outside its small vocabulary map to <unk>, which is
fine for perplexity and generation plumbing tests.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")  # ids 0..3
_WORDS = ("the a and of to is in it that this film movie story good bad great funny dull best worst plot "
          "characters love boring fun not no very too more most one just as but with for on an be its his her "
          "their all by so like than about from has was are have ever never would should kind much he they "
          "acting i recommend , . ' - -- s t")
WORDS = tuple(_WORDS.split())
FAMILIES = ("llama", "qwen2", "gpt2")


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys([*SPECIALS, *WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces on decode
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")


def _config(family: str, vocab: int):
    common = dict(vocab_size=vocab, bos_token_id=2, eos_token_id=3, pad_token_id=0, initializer_range=0.2)
    if family == "llama":
        return LlamaForCausalLM, LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                             tie_word_embeddings=True, **common)
    if family == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                                             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                                             tie_word_embeddings=False, **common)
    if family == "gpt2":
        return GPT2LMHeadModel, GPT2Config(n_embd=32, n_layer=4, n_head=4, n_inner=64, n_positions=128, **common)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


def make_tiny_decoder_folder(path: Path, family: str = "llama", seed: int = 0) -> Path:
    """Write a seeded tiny causal LM of `family` and its tokenizer to `path`; returns `path`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    cls, config = _config(family, len(tok))
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # random biases (HF inits them to 0), so bias slicing is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
