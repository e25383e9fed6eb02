"""Inputs that are never misread (issue 16): labels, problem types, user files on every command,
one run per folder, and one-line errors instead of tracebacks.

Every refusal here is checked the same way: exit code 2, exactly the expected `idprior: error:`
line(s) on stderr, no traceback, and nothing written (no --out folder, no ONNX file, an occupied
folder left byte for byte as it was).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from idprior import io
from idprior.cli.main import build_parser, main
from idprior.data import TaskData, align_labels, load_task, model_labels
from idprior.errors import IdpriorError
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_folder import make_tiny_bert_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-train", "40", "--max-eval", "16", "--batch-size", "16", "--max-length", "24", "--calib-size", "16",
        "--no-train", "--recover-epochs", "0", "--no-bench", "--target", "0.3"]
WORDS = ["good", "bad", "dull", "great", "fun", "boring"]


def _set_labels(folder: Path, names: list[str]) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"] = {str(i): n for i, n in enumerate(names)}
    cfg["label2id"] = {n: i for i, n in enumerate(names)}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    good = make_tiny_bert_folder(root / "good")  # 2 labels, default names LABEL_0 / LABEL_1
    named = _set_labels(make_tiny_bert_folder(root / "named"), ["positive", "negative"])
    nan = shutil.copytree(good, root / "nan")
    state = load_file(str(nan / "model.safetensors"))
    state["bert.encoder.layer.0.attention.self.query.weight"][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    return {"good": good, "named": named, "nan": nan, "llama": make_tiny_decoder_folder(root / "llama")}


def _csv(path: Path, labels, header: str = "text,label", sep: str = ",") -> str:
    rows = [f"{WORDS[i % len(WORDS)]} film number {i}{sep}{label}" for i, label in enumerate(labels)]
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def _refused(argv: list[str], capsys, *patterns: str, lines: int = 1) -> str:
    """Run the CLI; assert exit 2, `lines` error lines matching `patterns`, and no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("idprior: error: ")]
    assert len(errors) == lines, err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    return err


def _snapshot(path: Path):
    if not path.exists():
        return None
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- 1. labels are never reassigned ---------------------------------------------------------------

def test_named_classifier_keeps_its_labels_end_to_end(models, tmp_path, capsys):
    """{0: positive, 1: negative} pruned on data labelled negative/positive stays {0: positive, 1:
    negative}, with the same head rows; `--data` alone means --task custom and the columns default to
    text/label; the lock is gone afterwards, --resume says what was done, and report.md is readable."""
    data = _csv(tmp_path / "reviews.csv", ["negative", "positive"] * 30)
    out = tmp_path / "run"
    argv = ["prune", "--model", str(models["named"]), "--data", data, *FAST, "--out", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "--data given without --task: using --task custom" in captured.err
    pruned = json.loads((out / "pruned" / "config.json").read_text())
    assert pruned["id2label"] == {"0": "positive", "1": "negative"}
    before = load_file(str(models["named"] / "model.safetensors"))["classifier.weight"]
    assert torch.equal(load_file(str(out / "pruned" / "model.safetensors"))["classifier.weight"], before)
    assert not (out / ".idprior.lock").exists()

    report = (out / "report.md").read_text()
    assert "{'" not in report and "| bench | 0.0 |" not in report
    assert "| bench | skipped (--no-bench) |" in report and re.search(r"Split sizes: train \d+, validation", report)

    assert main([*argv, "--resume"]) == 0
    assert re.search(r"resuming .*run: finished stage\(s\) finetune, score, select, surgery, recover, evaluate",
                     capsys.readouterr().out)

    # evaluate --data reads the file the same way and scores with the model's own label ids
    assert main(["evaluate", str(out / "pruned"), "--data", data, "--split", "validation,test",
                 "--out", str(tmp_path / "ev")]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    run_metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == run_metrics["pruned"]["test"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "pruned"), "--data-test", data]) == 0  # one labelled file, all of it
    assert set(json.loads(capsys.readouterr().out)) == {"model", "task", "test"}


