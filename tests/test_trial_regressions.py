"""The classes that a second new-user trial of issue 31 (644 bad, unusual or contradictory inputs and faults
against the CLI) found mishandled, one test each: a traceback, an exit-0 wrong or silently altered result,
a user file changed, or output left behind by a refusal. Each test fails on the code before its fix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from idprior import io
from idprior.cli.main import build_parser, main
from idprior.errors import IdpriorError
from tiny_folder import make_tiny_bert_folder

WORDS = ["good", "bad", "dull", "great", "fun", "boring"]
FAST = ["--max-train", "40", "--max-eval", "16", "--max-length", "24", "--calib-size", "16", "--no-bench",
        "--recover-epochs", "0", "--no-train", "--target", "0.3"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return make_tiny_bert_folder(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="module")
def pruned_run(bert, tmp_path_factory) -> Path:
    """A finished post-training run (no fine-tune) of the tiny BERT on a small CSV."""
    root = tmp_path_factory.mktemp("run")
    data = _csv(root / "d.csv")
    out = root / "run"
    assert main(["prune", "--model", str(bert), "--data", str(data), *FAST, "--out", str(out)]) == 0
    return out


def _csv(path: Path, n: int = 60, header: str = "text,label", extra: list[str] = ()) -> Path:
    rows = [f"{WORDS[i % len(WORDS)]} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(n)]
    path.write_text("\n".join([header, *rows[:20], *extra, *rows[20:]]) + "\n", encoding="utf-8")
    return path


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def _refused(capsys, argv: list[str], *patterns: str) -> str:
    """Exit 2, exactly one `idprior: error:` line matching every pattern, no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("idprior: error: ")]
    assert len(lines) == 1, err
    assert not [x for x in err.splitlines()[err.splitlines().index(lines[0]) + 1:] if x.strip()], err
    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    return lines[0]


def _config(argv: list[str], capsys):
    """(config, stderr) of a prune/finetune command line, without running it."""
    from idprior.cli.common import config_from_args

    capsys.readouterr()
    cfg = config_from_args(build_parser().parse_args(argv))
    return cfg, capsys.readouterr().err


# ---- messages ------------------------------------------------------------------------------------------

def test_an_error_message_stays_one_line_when_a_path_holds_a_line_break(bert, tmp_path, capsys):
    line = _refused(capsys, ["evaluate", str(bert), "--data", str(tmp_path / "bad\nname.csv")], r"bad\\nname\.csv")
    assert "does not exist" in line


def test_an_error_of_the_file_system_is_one_line_not_a_traceback(pruned_run, tmp_path, capsys):
    (tmp_path / "f").write_text("a file where a folder should be")
    _refused(capsys, ["export", str(pruned_run / "pruned"), "--onnx-dir", str(tmp_path / "f" / "onnx")],
             r"f", r"(File exists|Not a directory|is a file)")


