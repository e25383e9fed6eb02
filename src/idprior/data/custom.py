"""Task "custom": the user's own CSV, TSV or JSON-lines files.

Formats by extension: `.csv` (standard CSV quoting, header row), `.tsv` (header row, tab
separated, no quoting: the GLUE convention; use CSV or JSONL for texts with tabs or newlines),
`.jsonl` / `.json` (one JSON object per line; `.json` may also be one array of objects).

Columns default to `text` and `label`; `--text-column` & co. name others. Without `--text-column`
and `--text-pair-column`, a training file whose columns are a known sentence pair (PAIR_COLUMNS:
`sentence1`/`sentence2`, `premise`/`hypothesis`, ...) is read as a pair, with one line on stderr
naming the columns; a file with several candidates (two known pairs, or a pair beside a `text`
column) is refused with the flags that choose, since reading one text of a pair task would train
and evaluate on half of each example without any error.

Labels: `problem_type` ("classification" / "regression", CLI `--problem-type`) says what the label
column is; without it the type is inferred: regression when every training label is a number,
there are more than 10 distinct values and at least one is not an integer, else classification.
A column that is mostly numbers with a few other values (`NaN`, `abc`, a shifted column) is refused
instead of being read as dozens of classes: naming the problem type is the fix. Classification
label names are the sorted unique training labels (numerically when all are numbers, so ids
0..k-1 stay 0..k-1; integer-valued numbers are named "3", not "3.0"); a classifier that already
has label names keeps its own ids (see `labels.py`). Validation and test labels must belong to the
training label space. A JSON list or object as a label (multi-label data) is refused, and so is a
CSV/TSV row with more fields than the header (a stray tab or unquoted comma in the text would
otherwise shift the label).

Splits: a split without a file is carved from the training file with a fixed seed, 10% of it each
(stratified for classification), so a train file alone gives 80/10/10.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
from pathlib import Path

from idprior.data.tasks import SPLIT_SEED, Task, TaskData, carve, tenth
from idprior.errors import IdpriorError

SPLITS = ("train", "validation", "test")
PROBLEM_TYPES = ("classification", "regression")
REGRESSION_MIN_VALUES = 10
MOSTLY_NUMERIC = 0.5  # inference: at least this share of numbers, and some non-numbers, is refused
_EXTRA = "\x00extra"  # DictReader key of the fields beyond the header
_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
PAIR_COLUMNS = (  # (first, second) text columns of common pair datasets, detected in this order
    ("sentence1", "sentence2"),  # GLUE MRPC, RTE, STS-B, WNLI
    ("question", "sentence"),  # QNLI
    ("question1", "question2"),  # QQP
    ("premise", "hypothesis"),  # MNLI, SNLI, CB
    ("question", "passage"),  # BoolQ
    ("query", "passage"),
    ("text_a", "text_b"),  # the InputExample convention
    ("text", "text_pair"),  # the tokenizer's own argument names
)


def load_custom(
    data_files: dict | None,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    problem_type: str | None = None,
) -> TaskData:
    """Read the user's files into a classification or regression task (see the module docstring)."""
    if problem_type is not None and problem_type not in PROBLEM_TYPES:
        raise IdpriorError(f"--problem-type must be classification or regression, got {problem_type!r}")
    label_column = label_column or "label"
    files = {k: v for k, v in (data_files or {}).items() if v is not None}
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise IdpriorError(f"unknown data split(s) {unknown}: use train, validation and test")
    if "train" not in files:
        raise IdpriorError("task 'custom' needs a training file: pass --data train.csv (CSV, TSV or JSONL)")
    train_path = Path(files["train"])
    records = _read_records(train_path)
    text_column, text_pair_column = _text_columns(records, train_path, text_column, text_pair_column, label_column)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]

    raw = {"train": _fields(records, train_path, columns)}
    del records
    raw |= {split: _fields(_read_records(Path(files[split])), Path(files[split]), columns)
            for split in ("validation", "test") if split in files}
    regression = _problem_is_regression(raw["train"], problem_type, train_path, label_column)
    if regression:
        label_names: tuple[str, ...] = ()
    else:
        label_names = _label_space([label for (_, _, label), _ in raw["train"]])
        if len(label_names) < 2:
            raise IdpriorError(
                f"{train_path} has a single label ({label_names[0]!r}) in column '{label_column}': "
                "classification needs at least two classes"
            )

    splits: dict[str, list[dict]] = {}
    for split, rows in raw.items():
        path = Path(files[split])
        examples = []
        for (text, pair, label_raw), line in rows:
            ex = {"text": text}
            if text_pair_column:
                ex["text_pair"] = pair
            ex["label"] = _convert_label(label_raw, regression, label_names, path, line, label_column)
            examples.append(ex)
        splits[split] = examples
    _check_unseen(splits, files, regression, label_names, label_column)

    stratify = not regression
    n = len(splits["train"])
    for split in ("test", "validation"):
        if split not in splits:
            seed = SPLIT_SEED if split == "test" else SPLIT_SEED + 1
            splits["train"], splits[split] = carve(
                splits["train"], max(1, tenth(n)), stratify=stratify, seed=seed
            )
    for split in SPLITS:
        if not splits[split]:
            raise IdpriorError(
                f"split '{split}' is empty: {train_path} has too few rows ({n}) to carve validation and test; "
                "add rows or pass --data-validation / --data-test"
            )
    if not regression and len({ex["label"] for ex in splits["train"]}) < 2:
        raise IdpriorError(
            f"the training split of {train_path} has a single class after carving: add more rows"
        )

    task = Task(
        name="custom",
        kind="regression" if regression else "classification",
        labels=label_names,
        metrics=_metrics(regression, len(label_names)),
        text_fields=("text", "text_pair") if text_pair_column else ("text",),
        description=f"user data from {train_path}",
    )
    return TaskData(task, {split: splits[split] for split in SPLITS})


