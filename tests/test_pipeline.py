"""End to end on a tiny BERT folder: the CLI runs every stage and writes every artefact."""

from __future__ import annotations

import json

import pytest
import torch

from idprior.cli.main import main
from idprior.config import load_config
from idprior.errors import ConfigError
from idprior.model.surgery import load_pruned
from tiny_folder import make_tiny_bert_folder

QUICK = ["--task", "rt-polarity", "--max-train", "48", "--max-eval", "24", "--epochs", "1", "--batch-size", "16",
         "--max-length", "24", "--calib-size", "32", "--recover-epochs", "1", "--no-bench"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


def test_prune_cli_writes_every_artefact(tiny_folder, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.4", "--set", "recover.batch_size=8",
               "--out", str(out)])
    assert rc == 0
    stages = json.loads((out / "stages.json").read_text())["stages"]
    assert (stages["finetune"]["steps"], stages["recover"]["steps"]) == (48 // 16, 48 // 8)  # each its own batch size
    for name in ("config.yaml", "stages.json", "scores.json", "plan.json", "metrics.json", "report.md",
                 "finetuned/model.safetensors", "surgery/model.safetensors", "pruned/model.safetensors", "pruned/config.json"):
        assert (out / name).exists(), name
    plan = json.loads((out / "plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    pruned = load_pruned(out / "pruned")
    assert sum(p.numel() for p in pruned.parameters()) == plan["measures"]["after"]["total_params"]
    assert metrics["compression"]["encoder_params"]["removed_fraction"] >= 0.4
    assert plan["selection"] == "prior"  # "auto" after the default (proximal) prior phase
    assert set(json.loads((out / "stages.json").read_text())["stages"]) >= {"finetune", "score", "select", "surgery",
                                                                            "recover", "evaluate", "report"}
    assert "test accuracy" in capsys.readouterr().out
    # a second run into the same folder is refused, resume skips every finished stage
    again = ["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.4", "--set", "recover.batch_size=8", "--out", str(out)]
    assert main(again) == 2
    before = (out / "plan.json").read_bytes()
    assert main([*again, "--resume"]) == 0
    assert (out / "plan.json").read_bytes() == before


def test_same_seed_same_plan_bytes(tiny_folder, tmp_path):
    args = ["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.3", "--recover-epochs", "0"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()


def _log_keys(path) -> set[str]:
    """Every key of a training log (train_log.jsonl / recover_log.jsonl); empty when there is none."""
    if not path.is_file():
        return set()
    return {k for line in path.read_text().splitlines() for k in json.loads(line)}


@pytest.mark.parametrize("extra", [["--sn", "--no-prior"], ["--no-train"], ["--iterative", "2", "--sn"],
                                   ["--selection", "share", "--head-share", "0.3", "--distill"],
                                   ["--set", "prune.finetune_distill=true"]])
def test_prune_variants(tiny_folder, tmp_path, extra):
    """Each option shows in the artefacts, so an option that were ignored would fail here."""
    out = tmp_path / "run"
    quick = [a for i, a in enumerate(QUICK) if "--epochs" not in QUICK[max(0, i - 1):i + 1]] if "--no-train" in extra else QUICK
    assert main(["prune", "--model", str(tiny_folder), *quick, "--target", "0.3", "--out", str(out), *extra]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["compression"]["encoder_params"]["removed_fraction"] >= 0.29
    x = torch.randint(5, 50, (2, 7))
    with torch.no_grad():
        assert load_pruned(out / "pruned")(input_ids=x).logits.shape == (2, 2)
    finetune = json.loads((out / "stages.json").read_text())["stages"]["finetune"]
    trained = "--no-train" not in extra
    assert ("steps" in finetune) == trained
    assert ("sn_matrices" in finetune) == (trained and "--sn" in extra)  # SN only when asked for
    assert ("sn_clip_frac" in _log_keys(out / "train_log.jsonl")) == (trained and "--sn" in extra)  # and only then logged
    prior_logged = {"prior", "prior_identity_frac"} & _log_keys(out / "train_log.jsonl")  # loss / proximal prior
    assert bool(prior_logged) == (trained and "--no-prior" not in extra)
    assert ("distill_loss" in _log_keys(out / "train_log.jsonl")) == ("prune.finetune_distill=true" in extra)
    if "--iterative" in extra:
        rounds = [json.loads((out / f"round{r}" / "plan.json").read_text()) for r in (1, 2)]
        assert all(p["units"] for p in rounds) and not (out / "round3").exists()
        assert json.loads((out / "plan.json").read_text())["rounds"] == rounds
        recover_logs = [out / f"round{r}" / "recover_log.jsonl" for r in (1, 2)]
    else:
        recover_logs = [out / "recover_log.jsonl"]
    assert all(log.is_file() for log in recover_logs)
    assert all(("distill_loss" in _log_keys(log)) == ("--distill" in extra) for log in recover_logs)
    if "--selection" in extra:
        assert json.loads((out / "plan.json").read_text())["selection"] == "share"


def test_bench_stage_times_like_a_fresh_process(tiny_folder, tmp_path):
    """The bench stage inside `idprior prune` times models in eval and inference mode, without SN,
    with the garbage collector paused and the thread count the process started with (after the
    training stages); its table carries the noise guard configured in the bench section."""
    import gc

    from torch.nn.modules.module import register_module_forward_pre_hook
    from torch.nn.utils import parametrize
    from transformers import PreTrainedModel

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    timed = []

    def record(module, args):
        if isinstance(module, PreTrainedModel) and not gc.isenabled():
            timed.append((module.training, any(parametrize.is_parametrized(m) for m in module.modules()),
                          torch.is_inference_mode_enabled(), torch.get_num_threads()))

    handle = register_module_forward_pre_hook(record)
    try:
        assert main(["prune", "--model", str(tiny_folder), *QUICK[:-1], "--target", "0.3", "--no-onnx", "--sn", "--out", str(out),
                     "--set", "bench.batch_sizes=[2]", "--set", "bench.seq_lens=[8]", "--set", "bench.repeats=3",
                     "--set", "bench.retime_rounds=0", "--set", "bench.max_iqr_fraction=0.5"]) == 0
    finally:
        handle.remove()
    assert timed and set(timed) == {(False, False, True, threads)}
    bench = json.loads((out / "bench.json").read_text())
    assert bench["noise_guard"] == {"max_iqr": 0.5, "max_gap": 0.08, "retime_rounds": 0}
    assert all(r["timing_rounds"] == 1 and "noise" in r for r in bench["rows"])
    assert "| check |" in (out / "report.md").read_text()


def test_bench_stage_can_time_in_fresh_processes(tiny_folder, tmp_path, monkeypatch):
    """bench.processes 2: the stage loads the run's dense and pruned folders in two fresh processes
    and reports the median of their speed-ups (issue 18: a whole process can run slow); the run's
    writes are flushed before each of them."""
    import os

    syncs = []
    real_sync = getattr(os, "sync", lambda: None)
    monkeypatch.setattr(os, "sync", lambda: (syncs.append(1), real_sync())[1], raising=False)
    out = tmp_path / "run"
    assert main(["prune", "--model", str(tiny_folder), *QUICK[:-1], "--target", "0.3", "--no-onnx", "--out", str(out),
                 "--set", "bench.batch_sizes=[2]", "--set", "bench.seq_lens=[8]", "--set", "bench.repeats=2",
                 "--set", "bench.processes=2"]) == 0
    bench = json.loads((out / "bench.json").read_text())
    assert bench["environment"]["processes"] == 2
    pruned = next(r for r in bench["rows"] if r["model"] == "pruned")
    assert len(pruned["process_speedups"]) == 2 and pruned["repeats"] == 4
    assert "Timed in 2 fresh processes" in (out / "bench.md").read_text()
    assert len(syncs) == 2 and len(bench["environment"]["sync_s"]) == 2  # os.sync before each process, timed


def test_a_stage_cannot_leak_torch_settings(tmp_path):
    """A stage that changes torch's thread count or grad mode (training code, a library it calls)
    leaves them as they were for the next stage."""
    from idprior.pipeline.stages import Run, run_stages

    def greedy(run):
        torch.set_num_threads(1 if before != 1 else 2)
        torch.set_grad_enabled(False)
        return {}

    before = torch.get_num_threads()
    run = Run(load_config(None, [f"out={tmp_path / 'run'}"]))
    try:
        run_stages(run, ["score"], fns={"score": greedy})
        assert torch.get_num_threads() == before and torch.is_grad_enabled()
        assert "score" in json.loads((tmp_path / "run" / "stages.json").read_text())["stages"]
    finally:
        run.close()
        torch.set_num_threads(before)
        torch.set_grad_enabled(True)


def test_distill_loss():
    """Zero when the student matches the teacher, positive otherwise, scaled by T^2 (Hinton et al.:
    soft-target gradients keep their size), and LM tokens outside the attention mask do not count."""
    from idprior.pipeline.train import distill_loss

    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert distill_loss(teacher, teacher, 2.0).abs() < 1e-6
    assert distill_loss(student, teacher, 2.0) > 0
    kl = torch.nn.functional.kl_div(torch.log_softmax(student / 3.0, -1), torch.log_softmax(teacher / 3.0, -1),
                                    log_target=True, reduction="batchmean")
    torch.testing.assert_close(distill_loss(student, teacher, 3.0), 9.0 * kl)
    # LM logits [B, T, V]: a masked token may differ arbitrarily without changing the loss
    teacher, student = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    other = student.clone()
    other[mask == 0] = torch.randn(3, 7, generator=g) * 10
    torch.testing.assert_close(distill_loss(other, teacher, 2.0, mask), distill_loss(student, teacher, 2.0, mask))
    assert distill_loss(teacher, teacher, 2.0, mask).abs() < 1e-6
    per_token = [distill_loss(student[b, t], teacher[b, t], 2.0) for b, t in ((0, 0), (0, 1), (1, 0))]
    torch.testing.assert_close(distill_loss(student, teacher, 2.0, mask), torch.stack(per_token).mean())


def test_finetune_and_evaluate_cli(tiny_folder, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--model", str(tiny_folder), *QUICK[:-7], "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1
    assert main(["evaluate", str(out / "finetuned"), "--task", "rt-polarity", "--max-eval", "16", "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["test"]["accuracy"] >= 0


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["prune.target=1.5", "train.lr=-1", "prune.kinds=heads", "train.epoch=3", "prune.prior_gamma=x"])
    text = "\n".join(e.value.problems)
    assert len(e.value.problems) == 5
    assert "prune.target" in text and "train.lr" in text and "prune.kinds" in text
    assert "did you mean train.epochs" in text
    assert "prune.prior_gamma must be float" in text
    with pytest.raises(ConfigError) as e:
        load_config("demo", ["bench.max_iqr_fraction=0", "bench.max_speedup_gap=-0.1", "bench.retime_rounds=-1",
                             "bench.processes=0"])
    assert [q.split(" must")[0] for q in e.value.problems] == [
        "bench.max_iqr_fraction", "bench.max_speedup_gap", "bench.retime_rounds", "bench.processes"]
    with pytest.raises(ConfigError, match="finetune_distill needs prune.finetune_first"):
        load_config("demo", ["prune.finetune_distill=true", "prune.finetune_first=false"])
    assert load_config("demo", ["prune.finetune_distill=true"]).prune.finetune_distill


def test_config_modes_are_typed_choices():
    """A mode outside its Literal choices is one problem naming the choices (the field keeps its default)."""
    with pytest.raises(ConfigError) as e:
        load_config(None, ["prune.measure=params", "prune.score=relative", "model.dtype=fp8"])
    assert sorted(e.value.problems) == [
        "model.dtype must be one of float32, bfloat16, float16, got 'fp8'",
        "prune.measure must be one of encoder_params, linear_params, flops, got 'params'",
        "prune.score must be one of absolute, residual, got 'relative'"]


def test_presets_are_package_data():
    """The presets live in the package (configs/ links there), so a wheel install has them: read here
    through importlib.resources, as an installed idprior reads them."""
    from importlib import resources

    from idprior.config import list_presets

    demo = resources.files("idprior").joinpath("presets", "demo.yaml")
    assert demo.is_file() and "demo" in list_presets()
    assert load_config("demo") == load_config(str(demo))
    assert load_config("demo").recover.epochs == 1.0


def test_every_preset_validates(capsys):
    from idprior.config import list_presets

    assert "demo" in list_presets()
    for name in list_presets():
        assert main(["validate", name]) == 0
    assert main(["validate", "demo", "--set", "prune.target=2"]) == 2
    assert "prune.target must be in (0, 1)" in capsys.readouterr().err


def test_decoder_preset_is_the_measured_decoder_recipe():
    """`--config decoder` must be the run the README's decoder figures come from: the after-ln arm of
    benchmarks/smollm2_prior.py (its command, parsed by the CLI) resolves on a Llama to the same config as the preset, whose prior settings come from the
    family's recipe, apart from where it writes and whether it benches."""
    import argparse
    import dataclasses
    import importlib.util
    from pathlib import Path

    from idprior.arch import recipe_of
    from idprior.cli.common import config_from_args
    from idprior.cli.main import build_parser
    from idprior.config import recipe_for

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_prior.py"
    spec = importlib.util.spec_from_file_location("smollm2_prior", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    defaults = argparse.Namespace(task="lm-rt", max_train=2000, max_eval=100, lr=5e-5, target=0.2, seed=0, epochs=1.0,
                                  runs_dir="runs/x")
    argv = bench.commands(defaults)["snip (prior phase, kind scale, floor, no SN, debias, after-ln)"]
    preset_cfg = load_config("decoder")
    assert preset_cfg.prune.prior_gamma is None and preset_cfg.prune.min_keep is None  # left to the recipe
    measured, preset = (dataclasses.asdict(dataclasses.replace(c, prune=recipe_for(c.prune, recipe_of("llama"))))
                        for c in (config_from_args(build_parser().parse_args(argv)), preset_cfg))
    for cfg in (measured, preset):
        cfg.pop("out"), cfg.pop("bench")
    assert measured == preset
    assert preset["prune"]["prior_debias"] and preset["prune"]["norm_after_ln"] and not preset["prune"]["sn"]


def test_overrides_change_typed_fields():
    cfg = load_config("demo", ["train.lr=3e-5", "bench.batch_sizes=[1,32]", "prune.tau=0.01", "data.max_train=null"])
    assert cfg.train.lr == 3e-5 and cfg.bench.batch_sizes == [1, 32] and cfg.prune.tau == 0.01
    assert cfg.data.max_train is None