def test_a_leading_tilde_is_expanded_for_every_path(pruned_run, tmp_path, monkeypatch, capsys):
    from idprior.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = _csv(tmp_path / "d.csv")
    assert main(["evaluate", str(pruned_run / "pruned"), "--data", "~/d.csv", "--max-length", "24", "--out", "~/ev"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file() and not (tmp_path / "~").exists()
    cfg = load_config(None, ["out=~/runs/x", f"data.train_file=~/{data.name}", "data.task=custom"])
    assert cfg.out == str(tmp_path / "runs" / "x") and cfg.data.train_file == str(data)


def test_a_failed_write_leaves_no_folder_it_made(tmp_path):
    def full_disk(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError) as e:
        io.write_with(tmp_path / "out" / "sub" / "metrics.json", full_disk)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as e:  # a write error without a file name is given the file being written
        io.write_with(tmp_path / "m.json", lambda tmp: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    assert e.value.filename == str(tmp_path / "m.json")


# ---- configs and grids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, pattern", [
    ("prune:\n  target: 0.3\ntrain:\n  lr: 1.0e-4\nprune:\n  method: fisher\n", r"key 'prune' is given twice \(line 5\)"),
    ("prune:\n  target: 0.3\n  target: 0.4\n", r"key 'target' is given twice"),
])
def test_a_yaml_key_given_twice_is_refused(tmp_path, capsys, text, pattern):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    _refused(capsys, ["validate", str(path)], pattern)


def test_a_grid_key_given_twice_is_refused(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: x\ntasks: [rt-polarity]\nseeds: [0]\ntargets: [0.3]\nmethods: [snip]\ntargets: [0.5]\n")
    _refused(capsys, ["bench-quality", str(grid), "--out", str(tmp_path / "q")], r"'targets' is given twice")
    assert not (tmp_path / "q").exists()


def test_a_section_given_as_a_scalar_is_reported_even_when_a_flag_sets_one_of_its_keys(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("bench: 3\n")
    _refused(capsys, ["validate", str(path), "--set", "bench.enabled=false"], r"bench must be a section")


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_bytes("# caf\u00e9\nseed: 0\n".encode("latin-1"))
    _refused(capsys, ["validate", str(path)], r"c\.yaml is not UTF-8")


def test_a_set_value_that_is_not_yaml_is_one_line(capsys):
    _refused(capsys, ["validate", "demo", "--set", "prune.target=[1"], r"override 'prune\.target=\[1'.*not valid YAML")


@pytest.mark.parametrize("flag", ["--data", "--data-test", "--out"])
def test_an_empty_path_is_refused_before_any_work(bert, tmp_path, monkeypatch, capsys, flag):
    monkeypatch.chdir(tmp_path)
    data = str(_csv(tmp_path / "d.csv"))
    argv = ["prune", "--model", str(bert), "--data", data, *FAST, "--out", str(tmp_path / "run"), flag, ""]
    _refused(capsys, argv, r"is empty|out must be a folder path")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]


def test_a_seed_numpy_cannot_take_is_refused_before_any_work(bert, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(capsys, ["prune", "--model", str(bert), "--data", str(_csv(tmp_path / "d.csv")), *FAST,
                      "--seed", str(2**64), "--out", str(out)], r"seed must be in \[0, 2\*\*32 - 1\]")
    assert not out.exists()


def test_grid_problems_are_one_line_each(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text("model: x\ntasks: [rt-polarity]\nseeds: [0]\ntargets: [0.3]\nmethods: [fishr]\ncolour: blue\n")
    capsys.readouterr()
    assert main(["bench-quality", str(grid), "--out", str(tmp_path / "q")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(x.startswith("idprior: error: bad grid") for x in lines), lines
    assert "colour" in lines[0] and "fishr" in lines[1]


# ---- command lines --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [("--out", "runs/run #2"), ("--out", "a: b"), ("--text-column", "yes"),
                                         ("--label-column", "null"), ("--out", "two\nlines")])
def test_flag_values_are_taken_as_written_not_as_yaml(tmp_path, capsys, flag, value):
    cfg, _ = _config(["prune", "--model", "m", "--data", "d.csv", flag, value], capsys)
    got = {"--out": cfg.out, "--text-column": cfg.data.text_column, "--label-column": cfg.data.label_column}[flag]
    assert got == value


def test_a_flag_or_set_given_twice_names_the_value_used(capsys):
    cfg, err = _config(["prune", "--model", "m", "--target", "0.2", "--target", "0.4", "--set", "train.lr=1e-4",
                        "--set", "train.lr=2e-4"], capsys)
    assert cfg.prune.target == 0.4 and cfg.train.lr == 2e-4
    assert re.search(r"warning: --target given twice \(0\.2, then 0\.4\): the last one, 0\.4, is used", err), err
    assert re.search(r"warning: --set train\.lr given twice", err), err


@pytest.mark.parametrize("argv, option", [
    (["--method", "fisher", "--selection", "prior"], "--selection prior"),
    (["--method", "fisher", "--score", "residual"], "--score residual"),
    (["--method", "fisher", "--sn-bound", "2"], "--sn-bound 2"),
    (["--method", "shortgpt", "--kinds", "head"], "--kinds head"),
    (["--method", "top-layers", "--min-keep", "0.5"], "--min-keep 0.5"),
    (["--no-prior", "--set", "prune.prior_gamma=2"], "--set prune.prior_gamma=2"),
    (["--sn-bound", "2"], "--sn-bound 2"),  # SN is off unless --sn
    (["--head-share", "0.4"], "--head-share 0.4"),
    (["--set", "bench.repeats=3"], "--set bench.repeats=3"),
])
def test_an_option_the_mode_never_reads_gets_a_warning(capsys, argv, option):
    _, err = _config(["prune", "--model", "m", "--no-bench", *argv], capsys)
    assert f"idprior: warning: {option} does nothing here" in err, err


def test_finetune_warns_about_prune_options_and_snip_reads_its_own_quietly(capsys):
    _, err = _config(["finetune", "--model", "m", "--set", "prune.target=0.3"], capsys)
    assert "warning: --set prune.target=0.3 does nothing here: idprior finetune" in err, err
    _, err = _config(["prune", "--model", "m", "--no-prior", "--selection", "share", "--head-share", "0.4"], capsys)
    assert "warning" not in err, err  # selection share reads --head-share


@pytest.mark.parametrize("argv, words", [
    (["--no-train", "--set", "train.epochs=2"], "--no-train skips the fine-tune, so --set train.epochs=2"),
    (["--epochs", "0", "--lr", "1e-3"], "--epochs 0 runs no fine-tune, so --lr 1e-3"),
    (["--recover-epochs", "0", "--set", "recover.lr=1e-3"], "--recover-epochs 0 runs no recovery, so --set recover.lr"),
])
def test_the_rate_or_length_of_a_training_that_does_not_run_is_refused(capsys, argv, words):
    from idprior.cli.common import config_from_args
    from idprior.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        config_from_args(build_parser().parse_args(["prune", "--model", "m", *argv]))
    assert any(words in p for p in e.value.problems), e.value.problems
    _, err = _config(["prune", "--model", "m", "--no-train", "--batch-size", "8"], capsys)
    assert "warning: --batch-size 8 does nothing here: --no-train skips the fine-tune" in err, err


# ---- files idprior replaces ----------------------------------------------------------------------------

def test_overwrite_keeps_a_user_file_inside_a_run_model_folder(pruned_run, tmp_path, capsys):
    run = shutil.copytree(pruned_run, tmp_path / "run")
    (run / "pruned" / "my_notes.txt").write_text("mine")
    with pytest.raises(IdpriorError, match=r"pruned/my_notes\.txt"):
        io.check_owned(run, "run", "remove it yourself")
    (run / "pruned" / "my_notes.txt").unlink()
    io.check_owned(run, "run", "remove it yourself")  # a run holding only what it wrote is still replaced


# ---- data -----------------------------------------------------------------------------------------------

def test_a_line_that_repeats_the_header_is_refused(tmp_path):
    from idprior.data import load_task

    path = _csv(tmp_path / "d.csv", extra=["text,label"])
    with pytest.raises(IdpriorError, match=r"d\.csv line 22 repeats the header \(text, label\)"):
        load_task("custom", data_files={"train": str(path)})


def test_misplaced_file_flags_are_named_as_given(tmp_path):
    from idprior.data import load_task

    with pytest.raises(IdpriorError, match=r"^--data-test only apply to --task custom"):
        load_task("rt-polarity", data_files={"test": str(tmp_path / "t.csv")})


# ---- checks before the run folder is made ---------------------------------------------------------------

def test_an_unreadable_gguf_file_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 100)
    out = tmp_path / "run"
    _refused(capsys, ["prune", "--model", str(gguf), "--task", "lm-rt", *FAST, "--out", str(out)],
             r"m\.gguf is not a readable GGUF model")
    assert not out.exists()


@pytest.mark.parametrize("extra, held", [(["--min-keep", "0.5", "--target", "0.6"], "min_keep 0.5"),
                                         (["--protect-first", "1", "--target", "0.6"], "protect_first 1")])
def test_a_target_held_back_units_put_out_of_reach_is_refused_before_work(bert, tmp_path, capsys, extra, held):
    out = tmp_path / "run"
    argv = [a for a in FAST if a not in ("--target", "0.3")]
    _refused(capsys, ["prune", "--model", str(bert), "--data", str(_csv(tmp_path / "d.csv")), *argv, *extra, "--out",
                      str(out)], rf"prune\.target 0\.6 is out of reach: with {held} at most")
    assert not out.exists()


def _resume_argv(run: Path, bert: Path, data: Path) -> list[str]:
    return ["prune", "--model", str(bert), "--data", str(data), *FAST, "--out", str(run), "--resume"]


def test_resume_refuses_a_finished_stage_whose_output_is_gone(pruned_run, bert, tmp_path, capsys):
    run = shutil.copytree(pruned_run, tmp_path / "run")  # a run folder may move; its data file stays
    shutil.rmtree(run / "pruned")
    before = _tree(run)
    _refused(capsys, _resume_argv(run, bert, pruned_run.parent / "d.csv"),
             r"finished stages whose output is gone \(pruned/\)", "--overwrite")
    assert _tree(run) == before


def test_resume_with_a_deleted_data_file_names_only_the_file(bert, tmp_path, capsys):
    data, run = _csv(tmp_path / "d.csv"), tmp_path / "run"
    assert main(["prune", "--model", str(bert), "--data", str(data), *FAST, "--out", str(run)]) == 0
    data.unlink()
    _refused(capsys, _resume_argv(run, bert, data), r"d\.csv does not exist")


def test_a_run_folder_given_as_the_model_points_to_its_model(pruned_run, capsys):
    _refused(capsys, ["evaluate", str(pruned_run), "--task", "rt-polarity"], r"is an idprior run folder.*pruned/")


# ---- bench-quality, report, bench, export, evaluate -----------------------------------------------------

GRID = "model: {model}\ntasks: [{task}]\nseeds: [0]\ntargets: [0.3]\nmethods: [snip]\nmax_train: 16\n"


@pytest.mark.parametrize("grid, extra, pattern", [
    ({}, ["--threads", "-1"], r"--threads must be >= 1"),
    ({}, ["--stop-after-min", "nan"], r"--stop-after-min must be"),
    ({}, ["--tasks", "subj"], r"--tasks subj: not in the grid's tasks"),
    ({}, ["--seeds", "3"], r"--seeds 3: not in the grid's seeds"),
    ({}, ["--seeds", "x"], r"--seeds 'x': give seeds of the grid as integers"),
    ({"task": "rt-polarty"}, [], r"grid task 'rt-polarty'"),
    ({"model": "/nonexistent/model"}, [], r"grid model: .*/nonexistent/model"),
    ({}, ["--results", "{tmp}/mine.jsonl", "--resume"], r"mine\.jsonl line 1 is not a result row"),
    ({}, ["--out", "{tmp}/f"], r"--out .*f is a file|f is a file"),
])
def test_bench_quality_checks_its_inputs_before_writing(bert, tmp_path, capsys, grid, extra, pattern):
    (tmp_path / "g.yaml").write_text(GRID.format(**{"model": bert, "task": "rt-polarity", **grid}))
    (tmp_path / "mine.jsonl").write_text('{"my": "rows"}\n')
    (tmp_path / "f").write_text("x")
    before = _tree(tmp_path)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    out = [] if "--out" in extra else ["--out", str(tmp_path / "q")]
    _refused(capsys, ["bench-quality", str(tmp_path / "g.yaml"), *out, *extra], pattern)
    assert _tree(tmp_path) == before


@pytest.fixture
def results(tmp_path) -> Path:
    from idprior.study.quality import ROW_KEYS

    split = {"validation": {"accuracy": 0.5}, "test": {"accuracy": 0.5}}
    row = {**dict.fromkeys(ROW_KEYS), "key": "rt-polarity/0/snip/0.3", "task": "rt-polarity", "seed": 0, "method": "snip",
           "base_method": "snip", "target": 0.3, "variant": "sn+prior", "model": "m", "main_metric": "accuracy",
           "dense": split, "pruned_no_recovery": split, "pruned": split, "removed": {}, "sizes": {"train": 1}, "wall_s": {}, "config": {}, "versions": {}, "finished_at": "now",
           "compression": {"seq_len": 128, **{m: {"dense": 2, "pruned": 1, "removed_fraction": 0.5}
                                              for m in ("encoder_params", "linear_params", "flops", "total_params")}}}
    path = tmp_path / "res.jsonl"
    path.write_text(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("notes, pattern", [("missing", r"nope\.md does not exist"), ("latin1", r"n\.md is not UTF-8"),
                                            ("folder", r"is a folder")])
def test_report_notes_that_cannot_be_read_are_one_line(results, tmp_path, capsys, notes, pattern):
    (tmp_path / "n.md").write_bytes("caf\u00e9".encode("latin-1"))
    path = {"missing": tmp_path / "nope.md", "latin1": tmp_path / "n.md", "folder": tmp_path}[notes]
    _refused(capsys, ["report", str(results), "--out", str(tmp_path / "rep"), "--notes", str(path)], pattern)
    assert not (tmp_path / "rep").exists()


def test_report_refuses_rows_without_the_fields_it_reads_and_finetune_runs(tmp_path, capsys):
    rows = tmp_path / "r.jsonl"
    rows.write_text('{"key": "a", "x": 1}\n')
    _refused(capsys, ["report", str(rows)], r"the row 'a' has no task, seed, method")
    run = tmp_path / "ft"
    run.mkdir()
    (run / "stages.json").write_text(json.dumps({"version": 2, "config": {}, "stages": {"finetune": {}}}))
    (run / "metrics.json").write_text(json.dumps({"validation": {"accuracy": 0.5}}))
    _refused(capsys, ["report", str(run)], r"not an idprior prune run")
    assert not (run / "report.md").exists()


@pytest.mark.parametrize("name", ["../escape", "sub/x", ""])
def test_report_name_is_a_plain_stem_so_nothing_lands_outside_out(results, tmp_path, capsys, name):
    (tmp_path / "escape.md").write_text("mine\n")
    before = _tree(tmp_path)
    _refused(capsys, ["report", str(results), "--out", str(tmp_path / "rep"), "--name", name], r"--name .*plain file stem")
    assert _tree(tmp_path) == before


def test_report_warns_that_reference_does_nothing_for_an_unpaired_grid(results, tmp_path, capsys):
    capsys.readouterr()
    assert main(["report", str(results), "--out", str(tmp_path / "rep"), "--reference", "fisher"]) == 0
    assert "warning: --reference fisher does nothing here" in capsys.readouterr().err


def test_bench_refuses_nan_noise_guards_and_warns_about_export_options_without_onnx(bert, pruned_run, tmp_path, capsys):
    bench = ["bench", "--dense", str(bert), "--pruned", str(pruned_run / "pruned"), "--batch-sizes", "1", "--seq-lens",
             "8", "--repeats", "1", "--warmup", "0", "--no-onnx", "--retime-rounds", "0", "--out", str(tmp_path / "b")]
    _refused(capsys, [*bench, "--max-iqr-fraction", "nan"], r"--max-iqr-fraction must be > 0, got nan")
    assert not (tmp_path / "b").exists()
    assert main([*bench, "--exporter", "legacy"]) == 0
    assert "warning: --exporter legacy does nothing here: --no-onnx" in capsys.readouterr().err


@pytest.mark.parametrize("extra, pattern", [(["--seq-len", "0"], r"--seq-len must be at least 2"),
                                            (["--seq-len", "100"], r"--seq-len 100 is too long.*--seq-len 63 at most"),
                                            (["--tol", "nan"], r"--tol must be a positive number")])
def test_export_names_the_flag_of_a_bad_seq_len_or_tol(pruned_run, tmp_path, capsys, extra, pattern):
    _refused(capsys, ["export", str(pruned_run / "pruned"), "--onnx", str(tmp_path / "m.onnx"), *extra], pattern)
    assert not (tmp_path / "m.onnx").exists()


def test_evaluate_with_only_a_test_file_refuses_other_splits(pruned_run, tmp_path, capsys):
    data = _csv(tmp_path / "t.csv")
    _refused(capsys, ["evaluate", str(pruned_run / "pruned"), "--data-test", str(data), "--split", "validation"],
             r"--split validation: with --data-test alone there is only the test split")


# ---- messages that named the wrong cause (borderline in the trial) --------------------------------------

def test_messages_name_the_cause(bert, pruned_run, tmp_path, capsys):
    from idprior.data import load_task

    data = _csv(tmp_path / "d.csv")
    (tmp_path / "f").write_text("a file")
    (tmp_path / "c.yaml").mkdir()
    bert3 = make_tiny_bert_folder(tmp_path / "bert3", num_labels=3)
    bench = ["bench", "--pruned", str(pruned_run / "pruned"), "--batch-sizes", "1", "--seq-lens", "8", "--repeats",
             "1", "--no-onnx", "--out", str(tmp_path / "b")]
    cases = [
        (["evaluate", str(pruned_run / "pruned"), "--data", str(data), "--batch-size", "0"], r"--batch-size must be >= 1, got 0"),
        (["bench", "--dense", str(bert), *bench[1:], "--warmup", "-1"], r"--warmup must be >= 0, got -1"),
        (["bench", "--dense", str(bert3), *bench[1:]], r"--dense .*bert3 has a 3-label head and the pruned model 2"),
        (["prune", "--model", str(bert), "--data", str(data), *FAST, "--out", str(tmp_path / "f" / "run")],
         r"f is a file, not a folder"),
        (["validate", str(tmp_path / "c.yaml")], r"c\.yaml is a folder"),
        (["export", str(pruned_run), "--onnx", str(tmp_path / "m.onnx")], r"is an idprior run folder"),
    ]
    for argv, pattern in cases:
        _refused(capsys, argv, pattern)
    capsys.readouterr()  # --out on /proc: one line (the probe), not also "not enough disk space (0 B free)"
    assert main(["prune", "--model", str(bert), "--data", str(data), *FAST, "--out", "/proc/idprior_run"]) == 2
    errors = [x for x in capsys.readouterr().err.splitlines() if x.startswith("idprior: error:")]
    assert len(errors) == 1 and "cannot be written" in errors[0], errors
    with pytest.raises(IdpriorError, match=r"/dev/null is not a regular file"):
        load_task("custom", data_files={"train": "/dev/null"})
    comment = tmp_path / "c.csv"
    comment.write_text("# my reviews\n" + data.read_text())
    with pytest.raises(IdpriorError, match=r"line 1 \('# my reviews'\) is a comment, not a header"):
        load_task("custom", data_files={"train": str(comment)})
