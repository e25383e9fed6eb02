"""User files are read as written (issue 31): each class here used to load with exit code 0 and a
wrong task (a column read twice, rows merged by a stray quote, the label read as the text, a class
per row, a class carved away from training), or fail with a raw error; now each is refused with a
line naming the file and the fix, or loads with a warning line on stderr.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from idprior.cli.main import main
from idprior.data import load_task
from idprior.errors import IdpriorError
from tiny_folder import make_tiny_bert_folder

WORDS = ["good", "bad", "dull", "great", "fun", "boring"]


def _write(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _rows(n: int, labels=("neg", "pos"), sep: str = ",") -> list[str]:
    return [f"{WORDS[i % len(WORDS)]} film number {i}{sep}{labels[i % len(labels)]}" for i in range(n)]


def _load(train, **kw):
    return load_task("custom", data_files={"train": train}, **kw)


def _refused(pattern: str, train, **kw) -> None:
    with pytest.raises(IdpriorError, match=pattern):
        _load(train, **kw)


def _warnings(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("idprior: warning: ")]


# ---- 1. a column name twice -------------------------------------------------------------------------

def test_repeated_column_names_are_refused(tmp_path):
    """`text,label,label` read the last label column, `text,text,label` the second text, silently."""
    labels = _write(tmp_path / "labels.csv", "text,label,label",
                    [f"{r},{'yes' if i % 3 else 'no'}" for i, r in enumerate(_rows(20))])
    _refused(r"labels\.csv has the column name 'label' more than once in its header \(columns 2, 3\).*"
             r"rename the others", labels)
    texts = _write(tmp_path / "texts.csv", "text,text,label", [f"t{i},{r}" for i, r in enumerate(_rows(20))])
    _refused(r"texts\.csv has the column name 'text' more than once .*\(columns 1, 2\)", texts)
    tsv = _write(tmp_path / "d.tsv", "text\tlabel\tlabel", [f"{r}\tneg" for r in _rows(20, sep="\t")])
    _refused(r"d\.tsv has the column name 'label' more than once", tsv)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}", "label": "c"}}\n' for i in range(20)))
    _refused(r"d\.jsonl line 1 has an object with the key 'label' more than once.*rename", jsonl)
    blank = _write(tmp_path / "blank.csv", "text,label,,", [f"{r},," for r in _rows(20)])  # unnamed trailing
    assert _load(blank).task.labels == ("neg", "pos")


# ---- 2. a stray quote -------------------------------------------------------------------------------

def test_stray_quote_that_swallows_rows_is_refused(tmp_path):
    """A field opening with `"` runs to the next quote: twenty rows became one example's text."""
    rows = _rows(40)
    rows[5] = '"a stray quote,pos'  # line 7; the quote closes at the next '"', line 27
    rows[25] = '"quoted" film,neg'
    stray = _write(tmp_path / "stray.csv", "text,label", rows)
    _refused(r"stray\.csv line 7: a quoted field opens on this line and runs to line 27.*look like rows "
             r"\(line 8: 'good film number 6,neg'\).*remove or close the stray \" on line 7", stray)
    in_label = list(rows)  # the stray quote in the label field swallows rows just the same
    in_label[5], in_label[25] = 'a film,"pos', '"quoted" film,neg'
    _refused(r"line 7: a quoted field opens", _write(tmp_path / "label.csv", "text,label", in_label))
    scores = [f"{WORDS[i % 6]} {i},{0.37 * i:.2f}" for i in range(40)]  # regression: any number is a label
    scores[5], scores[25] = '"stray,1.85', '"quoted" film,9.25'
    _refused(r"scores\.csv line 7: a quoted field opens", _write(tmp_path / "scores.csv", "text,label", scores))
    multi = list(_rows(40))  # quoted texts over several lines, even with a comma, are texts
    multi[3] = '"first line\nsecond line, still text\nthird",pos'
    data = _load(_write(tmp_path / "multi.csv", "text,label", multi))
    texts = [ex["text"] for split in data.splits.values() for ex in split]
    assert "first line\nsecond line, still text\nthird" in texts and len(texts) == 40


