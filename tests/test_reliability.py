"""Reliability: clear errors for bad input, nothing half-written, resume after a crash, determinism.

* Every bad input in `CASES` gives exit code 2, a one-line message naming the problem, no
  traceback, and writes nothing (an occupied --out is left byte-for-byte as it was).
* A run killed with SIGKILL (inside a checkpoint write, after scoring, while a model folder is
  being saved, or from outside at a random moment) and rerun with --resume ends with the same
  plan.json, metrics.json, training log and weights as a run that was never interrupted.
* Training resumed mid-epoch gives bit-identical weights; NaN/inf losses and scores stop with a
  message that names the step or the unit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tokenize
from dataclasses import dataclass
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from idprior import io
from idprior.cli.main import build_parser, main
from tiny_folder import make_tiny_bert_folder

REST = ["--max-train", "48", "--max-eval", "24", "--epochs", "1", "--batch-size", "16", "--max-length", "24",
        "--calib-size", "32", "--recover-epochs", "1", "--no-bench"]
SRC = Path(__file__).resolve().parents[1] / "src" / "idprior"


# ---- model folders ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A good tiny BERT folder and one broken copy of it per way a model folder can be bad."""
    root = tmp_path_factory.mktemp("models")
    good = make_tiny_bert_folder(root / "good")
    f = {"good": good, "one_layer": make_tiny_bert_folder(root / "one_layer", layers=1)}

    def copy(name: str, drop=()) -> Path:
        dst = root / name
        shutil.copytree(good, dst, ignore=lambda d, names: [n for n in names if n in drop])
        f[name] = dst
        return dst

    weights = good / "model.safetensors"
    data = weights.read_bytes()
    (copy("truncated") / "model.safetensors").write_bytes(data[: len(data) // 2])
    (copy("garbage") / "model.safetensors").write_bytes(os.urandom(4096))
    torch.save({"w": torch.zeros(2)}, copy("pickled", drop=("model.safetensors",)) / "pytorch_model.bin")
    copy("no_weights", drop=("model.safetensors",))
    copy("no_tokenizer", drop=("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    for name, edit in {"unknown_type": lambda c: c | {"model_type": "t5"},
                       "no_model_type": lambda c: {k: v for k, v in c.items() if k != "model_type"}}.items():
        cfg = json.loads((good / "config.json").read_text())
        (copy(name) / "config.json").write_text(json.dumps(edit(cfg)))
    (copy("bad_json") / "config.json").write_text("{not json")
    (root / "empty").mkdir()
    f["empty"] = root / "empty"
    (root / "notes.txt").write_text("not a model")
    f["file"] = root / "notes.txt"
    f["no_attention"] = _pruned_without_attention(good, root / "no_attention")
    nan = copy("nan_weights")
    state = load_file(str(nan / "model.safetensors"))
    state["bert.encoder.layer.1.output.dense.weight"][0, 0] = float("nan")
    save_file(state, str(nan / "model.safetensors"), metadata={"format": "pt"})
    return f


def _pruned_without_attention(good: Path, dst: Path) -> Path:
    from idprior.model import load as models
    from idprior.model.surgery import apply_plan, save_pruned

    model, tok = models.load(str(good))
    apply_plan(model, ["attn:0", "attn:1"])
    return save_pruned(model, tok, dst)


# ---- the table of bad inputs -------------------------------------------------------------------------

@dataclass
class Env:
    tmp: Path
    out: Path
    f: dict[str, Path]
    monkeypatch: pytest.MonkeyPatch

    def file(self, name: str, text: str | bytes) -> str:
        path = self.tmp / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text, encoding="utf-8")
        return str(path)


def prune(e: Env, *extra: str, model: str | None = None, task: str = "rt-polarity") -> list[str]:
    return ["prune", "--model", model or str(e.f["good"]), "--task", task, *REST, *extra]


def custom(e: Env, train: str, *extra: str, text: str = "text", label: str = "label") -> list[str]:
    return prune(e, "--data", train, "--text-column", text, "--label-column", label, *extra, task="custom")


ROWS = "text,label\n" + "".join(f"{w} film number {i},{'pos' if i % 2 else 'neg'}\n"
                                for i, w in enumerate(["good", "bad", "dull", "great"] * 10))


def started_run(e: Env, argv: list[str], extra_files: bool = True) -> None:
    """Make e.out look like a run started with `argv` (stages.json and config.yaml, as Run writes)."""
    from idprior.cli.common import config_from_args
    from idprior.config import CONFIG_VERSION, dump_config, resume_key
    from idprior.pipeline.stages import resolved

    cfg = resolved(config_from_args(build_parser().parse_args([*argv, "--out", str(e.out)])))
    e.out.mkdir(parents=True)
    (e.out / "stages.json").write_text(json.dumps({"version": CONFIG_VERSION, "config": resume_key(cfg),
                                                   "stages": {"finetune": {"wall_s": 1.0}}}))
    (e.out / "config.yaml").write_text(dump_config(cfg))
    if extra_files:
        (e.out / "scores.json").write_text("{}")


def occupied(e: Env) -> list[str]:
    started_run(e, prune(e, "--target", "0.4"))
    return prune(e, "--target", "0.4")


def resume_other_config(e: Env) -> list[str]:
    started_run(e, prune(e, "--target", "0.4"))
    return prune(e, "--target", "0.3", "--resume")


def not_a_run(e: Env) -> list[str]:
    e.out.mkdir()
    (e.out / "holiday.jpg").write_bytes(b"\xff\xd8")
    return prune(e, "--resume")


def full_disk(e: Env) -> list[str]:
    e.monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=10**6, used=10**6 - 1000, free=1000))
    return prune(e)


