"""Nothing silently wrong (issue 31): idprior replaces only what it wrote, `idprior bench` checks
its output and its models, and preflight checks what needs the model before anything is written.

* A. `prune`/`finetune --overwrite`, `evaluate`/`bench`/`report --out` never delete or overwrite a
  user's files: one `idprior: error:` line naming them, exit code 2, every byte kept; what idprior
  wrote itself (a run folder, a marked output file) is still replaced (`io.check_owned`).
* B. `idprior bench --out` onto a file or an unwritable place, and a pruned model that is not a
  narrowing of the dense one, are refused before anything is timed or written.
* C. `--protect-first/--protect-last` beyond the model's layers is refused by preflight (no run
  folder appears), and `--resume` runs the free-disk check too.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from idprior import io
from idprior.cli.main import build_parser, main
from idprior.errors import IdpriorError
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_folder import make_tiny_bert_folder

FAST = ["--max-train", "40", "--max-eval", "16", "--batch-size", "16", "--max-length", "24", "--calib-size", "16",
        "--no-train", "--recover-epochs", "0", "--no-bench", "--target", "0.3"]
TRAIN = ["--max-train", "32", "--max-eval", "16", "--epochs", "1", "--batch-size", "16", "--max-length", "24",
         "--calib-size", "16", "--recover-epochs", "1", "--no-bench", "--target", "0.3"]
BENCH = ["--batch-sizes", "1", "--seq-lens", "8", "--repeats", "1", "--warmup", "0", "--threads", "1", "--no-onnx",
         "--retime-rounds", "0"]
WORDS = ["good", "bad", "dull", "great", "fun", "boring"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny 2-layer BERT, a 4-layer one, a tiny GPT-2, and a pruned copy of the 2-layer BERT."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from idprior.model.surgery import apply_plan, save_pruned

    root = tmp_path_factory.mktemp("models")
    good = make_tiny_bert_folder(root / "good")
    model = BertForSequenceClassification.from_pretrained(str(good)).eval()
    apply_plan(model, ["head:0:1", "neuron:1:3"])
    pruned = save_pruned(model, AutoTokenizer.from_pretrained(str(good)), root / "pruned")
    return {"good": good, "pruned": pruned, "deep": make_tiny_bert_folder(root / "deep", layers=4),
            "gpt2": make_tiny_decoder_folder(root / "gpt2", family="gpt2")}


@pytest.fixture
def data(tmp_path) -> str:
    path = tmp_path / "reviews.csv"
    rows = [f"{WORDS[i % len(WORDS)]} film number {i},{'pos' if i % 2 else 'neg'}" for i in range(60)]
    path.write_text("\n".join(["text,label", *rows]) + "\n", encoding="utf-8")
    return str(path)


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "thesis").mkdir()
    (path / "thesis" / "chapter1.tex").write_text("\\chapter{One}")
    return path


def _snapshot(path: Path):
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _refused(argv: list[str], capsys, pattern: str) -> str:
    """Exit code 2, one `idprior: error:` line matching `pattern`, no traceback."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.startswith("idprior: error: ")]
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    return lines[0]


# ---- A: user files are never deleted or overwritten ---------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "finetune"])
def test_overwrite_keeps_a_folder_that_is_not_an_idprior_run(command, models, data, tmp_path, capsys):
    user = _user_folder(tmp_path / "mine")
    before = _snapshot(user)
    flags = FAST if command == "prune" else ["--max-train", "40", "--max-eval", "16", "--epochs", "1", "--max-length", "24"]
    argv = [command, "--model", str(models["good"]), "--data", data, *flags, "--out", str(user), "--overwrite"]
    line = _refused(argv, capsys, r"mine holds files idprior did not write \(notes\.txt, thesis\), so it is not "
                                  r"replaced; --overwrite deletes only an idprior run: choose another --out")
    assert "remove those files yourself" in line
    assert _snapshot(user) == before

    # the run folder itself refuses too, for a caller that skipped preflight
    from idprior.cli.common import config_from_args
    from idprior.pipeline.stages import Run

    cfg = config_from_args(build_parser().parse_args(["prune", "--model", str(models["good"]), "--out", str(user)]))
    with pytest.raises(IdpriorError, match=r"holds files idprior did not write \(notes\.txt, thesis\)"):
        Run(cfg, overwrite=True)
    assert _snapshot(user) == before


