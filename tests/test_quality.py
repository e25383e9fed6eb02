"""The quality benchmark runner (resumable grid, shared fine-tunes) and its report, on a tiny BERT."""

from __future__ import annotations

import json

import pytest

from idprior.cli.main import main
from idprior.errors import IdpriorError
from idprior.study.quality import ROW_KEYS, load_grid, run_grid
from idprior.study.report_quality import (
    aggregate,
    head_to_head,
    load_rows,
    mean_std,
    metric_table,
    summary_table,
    write_quality_report,
)
from tiny_folder import make_tiny_bert_folder

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_bert_folder(tmp_path_factory.mktemp("tinyq") / "bert")


def _grid(model) -> dict:
    return {"model": str(model), "tasks": ["rt-polarity"], "targets": [0.3, 0.5], "seeds": [0],
            "methods": ["snip", "random"], "max_train": 48, "max_eval": 16, "max_length": 16,
            "train": {"epochs": 1, "batch_size": 16, "eval_each_epoch": False},
            "recover": {"epochs": 1, "batch_size": 16, "eval_each_epoch": False},
            "prune": {"calib_size": 16}}


def test_grid_runs_resumes_and_shares_finetunes(tiny_folder, tmp_path):
    import yaml

    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(_grid(tiny_folder)))
    out, results = tmp_path / "sweep", tmp_path / "results.jsonl"
    assert main(["bench-quality", str(grid_file), "--out", str(out), "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    # 2 methods x 2 targets + one dense row, in order: dense first
    assert [r["key"] for r in rows] == ["rt-polarity/0/dense/0", "rt-polarity/0/snip/0.3", "rt-polarity/0/random/0.3",
                                        "rt-polarity/0/snip/0.5", "rt-polarity/0/random/0.5"]
    for r in rows:
        assert set(ROW_KEYS) <= set(r), set(ROW_KEYS) - set(r)
        assert {"validation", "test"} <= set(r["pruned"]) and {"idprior", "torch", "transformers"} <= set(r["versions"])
        assert {"encoder_params", "linear_params", "flops", "total_params"} <= set(r["compression"])
    cells = [r for r in rows if r["method"] != "dense"]
    for r in cells:
        assert r["compression"]["encoder_params"]["removed_fraction"] >= r["target"] - 1e-9
        assert {"finetune", "select", "surgery", "recover", "evaluate"} <= set(r["wall_s"])
        assert r["config"]["prune"]["finetune_first"] is False and r["config"]["prune"]["target"] == r["target"]
    assert {r["variant"] for r in rows} == {"plain", "sn+prior"}
    # the plain fine-tune is shared by every target and the dense row; the default (proximal) prior is
    # driven by the target, so SNIP has one fine-tune per target
    ft = sorted(p.name.split("-")[0] for p in (out / "finetune" / "rt-polarity" / "seed0").iterdir())
    assert ft == ["plain", "sn+prior", "sn+prior"]
    assert len({r["finetune_dir"] for r in rows}) == 3
    assert all(r["dense"] == rows[0]["dense"] for r in rows if r["variant"] == "plain")
    # snip cells keep their function norms for the report
    assert all((out / r["cell_dir"] / "scores.json").is_file() for r in cells if r["method"] == "snip")

    # a rerun recomputes nothing
    grid = load_grid(grid_file)
    c = run_grid(grid, out, results=results)
    assert (c["cells"], c["dense"], c["finetune"], c["skipped"]) == (0, 0, 0, 5)
    assert results.read_text().count("\n") == 5

    # "killed" during the last cell: its row is missing and a torn line is left; only that cell reruns
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    c = run_grid(grid, out, results=results)
    assert (c["cells"], c["dense"], c["finetune"], c["skipped"]) == (1, 0, 0, 4)
    assert [r["key"] for r in load_rows(results)] == [r["key"] for r in rows]


def test_grid_shards_split_seed_task_pairs(tiny_folder, tmp_path):
    """Two shards (run one after the other here) cover the grid once between them, in one results
    file, and never both fine-tune the same (seed, task) pair."""
    grid = load_grid(_grid(tiny_folder) | {"tasks": ["rt-polarity", "subj"], "seeds": [0, 1], "targets": [0.5],
                                           "methods": ["random"], "dense_row": False})
    out, results = tmp_path / "sweep", tmp_path / "results.jsonl"
    first = run_grid(grid, out, results=results, shard=(0, 2))
    second = run_grid(grid, out, results=results, shard=(1, 2))
    assert (first["cells"], second["cells"], first["skipped"], second["skipped"]) == (2, 2, 0, 0)
    keys = [r["key"] for r in map(json.loads, results.read_text().splitlines())]
    # pairs in order (0, rt), (0, subj), (1, rt), (1, subj): shard 0 takes the 1st and 3rd
    assert keys == ["rt-polarity/0/random/0.5", "rt-polarity/1/random/0.5", "subj/0/random/0.5", "subj/1/random/0.5"]
    assert first["finetune"] == second["finetune"] == 2
    assert main(["bench-quality", "g.yaml", "--out", str(out), "--shard", "2/2"]) == 2  # bad shard, before the file
    assert main(["bench-quality", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2


def test_grid_rejects_bad_entries(tiny_folder):
    from idprior.errors import IdpriorError

    bad = _grid(tiny_folder) | {"methods": ["snip", "nope"], "selection": {"random": "norm"}, "colour": 1}
    with pytest.raises(IdpriorError) as e:
        load_grid(bad)
    text = str(e.value)
    assert "nope" in text and "colour" in text and "random" in text


def test_grid_name_repeats_only_as_one_configuration(tiny_folder):
    """A method may run at more targets on fewer seeds under the same name; a name that would mean two
    configurations (other settings, or the same target twice) is refused."""
    from idprior.errors import IdpriorError
    from idprior.study.quality import cells

    base = _grid(tiny_folder) | {"targets": [0.5, 0.3], "seeds": [0, 1]}
    grid = load_grid(base | {"methods": [{"name": "random", "targets": [0.5]},
                                         {"name": "random", "targets": [0.3], "seeds": [0]}]})
    got = [(seed, target) for seed, _, target, spec in cells(grid) if spec is not None]
    assert sorted(got) == [(0, 0.3), (0, 0.5), (1, 0.5)]
    for second in ({"name": "random", "targets": [0.3], "set": {"prune.calib_size": 8}},
                   {"name": "random", "targets": [0.5, 0.3]},
                   {"name": "random"}):
        with pytest.raises(IdpriorError, match="used twice"):
            load_grid(base | {"methods": [{"name": "random", "targets": [0.5]}, second]})


def _row(task, seed, method, target, acc, removed=0.5):
    metrics = {"accuracy": acc}
    comp = {k: {"dense": 100, "pruned": int(100 * (1 - removed)), "removed_fraction": removed}
            for k in ("encoder_params", "linear_params", "flops", "total_params")}
    return {"key": f"{task}/{seed}/{method}/{target:g}", "task": task, "seed": seed, "method": method,
            "base_method": method, "target": target, "variant": "plain", "model": "m", "main_metric": "accuracy",
            "config": {}, "versions": {}, "sizes": {}, "dense": {"test": metrics, "validation": metrics},
            "pruned_no_recovery": {"test": metrics, "validation": metrics}, "pruned": {"test": metrics, "validation": metrics},
            "compression": comp | {"seq_len": 128}, "removed": {"head": 3, "neuron": 10},
            "wall_s": {"finetune": 10.0, "select": 1.0, "recover": 5.0, "evaluate": 2.0}, "cell_dir": None}


def test_report_mean_std_bold_and_plots(tmp_path):
    rows = []
    for seed, (a, b, c, d) in enumerate([(0.80, 0.60, 0.70, 0.65), (0.84, 0.64, 0.74, 0.75), (0.82, 0.62, 0.72, 0.70)]):
        rows += [_row("t1", seed, "snip", 0.5, a), _row("t2", seed, "snip", 0.5, b),
                 _row("t1", seed, "random", 0.5, c), _row("t2", seed, "random", 0.5, d),
                 _row("t1", seed, "dense", 0.0, 0.9, 0.0), _row("t2", seed, "dense", 0.0, 0.9, 0.0)]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"key": "torn')
    assert len(load_rows(path)) == len(rows)
    # by hand: snip on t1 = 0.80, 0.84, 0.82 -> mean 0.82, sample std sqrt((4+4+0)e-4 / 2) = 0.02
    m, s, n = mean_std([0.80, 0.84, 0.82])
    assert (round(m, 6), round(s, 6), n) == (0.82, 0.02, 3)
    agg = aggregate(rows)
    assert agg[(0.5, "snip")]["t1"] == pytest.approx((0.82, 0.02, 3))
    # random on t2 = 0.65, 0.75, 0.70 -> 0.70 ± 0.05; average = mean of task means = (0.72 + 0.70) / 2
    assert agg[(0.5, "random")]["t2"] == pytest.approx((0.70, 0.05, 3))
    # average ± = std over seeds of the per-seed averages (0.675, 0.745, 0.71) -> 0.035
    assert agg[(0.5, "random")]["average"] == pytest.approx((0.71, 0.035, 3))
    summary = "\n".join(summary_table(rows))
    assert "| snip | **72.0 ± 2.0 (3)** |" in summary and "| random | 71.0 ± 3.5 (3) |" in summary
    # snip vs random: t1 82 vs 72 (+10, a win), t2 62 vs 70 (-8, a loss) -> mean +1.0
    assert "| random | 1 | 0 | 1 | +1.0 |" in head_to_head(rows, "snip")
    table = "\n".join(metric_table(rows, 0.5))
    assert "| snip | **82.0 ± 2.0 (3)** | 62.0 ± 2.0 (3) | **72.0 ± 2.0 (3)** |" in table
    assert "| random | 72.0 ± 2.0 (3) | **70.0 ± 5.0 (3)** | 71.0 ± 3.5 (3) |" in table
    assert "| dense | 90.0 ± 0.0 (3) |" in table and "**90.0" not in table
    out = tmp_path / "rep"
    md = write_quality_report(load_rows(path), out, name="q", command="idprior bench-quality g.yaml")
    text = md.read_text()
    assert "82.0 ± 2.0 (3)" in text and "idprior bench-quality g.yaml" in text
    for png in ("q_tradeoff.png", "q_walltimes.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_report_cli(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(_row("t1", 0, "snip", 0.5, 0.7)) + "\n")
    assert main(["report", str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "r.md").is_file() and (tmp_path / "o" / "r_tradeoff.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2


def test_grid_targets_filter_runs_only_those_targets(tiny_folder, tmp_path):
    """--targets reaches a paired grid's secondary targets before its primary one is done everywhere; the
    skipped cells (and the dense row, which belongs to the primary target) run on a later call."""
    import yaml

    raw = _grid(tiny_folder) | {"tasks": ["rt-polarity"], "seeds": [0], "targets": [0.5, 0.3],
                                "methods": ["random"], "dense_row": True}
    out, results = tmp_path / "sweep", tmp_path / "results.jsonl"
    c = run_grid(load_grid(raw), out, results=results, targets=[0.3])
    assert c["cells"] == 1 and c["dense"] == 0
    assert [r["key"] for r in map(json.loads, results.read_text().splitlines())] == ["rt-polarity/0/random/0.3"]
    c = run_grid(load_grid(raw), out, results=results)
    assert (c["cells"], c["dense"], c["skipped"]) == (1, 1, 1)
    grid_file = tmp_path / "g.yaml"
    grid_file.write_text(yaml.safe_dump(raw))
    assert main(["bench-quality", str(grid_file), "--out", str(out), "--resume", "--targets", "0.9"]) == 2
    assert main(["bench-quality", str(grid_file), "--out", str(out), "--resume", "--targets", "half"]) == 2


def test_grid_seeds_filter_splits_one_tasks_seeds(tiny_folder, tmp_path):
    """--seeds splits one task's seeds between processes (which --shard cannot, once one task is left): the
    two calls cover the grid once between them, each seed's fine-tune made by one call only."""
    grid = load_grid(_grid(tiny_folder) | {"tasks": ["rt-polarity"], "seeds": [0, 1, 2], "targets": [0.5],
                                           "methods": ["random"], "dense_row": False})
    out, results = tmp_path / "sweep", tmp_path / "results.jsonl"
    first = run_grid(grid, out, results=results, seeds=[2])
    assert [r["key"] for r in map(json.loads, results.read_text().splitlines())] == ["rt-polarity/2/random/0.5"]
    second = run_grid(grid, out, results=results, seeds=[0, 1])
    assert (first["cells"], first["finetune"], second["cells"], second["finetune"], second["skipped"]) == (1, 1, 2, 2, 0)
    with pytest.raises(IdpriorError, match="--seeds 7: not in the grid's seeds"):
        run_grid(grid, out, results=results, seeds=[7])
