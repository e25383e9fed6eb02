"""Zero-shot classification by label-word likelihood (zeroshot.py), on a tiny random Llama with a
word-level tokenizer: predictions are the argmax of the label-word log-probabilities computed
independently (one unpadded sequence per example and form, full logits), for single-token and
multi-token words, with and without a chat template; padding and batching change nothing."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from idprior.pipeline.zeroshot import (
    SPECS,
    ZeroShotSpec,
    evaluate_zero_shot,
    label_logprobs,
    prompt_ids,
    word_ids,
)
from tiny_models import VOCAB, tiny_gpt2, tiny_llama

_WORDS = ("is the sentiment of this movie review positive or negative ? : answer with one word . very good bad "
          "film dull fun a and it not great boring user assistant system")
WORDS = tuple(_WORDS.split())
CHAT = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}")
TEXTS = ["a very good film", "dull and boring", "not great", "fun fun fun", "it is bad", "a good movie"]


def tokenizer(chat: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(dict.fromkeys(["<pad>", "<unk>", "<s>", "</s>", *WORDS]))}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    if chat:
        fast.chat_template = CHAT
    return fast


def independent_scores(model, tok, spec: ZeroShotSpec, text: str) -> list[float]:
    """Per label: log-sum-exp over forms of Σ log p(form token | prompt + earlier form tokens), from
    one unpadded forward of prompt + form with the model's full logits."""
    prompt = prompt_ids(tok, spec, text)
    out = []
    for forms in word_ids(tok, spec):
        per_form = []
        for w in forms:
            ids = torch.tensor([prompt + w])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)  # [T, V]
            per_form.append(sum(float(logp[len(prompt) - 1 + t, w[t]]) for t in range(len(w))))
        out.append(float(torch.logsumexp(torch.tensor(per_form), 0)))
    return out


SINGLE = SPECS["rt-polarity"]
MULTI = ZeroShotSpec("is this movie review positive or negative ? review : {text}",
                     (("very bad", "negative"), ("very good", "positive .")))


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
@pytest.mark.parametrize("spec", [SINGLE, MULTI], ids=["single-token", "multi-token"])
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_predictions_are_the_argmax_of_label_word_logprobs(build, spec, chat):
    model = build()
    tok = tokenizer(chat)
    examples = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]
    metrics, per = evaluate_zero_shot(model, tok, examples, spec, batch_size=4)
    want = torch.tensor([independent_scores(model, tok, spec, ex["text"]) for ex in examples], dtype=torch.float64)
    assert want.std() > 0  # the labels really differ, so the argmax check means something
    assert per["pred"].tolist() == want.argmax(-1).tolist()
    assert metrics["examples"] == len(examples)
    assert metrics["accuracy"] == pytest.approx(float((want.argmax(-1) == torch.tensor(per["label"]).long()).double().mean()))
    norm = want - want.logsumexp(-1, keepdim=True)
    gold = norm[torch.arange(len(examples)), torch.tensor(per["label"]).long()]
    torch.testing.assert_close(torch.tensor(per["gold_logprob"]).double(), gold, atol=1e-4, rtol=1e-4)
    # batching and padding change nothing
    prompts = [prompt_ids(tok, spec, ex["text"]) for ex in examples]
    one = label_logprobs(model, prompts, word_ids(tok, spec), pad_id=0, batch_size=1)
    many = label_logprobs(model, prompts, word_ids(tok, spec), pad_id=0, batch_size=6)
    torch.testing.assert_close(one, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(many, want, atol=1e-5, rtol=1e-5)


def test_prompt_uses_the_chat_template_and_words_follow_it():
    plain, chat = tokenizer(False), tokenizer(True)
    text = "a good film"
    assert plain.decode(prompt_ids(plain, SINGLE, text)).endswith("answer :")
    decoded = chat.decode(prompt_ids(chat, SINGLE, text))
    assert decoded.startswith("<s> user :") and decoded.endswith("<s> assistant :")
    assert SINGLE.words(True)[1] == ("positive", "Positive") and SINGLE.words(False)[1] == (" positive", " Positive")


def test_long_texts_are_cut():
    tok = tokenizer(False)
    short = prompt_ids(tok, SINGLE, "good " * 10, text_tokens=4)
    assert len(short) == len(prompt_ids(tok, SINGLE, "good " * 4))


def test_unknown_task():
    from idprior.errors import IdpriorError

    with pytest.raises(IdpriorError, match="rt-polarity"):
        evaluate_zero_shot(tiny_llama(), tokenizer(False), [{"text": "x", "label": 0}], "20ng")


def test_prune_cli_reports_zero_shot_accuracy(tmp_path):
    """--set data.zero_shot=rt-polarity: metrics.json has dense and pruned accuracy on the same examples,
    next to perplexity, and their per-example predictions for paired comparisons."""
    from idprior.cli.main import main
    from idprior.pipeline.evaluate import load_predictions
    from tiny_decoder_folder import make_tiny_decoder_folder

    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    out = tmp_path / "run"
    args = ["prune", "--model", str(folder), "--task", "lm-rt", "--no-train", "--max-train", "64", "--max-eval", "16",
            "--max-length", "32", "--calib-size", "16", "--recover-epochs", "0", "--no-bench", "--target", "0.3",
            "--set", "data.zero_shot=rt-polarity", "--set", "data.max_zero_shot=12", "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    zs = metrics["zero_shot"]
    assert zs["task"] == "rt-polarity" and zs["split"] == "test"
    for which in ("dense", "pruned"):
        assert zs[which]["examples"] == 12 and 0 <= zs[which]["accuracy"] <= 1
        assert metrics[which]["test"]["perplexity"] > 1
    assert "| zero-shot rt-polarity test accuracy (12 examples" in (out / "report.md").read_text()
    preds = load_predictions(out / "predictions.safetensors")
    assert len(preds["zero_shot.dense.test"]["pred"]) == 12
    assert (preds["zero_shot.dense.test"]["label"] == preds["zero_shot.pruned.test"]["label"]).all()


def test_evaluate_cli_zero_shot(tmp_path, capsys):
    from idprior.cli.main import main
    from tiny_decoder_folder import make_tiny_decoder_folder

    folder = make_tiny_decoder_folder(tmp_path / "llama", "llama")
    args = ["evaluate", str(folder), "--task", "lm-rt", "--max-eval", "8", "--max-length", "32", "--zero-shot",
            "rt-polarity", "--out", str(tmp_path / "eval")]
    assert main(args) == 0
    zs = json.loads((tmp_path / "eval" / "metrics.json").read_text())["zero_shot"]
    assert zs["task"] == "rt-polarity" and zs["examples"] == 8 and 0 <= zs["accuracy"] <= 1
    capsys.readouterr()
    assert main(["evaluate", str(folder), "--task", "rt-polarity", "--zero-shot", "rt-polarity"]) != 0
    assert "language-modelling" in capsys.readouterr().err