def overwrite_own_model(e: Env) -> list[str]:
    shutil.copytree(e.f["good"], e.out / "model")
    return prune(e, "--overwrite", model=str(e.out / "model"))


def out_is_file(e: Env) -> list[str]:
    e.out.write_text("x")
    return prune(e)


CASES: list[tuple[str, object, tuple[str, ...]]] = [
    # the model
    ("missing-folder", lambda e: prune(e, model=str(e.tmp / "nope")), (r"model '.*nope' not found",)),
    ("hub-name", lambda e: prune(e, model="bert-base-uncased"), (r"not found.*never downloads",)),
    ("hub-id", lambda e: prune(e, model="google/bert_uncased_L-2_H-128_A-2"), (r"looks like a Hugging Face hub id.*offline",)),
    ("empty-folder", lambda e: prune(e, model=str(e.f["empty"])), (r"has no config\.json",)),
    ("model-is-a-text-file", lambda e: prune(e, model=str(e.f["file"])), (r"not a model folder or a \.gguf file",)),
    ("config-not-json", lambda e: prune(e, model=str(e.f["bad_json"])), (r"config\.json is not valid JSON",)),
    ("config-without-model-type", lambda e: prune(e, model=str(e.f["no_model_type"])), (r"has no model_type",)),
    ("unsupported-architecture", lambda e: prune(e, model=str(e.f["unknown_type"])),
     (r"'t5' model, which idprior cannot prune; supported model types: .*bert.*gpt2.*llama",)),
    ("pickled-weights-only", lambda e: prune(e, model=str(e.f["pickled"])), (r"only pickled weights \(pytorch_model\.bin\).*safetensors only",)),
    ("no-weights", lambda e: prune(e, model=str(e.f["no_weights"])), (r"has no \*\.safetensors weights",)),
    ("truncated-safetensors", lambda e: prune(e, model=str(e.f["truncated"])), (r"model\.safetensors is corrupt or truncated",)),
    ("garbage-safetensors", lambda e: prune(e, model=str(e.f["garbage"])), (r"model\.safetensors is corrupt or truncated",)),
    ("no-tokenizer", lambda e: prune(e, model=str(e.f["no_tokenizer"])), (r"has no tokenizer",)),
    ("head-does-not-fit-task", lambda e: prune(e, task="r8"), (r"task head with 2 outputs but task r8 needs 8 labels",)),
    ("lm-task-on-encoder", lambda e: prune(e, task="lm-rt"), (r"lm-rt is language modelling, which needs a decoder",)),
    # the config
    ("unknown-key", lambda e: prune(e, "--set", "train.epoch=3"), (r"unknown config key 'train\.epoch' \(did you mean train\.epochs\?\)",)),
    ("target-above-1", lambda e: prune(e, "--target", "1.5"), (r"prune\.target must be in \(0, 1\).*got 1\.5",)),
    ("target-0", lambda e: prune(e, "--target", "0"), (r"prune\.target must be in \(0, 1\)",)),
    ("target-nan", lambda e: prune(e, "--target", ".nan"), (r"prune\.target must be in \(0, 1\).*nan",)),
    ("target-not-a-number", lambda e: prune(e, "--target", "half"), (r"prune\.target must be float, got 'half'",)),
    ("gamma-negative", lambda e: prune(e, "--set", "prune.prior_gamma=-1"), (r"prune\.prior_gamma must be in \[0, 4\], got -1",)),
    ("epochs-negative", lambda e: prune(e, "--epochs", "-1"), (r"train\.epochs must be >= 0, got -1",)),
    ("recover-epochs-negative", lambda e: prune(e, "--recover-epochs", "-1"), (r"recover\.epochs must be >= 0",)),
    ("lr-not-a-number", lambda e: prune(e, "--lr", "fast"), (r"train\.lr must be float, got 'fast'",)),
    ("batch-size-0", lambda e: prune(e, "--batch-size", "0"), (r"train\.batch_size must be >= 1",)),
    ("batch-size-fraction", lambda e: prune(e, "--batch-size", "2.5"), (r"train\.batch_size must be int, got 2\.5",)),
    ("kinds-bogus", lambda e: prune(e, "--kinds", "bogus"), (r"prune\.kinds must be a comma list of head, attn, ffn, neuron",)),
    ("measure-bogus", lambda e: prune(e, "--measure", "params"), (r"prune\.measure must be one of",)),
    ("selection-bogus", lambda e: prune(e, "--selection", "best"), (r"prune\.selection must be one of",)),
    ("share-without-head-share", lambda e: prune(e, "--selection", "share"), (r"needs prune\.head_share",)),
    ("tau-negative", lambda e: prune(e, "--tau", "-0.1"), (r"prune\.tau must be >= 0",)),
    ("max-length-too-small", lambda e: prune(e, "--max-length", "4"), (r"data\.max_length must be >= 8",)),
    ("calib-size-0", lambda e: prune(e, "--calib-size", "0"), (r"prune\.calib_size must be >= 1",)),
    ("dtype-bogus", lambda e: prune(e, "--dtype", "int8"), (r"model\.dtype must be one of float32, bfloat16, float16",)),
    ("override-without-value", lambda e: prune(e, "--set", "train.lr"), (r"override 'train\.lr': write key=value",)),
    ("several-config-problems", lambda e: prune(e, "--target", "1.5", "--calib-size", "0", "--epochs", "-1"),
     (r"prune\.target must be", r"prune\.calib_size must be", r"train\.epochs must be")),
    ("unknown-method", lambda e: prune(e, "--method", "snipp"), (r"unknown method 'snipp' \(did you mean 'snip'\?\)",)),
    ("tau-with-a-baseline", lambda e: prune(e, "--method", "random", "--tau", "0.1"), (r"takes --target only",)),
    ("unknown-preset", lambda e: prune(e, "--config", "nosuch"), (r"unknown preset 'nosuch'",)),
    ("preset-typo", lambda e: prune(e, "--config", "dem"), (r"unknown preset 'dem' \(did you mean 'demo'\?\)",)),
    ("config-file-missing", lambda e: prune(e, "--config", str(e.tmp / "none.yaml")), (r"config file .*none\.yaml not found",)),
    ("bad-yaml", lambda e: prune(e, "--config", e.file("bad.yaml", "model: [unclosed\n")), (r"bad\.yaml is not valid YAML",)),
    ("yaml-not-a-mapping", lambda e: prune(e, "--config", e.file("list.yaml", "- a\n- b\n")), (r"must hold a mapping of sections",)),
    ("yaml-unknown-section", lambda e: prune(e, "--config", e.file("typo.yaml", "modle:\n  name: x\n")),
     (r"unknown config key 'modle' \(did you mean model\?\)",)),
    ("yaml-wrong-type", lambda e: prune(e, "--config", e.file("type.yaml", "prune:\n  prior_gamma: [1, 2]\n")),
     (r"prune\.prior_gamma must be float or null, got \[1, 2\]",)),
    ("missing-flag-value", lambda e: [*prune(e), "--target"], (r"argument --target: expected one argument",)),
    ("nan-weights", lambda e: prune(e, model=str(e.f["nan_weights"])), (r"holds non-finite weights \(1 NaN/inf values",)),
    ("max-length-beyond-positions", lambda e: prune(e, "--max-length", "4096"), (r"--max-length 4096 is more than .* 128 positions",)),
    ("tau-with-target", lambda e: prune(e, "--tau", "0.1", "--target", "0.3"), (r"--tau and --target both given",)),
    ("resume-and-overwrite", lambda e: prune(e, "--resume", "--overwrite"), (r"--resume and --overwrite contradict",)),
    ("custom-mixed-numeric-labels", lambda e: custom(e, e.file("t.csv", "text,label\n" + "".join(
        f"t{i},{'NaN' if i == 3 else i * 0.37}\n" for i in range(30)))), (r"holds numbers except line 5 \('NaN'\)",)),
    # the task and its data
    ("unknown-task", lambda e: prune(e, task="rt-polarty"), (r"unknown task 'rt-polarty': did you mean 'rt-polarity'\?",)),
    ("glue-without-data-dir", lambda e: prune(e, task="sst2"), (r"GLUE task 'sst2' needs --data-dir",)),
    ("glue-data-dir-missing", lambda e: prune(e, "--data-dir", str(e.tmp / "glue"), task="sst2"), (r"GLUE folder .*glue does not exist",)),
    ("data-dir-on-offline-task", lambda e: prune(e, "--data-dir", str(e.tmp)), (r"reads its data from an installed package: drop --data-dir",)),
    ("columns-on-built-in-task", lambda e: prune(e, "--text-column", "sentence"), (r"--text-column only apply to --task custom",)),
    ("custom-without-data", lambda e: prune(e, task="custom"), (r"task 'custom' needs a training file: pass --data FILE",)),
    ("custom-file-missing", lambda e: custom(e, str(e.tmp / "none.csv")), (r"data file .*none\.csv does not exist",)),
    ("custom-missing-column", lambda e: custom(e, e.file("t.csv", ROWS.replace("text,", "sentence,", 1))),
     (r"t\.csv line 2 has no column 'text' \(it has 'sentence', 'label'\)",)),
    ("custom-header-only", lambda e: custom(e, e.file("t.csv", "text,label\n")), (r"t\.csv has no rows",)),
    ("custom-empty-file", lambda e: custom(e, e.file("t.csv", "")), (r"t\.csv has no rows",)),
    ("custom-single-class", lambda e: custom(e, e.file("t.csv", ROWS.replace(",neg", ",pos"))), (r"single label \('pos'\)",)),
    ("custom-test-label-not-in-train",
     lambda e: custom(e, e.file("t.csv", ROWS), "--data-test", e.file("test.csv", "text,label\nfine,pos\nodd,meh\n")),
     (r"test\.csv has label\(s\) 'meh' .* that the training file lacks",)),
    ("custom-unknown-format", lambda e: custom(e, e.file("t.xlsx", ROWS)), (r"unknown format '\.xlsx'",)),
    ("custom-too-few-rows", lambda e: custom(e, e.file("t.csv", "text,label\na,x\nb,y\n")), (r"split '\w+' is empty",)),
    ("custom-bad-jsonl", lambda e: custom(e, e.file("t.jsonl", '{"text": "a", "label": 1}\n{oops\n')), (r"t\.jsonl line 2 is not valid JSON",)),
    ("custom-not-utf8", lambda e: custom(e, e.file("t.csv", b"text,label\n\xff\xfe bad bytes,pos\n")), (r"cannot read the data .*UnicodeDecodeError",)),
    ("custom-missing-label", lambda e: custom(e, e.file("t.csv", ROWS + "orphan text,\n")), (r"has no label in column 'label'",)),
    # kinds and target against the model
    ("target-out-of-reach", lambda e: prune(e, "--target", "0.99"), (r"prune\.target 0\.99 is out of reach: with kinds head,neuron at most",)),
    ("kinds-attn-on-one-layer", lambda e: prune(e, "--kinds", "attn", model=str(e.f["one_layer"])), (r"at most 0\.0% of encoder_params",)),
    ("kinds-head-without-attention", lambda e: prune(e, "--kinds", "head", model=str(e.f["no_attention"])),
     (r"--kinds head: .* has no attention sub-layers left",)),
    # the output folder
    ("occupied-out", occupied, (r"holds another run; pass --resume .* --overwrite",)),
    ("non-empty-out", lambda e: (e.out.mkdir(), (e.out / "a.txt").write_text("mine"), prune(e))[-1], (r"output folder .* is not empty",)),
    ("resume-with-another-config", resume_other_config, (r"--resume: .* different config \(prune\.target differ\)",)),
    ("resume-into-a-non-run", not_a_run, (r"--resume: .* holds no idprior run",)),
    ("out-is-a-file", out_is_file, (r"output folder .* is a file",)),
    ("overwrite-would-delete-the-model", overwrite_own_model, (r"--overwrite would delete the model",)),
    ("not-enough-disk", full_disk, (r"not enough disk space .* 1\.0 KB free",)),
    # finetune and validate share the checks
    ("finetune-missing-model", lambda e: ["finetune", "--model", str(e.tmp / "nope"), "--task", "rt-polarity"], (r"not found",)),
    ("finetune-head-mismatch", lambda e: ["finetune", "--model", str(e.f["good"]), "--task", "bbc"], (r"needs 5 labels",)),
    ("validate-bad-field", lambda e: ["validate", "demo", "--set", "prune.prior_gamma=-2"], (r"prune\.prior_gamma must be in \[0, 4\]",)),
    # problems of different sources, all in one report
    ("model-task-and-out-at-once", lambda e: (started_run(e, prune(e)), prune(e, model=str(e.f["pickled"]), task="subjj"))[-1],
     (r"only pickled weights", r"unknown task 'subjj'", r"holds another run")),
]