def test_labels_are_mapped_onto_the_model_by_name():
    data = TaskData(load_task.__globals__["Task"]("custom", "classification", ("negative", "positive"), ("accuracy",),
                                                  ("text",), ""),
                    {"train": [{"text": "a", "label": 0}, {"text": "b", "label": 1}]})
    aligned = align_labels(data, ("POSITIVE", "Negative"), "m")
    assert aligned.task.labels == ("POSITIVE", "Negative")
    assert [ex["label"] for ex in aligned.splits["train"]] == [1, 0]  # negative -> 1, positive -> 0
    assert align_labels(data, None, "m") is data  # default names (LABEL_0, ...): the data's names win
    with pytest.raises(IdpriorError, match=r"labels of m \(pos, neg\) do not match .*\(negative, positive\): "
                                           r"'negative', 'positive' are not among"):
        align_labels(data, ("pos", "neg"), "m")
    with pytest.raises(IdpriorError, match=r"the model has 3 labels and the data 2"):
        align_labels(data, ("negative", "positive", "neutral"), "m")
    assert model_labels({"architectures": ["BertForSequenceClassification"],
                         "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}) is None
    assert model_labels({"architectures": ["BertModel"], "id2label": {"0": "a", "1": "b"}}) is None


def test_label_mismatch_is_one_line_listing_both_sets(models, tmp_path, capsys):
    out = tmp_path / "out"
    data = _csv(tmp_path / "d.csv", ["pos", "neg"] * 20)
    _refused(["prune", "--model", str(models["named"]), "--data", data, *FAST, "--out", str(out)], capsys,
             r"labels of .*named \(positive, negative\) do not match the labels of task custom \(neg, pos\)")
    three = _csv(tmp_path / "three.csv", ["positive", "negative", "neutral"] * 14)
    _refused(["prune", "--model", str(models["named"]), "--data", three, *FAST, "--out", str(out)], capsys,
             r"\(positive, negative\) .* \(negative, neutral, positive\): 'neutral' is not among the model's labels")
    # default label names: the message lists the labels found in the data
    _refused(["prune", "--model", str(models["good"]), "--data", three, *FAST, "--out", str(out)], capsys,
             r"2 outputs but task custom needs 3 labels \(labels found in the data: negative, neutral, positive\)")
    assert not out.exists()


def test_api_load_refuses_to_rename_a_classifiers_outputs(models):
    from idprior.data import Task
    from idprior.model import load as m

    task = Task("custom", "classification", ("negative", "positive"), ("accuracy",), ("text",), "")
    with pytest.raises(IdpriorError, match=r"labels \(positive, negative\).*align_labels"):
        m.load(str(models["named"]), task)


# ---- 2. the problem type --------------------------------------------------------------------------

def _load(path, **kw):
    return load_task("custom", data_files={"train": path}, **kw)


def test_mostly_numeric_column_with_bad_values_is_refused(tmp_path):
    values = [f"{0.37 * i:.2f}" for i in range(40)]
    values[6], values[18] = "NaN", "abc"
    path = _csv(tmp_path / "scores.csv", values)
    with pytest.raises(IdpriorError, match=r"scores\.csv column 'label' holds numbers except line 8 \('NaN'\), "
                                           r"line 20 \('abc'\).*--problem-type regression.*--problem-type classification"):
        _load(path)
    with pytest.raises(IdpriorError, match=r"scores\.csv has labels .* not numbers \(line 8 \('NaN'\), line 20 "
                                           r"\('abc'\)\), but --problem-type is regression"):
        _load(path, problem_type="regression")
    with pytest.raises(IdpriorError, match=r"test split carved from .*scores\.csv has label\(s\)"):
        _load(path, problem_type="classification")  # 40 classes of one row each: the carved ones never trained
    mixed = _csv(tmp_path / "mixed.csv", ["NaN", "1.5", "abc", "2"] * 10)
    as_classes = _load(mixed, problem_type="classification")
    assert as_classes.task.kind == "classification" and "NaN" in as_classes.task.labels
    ints = _csv(tmp_path / "ints.csv", [str(i % 3) for i in range(30)])
    assert _load(ints, problem_type="regression").task.kind == "regression"  # integer scores, as told
    assert _load(ints).task.labels == ("0", "1", "2")  # inferred: classes, as before


def test_stray_delimiters_and_json_lists_are_refused(tmp_path):
    tsv = _csv(tmp_path / "d.tsv", ["pos", "neg"] * 10, header="text\tlabel", sep="\t")
    Path(tsv).write_text(Path(tsv).read_text() + "a text\twith a tab\tpos\n")
    with pytest.raises(IdpriorError, match=r"d\.tsv line 22 has 3 fields but the header has 2: a tab inside the text"):
        _load(tsv)
    csv_path = _csv(tmp_path / "d.csv", ["pos", "neg"] * 10)
    Path(csv_path).write_text(Path(csv_path).read_text() + "fine, but long,pos\n")
    with pytest.raises(IdpriorError, match=r"d\.csv line 22 has 3 fields .*comma inside the text"):
        _load(csv_path)
    trailing = tmp_path / "t.csv"  # empty trailing cells shift nothing
    trailing.write_text("text,label\n" + "".join(f"t {i},{'ab'[i % 2]},\n" for i in range(20)))
    assert _load(trailing).task.labels == ("a", "b")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"t {i}", "label": ["a", "b"] if i == 3 else "a" if i % 2 else "b"})
                             + "\n" for i in range(20)))
    with pytest.raises(IdpriorError, match=r"d\.jsonl line 4 has a JSON list as its label .*multi-label"):
        _load(jsonl)