def test_overwrite_replaces_a_run_but_not_the_files_added_to_it(models, data, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["prune", "--model", str(models["good"]), "--data", data, *TRAIN, "--out", str(out)]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert {"stages.json", "config.yaml", "train_log.jsonl", "recover_log.jsonl", "pruned", "report.md"} <= set(names)
    assert io.folder_owner(out) == ("run", [])  # every name a run writes is known as the run's

    (out / "thesis.pdf").write_bytes(b"%PDF-1.4 mine")
    before = _snapshot(out)
    _refused([*argv, "--overwrite"], capsys, r"run holds files idprior did not write \(thesis\.pdf\)")
    assert _snapshot(out) == before

    (out / "thesis.pdf").unlink()
    assert main([*argv, "--overwrite"]) == 0  # an idprior run is still replaced
    assert sorted(p.name for p in out.iterdir()) == names


def test_evaluate_out_replaces_only_its_own_metrics(models, data, tmp_path, capsys):
    base = ["evaluate", str(models["pruned"]), "--data", data, "--max-length", "24"]
    user = tmp_path / "results"
    user.mkdir()
    (user / "metrics.json").write_text('{"my_model": {"f1": 0.91}}')
    _refused([*base, "--out", str(user)], capsys,
             r"results/metrics\.json exists and was not written by idprior evaluate, so it is not replaced; "
             r"choose another --out, or remove it yourself")
    assert json.loads((user / "metrics.json").read_text()) == {"my_model": {"f1": 0.91}}

    ours = tmp_path / "ours"
    assert main([*base, "--out", str(ours)]) == 0
    assert main([*base, "--out", str(ours), "--split", "validation"]) == 0  # its own output: replaced
    assert "validation" in json.loads((ours / "metrics.json").read_text())

    run = tmp_path / "run"  # a run's metrics.json is the run's, not evaluate's
    run.mkdir()
    (run / "stages.json").write_text(json.dumps({"config": {}, "stages": {"evaluate": {"wall_s": 1.0}}}))
    (run / "metrics.json").write_text('{"main_metric": "accuracy"}')
    _refused([*base, "--out", str(run)], capsys, r"metrics\.json was written by an idprior run \(prune/finetune\), "
                                                 r"not by idprior evaluate")
    assert (run / "metrics.json").read_text() == '{"main_metric": "accuracy"}'


@pytest.mark.parametrize("name", ["bench.json", "bench.md"])
def test_bench_out_replaces_only_its_own_files(name, models, tmp_path, capsys):
    base = ["bench", "--dense", str(models["good"]), "--pruned", str(models["pruned"]), *BENCH]
    user = tmp_path / "mine"
    user.mkdir()
    (user / name).write_text("my own timings\n")
    _refused([*base, "--out", str(user)], capsys, rf"mine/{re.escape(name)} exists and was not written by idprior "
                                                  r"bench, so it is not replaced")
    assert [p.name for p in user.iterdir()] == [name] and (user / name).read_text() == "my own timings\n"

    ours = tmp_path / "ours"
    assert main([*base, "--out", str(ours)]) == 0
    assert main([*base, "--out", str(ours)]) == 0  # its own files: replaced
    assert json.loads((ours / "bench.json").read_text())["rows"]


def test_report_out_replaces_only_its_own_files(tmp_path, capsys):
    metrics = {"accuracy": 0.7}
    comp = {k: {"dense": 100, "pruned": 50, "removed_fraction": 0.5}
            for k in ("encoder_params", "linear_params", "flops", "total_params")}
    row = {"key": "t1/0/snip/0.5", "task": "t1", "seed": 0, "method": "snip", "base_method": "snip", "target": 0.5,
           "variant": "plain", "model": "m", "main_metric": "accuracy", "config": {}, "versions": {}, "sizes": {},
           "dense": {"test": metrics}, "pruned_no_recovery": {"test": metrics}, "pruned": {"test": metrics},
           "compression": comp | {"seq_len": 128}, "removed": {"head": 3}, "wall_s": {"finetune": 1.0}, "cell_dir": None}
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(row) + "\n")
    out = tmp_path / "o"
    assert main(["report", str(results), "--out", str(out)]) == 0
    assert main(["report", str(results), "--out", str(out)]) == 0  # its own report and plots: replaced
    assert io.file_owner(out / "r.md") == "report" and io.file_owner(out / "r_tradeoff.png") == "report"

    for name in ("r.md", "r_walltimes.png"):
        user = tmp_path / f"user-{name}"
        user.mkdir()
        (user / name).write_bytes(b"my thesis chapter\n")
        _refused(["report", str(results), "--out", str(user)], capsys,
                 rf"{re.escape(name)} exists and was not written by idprior report, so it is not replaced")
        assert [p.name for p in user.iterdir()] == [name] and (user / name).read_bytes() == b"my thesis chapter\n"

    notes = _user_folder(tmp_path / "notes")  # a folder that is not a run: no report.md written into it
    _refused(["report", str(notes)], capsys, r"notes is not an idprior run folder")
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt", "thesis"]


