"""idprior.memory and idprior.study.benchutil, the helpers the benchmark scripts share: the memory probes read this
process's RSS, and the timing plans are the `magnitude` baseline's, cut from a copy."""

from __future__ import annotations

import pytest
import torch

from idprior import memory
from idprior.arch import get_adapter
from idprior.baselines import get_method
from idprior.study import benchutil
from tiny_models import tiny_bert


def test_peak_follows_an_allocation_and_resets():
    """A 64 MB buffer shows in the peak; after it is freed, `reset_peak` brings the peak back down,
    so a stage's peak can be read on its own."""
    if not memory.reset_peak():
        pytest.skip("this kernel does not allow /proc/self/clear_refs")
    base = memory.peak_mb()
    assert base == pytest.approx(memory.rss_mb(), abs=8)
    block = bytearray(64 * 2**20)  # zero-filled by the allocator: every page resident
    assert memory.peak_mb() >= base + 60
    assert memory.lifetime_peak_mb() >= base + 60
    del block
    memory.reset_peak()
    assert memory.peak_mb() < base + 30


def test_timing_plans_are_the_magnitude_baselines():
    model = tiny_bert()
    adapter = get_adapter(model)
    for share in (None, 0.3):
        plan = benchutil.magnitude_plan(model, 0.3, head_share=share)
        method = get_method("magnitude", selection="norm" if share is None else "share", head_share=share)
        assert plan.to_dict() == method.plan(model, adapter, [], target=0.3).to_dict()
        assert (plan.counts()["head"] > 0) == (share is not None)


def test_pruned_copy_leaves_the_dense_model_alone():
    dense = tiny_bert()
    state = {k: v.clone() for k, v in dense.state_dict().items()}
    plan = benchutil.magnitude_plan(dense, 0.3, head_share=0.3)
    pruned = benchutil.pruned_copy(dense, plan)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in state.items())
    assert sum(p.numel() for p in pruned.parameters()) == plan.measures["after"]["total_params"]


def test_publish_writes_json_and_markdown(tmp_path, capsys):
    benchutil.publish(tmp_path / "out", "x", {"a": 1}, "# x\n")
    assert (tmp_path / "out" / "x.md").read_text() == "# x\n"
    assert '"a": 1' in (tmp_path / "out" / "x.json").read_text()
    assert "# x" in capsys.readouterr().out


def test_run_idprior_reads_back_a_finished_run_and_runs_the_cli(tmp_path, capsys):
    """The SmolLM2 scripts' runner: a folder with metrics.json is not run again (nan wall time); otherwise
    the command runs in a subprocess, printed first, and a failing command raises."""
    import math
    import subprocess

    from idprior.study.benchutil import run_idprior

    done = tmp_path / "done"
    done.mkdir()
    (done / "metrics.json").write_text("{}")
    assert math.isnan(run_idprior(["prune", "--out", str(done)], threads=1))
    assert capsys.readouterr().out == ""
    with pytest.raises(subprocess.CalledProcessError):
        run_idprior(["prune", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "new")], threads=1)
    assert "$ idprior prune --model" in capsys.readouterr().out
