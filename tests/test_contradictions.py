"""Contradictions on one command line are refused with one line naming both sides, before anything is
written; so are options that would do nothing in the chosen mode, and a --resume whose data changed."""

from __future__ import annotations

import pytest

from idprior.cli.main import main
from tiny_folder import make_tiny_bert_folder

QUICK = ["--task", "rt-polarity", "--max-train", "48", "--max-eval", "24", "--batch-size", "16",
         "--max-length", "24", "--calib-size", "32", "--no-bench"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


def _refused(capsys, argv, *words) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("idprior: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("argv, words", [
    (["--no-train", "--epochs", "3"], ["--no-train", "--epochs 3"]),
    (["--no-train", "--lr", "1e-4"], ["--no-train", "--lr"]),
    (["--set", "prune.target=0.4", "--target", "0.2"], ["--target 0.2", "prune.target=0.4"]),
    (["--set", "train.epochs=2", "--epochs", "1"], ["--epochs 1", "train.epochs=2"]),
    (["--distill", "--recover-epochs", "0"], ["--distill", "recover"]),
    (["--zero-shot", "rt-polarity"], ["--zero-shot", "rt-polarity"]),
    (["--per-query-head"], ["--per-query-head", "grouped-query"]),
])
def test_contradiction_refused_before_writing(tiny_folder, tmp_path, capsys, argv, words):
    out = tmp_path / "run"
    _refused(capsys, ["prune", "--model", str(tiny_folder), *QUICK, *argv, "--out", str(out)], *words)
    assert not out.exists()


def test_same_value_from_flag_and_set_is_no_contradiction(tiny_folder, tmp_path):
    from idprior.cli.common import config_from_args
    from idprior.cli.main import build_parser

    args = build_parser().parse_args(["prune", "--model", str(tiny_folder), "--set", "prune.target=0.2",
                                      "--target", "0.2", "--out", str(tmp_path / "x")])
    assert config_from_args(args).prune.target == 0.2


def test_resume_refuses_changed_training_file(tiny_folder, tmp_path, capsys):
    data = tmp_path / "train.csv"
    rows = [f"{'good fine great' if i % 2 else 'bad awful poor'} movie {i},{i % 2}" for i in range(60)]
    data.write_text("text,label\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["prune", "--model", str(tiny_folder), "--data", str(data), "--max-eval", "24", "--batch-size", "16",
            "--max-length", "24", "--calib-size", "16", "--epochs", "1", "--recover-epochs", "0", "--no-bench",
            "--target", "0.3", "--out", str(out)]
    assert main(args) == 0
    assert main([*args, "--resume"]) == 0  # unchanged data: resumes (every stage done)
    data.write_text("text,label\n" + "\n".join(reversed(rows)) + "\n")
    _refused(capsys, [*args, "--resume"], "train data file changed")
