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
(stratified for classification), so a train file alone gives 80/10/10. A carved split that holds a
class the training split lacks (a class of one or two rows) is refused like such a test file.

Read as written (issue 31): a file is decoded as UTF-8 (an error names the line and byte); a header
naming a column twice is refused (which copy would be read?), and so is a JSON object with a key
twice, and a CSV/TSV line that repeats the header (two files joined); a `.csv` header holding tabs or semicolons (a `.tsv` header holding commas) is called
by its real separator; a CSV row whose quoted field runs over following lines that look like rows
(a stray `"`) is refused at the line where the quote opens; one column named for two roles (text
and label, text and pair) is refused; so is an inferred label column with too many distinct values
to be classes (MANY_CLASSES). Empty texts, a validation/test file that is the training file and
labels that differ only in case are allowed, with a warning line on stderr (said once per process:
a run loads its data twice, in preflight and in the run).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from idprior.data.base import PAIR, SINGLE, SPLIT_SEED, Task, TaskData, carve, tenth
from idprior.errors import IdpriorError

SPLITS = ("train", "validation", "test")
PROBLEM_TYPES = ("classification", "regression")
REGRESSION_MIN_VALUES = 10
MOSTLY_NUMERIC = 0.5  # inference: at least this share of numbers, and some non-numbers, is refused
# Inferred classification is refused when the label column has more than MANY_CLASSES distinct
# values AND more than DISTINCT_SHARE of the training rows would each need a class of their own
# (distinct labels > DISTINCT_SHARE x rows): an id, a score or the text column, not classes. r52
# (52 classes in 5,800 rows) and 20ng pass; 200 labels in 200 rows do not.
MANY_CLASSES = 50
DISTINCT_SHARE = 0.5
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
    given = {"--text-column": text_column, "--text-pair-column": text_pair_column, "--label-column": label_column}
    label_column = label_column or "label"
    files = {k: v for k, v in (data_files or {}).items() if v is not None}
    unknown = sorted(set(files) - set(SPLITS))
    if unknown:
        raise IdpriorError(f"unknown data split(s) {unknown}: use train, validation and test")
    if "train" not in files:
        raise IdpriorError("task 'custom' needs a training file: pass --data train.csv (CSV, TSV or JSONL)")
    train_path = Path(files["train"])
    records = _read_records(train_path, label_column)
    text_column, text_pair_column = _text_columns(records, train_path, text_column, text_pair_column, label_column)
    _check_roles(train_path, given, text_column, text_pair_column, label_column)
    columns = [text_column] + ([text_pair_column] if text_pair_column else []) + [label_column]

    raw = {"train": _fields(records, train_path, columns)}
    del records
    raw |= {split: _fields(_read_records(Path(files[split]), label_column), Path(files[split]), columns)
            for split in ("validation", "test") if split in files}
    _warn_same_file(files)
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
        if problem_type is None:
            _check_class_count(label_names, len(raw["train"]), train_path, label_column)
        _warn_case(label_names, train_path, label_column)

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
    _carve_missing(splits, regression, train_path, label_names, label_column)

    task = Task(
        name="custom",
        kind="regression" if regression else "classification",
        labels=label_names,
        metrics=_metrics(regression, len(label_names)),
        text_fields=PAIR if text_pair_column else SINGLE,
        description=f"user data from {train_path}",
    )
    return TaskData(task, {split: splits[split] for split in SPLITS})


def _carve_missing(splits: dict[str, list[dict]], regression: bool, train_path: Path, label_names: tuple[str, ...],
                   label_column: str) -> None:
    """Carve the validation and test splits the user did not give out of train (fixed seeds, in place);
    refuse a split left empty and a training split left with a single class."""
    stratify = not regression
    n = len(splits["train"])
    carved = [split for split in ("test", "validation") if split not in splits]
    for split in carved:
        seed = SPLIT_SEED if split == "test" else SPLIT_SEED + 1
        splits["train"], splits[split] = carve(splits["train"], max(1, tenth(n)), stratify=stratify, seed=seed)
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
    if not regression:
        _check_carved(splits, carved, train_path, label_names, label_column)


