"""GLUE tasks from a local copy: the official TSV layout, or a `datasets.save_to_disk` folder.

GLUE cannot be downloaded here; the user puts it in place. `data_dir` may be the GLUE root
(`<data_dir>/SST-2/train.tsv`) or the task's own folder (`<data_dir>/train.tsv`).

Split rule: GLUE test labels are not public, so "test" is the official dev set (MNLI: dev matched,
plus "test_mismatched" = dev mismatched) and "validation" is a fixed stratified 10% of train, at
most 2,000 examples, carved with `SPLIT_SEED`.

TSV files are read with `csv.QUOTE_NONE`: GLUE texts contain stray double quotes that a quoting
reader would swallow across lines. Rows with too few fields or an unknown label (a few exist in
the official QQP train file) are skipped and counted in a warning.
"""

from __future__ import annotations

import csv
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from idprior.data.base import PAIR, SINGLE, SPLIT_SEED, Task, carve, tenth
from idprior.errors import IdpriorError

log = logging.getLogger(__name__)

VALIDATION_CAP = 2000

GLUE_TASKS: tuple[Task, ...] = (
    Task("sst2", "classification", ("negative", "positive"), ("accuracy",), SINGLE,
         "GLUE SST-2: movie-review sentence sentiment"),
    Task("cola", "classification", ("unacceptable", "acceptable"), ("matthews", "accuracy"), SINGLE,
         "GLUE CoLA: grammatical acceptability"),
    Task("mrpc", "classification", ("not_equivalent", "equivalent"), ("f1", "accuracy"), PAIR,
         "GLUE MRPC: paraphrase detection on news sentence pairs"),
    Task("stsb", "regression", (), ("pearson", "spearman"), PAIR,
         "GLUE STS-B: sentence-pair similarity score 0-5"),
    Task("qqp", "classification", ("not_duplicate", "duplicate"), ("f1", "accuracy"), PAIR,
         "GLUE QQP: duplicate Quora question pairs"),
    Task("mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",), PAIR,
         "GLUE MNLI: natural language inference; test = dev matched, test_mismatched = dev mismatched"),
    Task("qnli", "classification", ("entailment", "not_entailment"), ("accuracy",), PAIR,
         "GLUE QNLI: does the sentence answer the question"),
    Task("rte", "classification", ("entailment", "not_entailment"), ("accuracy",), PAIR,
         "GLUE RTE: textual entailment"),
)  # fmt: skip


@dataclass(frozen=True)
class GlueFormat:
    """Where a task's fields live: column names, or indices when the file has no header row."""

    folder: str
    text: str | int
    text_pair: str | int | None
    label: str | int
    header: bool = True
    hf_columns: tuple[str, ...] = ()  # text (and pair) columns in the Hugging Face `glue` data set


FORMATS: dict[str, GlueFormat] = {
    "sst2": GlueFormat("SST-2", "sentence", None, "label", hf_columns=("sentence",)),
    # CoLA: no header; columns source, label, original annotation, sentence.
    "cola": GlueFormat("CoLA", 3, None, 1, header=False, hf_columns=("sentence",)),
    "mrpc": GlueFormat("MRPC", "#1 String", "#2 String", "Quality", hf_columns=("sentence1", "sentence2")),
    "stsb": GlueFormat("STS-B", "sentence1", "sentence2", "score", hf_columns=("sentence1", "sentence2")),
    "qqp": GlueFormat("QQP", "question1", "question2", "is_duplicate", hf_columns=("question1", "question2")),
    "mnli": GlueFormat("MNLI", "sentence1", "sentence2", "gold_label", hf_columns=("premise", "hypothesis")),
    "qnli": GlueFormat("QNLI", "question", "sentence", "label", hf_columns=("question", "sentence")),
    "rte": GlueFormat("RTE", "sentence1", "sentence2", "label", hf_columns=("sentence1", "sentence2")),
}

# Our split name -> official file (TSV) and Hugging Face split name.
_TSV_FILES = {"train": "train.tsv", "test": "dev.tsv"}
_MNLI_TSV_FILES = {"train": "train.tsv", "test": "dev_matched.tsv", "test_mismatched": "dev_mismatched.tsv"}
_HF_SPLITS = {"train": "train", "test": "validation"}
_MNLI_HF_SPLITS = {"train": "train", "test": "validation_matched", "test_mismatched": "validation_mismatched"}


