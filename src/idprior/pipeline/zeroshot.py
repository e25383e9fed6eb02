"""Zero-shot classification with a causal LM by label-word likelihood: a capability check beyond
perplexity for pruned decoders (issue 15).

For each example the text goes into an instruction (a user turn of the tokenizer's chat template
when it has one, else a plain "...\\nAnswer:" prompt), and every label is scored by the
log-likelihood of its word right after the prompt: log p(word | prompt), summed over the word's
tokens, and log-sum-exp over its surface forms ("positive" / "Positive"), since an instruct model
may start its answer capitalized. The prediction is the label with the highest score; no
generation, no calibration. Prompt and word are tokenized separately and concatenated, so a word's
tokens are the same for every example.

Cost: one forward per distinct prompt-plus-word-prefix; with single-token words (SmolLM2's
"positive", "negative", ...) that is one forward of the prompt per example. Logits are computed
only at the positions read (the LM head on gathered hidden states), not for the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

TEXT_TOKENS = 256  # an example's text is cut to this many tokens before it goes into the prompt


@dataclass(frozen=True)
class ZeroShotSpec:
    instruction: str  # with {text}
    forms: tuple[tuple[str, ...], ...]  # surface forms of each label's word, in label-id order

    def words(self, chat: bool) -> tuple[tuple[str, ...], ...]:
        """The forms as they follow the prompt: a chat answer starts the assistant turn, a plain
        prompt ends with "Answer:" and the word follows a space."""
        return self.forms if chat else tuple(tuple(" " + f for f in forms) for forms in self.forms)


_SENTIMENT = ZeroShotSpec(
    "Is the sentiment of this movie review positive or negative?\n\nReview: {text}\n\n"
    "Answer with one word: positive or negative.",
    (("negative", "Negative"), ("positive", "Positive")),
)
SPECS: dict[str, ZeroShotSpec] = {
    "rt-polarity": _SENTIMENT,  # labels (rotten, fresh)
    "sst2": _SENTIMENT,  # labels (negative, positive)
}


def get_spec(task: str) -> ZeroShotSpec:
    from ..errors import IdpriorError

    if task not in SPECS:
        raise IdpriorError(f"no zero-shot prompt for task {task!r}; use one of {', '.join(SPECS)}")
    return SPECS[task]


def _has_chat(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer, spec: ZeroShotSpec, text: str, text_tokens: int = TEXT_TOKENS) -> list[int]:
    """Token ids of the instruction with `text` (cut to `text_tokens` tokens) filled in."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) > text_tokens:
        text = tokenizer.decode(ids[:text_tokens])
    content = spec.instruction.format(text=text)
    if _has_chat(tokenizer):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                 tokenize=False)
    else:
        rendered = content + "\nAnswer:"
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def word_ids(tokenizer, spec: ZeroShotSpec) -> list[list[list[int]]]:
    """[label][form] -> token ids of that form as it follows the prompt."""
    return [[tokenizer(w, add_special_tokens=False)["input_ids"] for w in forms]
            for forms in spec.words(_has_chat(tokenizer))]


def label_logprobs(model, prompts: list[list[int]], words: list[list[list[int]]], *, pad_id: int,
                   batch_size: int = 8):
    """[N, K] float64: log-sum-exp over forms of log p(form | prompt) for every example and label."""
    import torch

    # One request per (example, label, form); the sequence it needs is prompt + form[:-1]: the form's
    # tokens are predicted at positions len(prompt) - 1 ... len(prompt) + len(form) - 2.
    seqs: dict[tuple[int, ...], int] = {}
    requests = []  # (example, label, first position, form ids)
    by_seq: dict[int, list[int]] = {}  # sequence index -> the requests it serves
    for i, p in enumerate(prompts):
        for k, forms in enumerate(words):
            for w in forms:
                if not w:
                    raise ValueError("a label word tokenizes to nothing")
                j = seqs.setdefault(tuple(p + w[:-1]), len(seqs))
                by_seq.setdefault(j, []).append(len(requests))
                requests.append((i, k, len(p) - 1, w))
    per_form = torch.full((len(requests),), float("nan"), dtype=torch.float64)
    ordered = sorted(seqs.items(), key=lambda kv: len(kv[0]))  # similar lengths share a batch: little padding
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    try:
        with torch.no_grad():
            for start in range(0, len(ordered), batch_size):
                chunk = ordered[start:start + batch_size]
                width = max(len(s) for s, _ in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, (s, _) in enumerate(chunk):  # right padding: positions 0..len-1 as without padding
                    ids[row, :len(s)] = torch.tensor(s)
                    mask[row, :len(s)] = 1
                hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                          use_cache=False).last_hidden_state  # [B, T, D]
                for row, (_, j) in enumerate(chunk):
                    for n in by_seq[j]:
                        first, w = requests[n][2], requests[n][3]
                        logits = head(hidden[row, first:first + len(w)])  # [len(w), V] only where the form is read
                        logp = torch.log_softmax(logits.double(), dim=-1)
                        per_form[n] = float(logp[torch.arange(len(w)), torch.tensor(w, device=device)].sum())
    finally:
        model.train(was_training)
    out = torch.full((len(prompts), len(words)), float("-inf"), dtype=torch.float64)
    for n, (i, k, _, _) in enumerate(requests):
        out[i, k] = torch.logaddexp(out[i, k], per_form[n])
    return out


def evaluate_zero_shot(model, tokenizer, examples: list[dict], task: str | ZeroShotSpec, *, batch_size: int = 8,
                       text_tokens: int = TEXT_TOKENS) -> tuple[dict, dict]:
    """({"accuracy", "examples"}, per-example {"pred", "label", "gold_logprob"}) on `examples` of `task`
    (a name in SPECS or a spec; {"text", "label"} dicts, labels in the task's id order). gold_logprob is
    log p(gold) among the labels' scores."""
    import numpy as np

    from ..data.collate import pad_token_id

    spec = task if isinstance(task, ZeroShotSpec) else get_spec(task)
    prompts = [prompt_ids(tokenizer, spec, ex["text"], text_tokens) for ex in examples]
    scores = label_logprobs(model, prompts, word_ids(tokenizer, spec), pad_id=pad_token_id(tokenizer),
                            batch_size=batch_size)
    labels = np.array([int(ex["label"]) for ex in examples])
    pred = scores.argmax(-1).numpy()
    norm = scores - scores.logsumexp(-1, keepdim=True)  # [N, K] log p(label) among the labels
    per = {"pred": pred.astype(np.int16), "label": labels.astype(np.int16),
           "gold_logprob": norm.numpy()[np.arange(len(labels)), labels].astype(np.float32)}
    return {"accuracy": float((pred == labels).mean()) if len(labels) else float("nan"), "examples": len(labels)}, per


def zero_shot_models(models: dict, tokenizer, task: str, *, max_examples: int | None = None,
                     batch_size: int = 8) -> tuple[dict, dict]:
    """Every model of {name: model} on the same fixed subset of `task`'s test split:
    ({"task", "split", name: metrics}, {"zero_shot.<name>.test": per-example arrays})."""
    from ..data import load_task

    examples = load_task(task, max_eval=max_examples).splits["test"]
    out: dict = {"task": task, "split": "test"}
    per: dict = {}
    for name, model in models.items():
        out[name], per[f"zero_shot.{name}.test"] = evaluate_zero_shot(model, tokenizer, examples, task,
                                                                       batch_size=batch_size)
    return out, per