def _metrics(regression: bool, num_labels: int) -> tuple[str, ...]:
    if regression:
        return ("pearson", "spearman")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy", "macro_f1")


# ----------------------------------------------------------------------------- reading


def _read_records(path: Path, label_column: str) -> list[tuple[dict, int]]:
    """(record, line number) for every data row of `path`, a CSV, TSV or JSON-lines file.

    `label_column` only helps to recognize rows that a stray quote swallowed (`_check_merged`)."""
    if path.is_dir():
        raise IdpriorError(f"data file {path} is a folder: give a CSV, TSV or JSONL file with --data")
    if path.exists() and not path.is_file():  # a device or a pipe (<(zcat f.gz)): read twice, by preflight and the run
        raise IdpriorError(f"data file {path} is not a regular file (a device or a pipe); save the data to a file and "
                           "pass that")
    if not path.is_file():
        raise IdpriorError(f"data file {path} does not exist: check the path given with --data")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_delimited(path, suffix, label_column)
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


def _check_roles(path: Path, given: dict, text_column: str, pair_column: str | None, label_column: str) -> None:
    """One column in two roles (the label read as the text, a text paired with itself) is refused."""
    roles = [("text", "--text-column", text_column), ("text pair", "--text-pair-column", pair_column),
             ("label", "--label-column", label_column)]
    for (role_a, flag_a, a), (role_b, flag_b, b) in itertools.combinations(roles, 2):
        if a is not None and a == b:
            flags = [flag if given[flag] is not None else f"{flag} (default '{column}')"
                     for flag, column in ((flag_a, a), (flag_b, b))]
            raise IdpriorError(
                f"{path}: {flags[0]} and {flags[1]} both name column '{a}', which cannot be both the {role_a} and "
                f"the {role_b}: name another column for one of them"
            )


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
    for column, index in [(text_column, 0)] + ([(pair_column, 1)] if pair_column else []):
        empty = [line for values, line in rows if not values[index].strip()]
        if len(empty) == len(rows):
            raise IdpriorError(f"{path} column '{column}' is empty on every row: name the column that holds the "
                               f"texts with {flags[column]}")
        if empty:
            lines = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
            _warn(f"{path}: {len(empty)} of {len(rows)} rows have an empty text in column '{column}' "
                  f"(line {lines}): they are read as empty strings; fill them in or drop them")
    return rows


