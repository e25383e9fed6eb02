"""The from-pretrained (user) protocol of the quality grid, and where spectral normalization binds."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn
from torch.nn.utils import parametrize

from idprior.cli.main import main
from idprior.errors import IdpriorError
from idprior.method.spectral import BoundedSpectralNorm, sn_stats
from idprior.study.quality import load_grid, run_grid
from idprior.study.report_paired import protocol_check, shared_finetune_check
from tiny_folder import make_tiny_bert_folder

ARMS = ["snip", "fisher", "snip-no-sn", "snip-no-prior", "michel"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tinypt") / "bert")


def _grid(model) -> dict:
    return {"model": str(model), "protocol": "pretrained", "tasks": ["rt-polarity"], "targets": [0.5], "seeds": [0, 1],
            "methods": ARMS, "max_train": 48, "max_eval": 24, "max_validation": 16, "max_length": 16,
            "train": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "eval_each_epoch": False, "checkpoint_every": 0},
            "recover": {"epochs": 1, "batch_size": 16, "eval_each_epoch": False, "checkpoint_every": 0},
            "prune": {"calib_size": 16}}


def _log(folder, name="train_log.jsonl") -> list[dict]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def test_every_arm_starts_from_pretrained_with_the_same_steps_and_data(tiny_folder, tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(_grid(tiny_folder)))
    out, results = tmp_path / "sweep", tmp_path / "res" / "pre.jsonl"
    assert main(["bench-quality", str(grid_file), "--out", str(out), "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["dense", *ARMS] * 2
    cells = [r for r in rows if r["method"] != "dense"]
    assert all(r["paired"] and r["protocol"] == "pretrained" and r["from"] == "pretrained" for r in cells)
    assert all(r["predictions"] and r["dense_predictions"] for r in cells)
    for seed in (0, 1):
        by = {r["method"]: r for r in cells if r["seed"] == seed}
        # every arm fine-tuned from the pretrained folder itself (not from a shared start), as prune does
        for r in by.values():
            saved = json.loads((out / r["finetune_dir"] / "stages.json").read_text())["config"]
            assert saved["model"]["name"] == str(tiny_folder) and saved["prune"]["finetune_first"] is True
        # the baselines share their plain fine-tune; each SNIP variant trains its own
        assert by["fisher"]["finetune_dir"] == by["michel"]["finetune_dir"]
        assert len({by[m]["finetune_dir"] for m in ("snip", "fisher", "snip-no-sn", "snip-no-prior")}) == 4
        assert {m: r["variant"] for m, r in by.items()} == {"snip": "sn+prior", "fisher": "plain", "snip-no-sn": "prior",
                                                            "snip-no-prior": "sn", "michel": "plain"}
        # the same steps (48 examples / batch 16, one epoch each) on the same batches in the same order
        assert {json.dumps(r["steps"]) for r in by.values()} == {json.dumps({"finetune": 3, "recover": 3})}
        assert len({json.dumps(r["data_order"]) for r in by.values()}) == 1 and None not in by["snip"]["data_order"].values()
        first = {m: _log(out / r["finetune_dir"])[0]["batch"] for m, r in by.items()}
        assert len(set(first.values())) == 1
        recover_first = {_log(out / r["cell_dir"], "recover_log.jsonl")[0]["batch"] for r in by.values()}
        assert len(recover_first) == 1
        # SNIP is cut by the rule `idprior prune` uses after its prior phase
        assert by["snip"]["config"]["prune"]["selection"] == "prior"
        # where SN binds: logged for the fine-tunes with SN, absent for the others
        assert by["snip"]["sn_log"]["steps"] == 3 and by["snip-no-prior"]["sn_log"] is not None
        assert by["fisher"]["sn_log"] is None and by["snip-no-sn"]["sn_log"] is None
        assert {"sn_clip_frac", "sn_ratio_mean", "sn_ratio_max"} <= set(_log(out / by["snip"]["finetune_dir"])[0])
        assert by["snip"]["prior_log"] is not None and by["fisher"]["prior_log"] is None
    # the digest is of the data: another seed shuffles differently
    assert cells[0]["data_order"] != cells[len(ARMS)]["data_order"]

    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "pre.md").read_text()
    assert "from the pretrained model" in text and "2 of 2 (task, seed) pairs" in text
    assert "a fine-tune of 1 epoch (" in text and "1 epoch of recovery" in text  # one epoch each, singular
    for heading in ("## Every method against fisher (before recovery, test)",
                    "## Every method against fisher (after recovery, test)",
                    "## Per task: snip − fisher, after recovery, test", "## Where spectral normalization binds"):
        assert heading in text
    assert "| snip − fisher | 0.5 | 2 |" in text and "| snip-no-prior | 0.5 | 2 |" in text

    # a rerun recomputes nothing
    c = run_grid(load_grid(grid_file), out, results=results)
    assert (c["cells"], c["finetune"], c["skipped"]) == (0, 0, 12)


def test_protocol_errors(tiny_folder):
    for bad, words in (({"paired": True}, "drop 'paired:'"), ({"protocol": "user"}, "use one of"),
                       ({"continue": {"epochs": 1}}, "'continue:' is only meaningful")):
        with pytest.raises(IdpriorError, match=words):
            load_grid(_grid(tiny_folder) | bad)


def test_protocol_check_names_pairs_whose_arms_saw_other_data():
    def row(method, seed, order, steps=3):
        return {"task": "t", "seed": seed, "method": method, "steps": {"finetune": steps, "recover": 3},
                "data_order": {"finetune": order, "recover": "r"}}

    rows = [row("snip", 0, "a"), row("fisher", 0, "a"), row("snip", 1, "a"), row("fisher", 1, "b"),
            row("snip", 2, "a"), row("fisher", 2, "a", steps=4), {"task": "t", "seed": 3, "method": "x", "data_order": None}]
    assert protocol_check(rows) == ("Same steps and same batches in the same order for every arm, in fine-tuning and "
                                    "in recovery: 1 of 3 (task, seed) pairs; differing: t/1, t/2. 1 cells logged no "
                                    "batch digests (rows from before the check).")


def test_shared_finetune_check_names_fine_tunes_whose_arms_cut_different_models():
    def row(method, seed, ft, acc):
        return {"task": "t", "seed": seed, "method": method, "finetune_dir": ft, "dense": {"test": {"accuracy": acc}}}

    rows = [row("fisher", 0, "plain", 0.8), row("michel", 0, "plain", 0.8), row("snip", 0, "prior", 0.7),
            row("fisher", 1, "plain", 0.8), row("michel", 1, "plain", 0.81)]  # seed 1's plain fine-tune was rebuilt
    assert shared_finetune_check(rows) == ("Arms that share a fine-tune report the same dense model: 1 of 2 shared "
                                           "fine-tunes; differing: t/1 (plain).")


def test_a_sweep_names_rows_cut_from_a_lost_copy_of_a_rebuilt_fine_tune(tmp_path):
    from idprior.study.quality import append_row, rebuilt_finetune_rows

    def row(key, seed, ft, acc):
        return {"key": key, "task": "t", "seed": seed, "finetune_dir": ft, "dense": {"test": {"accuracy": acc}}}

    results = tmp_path / "r.jsonl"
    for r in (row("t/0/fisher/0.5", 0, "plain", 0.8), row("t/0/snip/0.5", 0, "prior", 0.7),
              row("t/1/fisher/0.5", 1, "plain", 0.9)):
        append_row(results, r)
    rebuilt = row("t/0/michel/0.5", 0, "plain", 0.81)
    append_row(results, rebuilt)
    assert rebuilt_finetune_rows(results, rebuilt) == ["t/0/fisher/0.5"]
    assert rebuilt_finetune_rows(results, row("t/0/michel/0.5", 0, "plain", 0.8)) == []


def test_sn_stats_says_which_matrices_bind_and_how_hard():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4))
    assert sn_stats(model) == {}
    for lin in model:
        parametrize.register_parametrization(lin, "weight", BoundedSpectralNorm(lin.weight), unsafe=True)
    model.train()
    model(torch.randn(2, 6))
    s = sn_stats(model)
    assert s["sn_clip_frac"] == 0.0 and s["sn_ratio_max"] == pytest.approx(1.0, abs=1e-3)
    with torch.no_grad():  # the second matrix grows to twice its bound
        model[1].parametrizations.weight.original.mul_(2.0)
    for _ in range(30):  # the power iteration converges on the new sigma
        model(torch.randn(2, 6))
    s = sn_stats(model)
    assert s["sn_clip_frac"] == 0.5
    assert s["sn_ratio_max"] == pytest.approx(2.0, rel=1e-2)
    assert s["sn_ratio_mean"] == pytest.approx(1.5, rel=1e-2)
    # clipped: the weight the forward uses sits on the bound
    sn = model[1].parametrizations.weight[0]
    assert float(torch.linalg.matrix_norm(model[1].weight, ord=2)) == pytest.approx(float(sn.bound), rel=1e-2)