# ---- 3. one column, two roles -----------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"text_column": "label"}, r"--text-column and --label-column \(default 'label'\) both name column 'label', "
                               r"which cannot be both the text and the label: name another column"),
    ({"label_column": "text"}, r"--text-column \(default 'text'\) and --label-column both name column 'text'"),
    ({"text_column": "a", "label_column": "a"}, r"--text-column and --label-column both name column 'a'"),
    ({"text_pair_column": "text"}, r"--text-column \(default 'text'\) and --text-pair-column both name column "
                                   r"'text', which cannot be both the text and the text pair"),
    ({"text_column": "a", "text_pair_column": "label"}, r"--text-pair-column and --label-column \(default 'label'\)"),
])
def test_one_column_in_two_roles_is_refused(tmp_path, kwargs, message):
    """The label read as the text (a perfect, useless classifier) or a text paired with itself."""
    path = _write(tmp_path / "d.csv", "text,a,label", [f"t{i},a{i},{'xy'[i % 2]}" for i in range(40)])
    _refused(re.escape(str(path)) + ": " + message, path, **kwargs)


# ---- 4. a label per row -----------------------------------------------------------------------------

def test_a_distinct_label_on_every_row_is_refused(tmp_path):
    """200 rows with 200 labels became a 200-class task (an id, a score or the text as the label)."""
    ids = _write(tmp_path / "ids.csv", "text,label", [f"{WORDS[i % 6]} {i},{1000 + i}" for i in range(200)])
    _refused(r"ids\.csv column 'label' has 200 distinct labels in 200 rows, too many to be classes: they are "
             r"numbers: pass --problem-type regression.*check that --label-column", ids)
    assert _load(ids, problem_type="regression").task.kind == "regression"
    names = _write(tmp_path / "names.csv", "label,text", [f"{WORDS[i % 6]} {i},x" for i in range(200)])
    _refused(r"names\.csv column 'label' has 200 distinct labels in 200 rows, too many to be classes: check that "
             r"--label-column names the label column", names)
    # Real many-class tasks pass: 20 classes over 100 rows, and r52's 52 classes over 1,040 rows.
    twenty = _write(tmp_path / "twenty.csv", "text,label", _rows(100, labels=[f"c{k}" for k in range(20)]))
    assert len(_load(twenty).task.labels) == 20
    r52 = _write(tmp_path / "r52.csv", "text,label", _rows(1040, labels=[f"topic{k}" for k in range(52)]))
    assert len(_load(r52).task.labels) == 52


# ---- 5. a carved split with a class training lacks --------------------------------------------------

def test_carved_split_with_a_class_training_lacks_is_refused(tmp_path):
    """Ten classes of one row: the carved test split took one, and training never saw it."""
    rows = _rows(40, labels=("a", "b")) + [f"rare film {k},r{k}" for k in range(10)]
    path = _write(tmp_path / "rare.csv", "text,label", rows)
    _refused(r"the test split carved from .*rare\.csv has label\(s\) 'r0' in column 'label' that the training split "
             r"lacks.*add examples of them to .*rare\.csv, drop those rows, or pass --data-test", path)
    test = _write(tmp_path / "test.csv", "text,label", ["x,a", "y,b"])  # with a test file nothing is carved away
    data = load_task("custom", data_files={"train": path, "test": test, "validation": test})
    assert len(data.task.labels) == 12 and {ex["label"] for ex in data.splits["train"]} == set(range(12))


# ---- 6. not UTF-8 -----------------------------------------------------------------------------------

def test_non_utf8_file_names_the_line_and_byte(tmp_path):
    """A raw UnicodeDecodeError named neither the file nor the line."""
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"text,label\ngood film,pos\ncaf\xe9 film,neg\n")
    _refused(r"cannot read the data file .*latin\.csv: it is not UTF-8 text, line 3 \(byte 28: 0xe9\).*save it "
             r"as UTF-8", latin)
    utf16 = tmp_path / "utf16.jsonl"
    utf16.write_bytes('{"text": "a", "label": 1}\n'.encode("utf-16"))
    _refused(r"utf16\.jsonl: it is not UTF-8 text, it starts with a UTF-16 byte-order mark", utf16)
    bom = tmp_path / "bom.csv"  # a UTF-8 byte-order mark is fine
    bom.write_bytes("\ufefftext,label\n".encode() + "\n".join(_rows(20)).encode())
    assert _load(bom).task.labels == ("neg", "pos")


# ---- 7. the wrong separator -------------------------------------------------------------------------

