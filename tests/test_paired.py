"""The paired quality benchmark: shared start, per-example predictions, and its statistics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from idprior.cli.main import main
from idprior.errors import IdpriorError
from idprior.pipeline.evaluate import load_predictions, save_predictions
from idprior.study.paired import (
    DENSE,
    Comparison,
    PairedCell,
    add_predictions,
    blocked_interval,
    bootstrap_interval,
    compare,
    load_predictions_ref,
    mcnemar_p,
    min_detectable,
    t_interval,
)
from idprior.study.quality import load_grid, run_grid, weights_sha256
from tiny_folder import make_tiny_bert_folder

# ---- statistics on hand-computed examples ------------------------------------------------------

def _cell(a_right: int, b_right: int, both: int, n: int, task="t", seed=0) -> PairedCell:
    """n examples: `a_right` only A right, `b_right` only B right, `both` both right, rest both wrong."""
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:a_right] = True
    b[a_right:a_right + b_right] = True
    a[a_right + b_right:a_right + b_right + both] = True
    b[a_right + b_right:a_right + b_right + both] = True
    return PairedCell(task, seed, 0.5, a, b)


def test_t_interval_matches_hand_computation():
    # diffs 1, 2, 3: mean 2, sd 1, half-width t_{0.975,2} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138
    mean, lo, hi = t_interval([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert (lo, hi) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)
    # contains the true mean 2, excludes a wrong value 5
    assert lo < 2 < hi and not lo < 5 < hi
    assert math.isnan(t_interval([1.0])[1])


def test_paired_cell_difference_and_mcnemar():
    c = _cell(a_right=10, b_right=2, both=50, n=100)
    assert c.diff == pytest.approx(8.0)  # 60% - 52%
    assert c.discordant == (10, 2)
    # exact two-sided binomial on 12 discordant pairs split 10 / 2: 2 * P(X <= 2 | n=12, p=1/2) = 2 * 79 / 4096
    assert mcnemar_p(c.a, c.b) == pytest.approx(2 * 79 / 4096)
    assert mcnemar_p(c.a, c.a) == 1.0


def test_bootstrap_interval_contains_the_truth_and_excludes_zero_when_clear():
    # five cells of 1,000 examples, A better by 3 points in each (30 vs 0 discordant)
    cells = [_cell(30, 0, 700, 1000, seed=s) for s in range(5)]
    lo, hi = bootstrap_interval(cells, n_boot=2000, seed=1)
    assert lo < 3.0 < hi and lo > 0
    # no difference at all: the interval holds 0
    tied = [_cell(20, 20, 700, 1000, seed=s) for s in range(5)]
    lo, hi = bootstrap_interval(tied, n_boot=2000, seed=1)
    assert lo < 0 < hi


def test_task_blocked_interval_matches_hand_computation():
    # task x: diffs 1, 3; task y: 5, 7 (points). Task means 2 and 6 -> mean 4. Within-task squares
    # (1 + 1) + (1 + 1) = 4 over df = 4 - 2 = 2 -> s_w^2 = 2; se = sqrt(2 * (1/2 + 1/2)) / 2 = 0.707107;
    # half-width t_{.975,2} * se = 4.302653 * 0.707107 = 3.042435; MDE (4.302653 + t_{.80,2} 1.060660) * se
    cells = [_cell(k, 0, 50, 100, task=t, seed=s) for s, (t, k) in enumerate([("x", 1), ("x", 3), ("y", 5), ("y", 7)])]
    mean, lo, hi, mde = blocked_interval(cells)
    assert mean == pytest.approx(4.0)
    assert (lo, hi) == pytest.approx((4 - 3.042435, 4 + 3.042435), abs=1e-5)
    assert mde == pytest.approx(5.363313 * 0.707107, abs=1e-5)
    assert lo < 4 < hi and lo > 0  # contains the truth, excludes 0 ...
    assert t_interval([c.diff for c in cells])[1] < 0  # ... where the unblocked interval does not (tasks differ)
    assert math.isnan(blocked_interval(cells[::2])[1])  # one cell per task: no within-task spread to use
    assert math.isnan(blocked_interval(cells[:3])[1])  # nor when one task has a single cell
    s = Comparison("a", "b", 0.5, "pruned_no_recovery", "test", cells).summary(n_boot=0)
    assert (s["block_low"], s["block_mde"]) == pytest.approx((lo, mde))


def test_min_detectable_difference():
    # n = 20, sd = 2: (t_{.975,19} + t_{.80,19}) * 2 / sqrt(20) = (2.093024 + 0.860951) * 0.447214
    assert min_detectable(2.0, 20) == pytest.approx((2.093024 + 0.860951) * 2 / math.sqrt(20), abs=1e-4)
    assert min_detectable(2.0, 80) < min_detectable(2.0, 20)


def test_comparison_summary_counts_wins_losses_and_significance():
    comp = Comparison("a", "b", 0.5, "pruned_no_recovery", "test",
                      [_cell(30, 0, 500, 1000, seed=0), _cell(0, 30, 500, 1000, seed=1), _cell(5, 5, 500, 1000, seed=2)])
    s = comp.summary(n_boot=0)
    assert (s["wins"], s["losses"], s["ties"]) == (1, 1, 1)
    assert (s["sig_wins"], s["sig_losses"]) == (1, 1)
    assert s["mean"] == pytest.approx(0.0) and s["cells"] == 3 and s["examples"] == 3000


# ---- the harness on a tiny model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tinyp") / "bert")


def _paired_grid(model) -> dict:
    return {"model": str(model), "paired": True, "tasks": ["rt-polarity"], "targets": [0.5, 0.3], "seeds": [0],
            "methods": ["snip", {"name": "snip-no-prior", "method": "snip-no-prior", "targets": [0.5], "seeds": [0]},
                        "random", {"name": "norm-start", "method": "snip-no-sn-no-prior", "from": "start", "targets": [0.5]}],
            "max_train": 48, "max_eval": 24, "max_validation": 16, "max_length": 16,
            "train": {"epochs": 1, "batch_size": 16, "eval_each_epoch": False},
            "continue": {"epochs": 1, "lr": 1e-4},
            "recover": {"epochs": 1, "batch_size": 16, "eval_each_epoch": False},
            "prune": {"calib_size": 16}}


def test_paired_grid_shares_one_start_and_keeps_predictions(tiny_folder, tmp_path):
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(_paired_grid(tiny_folder)))
    out, results = tmp_path / "sweep", tmp_path / "res" / "paired.jsonl"
    assert main(["bench-quality", str(grid_file), "--out", str(out), "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    # primary target first for every pair, per-method targets respected
    assert [r["key"] for r in rows] == ["rt-polarity/0/dense/0", "rt-polarity/0/snip/0.5", "rt-polarity/0/snip-no-prior/0.5",
                                        "rt-polarity/0/random/0.5", "rt-polarity/0/norm-start/0.5",
                                        "rt-polarity/0/snip/0.3", "rt-polarity/0/random/0.3"]
    by = {(r["method"], r["target"]): r for r in rows}
    seed_dir = out / "finetune" / "rt-polarity" / "seed0"
    starts = [p for p in seed_dir.iterdir() if p.name.startswith("start-")]
    assert len(starts) == 1
    # every fine-tune folder is unlocked once used: another grid process sharing the start can take it
    assert not [p for p in seed_dir.glob("*/.idprior.lock")]
    start_sha = weights_sha256(starts[0] / "finetuned")
    # the baseline's control and SNIP's prior phase continue from byte-identical weights
    snip, rand = by[("snip", 0.5)], by[("random", 0.5)]
    assert snip["start_sha256"] == rand["start_sha256"] == by[("snip-no-prior", 0.5)]["start_sha256"] == start_sha
    assert snip["variant"] == "sn+prior" and rand["variant"] == "plain" and by[("snip-no-prior", 0.5)]["variant"] == "sn"
    assert len({snip["finetune_dir"], rand["finetune_dir"], by[("snip-no-prior", 0.5)]["finetune_dir"]}) == 3
    # continuations got the same number of further steps
    steps = {json.loads((out / r["finetune_dir"] / "stages.json").read_text())["stages"]["finetune"]["steps"]
             for r in (snip, rand, by[("snip-no-prior", 0.5)])}
    assert steps == {3}  # 48 examples / batch 16, one epoch
    # a post-hoc method prunes the start itself
    assert by[("norm-start", 0.5)]["finetune_dir"] == rows[0]["finetune_dir"] == str(starts[0].relative_to(out))
    assert by[("norm-start", 0.5)]["variant"] == "start"
    # per-example predictions for every cell, on the same examples, consistent with the metrics, all in
    # one store beside the results
    assert sorted(p.name for p in results.parent.iterdir()) == ["paired.jsonl", "paired_preds.safetensors"]
    for r in rows[1:]:
        assert r["predictions"].startswith("paired_preds.safetensors#rt-polarity/seed0/")
        preds = load_predictions_ref(results.parent, r["predictions"])
        for split, n in (("validation", 16), ("test", 24)):
            for stage in ("pruned_no_recovery", "pruned"):
                p = preds[f"{stage}.{split}"]
                assert p["pred"].shape == (n,) and p["gold_logprob"].shape == (n,)
                assert (p["gold_logprob"] <= 0).all()
                acc = float((p["pred"] == p["label"]).mean())
                assert acc == pytest.approx(r[stage][split]["accuracy"])
        dense = load_predictions_ref(results.parent, r["dense_predictions"])["dense.test"]
        assert float((dense["pred"] == dense["label"]).mean()) == pytest.approx(r["dense"]["test"]["accuracy"])
        assert not any(str(v).startswith("/") for k, v in r.items() if k.endswith("_dir") or k.endswith("predictions"))
    # the comparison pairs cells and the report states the statistics
    comp = compare(rows, "snip", "random", target=0.5, root=results.parent)
    assert len(comp.cells) == 1 and comp.cells[0].a.shape == (24,)
    assert len(compare(rows, "snip", DENSE, target=0.5, root=results.parent).cells) == 1
    assert main(["report", str(results), "--out", str(tmp_path / "rep")]) == 0
    text = (tmp_path / "rep" / "paired.md").read_text()
    assert "snip − random" in text and "MDE" in text and "its own dense model" in text
    assert (tmp_path / "rep" / "paired_paired.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun recomputes nothing
    c = run_grid(load_grid(grid_file), out, results=results)
    assert (c["cells"], c["finetune"], c["skipped"]) == (0, 0, 7)


def test_finetune_folder_does_not_depend_on_selection(tiny_folder):
    """The bug behind issue 13: a change of default selection split the fine-tune cache."""
    from idprior.study.quality import MethodSpec, cell_config, finetune_config

    grid = load_grid(_paired_grid(tiny_folder))
    a = cell_config(grid, "rt-polarity", 0, MethodSpec("snip", "snip", {"prune.selection": "norm"}), 0.5, out="x")
    b = cell_config(grid, "rt-polarity", 0, MethodSpec("snip", "snip", {"prune.selection": "share", "prune.head_share": 0.3}), 0.5, out="y")
    assert finetune_config(a, out="p")[1] == finetune_config(b, out="p")[1]
    c = cell_config(grid, "rt-polarity", 0, MethodSpec("snip", "snip", {"prune.prior_gamma": 1.0}), 0.5, out="x")
    assert finetune_config(a, out="p")[1] != finetune_config(c, out="p")[1]


def test_paired_grid_errors(tiny_folder):
    from idprior.errors import IdpriorError

    bad = _paired_grid(tiny_folder)
    del bad["continue"]
    with pytest.raises(IdpriorError, match="continue"):
        load_grid(bad)
    bad = _paired_grid(tiny_folder) | {"paired": False}
    with pytest.raises(IdpriorError, match="from: start"):
        load_grid(bad)


def test_paired_cells_order_and_per_method_targets_and_seeds(tiny_folder):
    from idprior.study.quality import cells

    raw = _paired_grid(tiny_folder) | {"seeds": [0, 1], "tasks": ["rt-polarity", "subj"]}
    raw["methods"] = ["snip", {"name": "only-seed1", "method": "random", "targets": [0.5], "seeds": [1]}]
    order = [(seed, task, target, spec.name if spec else "dense") for seed, task, target, spec in cells(load_grid(raw))]
    # the primary target for every (seed, task) before the secondary one; a restricted method only where asked
    assert [o for o in order if o[2] == 0.3] == [(0, "rt-polarity", 0.3, "snip"), (0, "subj", 0.3, "snip"),
                                               (1, "rt-polarity", 0.3, "snip"), (1, "subj", 0.3, "snip")]
    assert order.index((1, "subj", 0.5, "snip")) < order.index((0, "rt-polarity", 0.3, "snip"))
    assert [o for o in order if o[3] == "only-seed1"] == [(1, "rt-polarity", 0.5, "only-seed1"), (1, "subj", 0.5, "only-seed1")]


def _finished(folder, cfg_dict, start=None):
    folder.mkdir(parents=True)
    (folder / "stages.json").write_text(json.dumps({"config": cfg_dict, "stages": {"finetune": {"wall_s": 1.0}}}))
    if start:
        (folder / "start.json").write_text(json.dumps({"start": f"../{start}", "sha256": "x"}))


def test_existing_equivalent_finds_the_start_earlier_rows_used(tmp_path):
    """A field added to idprior later changes the folder digest; the pair must keep its start (the one
    most continuations used), and a real difference must not be mistaken for a match."""
    from idprior.config import RunConfig
    from idprior.study.quality import existing_equivalent

    cfg = RunConfig()
    cfg.prune.prior = False  # a start is a plain fine-tune
    old = cfg.to_dict()
    del old["data"]["problem_type"]  # saved before the field existed: it reads as its default
    _finished(tmp_path / "start-aaaa", old)
    _finished(tmp_path / "start-bbbb", cfg.to_dict())
    _finished(tmp_path / "plain-1111", cfg.to_dict(), start="start-aaaa")
    _finished(tmp_path / "prior-2222", cfg.to_dict(), start="start-aaaa")
    _finished(tmp_path / "sn-3333", cfg.to_dict(), start="start-bbbb")
    assert existing_equivalent(tmp_path, "start-cccc", cfg).name == "start-aaaa"
    assert existing_equivalent(tmp_path, "start-bbbb", cfg).name == "start-bbbb"  # the exact name wins when finished
    other = RunConfig()
    other.prune.prior = False
    other.train.lr = 1e-3
    assert existing_equivalent(tmp_path, "start-dddd", other).name == "start-dddd"  # nothing equivalent: its own name
    assert existing_equivalent(tmp_path, "sn+prior-9999", cfg).name == "sn+prior-9999"  # variants never cross


def test_a_finetune_recorded_under_older_defaults_resumes(tmp_path):
    """A plain fine-tune folder may lack fields added later (they read as their defaults) and hold
    other values of fields a plain fine-tune never reads (selection, the prior's settings); the grid must
    still resume it, since its digest (what changes a fine-tune) agrees. A folder that trained differently
    (another learning rate) must still be refused."""
    import dataclasses

    import yaml

    from idprior.config import RunConfig, resume_differences
    from idprior.study.quality import _as_recorded, finetune_config

    cell = RunConfig()
    cell.train.epochs = 1  # as a grid file writes it; the folder records 1.0
    cfg, _ = finetune_config(dataclasses.replace(cell, prune=dataclasses.replace(cell.prune, sn=False, prior=False)),
                             out=str(tmp_path))
    old = cfg.to_dict()
    old["train"]["epochs"] = 1.0
    for key in ("prior_gamma", "prior_debias"):
        del old["prune"][key]
    old["prune"]["selection"] = "norm"
    _finished(tmp_path / "f", old)
    (tmp_path / "f" / "config.yaml").write_text(yaml.safe_dump(old))
    assert resume_differences(old, cfg)  # compared whole, today's defaults differ from what it recorded
    assert resume_differences(old, _as_recorded(cfg, tmp_path / "f")) == []
    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=cfg.train.lr * 2))
    assert _as_recorded(other, tmp_path / "f") is other and resume_differences(old, other)


def test_rows_from_different_starts_are_not_paired():
    from idprior.study.paired import compare

    ok = {"pred": np.array([1, 1, 0]), "label": np.array([1, 0, 0])}
    preds = {"a.p": {"pruned_no_recovery.test": ok}, "b.p": {"pruned_no_recovery.test": ok}}

    def row(method, seed, sha):
        return {"task": "t", "seed": seed, "method": method, "target": 0.5, "predictions": f"{method[0]}.p",
                "start_sha256": sha}

    rows = [row("a", 0, "s0"), row("b", 0, "s0"), row("a", 1, "s1"), row("b", 1, "other")]
    comp = compare(rows, "a", "b", target=0.5, load=lambda rel: preds[rel])
    assert [c.seed for c in comp.cells] == [0] and comp.unpaired == ["t/1"]
    assert comp.summary(n_boot=0)["unpaired"] == 1


def _cell_preds(tmp_path, name: str, n: int, offset: int = 0) -> Path:
    path = tmp_path / "cells" / f"{name.replace('/', '_')}.safetensors"
    pred = (np.arange(n) + offset) % 2
    save_predictions(path, {f"{stage}.{split}": {"pred": pred.astype(np.int16), "label": np.zeros(n, np.int16)}
                            for stage in ("pruned", "pruned_no_recovery") for split in ("validation", "test")})
    return path


def test_prediction_store_is_one_file_that_replaces_a_cell_and_reads_old_grids(tmp_path):
    store = tmp_path / "res" / "grid_preds.safetensors"
    ref = add_predictions(store, "t/seed0/a_t0.5", _cell_preds(tmp_path, "a", 5))
    assert ref == "grid_preds.safetensors#t/seed0/a_t0.5"
    add_predictions(store, "t/seed0/a_t0.5x", _cell_preds(tmp_path, "ax", 3))  # a name that extends another
    got = load_predictions_ref(store.parent, ref)
    assert sorted(got) == ["pruned.test", "pruned.validation", "pruned_no_recovery.test", "pruned_no_recovery.validation"]
    assert got["pruned.test"]["pred"].tolist() == [0, 1, 0, 1, 0]
    # a rerun of a cell replaces its entries (the other cell's stay)
    add_predictions(store, "t/seed0/a_t0.5", _cell_preds(tmp_path, "a2", 5, offset=1))
    assert load_predictions_ref(store.parent, ref)["pruned.test"]["pred"].tolist() == [1, 0, 1, 0, 1]
    assert len(load_predictions_ref(store.parent, "grid_preds.safetensors#t/seed0/a_t0.5x")["pruned.test"]["pred"]) == 3
    assert sorted(p.name for p in store.parent.iterdir()) == ["grid_preds.safetensors"]  # no temporary left
    with pytest.raises(IdpriorError, match="no predictions for 't/seed0/b_t0.5'"):
        load_predictions_ref(store.parent, "grid_preds.safetensors#t/seed0/b_t0.5")
    # rows of a grid from before the store name a file per cell
    old = _cell_preds(tmp_path, "old", 4)
    assert load_predictions_ref(tmp_path, "cells/old.safetensors")["pruned.test"]["pred"].tolist() == [0, 1, 0, 1]
    assert load_predictions(old)["pruned.test"]["pred"].tolist() == [0, 1, 0, 1]


def _add_many(store: str, src: str, worker: int) -> None:
    for i in range(15):
        add_predictions(store, f"t/seed{worker}/m{i}_t0.5", src)


def test_prediction_store_keeps_every_cell_when_shards_add_at_once(tmp_path):
    """Two grid shards add to one store at the same time: the lock keeps every cell of both."""
    import multiprocessing

    src, store = _cell_preds(tmp_path, "src", 200), tmp_path / "grid_preds.safetensors"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_add_many, args=(str(store), str(src), w)) for w in (0, 1, 2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]
    for w in (0, 1, 2):
        for i in range(15):
            assert load_predictions_ref(tmp_path, f"grid_preds.safetensors#t/seed{w}/m{i}_t0.5")["pruned.test"]["pred"].shape == (200,)


# The fine-tune folder names of every cell of benchmarks/quality_paired.yaml as the grid's run folders
# hold them (data.problem_type and the prune fields added later are left out of the digest at their
# default, so these are the names seeds 0-1 were trained under): run folders are keyed by these digests,
# so a change to what goes into `finetune_digest` (or to its values) would orphan the sweep's fine-tunes
# (`existing_equivalent` would still find them, but only by reading every sibling's config).


def test_finetune_distill_splits_the_continuation_not_the_start(tiny_folder):
    """Distillation during the fine-tune changes the continuation a cell prunes (its own folder), never
    the shared start (a plain fine-tune from the pretrained model, nothing to distil from)."""
    from pathlib import Path

    from idprior.study.quality import MethodSpec, cell_config, continuation_config, start_config

    grid = load_grid(_paired_grid(tiny_folder))
    names = {}
    for name, extra in [("off", {}), ("kd", {"prune.finetune_distill": True}),
                        ("kd-a1", {"prune.finetune_distill": True, "prune.distill_alpha": 1.0})]:
        spec = MethodSpec(name, "snip", overrides=extra)
        cfg = cell_config(grid, "rt-polarity", 0, spec, 0.5, out="pending")
        start = start_config(cfg, out="pending")[1]
        names[name] = (start, continuation_config(grid, cfg, Path("x") / start)[1])
    assert len({s for s, _ in names.values()}) == 1
    assert len({c for _, c in names.values()}) == 3


def _load_seeds_script():
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "smollm2_prior_seeds.py"
    spec = importlib.util.spec_from_file_location("smollm2_prior_seeds", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _prior_result(path, seed: int, arms: dict[str, float], epochs: int = 1) -> str:
    """A results file as smollm2_prior.py writes it, holding only what the seed comparison reads."""
    runs = {arm: {"command": f"idprior prune --epochs {epochs} --recover-epochs 0",
                  "metrics": {"seed": seed, "target": 0.3, "task": "lm-rt",
                              "pruned": {"test": {"perplexity": ppl, "nll": math.log(ppl)}}}}
            for arm, ppl in arms.items()}
    path.write_text(json.dumps({"runs": runs}))
    return str(path)


def test_seed_comparison_pairs_arms_per_seed_and_refuses_mixed_seeds(tmp_path):
    seeds = _load_seeds_script()
    cells = [_prior_result(tmp_path / f"s{s}.json", s, {"A": a, "B": b})
             for s, (a, b) in enumerate([(90.0, 100.0), (99.0, 100.0), (104.0, 100.0)])]
    argv = ["--a", "A", "--b", "B", "--name", "cmp", "--out-dir", str(tmp_path)]
    for c in cells:
        argv += ["--cell", c, c]
    assert seeds.main(argv) == 0
    out = json.loads((tmp_path / "cmp.json").read_text())
    assert [round(r["rel_pct"], 6) for r in out["cells"]] == [-10.0, -1.0, 4.0]
    mean, low, high = t_interval([-10.0, -1.0, 4.0])
    assert out["rel_pct"] == pytest.approx({"mean": mean, "low": low, "high": high})
    assert (tmp_path / "cmp.md").read_text().count("\n| ") == 4  # header row + three seeds

    with pytest.raises(SystemExit) as e:  # seed 0's A against seed 1's B is not a pair
        seeds.main(["--a", "A", "--b", "B", "--out-dir", str(tmp_path), "--cell", cells[0], cells[1]])
    assert e.value.code == 2


def test_sn_prior_2x2_reads_each_factor_with_the_other_on_and_off(tmp_path):
    """The report's SN x prior section pairs the four corners as labelled: with 10 examples per cell and the
    corners right on 9 / 7 / 6 / 2 of them, SN with the prior is +20 points and without it +40."""
    from idprior.study.report_paired import sn_prior_sections

    right = {"snip": 9, "snip-no-sn": 7, "snip-no-prior": 6, "snip-no-sn-no-prior": 2}
    rows = []
    for task in ("t1", "t2"):
        for method, k in right.items():
            path = tmp_path / f"{task}_{method}.safetensors"
            pred = (np.arange(10) >= k).astype(np.int16)  # the first k right (labels are 0)
            save_predictions(path, {f"{stage}.test": {"pred": pred, "label": np.zeros(10, np.int16)}
                                    for stage in ("pruned", "pruned_no_recovery")})
            rows.append({"task": task, "seed": 0, "method": method, "target": 0.5, "predictions": path.name})
    text = "\n".join(sn_prior_sections(rows, tmp_path, n_boot=0))
    assert text.count("## The SN × prior 2×2") == 2  # before and after recovery
    for a, b, diff in (("snip", "snip-no-sn", "+20.00"), ("snip-no-prior", "snip-no-sn-no-prior", "+40.00"),
                       ("snip", "snip-no-prior", "+30.00"), ("snip-no-sn", "snip-no-sn-no-prior", "+50.00")):
        assert f"| {a} − {b} | 0.5 | 2 | **{diff}** |" in text, (a, b)
    assert sn_prior_sections([r for r in rows if r["method"] != "snip-no-sn-no-prior"], tmp_path, n_boot=0) == []