# ---- B: idprior bench's output and models ---------------------------------------------------------------

def test_bench_out_that_cannot_be_written_is_refused_before_timing(models, tmp_path, capsys):
    base = ["bench", "--dense", str(models["good"]), "--pruned", str(models["pruned"]), *BENCH]
    afile = tmp_path / "afile"
    afile.write_text("mine")
    _refused([*base, "--out", str(afile)], capsys, r"--out .*afile is a file; give a folder for bench\.json")
    assert afile.read_text() == "mine"
    _refused([*base, "--out", str(afile / "b")], capsys, r"afile is a file, not a folder")
    _refused([*base, "--out", "/proc/idprior-test/b"], capsys, r"--out .* cannot be written")
    (tmp_path / "o" / "bench.json").mkdir(parents=True)
    _refused([*base, "--out", str(tmp_path / "o")], capsys, r"bench\.json is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "o"]
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["bench.json"]


@pytest.mark.parametrize("dense,why", [("gpt2", r"model type bert vs gpt2"), ("deep", r"layers 2 vs 4")])
def test_bench_refuses_a_pruned_model_that_is_not_from_the_dense_one(dense, why, models, tmp_path, capsys):
    out = tmp_path / "b"
    _refused(["bench", "--dense", str(models[dense]), "--pruned", str(models["pruned"]), *BENCH, "--out", str(out)],
             capsys, rf"--pruned .*pruned is not a pruned version of --dense .*{dense} \({why} in the dense model\), "
                     r"so a speed-up between them would mean nothing")
    assert not out.exists()


def test_bench_refuses_a_pruned_model_wider_than_the_dense_one(models):
    from transformers import BertForSequenceClassification

    from idprior.model.surgery import apply_plan
    from idprior.pipeline.bench import check_pruned_from

    dense = BertForSequenceClassification.from_pretrained(str(models["good"]))
    narrower = BertForSequenceClassification.from_pretrained(str(models["good"]))
    apply_plan(narrower, ["head:1:0", "neuron:0:5"])
    check_pruned_from(dense, narrower, "d", "p")  # a narrowing: fine
    with pytest.raises(IdpriorError, match=r"layer 0 has 64 FFN neurons, more than the dense model"):
        check_pruned_from(narrower, dense, "p", "d")


# ---- C: structure and disk checks before anything is written ---------------------------------------------

@pytest.mark.parametrize("flags,pattern", [
    (["--protect-first", "3"], r"--protect-first \(prune\.protect_first\) 3: .* has only 2 layers; protect at most 1"),
    (["--protect-last", "5"], r"--protect-last \(prune\.protect_last\) 5: .* has only 2 layers"),
    (["--protect-first", "1", "--protect-last", "1"], r"protect all 2 layers of .*, so nothing can be pruned"),
])
def test_protect_beyond_the_layers_is_refused_before_anything_is_written(flags, pattern, models, data, tmp_path, capsys):
    out = tmp_path / "out"
    _refused(["prune", "--model", str(models["good"]), "--data", data, *FAST, *flags, "--out", str(out)], capsys, pattern)
    assert not out.exists()


def test_resume_runs_the_disk_check(models, data, tmp_path, monkeypatch, capsys):
    from idprior.cli.common import config_from_args
    from idprior.config import CONFIG_VERSION, dump_config, resume_key
    from idprior.pipeline.stages import resolved

    out = tmp_path / "run"
    argv = ["prune", "--model", str(models["good"]), "--data", data, *FAST, "--out", str(out)]
    cfg = resolved(config_from_args(build_parser().parse_args(argv)))
    out.mkdir()  # a run started with these options (what Run writes first)
    (out / "stages.json").write_text(json.dumps({"version": CONFIG_VERSION, "config": resume_key(cfg), "stages": {}}))
    (out / "config.yaml").write_text(dump_config(cfg))
    before = _snapshot(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    _refused([*argv, "--resume"], capsys, r"not enough disk space for .*run: the run needs about .* less .* the run "
                                          r"already holds\) but .* has 1\.0 KB free")
    assert _snapshot(out) == before
