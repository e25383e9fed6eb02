"""A tiny BERT classifier saved as a Hugging Face folder with a real (word-piece) tokenizer,
so that the CLI and the pipeline can be run end to end on it in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

WORDS = ["the", "a", "and", "of", "to", "is", "in", "it", "that", "this", "film", "movie", "story", "good", "bad", "great", "funny", "dull", "best", "worst", "plot", "characters", "love", "boring", "fun", "not", "no", "very", "too", "more", "most", "one", "just", "as", "but", "with", "for", "on", "an", "be", "its", "his", "her", "their", "all", "by", "so", "like", "than", "about", "from", "has", "was", "are", "have", "ever", "never"]


def make_tiny_bert_folder(path: Path, num_labels: int = 2, seed: int = 0, layers: int = 2) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *[chr(c) for c in range(ord("a"), ord("z") + 1)]]
    vocab += [f"##{chr(c)}" for c in range(ord("a"), ord("z") + 1)]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab_file=str(path / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