def test_problem_type_flag_and_config(models, tmp_path, capsys):
    out = tmp_path / "out"
    values = [f"{0.37 * i:.2f}" for i in range(40)]
    values[5] = "n/a"
    path = _csv(tmp_path / "s.csv", values)
    _refused(["prune", "--model", str(models["good"]), "--data", path, *FAST, "--out", str(out)], capsys,
             r"s\.csv column 'label' holds numbers except line 7 \('n/a'\)")
    _refused(["prune", "--model", str(models["good"]), "--data", path, "--problem-type", "regression", *FAST,
              "--out", str(out)], capsys, r"but --problem-type is regression")
    _refused(["prune", "--model", str(models["good"]), "--data", path, "--problem-type", "regresion", *FAST,
              "--out", str(out)], capsys, r"--problem-type \(data\.problem_type\) must be classification or regression")
    _refused(["prune", "--model", str(models["good"]), "--task", "rt-polarity", "--problem-type", "regression",
              *FAST, "--out", str(out)], capsys, r"--problem-type only apply to --task custom")
    assert not out.exists()


# ---- 3. evaluate on user files --------------------------------------------------------------------

def test_evaluate_flags_are_never_abbreviations():
    parser = build_parser()
    args = parser.parse_args(["evaluate", "m", "--data", "f.csv"])
    assert args.data == "f.csv" and args.data_dir is None
    for argv in (["evaluate", "m", "--data-d", "x"], ["prune", "--tar", "0.3"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_pair_columns_are_detected_on_the_command_line(models, tmp_path, capsys):
    """sentence1/sentence2 columns are read as a pair without flags (one stderr line says so); a file
    with two candidate pairs is one error line naming them and the flags, and a run writes nothing."""
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("\n".join(["sentence1,sentence2,label", *(f"{WORDS[i % 6]} film,{WORDS[(i + 1) % 6]} plot {i},"
                                                               f"{i % 2}" for i in range(40))]) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(models["good"]), "--data", str(pairs), "--split", "test"]) == 0
    err = capsys.readouterr().err
    assert err.count("reading columns 'sentence1' and 'sentence2' as a text pair") == 1, err
    both = tmp_path / "both.csv"
    both.write_text("question,sentence,passage,label\n" + "".join(f"q{i},s{i},p{i},{i % 2}\n" for i in range(40)))
    out = tmp_path / "run"
    _refused(["prune", "--model", str(models["good"]), "--data", str(both), *FAST, "--out", str(out)], capsys,
             r"both\.csv has columns of more than one text input \(question \+ sentence, question \+ passage\): "
             r"say which to read with --text-column question --text-pair-column sentence or")
    assert not out.exists()


def test_evaluate_refusals(models, tmp_path, capsys):
    data = _csv(tmp_path / "d.csv", ["neg", "pos"] * 20)
    good, llama = str(models["good"]), str(models["llama"])
    _refused(["evaluate", llama, "--data", data], capsys,
             r"is a causal language model \(LlamaForCausalLM\), but task custom needs a fine-tuned classifier.*lm-rt")
    _refused(["evaluate", good, "--task", "lm-rt", "--max-eval", "8"], capsys,
             r"is a classifier \(BertForSequenceClassification\), but task lm-rt is language modelling")
    _refused(["evaluate", good, "--data", data, "--max-length", "512"], capsys,
             r"--max-length 512 is more than .* can take: it has 128 positions \(max_position_embeddings")
    _refused(["evaluate", good], capsys, r"give --task NAME .* or --data FILE")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused(["evaluate", good, "--data", data, "--out", str(afile)], capsys, r"--out .*afile is a file")
    (tmp_path / "o" / "metrics.json").mkdir(parents=True)
    _refused(["evaluate", good, "--data", data, "--out", str(tmp_path / "o")], capsys,
             r"holds a folder named metrics\.json")
    _refused(["evaluate", good, "--data", data, "--out", "/proc/idprior-test/o"], capsys, r"cannot be written")
    assert afile.read_text() == "mine" and sorted(p.name for p in (tmp_path / "o").iterdir()) == ["metrics.json"]


# ---- 4. one run per folder ------------------------------------------------------------------------

def _lock(folder: Path, pid: int) -> None:
    import socket

    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".idprior.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01T00:00:00"}))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_run_locks_its_folder(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stages.json").write_text(json.dumps({"config": {}, "stages": {}}))
    _lock(out, os.getppid())  # a live process that is not this one
    before = _snapshot(out)
    base = ["prune", "--model", str(models["good"]), "--task", "rt-polarity", *FAST, "--out", str(out)]
    for extra in (["--resume"], ["--overwrite"], []):
        _refused([*base, *extra], capsys, rf"output folder .*out is in use by another idprior run \(pid {os.getppid()} "
                 r"on .*, started 2026-01-01T00:00:00\)")
    _refused([*base, "--resume", "--overwrite"], capsys, r"--resume and --overwrite contradict each other")
    assert _snapshot(out) == before

    # two runs that both passed preflight: the second one's Run refuses before deleting anything
    from idprior.config import load_config
    from idprior.pipeline.stages import Run

    cfg = load_config(None, [f"model.name={models['good']}", f"out={out}"])
    with pytest.raises(IdpriorError, match="in use by another idprior run"):
        Run(cfg, overwrite=True)
    assert _snapshot(out) == before


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    from idprior.config import load_config
    from idprior.pipeline.stages import Run

    out = tmp_path / "out"
    dead = _dead_pid()
    _lock(out, dead)
    cfg = load_config(None, [f"out={out}"])
    run = Run(cfg, resume=True)
    assert f"locked by a run that is no longer running (pid {dead} " in capsys.readouterr().err
    assert json.loads((out / ".idprior.lock").read_text())["pid"] == os.getpid()
    assert run.resume_note().endswith("nothing finished yet, starting from the beginning")
    state = out / "ckpt_finetune" / "e0001-s0000003"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}")
    run.status["stages"]["finetune"] = {"wall_s": 1.0}
    assert run.resume_note() == (f"resuming {out}: finished stage(s) finetune; training continues from checkpoint "
                                 "ckpt_finetune/e0001-s0000003")
    run.close()
    assert not (out / ".idprior.lock").exists()


