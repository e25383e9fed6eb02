"""A baseline means the baseline: `--method <baseline>` fine-tunes and recovers plainly (no SN, no identity
prior) from every entry point (CLI, `idprior.prune`, the paired grid) unless SN or the prior is asked for,
and the run records which training ran. Before this, a CLI baseline kept SNIP's defaults and chose among
units the prior had already zeroed: on a real task `--method fisher` and SNIP gave the same plan."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from idprior.baselines import METHODS
from idprior.cli.main import main
from idprior.config import PruneConfig, RunConfig, load_config, prune_config, training_of
from idprior.pipeline import stages as pipeline
from tiny_folder import make_tiny_bert_folder

QUICK = ["--task", "rt-polarity", "--max-train", "48", "--max-eval", "24", "--epochs", "1", "--batch-size", "16",
         "--max-length", "24", "--calib-size", "32", "--recover-epochs", "1", "--no-bench"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tiny") / "bert")


@pytest.fixture
def spy_training(monkeypatch):
    """Record, for every fine-tune the pipeline runs, whether it attached SN and which prior hooks it built."""
    from idprior.method import spectral

    seen = {"sn": 0, "prior_hooks": []}
    attach, hooks = spectral.attach, pipeline.prior_hooks

    def spy_attach(*a, **k):
        seen["sn"] += 1
        return attach(*a, **k)

    def spy_hooks(*a, **k):
        out = hooks(*a, **k)
        seen["prior_hooks"].append(len(out[0]))
        return out

    monkeypatch.setattr(spectral, "attach", spy_attach)
    monkeypatch.setattr(pipeline, "prior_hooks", spy_hooks)
    return seen


def _log_keys(path) -> set[str]:
    return set().union(*(json.loads(line) for line in path.read_text().splitlines())) if path.is_file() else set()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_baseline_resolves_to_plain_training(method):
    cfg = pipeline.resolved(load_config(None, [f"prune.method={method}"]))
    assert (cfg.prune.sn, cfg.prune.prior) == (False, False)
    assert training_of(PruneConfig(method=method)) == (False, False)
    assert training_of(PruneConfig()) == (False, True)  # SNIP's own: the prior (SN only when asked for)


def test_explicit_choice_wins_for_baseline_and_snip_ablation():
    cfg = pipeline.resolved(load_config(None, ["prune.method=fisher", "prune.sn=true", "prune.prior=true"]))
    assert (cfg.prune.sn, cfg.prune.prior) == (True, True)
    cfg = pipeline.resolved(load_config(None, ["prune.sn=true", "prune.prior=false"]))  # SNIP's SN-alone ablation
    assert (cfg.prune.sn, cfg.prune.prior) == (True, False)
    # SnipTrainer's settings
    assert training_of(prune_config(sn=True)) == (True, True) and training_of(prune_config()) == (False, True)


def test_cli_baseline_finetunes_plainly_and_says_so(tiny_folder, tmp_path, spy_training):
    out = tmp_path / "fisher"
    assert main(["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.4", "--method", "fisher",
                 "--out", str(out)]) == 0
    assert spy_training["sn"] == 0
    assert spy_training["prior_hooks"] in ([], [0])
    assert not any(k.startswith("prior") or k.startswith("sn_") for k in _log_keys(out / "train_log.jsonl"))
    saved = yaml.safe_load((out / "config.yaml").read_text())["prune"]
    assert (saved["sn"], saved["prior"]) == (False, False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training"].startswith("plain")
    assert "plain (no SN, no identity prior)" in (out / "report.md").read_text()


def test_python_prune_baseline_finetunes_plainly(tiny_folder, tmp_path, spy_training):
    """`idprior.prune` with a hand-built RunConfig (sn/prior left at None) trains a baseline plainly."""
    cfg = RunConfig()
    cfg.model.name = str(tiny_folder)
    cfg.data.task, cfg.data.max_train, cfg.data.max_eval, cfg.data.max_length = "rt-polarity", 48, 24, 24
    cfg.train = dataclasses.replace(cfg.train, epochs=1, batch_size=16)
    cfg.recover = dataclasses.replace(cfg.recover, epochs=0)
    cfg.prune = dataclasses.replace(cfg.prune, method="magnitude", target=0.4, calib_size=32)
    cfg.bench.enabled, cfg.out = False, str(tmp_path / "mag")
    pipeline.prune(cfg)
    assert spy_training["sn"] == 0 and spy_training["prior_hooks"] in ([], [0])
    assert yaml.safe_load((tmp_path / "mag" / "config.yaml").read_text())["prune"]["sn"] is False


@pytest.mark.parametrize("sn", [False, True], ids=["default", "--sn"])
def test_snip_trains_with_the_prior_and_sn_only_when_asked(tiny_folder, tmp_path, spy_training, sn):
    out = tmp_path / "snip"
    assert main(["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.4", "--recover-epochs", "0",
                 *(["--sn"] if sn else []), "--out", str(out)]) == 0
    assert spy_training["sn"] == int(sn) and spy_training["prior_hooks"] == [1]
    assert "prior_identity_frac" in _log_keys(out / "train_log.jsonl")


def test_grid_gives_baselines_a_plain_fine_tune():
    from idprior.study.quality import Grid, MethodSpec, cell_config

    grid = Grid(model="minilm-l6", tasks=["rt-polarity"], seeds=[0], targets=[0.5],
                methods=[MethodSpec(name="fisher", method="fisher")], overrides={})
    cfg = cell_config(grid, "rt-polarity", 0, grid.methods[0], 0.5, out="x")
    assert (cfg.prune.sn, cfg.prune.prior) == (False, False)


def test_snip_and_fisher_choose_different_units(tiny_folder, tmp_path):
    """With the baseline trained plainly, fisher plans on the plain model: the plans differ (they were equal
    when fisher chose among the units SNIP's prior had zeroed)."""
    plans = {}
    for method in ("snip", "fisher"):
        out = tmp_path / method
        assert main(["prune", "--model", str(tiny_folder), *QUICK, "--target", "0.4", "--recover-epochs", "0",
                     "--method", method, "--out", str(out)]) == 0
        plans[method] = set(json.loads((out / "plan.json").read_text())["units"])
    assert plans["snip"] and plans["fisher"]
    assert plans["snip"] != plans["fisher"]