def test_file_with_another_separator_is_named_for_it(tmp_path):
    """A TSV or semicolon file called .csv was told to pass --text-column."""
    tabs = _write(tmp_path / "tabs.csv", "text\tlabel", _rows(20, sep="\t"))
    _refused(r"tabs\.csv looks tab-separated \(its header 'text\\tlabel' holds tabs\): rename it to \.tsv", tabs)
    semi = _write(tmp_path / "semi.csv", "text;label", _rows(20, sep=";"))
    _refused(r"semi\.csv looks semicolon-separated .*save it comma-separated", semi)
    commas = _write(tmp_path / "commas.tsv", "text,label", _rows(20))
    _refused(r"commas\.tsv does not look tab-separated .*rename it to \.csv", commas)


# ---- 8. warnings: empty texts, test = train, labels that differ in case -----------------------------

def test_empty_texts_warn_and_all_empty_is_refused(tmp_path, capsys):
    rows = _rows(40)
    rows[3], rows[10] = ",pos", "  ,pos"
    path = _write(tmp_path / "some.csv", "text,label", rows)
    capsys.readouterr()
    assert len(_load(path).splits["train"]) == 32  # still read, as written
    assert _warnings(capsys) == [f"idprior: warning: {path}: 2 of 40 rows have an empty text in column 'text' "
                                 "(line 5, 12): they are read as empty strings; fill them in or drop them"]
    _load(path)  # a run loads its data twice (preflight, then the run): one warning
    assert _warnings(capsys) == []
    empty = _write(tmp_path / "empty.csv", "text,label", [f",{'ab'[i % 2]}" for i in range(20)])
    _refused(r"empty\.csv column 'text' is empty on every row: name the column that holds the texts with "
             r"--text-column", empty)


def test_test_file_that_is_the_training_file_warns(tmp_path, capsys):
    train = _write(tmp_path / "train.csv", "text,label", _rows(40))
    copy = shutil.copy(train, tmp_path / "copy.csv")
    capsys.readouterr()
    load_task("custom", data_files={"train": train, "test": train})
    assert _warnings(capsys) == [f"idprior: warning: --data-test {train} is the training file {train}: test scores "
                                 "measure memorization, not generalization; give held-out rows, or drop --data-test "
                                 "to carve a test split from the training file"]
    load_task("custom", data_files={"train": train, "validation": copy})
    assert _warnings(capsys) == [f"idprior: warning: --data-validation {copy} is the training file {train} (the same "
                                 "content): model selection sees training rows, not generalization; give held-out "
                                 "rows, or drop --data-validation to carve a validation split from the training file"]
    other = _write(tmp_path / "other.csv", "text,label", ["x,neg", "y,pos"])
    load_task("custom", data_files={"train": train, "test": other})
    assert _warnings(capsys) == []


def test_labels_that_differ_only_in_case_warn(tmp_path, capsys):
    path = _write(tmp_path / "case.csv", "text,label", _rows(40, labels=("Pos", "neg", "pos", "NEG", "other")))
    capsys.readouterr()
    assert _load(path).task.labels == ("NEG", "Pos", "neg", "other", "pos")  # read as written: five classes
    assert _warnings(capsys) == [f"idprior: warning: {path} column 'label' has labels that differ only in case "
                                 "('NEG', 'neg'; 'Pos', 'pos'): they are read as different classes; write them the "
                                 "same way if they are one class"]


# ---- through the command line -----------------------------------------------------------------------

def test_refusals_are_one_error_line_and_write_nothing(tmp_path, capsys):
    """`prune` refuses each class in preflight: exit 2, one error line, no traceback, no --out folder."""
    model = make_tiny_bert_folder(tmp_path / "model")
    out = tmp_path / "run"
    files = {
        "dup.csv": ("text,label,label\n" + "".join(f"{r},neg\n" for r in _rows(40)), r"column name 'label' more than"),
        "ids.csv": ("text,label\n" + "".join(f"t{i},{i}\n" for i in range(200)), r"200 distinct labels in 200 rows"),
        "semi.csv": ("text;label\n" + "\n".join(_rows(40, sep=";")), r"looks semicolon-separated"),
    }
    for name, (content, pattern) in files.items():
        (tmp_path / name).write_text(content)
        capsys.readouterr()
        rc = main(["prune", "--model", str(model), "--data", str(tmp_path / name), "--no-train", "--no-bench",
                   "--target", "0.3", "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("idprior: error: ")]
        assert len(errors) == 1 and re.search(pattern, errors[0]), err
        assert not out.exists()