# ---- 5. tracebacks that became one-line errors ------------------------------------------------------

def test_prune_refusals(models, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["prune", "--task", "rt-polarity", *FAST, "--out", str(out)]
    _refused([*base, "--model", str(models["good"]), "--max-length", "512"], capsys,
             r"--max-length 512 is more than .* 128 positions")
    train = [a for a in base if a != "--no-train"] + ["--epochs", "1"]
    _refused([*train, "--model", str(models["nan"])], capsys,
             r"model\.safetensors holds non-finite weights \(1 NaN/inf values in "
             r"bert\.encoder\.layer\.0\.attention\.self\.query\.weight\): .*healthy checkpoint")
    _refused([*base, "--model", str(models["good"]), "--tau", "0.1"], capsys,
             r"--tau and --target both given")
    assert not out.exists()


def test_export_refusals(models, tmp_path, capsys):
    good = str(models["good"])
    _refused(["export", good, "--onnx", str(tmp_path / "m.onnx"), "--opset", "7"], capsys,
             r"--opset 7 is outside what the dynamo exporter writes \(18 to 23\)")
    _refused(["export", good, "--onnx", str(tmp_path / "m.onnx"), "--opset", "21", "--exporter", "legacy"], capsys,
             r"legacy exporter writes \(13 to 20\)")
    (tmp_path / "dir.onnx").mkdir()
    _refused(["export", good, "--onnx", str(tmp_path / "dir.onnx")], capsys, r"--onnx .*dir\.onnx is a folder")
    _refused(["export", good, "--onnx", "/proc/idprior-test/m.onnx"], capsys, r"--onnx .* cannot be written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.onnx"]


def test_writable_problem_probe_leaves_nothing(tmp_path):
    assert io.writable_problem(tmp_path / "a" / "b" / "m.onnx", "--onnx") is None
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in io.writable_problem(tmp_path / "f" / "m.onnx", "--onnx")


def test_ranks_of_one_launch_share_rank_0s_lock(tmp_path, monkeypatch):
    from idprior import lock

    _lock(tmp_path, os.getppid())
    assert lock.in_use(tmp_path) is not None
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert lock.in_use(tmp_path) is None
    assert not lock.Lock(tmp_path / "other").acquire().owned