def load_glue(task: Task, data_dir) -> dict[str, list[dict]]:
    """Read the task's official files from `data_dir`, then carve validation from train."""
    fmt = FORMATS[task.name]
    if data_dir is None:
        raise IdpriorError(
            f"GLUE task '{task.name}' needs --data-dir: a folder you downloaded GLUE into, "
            f"laid out as <dir>/{fmt.folder}/train.tsv and dev.tsv"
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise IdpriorError(
            f"GLUE folder {root} does not exist: download GLUE and pass its folder with --data-dir"
        )
    hf_dir = _find_hf_dir(root, task.name)
    if hf_dir is not None:
        splits = _load_hf(task, fmt, hf_dir)
    else:
        splits = _load_tsv(task, fmt, root)
    stratify = task.kind == "classification"
    train = splits["train"]
    train, validation = carve(
        train, min(tenth(len(train)), VALIDATION_CAP), stratify=stratify, seed=SPLIT_SEED
    )
    return {"train": train, "validation": validation, **{k: v for k, v in splits.items() if k != "train"}}


# ----------------------------------------------------------------------------- TSV layout


def _load_tsv(task: Task, fmt: GlueFormat, root: Path) -> dict[str, list[dict]]:
    folder = root / fmt.folder
    if not (folder / "train.tsv").is_file() and (root / "train.tsv").is_file():
        folder = root  # data_dir is the task folder itself
    files = _MNLI_TSV_FILES if task.name == "mnli" else _TSV_FILES
    splits = {}
    for split, filename in files.items():
        path = folder / filename
        if not path.is_file():
            raise IdpriorError(
                f"GLUE file {path} is missing: download GLUE yourself and lay it out as "
                f"<data-dir>/{fmt.folder}/{filename} (the official TSV layout)"
            )
        splits[split] = read_glue_tsv(path, task, fmt)
    return splits


def read_glue_tsv(path: Path, task: Task, fmt: GlueFormat) -> list[dict]:
    """Examples of one official GLUE TSV file; malformed rows are skipped with a warning."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None) if fmt.header else None
        if fmt.header and header is None:
            raise IdpriorError(f"GLUE file {path} is empty: re-download it")
        columns = [fmt.text, fmt.label] + ([fmt.text_pair] if fmt.text_pair is not None else [])
        if header is not None:
            missing = [c for c in columns if c not in header]
            if missing:
                raise IdpriorError(
                    f"GLUE file {path} has no column {', '.join(map(repr, missing))} (it has {header}): "
                    "use the official GLUE TSV files"
                )
            index = {c: header.index(c) for c in columns}
        else:
            index = {c: c for c in columns}
        width = max(index.values()) + 1
        examples, skipped = [], 0
        for row in rows:
            label = _parse_label(task, row[index[fmt.label]]) if len(row) >= width else None
            if label is None:
                skipped += 1
                continue
            ex = {"text": row[index[fmt.text]]}
            if fmt.text_pair is not None:
                ex["text_pair"] = row[index[fmt.text_pair]]
            ex["label"] = label
            examples.append(ex)
    if skipped:
        log.warning("%s: skipped %d malformed row(s) (too few fields or an unknown label)", path, skipped)
    if not examples:
        raise IdpriorError(f"GLUE file {path} has no valid rows: re-download it in the official TSV layout")
    return examples


def _parse_label(task: Task, value: str):
    """Label id (classification) or score (regression); None when the value is not a valid label."""
    value = value.strip()
    if task.kind == "regression":
        try:
            return float(value)
        except ValueError:
            return None
    if value in task.labels:
        return task.labels.index(value)
    if value.isdigit() and int(value) < len(task.labels):
        return int(value)
    return None


# ----------------------------------------------------------------------------- datasets.save_to_disk


def _find_hf_dir(root: Path, name: str) -> Path | None:
    """A `DatasetDict.save_to_disk` folder: `root` itself or `root/<task name>`."""
    for candidate in (root, root / name):
        if (candidate / "dataset_dict.json").is_file():
            return candidate
    return None


def _load_hf(task: Task, fmt: GlueFormat, path: Path) -> dict[str, list[dict]]:
    try:
        import datasets
    except ImportError:
        raise IdpriorError(
            f"{path} is a `datasets` folder, which needs the optional package: run `pip install datasets`, "
            "or pass the GLUE TSV folder instead"
        ) from None
    dataset_dict = datasets.load_from_disk(str(path))
    wanted = _MNLI_HF_SPLITS if task.name == "mnli" else _HF_SPLITS
    available = list(dataset_dict.keys())
    splits = {}
    for split, hf_split in wanted.items():
        if hf_split not in dataset_dict:
            raise IdpriorError(
                f"{path} has no split '{hf_split}' (it has {available}): save GLUE '{task.name}' with it"
            )
        ds = dataset_dict[hf_split]
        columns = [*fmt.hf_columns, "label"]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise IdpriorError(
                f"{path}/{hf_split} has no column {', '.join(missing)} (it has {ds.column_names}): "
                f"save the Hugging Face `glue/{task.name}` data set"
            )
        names = getattr(ds.features["label"], "names", None)
        if task.kind == "classification" and names is not None and tuple(names) != task.labels:
            raise IdpriorError(
                f"{path}/{hf_split} labels are {names}, expected {list(task.labels)}: wrong task folder?"
            )
        texts = list(ds[fmt.hf_columns[0]])
        pairs = list(ds[fmt.hf_columns[1]]) if len(fmt.hf_columns) > 1 else None
        labels = list(ds["label"])
        examples = []
        for i, label in enumerate(labels):
            if task.kind == "classification" and not 0 <= label < len(task.labels):
                continue  # -1 marks an unlabelled example
            ex = {"text": texts[i]}
            if pairs is not None:
                ex["text_pair"] = pairs[i]
            ex["label"] = float(label) if task.kind == "regression" else int(label)
            examples.append(ex)
        if not examples:
            raise IdpriorError(f"{path}/{hf_split} has no labelled examples: save the labelled GLUE splits")
        splits[split] = examples
    return splits
