"""Tokenization and batching.

Texts are tokenized once, eagerly and in chunks (fast tokenizers parallelize a list call), when the
data loader is built; batches are padded to their longest member (dynamic padding), on the side
the tokenizer asks for. Shuffling uses a seeded `torch.Generator`, so the order of every epoch is
reproducible.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from idprior.data.tasks import Task
from idprior.errors import IdpriorError

CHUNK = 1024  # examples per tokenizer call
IGNORE_INDEX = -100  # label of padded positions in language modelling (skipped by the loss)


def pad_token_id(tokenizer) -> int:
    """The pad id, falling back to EOS for decoder tokenizers without one (masked out anyway)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise IdpriorError(
        "the tokenizer has neither a pad nor an EOS token: set tokenizer.pad_token before training"
    )


class EncodedDataset(Dataset):
    """Token ids (and token type ids) of each example, truncated to `max_length`, plus its label."""

    def __init__(self, examples: list[dict], tokenizer, task: Task, max_length: int):
        if task.kind == "lm":
            raise IdpriorError(f"task '{task.name}' is language modelling: use make_lm_dataloader")
        texts = [_field(ex, "text", task) for ex in examples]
        pairs = [_field(ex, "text_pair", task) for ex in examples] if task.is_pair else None
        self.features: list[dict[str, list[int]]] = []
        for start in range(0, len(texts), CHUNK):
            encoded = tokenizer(
                texts[start : start + CHUNK],
                pairs[start : start + CHUNK] if pairs is not None else None,
                truncation=True,
                max_length=max_length,
                padding=False,
                return_attention_mask=False,
                verbose=False,
            )
            keys = [k for k in ("input_ids", "token_type_ids") if k in encoded]
            for i in range(len(encoded["input_ids"])):
                self.features.append({k: encoded[k][i] for k in keys})
        self.labels = None
        if all("label" in ex for ex in examples):
            dtype = torch.float32 if task.kind == "regression" else torch.long
            self.labels = torch.tensor([ex["label"] for ex in examples], dtype=dtype)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        item = dict(self.features[i])
        if self.labels is not None:
            item["labels"] = self.labels[i]
        return item


class PadCollator:
    """Pads a list of encoded examples to the longest one; attention_mask marks real tokens."""

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.left = padding_side == "left"

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        batch: dict[str, torch.Tensor] = {}
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "token_type_ids": 0}
        for key, pad in pads.items():
            if key != "attention_mask" and key not in items[0]:
                continue
            rows = []
            for item in items:
                n = len(item["input_ids"])
                values = [1] * n if key == "attention_mask" else item[key]
                fill = [pad] * (width - n)
                rows.append(fill + values if self.left else values + fill)
            batch[key] = torch.tensor(rows, dtype=torch.long)
        if "labels" in items[0]:
            batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch


def make_dataloader(
    examples: list[dict],
    tokenizer,
    task: Task,
    *,
    batch_size: int,
    max_length: int,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of input_ids / attention_mask (/ token_type_ids) / labels for a classification or
    regression task; pair tasks are encoded as (text, text_pair)."""
    _check_sizes(examples, batch_size, "max_length", max_length)
    dataset = EncodedDataset(examples, tokenizer, task, max_length)
    collator = PadCollator(pad_token_id(tokenizer), getattr(tokenizer, "padding_side", "right"))
    return _loader(dataset, collator, batch_size, shuffle, seed, drop_last)


# ----------------------------------------------------------------------------- language modelling


class BlockDataset(Dataset):
    """Fixed-length blocks cut from one token stream: documents joined with EOS after each.

    The last, shorter block is kept and padded (labels IGNORE_INDEX, attention 0), so every token
    of a small evaluation set counts.
    """

    def __init__(self, examples: list[dict], tokenizer, block_size: int):
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if eos is None:
            raise IdpriorError(
                "the tokenizer has no EOS (or SEP) token to separate documents: use a decoder tokenizer"
            )
        texts = [_field(ex, "text", None) for ex in examples]
        stream: list[int] = []
        for start in range(0, len(texts), CHUNK):
            encoded = tokenizer(texts[start : start + CHUNK], add_special_tokens=False, verbose=False)
            for ids in encoded["input_ids"]:
                stream.extend(ids)
                stream.append(eos)
        n_blocks = -(-len(stream) // block_size)
        pad = pad_token_id(tokenizer)
        input_ids = torch.full((n_blocks, block_size), pad, dtype=torch.long)
        labels = torch.full((n_blocks, block_size), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((n_blocks, block_size), dtype=torch.long)
        tokens = torch.tensor(stream, dtype=torch.long)
        flat = slice(0, len(stream))
        input_ids.view(-1)[flat] = tokens
        labels.view(-1)[flat] = tokens
        attention.view(-1)[flat] = 1
        self.input_ids, self.attention_mask, self.labels = input_ids, attention, labels
        self.n_tokens = len(stream)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[i],
            "attention_mask": self.attention_mask[i],
            "labels": self.labels[i],
        }


def _stack(items: list[dict]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def make_lm_dataloader(
    examples: list[dict],
    tokenizer,
    *,
    batch_size: int,
    block_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """Batches of (batch, block_size) input_ids / attention_mask / labels (= input_ids; the model
    shifts them) from documents concatenated with EOS between them."""
    _check_sizes(examples, batch_size, "block_size", block_size)
    dataset = BlockDataset(examples, tokenizer, block_size)
    return _loader(dataset, _stack, batch_size, shuffle, seed, drop_last)


# ----------------------------------------------------------------------------- helpers


def _loader(dataset, collate_fn, batch_size: int, shuffle: bool, seed: int, drop_last: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        drop_last=drop_last,
        collate_fn=collate_fn,
        num_workers=0,
    )


def _check_sizes(examples, batch_size: int, length_name: str, length: int) -> None:
    if not examples:
        raise IdpriorError(
            "no examples to batch: the split is empty (check max_train / max_eval and the data)"
        )
    if batch_size < 1:
        raise IdpriorError(f"batch size must be at least 1, got {batch_size}")
    if length < 2:
        raise IdpriorError(f"{length_name} must be at least 2 tokens, got {length}")


def _field(example: dict, key: str, task: Task | None) -> str:
    value = example.get(key)
    if not isinstance(value, str):
        name = f"task '{task.name}'" if task is not None else "language modelling"
        raise IdpriorError(f"{name} needs a '{key}' string in every example, got {type(value).__name__}")
    return value