def _decode(path: Path) -> str:
    """The file as text: UTF-8 (a leading byte-order mark is dropped); anything else is refused with
    the line and byte, since guessing an encoding would misread the texts without a word."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        where = f"line {line} (byte {e.start}: 0x{data[e.start]:02x})"
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
            where = "it starts with a UTF-16 byte-order mark"
        raise IdpriorError(
            f"cannot read the data file {path}: it is not UTF-8 text, {where} (UnicodeDecodeError): save it as "
            "UTF-8 (in a spreadsheet: 'CSV UTF-8')"
        ) from None
    return text.removeprefix("\ufeff")


def _read_delimited(path: Path, suffix: str, label_column: str) -> list[tuple[dict, int]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    lines = list(io.StringIO(_decode(path), newline=""))  # physical lines, as the csv reader counts them
    tsv = suffix == ".tsv"
    reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.reader(lines)
    rows = []  # (cells, first line, last line): a quoted CSV field may span lines
    try:
        header = next(reader, None)
        start = reader.line_num + 1
        for cells in reader:
            if cells:  # blank lines are skipped
                rows.append((cells, start, reader.line_num))
            start = reader.line_num + 1
    except csv.Error as e:
        raise IdpriorError(f"{path} line {reader.line_num} cannot be read as {'TSV' if tsv else 'CSV'} ({e}): "
                           "fix that line") from None
    if header is None:
        return []
    _check_header(header, path, tsv)
    names = [h.strip() for h in header]
    again = next((line for cells, line, _ in rows if len(names) > 1 and [c.strip() for c in cells] == names), None)
    if again is not None:  # two files joined: the second header would be one example, its label a class of its own
        raise IdpriorError(f"{path} line {again} repeats the header ({', '.join(names)}): were two files joined? remove "
                           "that line")
    if not tsv:
        _check_merged(rows, lines, header, path, label_column)
    records = []
    # A cell missing at the end of a row reads as None (reported as "no value" later); a cell too
    # many means the row's text holds the delimiter, and every later column is shifted.
    for cells, line, _ in rows:
        if any(v.strip() for v in cells[len(header):]):  # empty trailing cells shift nothing
            fix = ("a tab inside the text? TSV has no quoting: remove tabs from the texts or use CSV/JSONL"
                   if tsv else 'a comma inside the text? put such texts in double quotes')
            raise IdpriorError(f"{path} line {line} has {len(cells)} fields but the header has {len(header)}: {fix}")
        records.append(({name: cells[i] if i < len(cells) else None for i, name in enumerate(header)}, line))
    return records


def _check_header(header: list[str], path: Path, tsv: bool) -> None:
    """A header that shows another separator than the extension's, or names a column twice, is refused:
    the first would be read as one column, the second would read one copy and drop the other unseen."""
    shown = ("\t" if tsv else ",").join(header)[:60]
    if header and header[0].lstrip().startswith("#") and (len(header) == 1 or header[0].lstrip().startswith("# ")):
        raise IdpriorError(f"{path} line 1 ({shown!r}) is a comment, not a header: the first line must name the "
                           "columns (text,label); remove the comment lines")
    if not tsv and "\t" in shown:
        raise IdpriorError(f"{path} looks tab-separated (its header {shown!r} holds tabs): rename it to .tsv, or "
                           "save it comma-separated")
    if not tsv and len(header) == 1 and ";" in shown:
        raise IdpriorError(f"{path} looks semicolon-separated (its header {shown!r} holds ';'): save it "
                           "comma-separated (a spreadsheet's 'CSV UTF-8 (comma delimited)'), or tab-separated as .tsv")
    if tsv and len(header) == 1 and ("," in shown or ";" in shown):
        raise IdpriorError(f"{path} does not look tab-separated (its header {shown!r} has no tab): rename it to "
                           ".csv if it is comma-separated, or save it tab-separated")
    twice = [name for name in dict.fromkeys(header) if name.strip() and header.count(name) > 1]
    if twice:
        at = ", ".join(str(i + 1) for i, name in enumerate(header) if name == twice[0])
        raise IdpriorError(
            f"{path} has the column name {twice[0]!r} more than once in its header (columns {at}), and only the "
            "last would be read: rename the others"
        )


def _check_merged(rows: list, lines: list[str], header: list[str], path: Path, label_column: str) -> None:
    """Refuse a CSV row whose quoted field swallowed the rows after it.

    A field that opens with `"` runs to the next `"`, over line breaks: a stray quote silently turns
    the next rows into one example's text (or label). Texts may hold line breaks, so a row that spans
    lines is refused only when one of its inner lines (after the first, before the last, which closes
    the quote and carries the row's other fields), read alone, is a row of this file: the header's
    number of fields, and a label that single-line rows also have (or any number, when
    they have more than REGRESSION_MIN_VALUES labels, most of them numbers: scores)."""
    if label_column not in header or all(first == last for _, first, last in rows):
        return
    at = header.index(label_column)
    labels = {cells[at].strip() for cells, first, last in rows if first == last and len(cells) > at}
    scores = len(labels) > REGRESSION_MIN_VALUES and sum(_number(v) is not None for v in labels) > len(labels) / 2

    def looks_like_row(line: str) -> bool:
        try:
            cells = next(csv.reader([line]), [])
        except csv.Error:
            return False
        value = cells[at].strip() if len(cells) == len(header) else ""
        return bool(value) and (value in labels or (scores and _number(value) is not None))

    for _, first, last in rows:
        inner = lines[first:last - 1]  # the row's lines after its first and before its last (lines[0] is line 1)
        rowlike = [first + 1 + i for i, line in enumerate(inner) if looks_like_row(line)]
        if rowlike:
            raise IdpriorError(
                f"{path} line {first}: a quoted field opens on this line and runs to line {last}, so the lines "
                f"after it, which look like rows (line {rowlike[0]}: {inner[rowlike[0] - first - 1].strip()[:40]!r}),"
                f" are read into this one example: remove or close the stray \" on line {first} (a quote inside a "
                'quoted text is written "")'
            )


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """json object hook: a key given twice is refused (json keeps the last one silently)."""
    keys = [key for key, _ in pairs]
    if len(set(keys)) < len(keys):
        raise _DuplicateKey(next(key for key in keys if keys.count(key) > 1))
    return dict(pairs)


def _twice(where, key: str) -> str:
    return f"{where} has an object with the key {key!r} more than once, and only the last would be read: rename the others"


def _read_json(path: Path) -> list[tuple[dict, int]]:
    text = _decode(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise IdpriorError(_twice(path, e.args[0])) from None
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
                records.append((json.loads(line, object_pairs_hook=_unique_keys), line_no))
            except _DuplicateKey as e:
                raise IdpriorError(_twice(f"{path} line {line_no}", e.args[0])) from None
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


# ----------------------------------------------------------------------------- warnings

_WARNED: set[str] = set()


def _warn(message: str) -> None:
    """One line on stderr, once per process: a run loads its data twice (preflight, then the run)."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"idprior: warning: {message}", file=sys.stderr)


def _warn_same_file(files: dict) -> None:
    """A validation or test file that is the training file (same path or same bytes) scores training rows."""
    train = Path(files["train"])
    for split in ("validation", "test"):
        if split not in files:
            continue
        path = Path(files[split])
        same_path = path.resolve() == train.resolve()
        if same_path or (path.stat().st_size == train.stat().st_size and path.read_bytes() == train.read_bytes()):
            how = "" if same_path else " (the same content)"
            use = "test scores measure memorization" if split == "test" else "model selection sees training rows"
            _warn(f"--data-{split} {path} is the training file {train}{how}: {use}, not generalization; give "
                  f"held-out rows, or drop --data-{split} to carve a {split} split from the training file")


def _warn_case(names: tuple[str, ...], path: Path, column: str) -> None:
    """Labels that differ only in case (`Pos`, `pos`) are two classes; often a typo for one."""
    by_case = defaultdict(list)
    for name in names:
        by_case[name.lower()].append(name)
    groups = [group for group in by_case.values() if len(group) > 1]
    if groups:
        shown = "; ".join(", ".join(map(repr, group)) for group in groups)
        _warn(f"{path} column '{column}' has labels that differ only in case ({shown}): they are read as "
              "different classes; write them the same way if they are one class")


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


def _check_class_count(names: tuple[str, ...], rows: int, path: Path, column: str) -> None:
    """An inferred classification with a class for (nearly) every row is refused (rule at MANY_CLASSES)."""
    if len(names) > MANY_CLASSES and len(names) > DISTINCT_SHARE * rows:
        numbers = all(_number(name) is not None for name in names)
        hint = "they are numbers: pass --problem-type regression to predict them as scores; else " if numbers else ""
        raise IdpriorError(
            f"{path} column '{column}' has {len(names)} distinct labels in {rows} rows, too many to be classes: "
            f"{hint}check that --label-column names the label column (or pass --problem-type classification if "
            "every value really is a class)"
        )


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


def _check_carved(splits: dict, carved: list[str], path: Path, names: tuple[str, ...], column: str) -> None:
    """A carved split must hold only classes left in the training split, as a --data-test file must
    (`_check_unseen`): a class of one or two rows can be carved away from training entirely."""
    train = {ex["label"] for ex in splits["train"]}
    for split in carved:
        unseen = sorted({ex["label"] for ex in splits[split]} - train)
        if unseen:
            shown = ", ".join(repr(names[i]) for i in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
            raise IdpriorError(
                f"the {split} split carved from {path} has label(s) {shown} in column '{column}' that the training "
                f"split lacks (too few rows of them to carve): add examples of them to {path}, drop those rows, or "
                f"pass --data-{split}"
            )


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