def _metrics(regression: bool, num_labels: int) -> tuple[str, ...]:
    if regression:
        return ("pearson", "spearman")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy", "macro_f1")


# ----------------------------------------------------------------------------- reading


def _read_records(path: Path) -> list[tuple[dict, int]]:
    """(record, line number) for every data row of `path`, a CSV, TSV or JSON-lines file."""
    if path.is_dir():
        raise IdpriorError(f"data file {path} is a folder: give a CSV, TSV or JSONL file with --data")
    if not path.is_file():
        raise IdpriorError(f"data file {path} does not exist: check the path given with --data")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_delimited(path, suffix)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        records = _read_json(path)
    elif path.is_dir():
        raise IdpriorError(f"data file {path} is a folder: give a CSV, TSV or JSONL file with --data")
    else:
        raise IdpriorError(f"data file {path} has an unknown format '{suffix}': use .csv, .tsv or .jsonl")
    if not records:
        raise IdpriorError(f"data file {path} has no rows: give it at least one example")
    return records


def _text_columns(records: list[tuple[dict, int]], path: Path, text_column: str | None,
                  pair_column: str | None, label_column: str) -> tuple[str, str | None]:
    """(text column, pair column or None): as given, else `text` alone or the one known pair of
    PAIR_COLUMNS among the first record's columns (printed to stderr); several candidates are refused."""
    if text_column is not None or pair_column is not None:
        return text_column or "text", pair_column
    have = set(records[0][0])
    pairs = [p for p in PAIR_COLUMNS if set(p) <= have and label_column not in p]
    single = "text" in have and ("text", "text_pair") not in pairs
    if not pairs:
        return "text", None
    if len(pairs) == 1 and not single:
        first, second = pairs[0]
        print(f"idprior: {path.name}: reading columns '{first}' and '{second}' as a text pair "
              f"(--text-column {first} --text-pair-column {second}; --text-column alone reads one text)", file=sys.stderr)
        return first, second
    options = [f"--text-column {a} --text-pair-column {b}" for a, b in pairs] + (["--text-column text"] if single else [])
    raise IdpriorError(f"{path} has columns of more than one text input ({', '.join(f'{a} + {b}' for a, b in pairs)}"
                       f"{', text' if single else ''}): say which to read with {' or '.join(options)}")


def _fields(records: list[tuple[dict, int]], path: Path, columns: list[str]) -> list[tuple[tuple, int]]:
    """((text, text_pair or None, raw label), line number) for every record; missing or empty cells refused."""
    text_column, label_column = columns[0], columns[-1]
    pair_column = columns[1] if len(columns) == 3 else None
    rows = []
    flags = {text_column: "--text-column", label_column: "--label-column"}
    if pair_column:
        flags[pair_column] = "--text-pair-column"
    for record, line in records:
        missing = [c for c in columns if c not in record]
        if missing:
            which = " / ".join(dict.fromkeys(flags[c] for c in missing))
            raise IdpriorError(
                f"{path} line {line} has no column {', '.join(map(repr, missing))} "
                f"(it has {', '.join(map(repr, record))}): name the right one with {which}"
            )
        text = _text(record[text_column], path, line, text_column)
        pair = _text(record[pair_column], path, line, pair_column) if pair_column else None
        label = record[label_column]
        if label is None or (isinstance(label, str) and not label.strip()):
            raise IdpriorError(
                f"{path} line {line} has no label in column '{label_column}': fill it in or drop the row"
            )
        if isinstance(label, (list, dict)):
            what = "list" if isinstance(label, list) else "object"
            raise IdpriorError(
                f"{path} line {line} has a JSON {what} as its label in column '{label_column}' "
                f"({json.dumps(label)[:60]}): give one label per row, a string or a number (multi-label data "
                "is not supported)"
            )
        rows.append(((text, pair, label), line))
    return rows