def _snapshot(path: Path):
    """Every file under `path` with its bytes (None when `path` does not exist)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_there_are_at_least_40_bad_inputs():
    assert len(CASES) >= 40
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exit_2_one_line_nothing_written(case, folders, tmp_path, monkeypatch, capsys):
    name, make, patterns = case
    env = Env(tmp=tmp_path, out=tmp_path / "out", f=folders, monkeypatch=monkeypatch)
    argv = make(env)
    if argv[0] in ("prune", "finetune") and "--out" not in argv:
        argv = [*argv, "--out", str(env.out)]
    before = _snapshot(env.out)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    for pattern in patterns:
        assert re.search(pattern, err), f"{pattern!r} not in:\n{err}"
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if re.match(r"idprior( \w+)?: error: ", line)]
    assert len(lines) >= len(patterns)  # one line per problem
    assert _snapshot(env.out) == before  # nothing written: no --out folder, or an occupied one untouched


def test_debug_shows_the_traceback(folders, tmp_path):
    from idprior.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "prune", "--model", str(folders["truncated"]), "--task", "rt-polarity", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


# ---- determinism -------------------------------------------------------------------------------------

def test_same_seed_same_plan_bytes_metrics_and_weights(folders, tmp_path):
    args = ["prune", "--model", str(folders["good"]), "--task", "rt-polarity", *REST, "--target", "0.3"]
    for name in ("a", "b"):
        assert main([*args, "--out", str(tmp_path / name)]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "plan.json").read_bytes() == (b / "plan.json").read_bytes()
    assert (a / "scores.json").read_bytes() == (b / "scores.json").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    ma["model"] = mb["model"] = None
    assert ma == mb
    _assert_same_weights(a / "pruned", b / "pruned")


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ---- kill and resume -----------------------------------------------------------------------------------

DRIVER = r'''
"""Run the idprior CLI; IDPRIOR_TEST_KILL makes the process SIGKILL itself at a chosen point."""
import contextlib, os, signal, sys
import torch
torch.set_num_threads(1)
from idprior import io
from idprior.model import surgery
from idprior.pipeline import stages as pipeline
from idprior.cli.main import main

point, count = os.environ.get("IDPRIOR_TEST_KILL", ""), [0]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("checkpoint:"):  # inside the n-th checkpoint write: weights written, state.json not yet
    real_write_json = io.write_json
    def write_json(path, obj):
        if os.path.basename(str(path)) == "state.json":
            count[0] += 1
            if count[0] == int(point.split(":")[1]):
                die()
        real_write_json(path, obj)
    io.write_json = write_json
elif point == "after-score":  # scores.json written and the stage recorded, selection not started
    pipeline.STAGE_FNS["select"] = lambda run: die()
elif point.startswith("saving:"):  # the n-th model folder is complete in its temp folder, not yet renamed
    real_atomic_dir = surgery.atomic_dir
    @contextlib.contextmanager
    def atomic_dir(path):
        with real_atomic_dir(path) as tmp:
            yield tmp
            count[0] += 1
            if count[0] == int(point.split(":")[1]):
                die()
    surgery.atomic_dir = atomic_dir
sys.exit(main(sys.argv[1:]))
'''

KILL_ARGS = ["--task", "rt-polarity", "--max-train", "160", "--max-eval", "24", "--epochs", "2", "--batch-size", "16",
             "--max-length", "24", "--calib-size", "32", "--recover-epochs", "1", "--no-bench", "--target", "0.3",
             "--set", "train.checkpoint_every=3", "--set", "recover.checkpoint_every=3"]


def _cli(tmp: Path, argv: list[str], kill: str = "", popen: bool = False):
    driver = tmp / "driver.py"
    if not driver.exists():
        driver.write_text(DRIVER)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", IDPRIOR_TEST_KILL=kill,
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, str(driver), *argv]
    if popen:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(folders, tmp_path_factory) -> Path:
    """An uninterrupted run, in a subprocess like the killed ones."""
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "run"
    r = _cli(tmp, ["prune", "--model", str(folders["good"]), *KILL_ARGS, "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def _assert_same_run(got: Path, ref: Path) -> None:
    assert (got / "plan.json").read_bytes() == (ref / "plan.json").read_bytes()
    assert (got / "scores.json").read_bytes() == (ref / "scores.json").read_bytes()
    mg, mr = (json.loads((d / "metrics.json").read_text()) for d in (got, ref))
    for split in mr["pruned"]:  # the quality numbers, exactly
        for kind in ("dense", "pruned_no_recovery", "pruned"):
            assert mg[kind][split] == mr[kind][split], (kind, split)
    assert mg == mr
    for log in ("train_log.jsonl", "recover_log.jsonl"):  # resumed steps are logged once, identically
        assert (got / log).read_text() == (ref / log).read_text(), log
    sg, sr = (json.loads((d / "stages.json").read_text())["stages"] for d in (got, ref))
    assert sg["finetune"]["history"] == sr["finetune"]["history"]
    for folder in ("finetuned", "surgery", "pruned"):
        _assert_same_weights(got / folder, ref / folder)
    leftovers = [p.name for p in got.iterdir() if p.name.startswith(".") or p.name.startswith("ckpt")]
    assert leftovers == []


def _kill_and_resume(folders, tmp: Path, kill: str) -> Path:
    out = tmp / "run"
    argv = ["prune", "--model", str(folders["good"]), *KILL_ARGS, "--out", str(out)]
    killed = _cli(tmp, argv, kill=kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _cli(tmp, [*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return out


def test_kill_inside_a_mid_epoch_checkpoint_then_resume(folders, reference, tmp_path):
    """Killed while writing the 3rd fine-tuning checkpoint (step 9 of 10 in epoch 1): the partial
    checkpoint is ignored, training continues from step 6 and ends exactly where the reference did."""
    _assert_same_run(_kill_and_resume(folders, tmp_path, "checkpoint:3"), reference)


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["checkpoint:5", "after-score", "saving:2", "saving:3", "checkpoint:9"])
def test_kill_at_other_points_then_resume(folders, reference, tmp_path, kill):
    """checkpoint:5 is the 2nd epoch; saving:2 / saving:3 kill while surgery/ and pruned/ are being
    written; checkpoint:9 is inside a recovery checkpoint."""
    _assert_same_run(_kill_and_resume(folders, tmp_path, kill), reference)


@pytest.mark.slow
def test_external_sigkill_during_training_then_resume(folders, reference, tmp_path):
    """SIGKILL from outside as soon as the first fine-tuning checkpoint exists (polling the folder)."""
    out = tmp_path / "run"
    argv = ["prune", "--model", str(folders["good"]), *KILL_ARGS, "--out", str(out)]
    proc = _cli(tmp_path, argv, popen=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any((out / "ckpt_finetune").glob("e*-s*")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    resumed = _cli(tmp_path, [*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_run(out, reference)


# ---- training: resume, checkpoints, numerical guards ------------------------------------------------------

class _Stop(Exception):
    pass


def _tiny_training(ckpt: Path, *, stop_at: int | None = None, resume: bool = False, nan_at: int | None = None):
    """Tiny BERT with dropout, spectral norm and the identity prior (as `idprior prune` builds it), 2 epochs of
    5 batches; `stop_at` raises in step `stop_at`'s loss (a crash), `nan_at` makes that step's loss NaN."""
    from torch.utils.data import DataLoader

    from idprior.arch import get_adapter
    from idprior.config import PruneConfig, TrainConfig, recipe_for
    from idprior.method import spectral
    from idprior.method.proximal import build_prior
    from idprior.pipeline.train import train
    from tiny_models import tiny_bert

    torch.manual_seed(0)
    model = tiny_bert()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    adapter = get_adapter(model)
    spectral.attach(model, adapter)
    prior, _ = build_prior(recipe_for(PruneConfig(target=0.3), adapter.recipe), model, adapter)

    def extra(model, batch, step, total):
        if step == stop_at:
            raise _Stop
        return torch.tensor(float("nan") if step == nan_at else 0.0), {}

    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 100, (40, 12), generator=g), torch.randint(0, 3, (40,), generator=g)
    data = [{"input_ids": x[i], "labels": y[i]} for i in range(40)]
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-3, checkpoint_every=2)
    result = train(model, loader, cfg, seed=3, eval_fn=lambda m: {"neg_loss": 0.0}, extra_loss=extra, post_step=prior,
                   ckpt_dir=ckpt, resume=resume, log_path=ckpt.parent / "log.jsonl")
    return {k: v.clone() for k, v in model.state_dict().items()}, result


def test_resumed_mid_epoch_training_gives_identical_weights(tmp_path):
    ref, ref_result = _tiny_training(tmp_path / "ref" / "ckpt")
    for stop in (3, 7):  # mid-epoch 1 (last checkpoint at step 2), mid-epoch 2 (step 6)
        ckpt = tmp_path / f"stop{stop}" / "ckpt"
        with pytest.raises(_Stop):
            _tiny_training(ckpt, stop_at=stop)
        got, result = _tiny_training(ckpt, resume=True)
        assert got.keys() == ref.keys()
        assert all(torch.equal(got[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(got[k], ref[k])]
        assert result.history == ref_result.history
        assert (ckpt.parent / "log.jsonl").read_text() == (tmp_path / "ref" / "log.jsonl").read_text()


def test_train_state_reads_the_earlier_state_json():
    """state.json of earlier versions (a plain dict; running sums only mid-epoch; hook state and RNG
    beside the progress) still resumes: the running sums default to an epoch start."""
    from idprior.pipeline.train import TrainState

    epoch_end = {"epoch": 1, "step_in_epoch": 0, "global_step": 5, "best_metric": 0.5, "best_epoch": 1,
                 "history": [{"epoch": 1}], "post_step": {"lam": 0.1}, "rng": {"python": []}}
    state = TrainState.from_json(epoch_end)
    assert (state.epoch, state.global_step, state.best_epoch, state.epoch_sums, state.epoch_count) == (1, 5, 1, {}, 0)
    mid = TrainState.from_json({**epoch_end, "step_in_epoch": 2, "epoch_sums": {"task_loss": 2.0}, "epoch_count": 2})
    assert (mid.step_in_epoch, mid.epoch_sums, mid.epoch_count) == (2, {"task_loss": 2.0}, 2)
    assert TrainState.from_json(mid.to_json()) == mid


def test_checkpoint_holds_spectral_norm_vectors_and_is_all_or_nothing(tmp_path, monkeypatch):
    from idprior.pipeline import train as train_mod

    ckpt = tmp_path / "run" / "ckpt"
    real = io.write_json
    calls = []

    def failing_write_json(path, obj):  # the 2nd checkpoint dies after its weights, before state.json
        if Path(path).name == "state.json":
            calls.append(path)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(io, "write_json", failing_write_json)
    with pytest.raises(KeyboardInterrupt):
        _tiny_training(ckpt)
    monkeypatch.setattr(io, "write_json", real)
    last = train_mod.latest_checkpoint(ckpt)
    assert last is not None and last.name == "e0000-s0000002"  # the complete one, not the interrupted one
    assert sorted(p.name for p in ckpt.iterdir()) == ["e0000-s0000002"]  # the temp folder was cleaned up
    keys = load_file(str(last / "model.safetensors")).keys()
    assert any(k.endswith("parametrizations.weight.0.u") for k in keys)
    assert any(k.endswith("parametrizations.weight.0.v") for k in keys)
    assert json.loads((last / "state.json").read_text())["global_step"] == 2
    # no pickle: the optimizer's tensors are safetensors (Adam's moments for every trained parameter)
    assert sorted(p.name for p in last.iterdir() if p.suffix not in (".json", ".safetensors")) == []
    opt_keys = load_file(str(last / "optimizer.safetensors")).keys()
    assert any(k.endswith(".exp_avg_sq") for k in opt_keys) and any(k.endswith(".exp_avg") for k in opt_keys)


def test_a_checkpoint_with_a_pickled_optimizer_is_refused_with_the_fix(tmp_path):
    """Checkpoints of older versions kept the optimizer in a pickle (`optimizer.pt`); idprior no longer
    reads pickles, so resuming one says to start over instead of loading it."""
    from idprior.errors import IdpriorError
    from idprior.pipeline.train import latest_checkpoint

    ckpt = tmp_path / "run" / "ckpt"
    with pytest.raises(_Stop):
        _tiny_training(ckpt, stop_at=3)
    last = latest_checkpoint(ckpt)
    (last / "optimizer.safetensors").rename(last / "optimizer.pt")
    with pytest.raises(IdpriorError, match="older idprior.*--overwrite"):
        _tiny_training(ckpt, resume=True)


def test_nonfinite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from idprior.pipeline.train import NonFiniteLoss, latest_checkpoint

    ckpt = tmp_path / "run" / "ckpt"
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 7/10 \(epoch 2, .*lower the learning rate"):
        _tiny_training(ckpt, nan_at=6)  # the 7th step; checkpoints after steps 2, 4, 5 (epoch end) and 6
    last = latest_checkpoint(ckpt)
    assert json.loads((last / "state.json").read_text())["global_step"] == 6
    state = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nonfinite_scores_stop_with_the_unit_and_cause(folders, tmp_path, capsys, monkeypatch):
    """Preflight refuses NaN weights in the model folder (tests/test_inputs.py); with that check off,
    as for a fine-tune that diverged, scoring is the guard that stops the run."""
    from idprior.pipeline import preflight

    monkeypatch.setattr(preflight, "check_finite_weights", lambda info: [])
    out = tmp_path / "out"
    rest = [a for i, a in enumerate(REST) if "--epochs" not in REST[max(0, i - 1):i + 1]]  # --no-train: no epochs
    rc = main(["prune", "--model", str(folders["nan_weights"]), "--task", "rt-polarity", *rest, "--no-train",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(r"function norm of (ffn|neuron unit \d+) of layer 1 is nan .*diverged fine-tune.*--dtype float32", err), err
    assert "Traceback" not in err
    assert not (out / "scores.json").exists()


# ---- files ------------------------------------------------------------------------------------------------

def test_atomic_writes_leave_nothing_half_written(tmp_path):
    target = tmp_path / "a.json"
    io.write_json(target, {"v": 1})

    def broken(tmp):
        tmp.write_text('{"v": ')
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        io.write_with(target, broken)
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not tempfile's owner-only 0600

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("x")
    io.copy_dir(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "sub" / "f.txt").read_text() == "x"
    (tmp_path / ".dst.abc.tmp").mkdir()
    (tmp_path / ".plan.json.xyz.tmp").write_text("{")
    gone = io.remove_leftovers(tmp_path)
    assert sorted(p.name for p in gone) == [".dst.abc.tmp", ".plan.json.xyz.tmp"]


def test_every_write_goes_through_io():
    """No module writes files directly: only io.py opens files for writing or renames into place.
    (Append-only JSONL logs are the exception: whole rows, and readers skip a torn last line; so are
    the kernel's control files under /proc, which are settings, not files, and take no rename.)"""
    direct = re.compile(r"open\([^)]*[\"']wb?[\"']|\.write_text\(|\.write_bytes\(|json\.dump\(|torch\.save\(|"
                        r"save_file\(|savefig\(|copytree\(|os\.replace\(|os\.rename\(")
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "io.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if direct.search(line) and "io." not in line and "tmp" not in line and 'Path("/proc/' not in line:
                offenders.append(f"{path.relative_to(SRC)}:{n}: {line.strip()}")
    assert offenders == []


def _code_only(text: str) -> str:
    """The source's tokens without strings and comments (a model card may tell users to pass
    trust_remote_code; idprior's own code must never pass it)."""
    skip = {tokenize.STRING, tokenize.COMMENT, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    return " ".join(t.string for t in tokenize.generate_tokens(StringIO(text).readline) if t.type not in skip)


def test_no_pickle_and_no_remote_code():
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert "import pickle" not in text and "pickle.load" not in text, path.name
        assert not re.search(r"trust_remote_code\s*=\s*True", _code_only(text)), path.name


def test_preflight_accepts_a_good_config_and_writes_nothing(folders, tmp_path):
    from idprior.cli.common import config_from_args
    from idprior.pipeline.preflight import preflight

    out = tmp_path / "out"
    args = build_parser().parse_args(["prune", "--model", str(folders["good"]), "--task", "rt-polarity", *REST,
                                      "--out", str(out)])
    preflight(config_from_args(args))
    assert not out.exists()