def _read_delimited(path: Path, suffix: str) -> list[tuple[dict, int]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with open(path, encoding="utf-8-sig", newline="") as f:
        if suffix == ".tsv":
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        else:
            reader = csv.DictReader(f)
        reader.restkey = _EXTRA
        if reader.fieldnames is None:
            return []
        rows = []
        # A cell missing at the end of a row reads as None (reported as "no value" below); a cell too
        # many means the row's text holds the delimiter, and every later column is shifted.
        for row in reader:
            if any((v or "").strip() for v in row.get(_EXTRA, ())):  # empty trailing cells shift nothing
                n, m = len(reader.fieldnames) + len(row[_EXTRA]), len(reader.fieldnames)
                fix = ("a tab inside the text? TSV has no quoting: remove tabs from the texts or use CSV/JSONL"
                       if suffix == ".tsv" else 'a comma inside the text? put such texts in double quotes')
                raise IdpriorError(f"{path} line {reader.line_num} has {n} fields but the header has {m}: {fix}")
            row.pop(_EXTRA, None)
            rows.append((row, reader.line_num))
        return rows


def _read_json(path: Path) -> list[tuple[dict, int]]:
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise IdpriorError(
                f"{path} is not valid JSON ({e}): fix the file or write one object per line"
            ) from None
        records = list(zip(items, range(1, len(items) + 1)))  # "line" = position in the array
    else:
        records = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((json.loads(line), line_no))
            except json.JSONDecodeError as e:
                raise IdpriorError(
                    f"{path} line {line_no} is not valid JSON ({e}): write one object per line"
                ) from None
    for record, line_no in records:
        if not isinstance(record, dict):
            raise IdpriorError(f"{path} line {line_no} is not a JSON object: write one {{...}} per line")
    return records


def _text(value, path: Path, line: int, column: str) -> str:
    if value is None:
        raise IdpriorError(
            f"{path} line {line} has no value in column '{column}': fill it in or drop the row"
        )
    if isinstance(value, (dict, list)):
        raise IdpriorError(f"{path} line {line} column '{column}' is not text: give a string")
    return str(value)


# ----------------------------------------------------------------------------- labels


def _number(value) -> float | None:
    """The label as a finite number, or None when it is not one (bools and "nan" are not)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip())
    return None


def _problem_is_regression(rows: list, problem_type: str | None, path: Path, column: str) -> bool:
    """The label column's problem type: as given, else inferred; mixed numeric columns are refused."""
    labels = [(label, line) for (_, _, label), line in rows]
    if problem_type == "classification":
        return False
    bad = [(line, label) for label, line in labels if _number(label) is None]
    if problem_type == "regression":
        if bad:
            raise IdpriorError(
                f"{path} has labels in column '{column}' that are not numbers ({_rows(bad)}), but --problem-type is "
                "regression: fix or drop those rows"
            )
        return True
    if bad and len(bad) < len(labels) and len(labels) - len(bad) >= MOSTLY_NUMERIC * len(labels):
        raise IdpriorError(
            f"{path} column '{column}' holds numbers except {_rows(bad)}: fix or drop those rows, or say what the "
            "column is with --problem-type regression (numbers only) or --problem-type classification (every "
            "value a class name)"
        )
    return _is_regression([label for label, _ in labels])


def _rows(bad: list[tuple[int, object]], shown: int = 5) -> str:
    """'line 7 ('NaN'), line 19 ('abc') and 3 more rows'."""
    text = ", ".join(f"line {line} ({value!r})" for line, value in bad[:shown])
    return text + (f" and {len(bad) - shown} more rows" if len(bad) > shown else "")


def _is_regression(labels: list) -> bool:
    numbers = [_number(v) for v in labels]
    if any(x is None for x in numbers):
        return False
    non_integer = {x for x in numbers if not x.is_integer()}
    return bool(non_integer) and len(set(numbers)) > REGRESSION_MIN_VALUES


def _label_key(value) -> str:
    """Canonical class name: integer-valued numbers as "3", other numbers as repr, strings stripped."""
    x = _number(value)
    if x is None:
        return str(value).strip()
    return str(int(x)) if x.is_integer() else repr(x)


def _label_space(labels: list) -> tuple[str, ...]:
    keys = {_label_key(v) for v in labels}
    if all(_number(k) is not None for k in keys):
        return tuple(sorted(keys, key=float))
    return tuple(sorted(keys))


def _convert_label(value, regression: bool, names: tuple[str, ...], path: Path, line: int, column: str):
    if regression:
        x = _number(value)
        if x is None:
            raise IdpriorError(
                f"{path} line {line} label {value!r} in column '{column}' is not a number, and the task is "
                "regression (numeric training labels, or --problem-type regression): fix or drop the row"
            )
        return x
    key = _label_key(value)
    return names.index(key) if key in names else key  # unseen labels are reported together below


def _check_unseen(splits, files, regression, names, column) -> None:
    if regression:
        return
    for split, examples in splits.items():
        unseen = sorted({ex["label"] for ex in examples if isinstance(ex["label"], str)})
        if unseen:
            shown = ", ".join(map(repr, unseen[:5])) + (" ..." if len(unseen) > 5 else "")
            raise IdpriorError(
                f"{files[split]} has label(s) {shown} in column '{column}' that the training file lacks "
                f"(training labels: {', '.join(names)}): fix the labels or add examples of them to the training file"
            )
