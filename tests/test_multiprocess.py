"""Training in several CPU processes (gloo): replicas stay bit-identical, a step is the one-process step.

* `train.train` in two processes (`distributed`): after every optimizer step of a prior phase (SN + the
  proximal prior, measured after the LayerNorm) and of a plain recovery phase with dropout, both ranks hold
  bit-identical weights, SN vectors, optimizer state and prior state (λ, F̄, moment averages, last norms);
  with the prior's moment reduction switched off they do not (the check can fail); the prior phase ends
  where one process ends at the same global batch size, up to float summation order.
* `SnipTrainer` in two processes: the same replica check, and a run resumed from a checkpoint (written by
  rank 0, read by both) ends bit-identically, prior state included.
* `idprior prune` under torchrun (slow): the one-process plan, replicas identical in both training stages,
  a launch killed mid fine-tune continues with --resume to the uninterrupted result.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from idprior import distributed
from idprior.pipeline.train import TrainHook

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    """What torchrun gives each rank, then `distributed.init` as the CLI calls it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    assert distributed.init() and distributed.world() == WORLD


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def digest(model: nn.Module, opt=None, prior=None) -> str:
    """sha256 of every weight and buffer (SN u, v, bound), the optimizer's tensors and the prior's state."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + _bytes(t))
    if opt is not None:
        for pid, entry in sorted(opt.state_dict()["state"].items()):
            for name, t in sorted(entry.items()):
                h.update(f"{pid}.{name}".encode() + (_bytes(t) if torch.is_tensor(t) else repr(t).encode()))
    if prior is not None:
        state = prior.state_dict()
        for name in sorted(state):
            value = state[name]
            h.update(name.encode() + (_bytes(value) if torch.is_tensor(value) else json.dumps(value, sort_keys=True).encode()))
    return h.hexdigest()


# ---- train.train -------------------------------------------------------------------------------------

class _Data(torch.utils.data.Dataset):
    """21 sequences of 12 tokens, padded after a random length (so ranks see different token counts)."""

    def __init__(self, n: int = 21):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(3, 100, (n, 12), generator=g)
        self.lengths = torch.randint(4, 13, (n,), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        mask = (torch.arange(12) < self.lengths[i]).long()
        return {"input_ids": self.ids[i] * mask, "attention_mask": mask, "labels": self.labels[i]}


def _loader(batch_size: int):
    return torch.utils.data.DataLoader(_Data(), batch_size=batch_size, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


class _Record(TrainHook):
    """A training hook (after the prior's) that records the replica digest after every step."""

    def __init__(self, prior=None):
        self.prior, self.opt, self.rows = prior, None, []

    def bind_optimizer(self, opt):
        self.opt = opt

    def after_step(self, model, step, total):
        self.rows.append(digest(model, self.opt, self.prior))
        return {}


def _prior_phase(model, adapter, *, reduce: bool = True) -> tuple[list[str], object]:
    """SN + the proximal prior (after-LN norms, readout) for one epoch of batches 8, 8, 5 (ranks: 4/4, 4/4, 3/2)."""
    from idprior.config import TrainConfig
    from idprior.method import proximal, spectral
    from idprior.method.gates import Gates
    from idprior.pipeline.train import AfterStep, train

    spectral.attach(model, adapter, "init")
    gates = Gates(model, adapter).attach()
    prior = proximal.ProximalPrior(model, adapter, gates, target=0.5, after_ln=True)
    record = _Record(prior)
    real = proximal._all_reduce_moments
    if not reduce:  # a rank-local statistic enters the prior's step
        proximal._all_reduce_moments = lambda rec: None
    try:
        train(model, _loader(8), TrainConfig(epochs=1, lr=3e-3, warmup_ratio=0.0, eval_each_epoch=False,
                                             checkpoint_every=0), hooks=[AfterStep(prior), record], desc="prior")
    finally:
        proximal._all_reduce_moments = real
    prior.detach()
    gates.detach()
    spectral.fold(model)
    return record.rows, prior


def _recovery_phase(model) -> list[str]:
    """Plain training with dropout on, batches of 4 (the last has one row: every rank runs it whole)."""
    from idprior.config import TrainConfig
    from idprior.pipeline.train import train

    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    record = _Record()
    train(model, _loader(4), TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.0, eval_each_epoch=False,
                                         checkpoint_every=0), hooks=[record], desc="recover")
    return record.rows


def _tiny():
    from idprior.arch import get_adapter
    from tiny_models import tiny_bert

    model = tiny_bert()
    for m in model.modules():  # the prior phase is compared with one process: no dropout there
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model, get_adapter(model)


def _train_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    try:
        model, adapter = _tiny()
        prior_rows, prior = _prior_phase(model, adapter)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(Path(out, "prior_phase.safetensors")))
        rows = {"prior": prior_rows, "recover": _recovery_phase(model), "identity": [str(u) for u in prior.identity_units()]}
        model, adapter = _tiny()
        rows["unreduced"] = _prior_phase(model, adapter, reduce=False)[0]
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(rows), encoding="utf-8")


def test_train_replicas_stay_identical_and_match_one_process(tmp_path):
    mp.spawn(_train_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD))
    assert len(r0["prior"]) == 3 and len(r0["recover"]) == 6  # one digest per optimizer step
    assert r0["prior"] == r1["prior"]
    assert r0["recover"] == r1["recover"]
    assert r0["unreduced"][0] != r1["unreduced"][0]  # without the moment all-reduce the ranks part at once
    # the same global batches in one process: the same weights up to float summation order, the same units
    model, adapter = _tiny()
    _, prior = _prior_phase(model, adapter)
    assert r0["identity"] and [str(u) for u in prior.identity_units()] == r0["identity"]
    two = load_file(str(tmp_path / "prior_phase.safetensors"))
    one = model.state_dict()
    assert two.keys() == one.keys()
    # Attention key biases have a zero gradient in exact arithmetic (softmax ignores a constant per query), so
    # Adam normalises rounding noise into steps of up to lr each: they may differ by lr x steps, the rest by noise.
    keyb = [k for k in one if k.endswith("attention.self.key.bias")]
    assert max(float((two[k] - one[k]).abs().max()) for k in keyb) <= 3e-3 * 3
    worst = max(float((two[k] - one[k]).abs().max()) for k in one if k not in keyb)
    assert worst < 1e-5, worst


def test_shard_splits_rows_by_loss_items(monkeypatch):
    """Contiguous slices weighted by their share of the loss items (rows; shifted LM labels), and a batch
    some rank would get nothing of is run whole by every rank at weight 1/world."""
    monkeypatch.setattr(distributed, "world", lambda: 2)
    ids = torch.arange(10).view(5, 2)
    for r, (rows, weight) in enumerate([([0, 1, 2], 3 / 5), ([3, 4], 2 / 5)]):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        part, w = distributed.shard({"input_ids": ids, "labels": torch.arange(5), "note": "kept"})
        assert part["input_ids"].tolist() == ids[rows].tolist() and w == weight and part["note"] == "kept"
    labels = torch.tensor([[1, 2, 3, 4], [1, 2, -100, -100], [5, 6, 7, -100], [1, -100, -100, -100]])
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    part, w = distributed.shard({"input_ids": labels.clamp(min=0), "labels": labels})
    assert part["labels"].tolist() == labels[2:].tolist() and w == 2 / 6  # token labels after the shift: 3+1 | 2+0
    whole, w = distributed.shard({"input_ids": labels[:1], "labels": labels[:1]})
    assert whole["labels"].shape[0] == 1 and w == 0.5


def test_accelerate_cpu_launch_of_one_process_is_reported(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` runs one process; its environment gives it away."""
    for key in ("WORLD_SIZE", "ACCELERATE_USE_CPU", "MASTER_ADDR", "ACCELERATE_NUM_PROCESSES"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.single_launch_warning() is None
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert distributed.single_launch_warning() is None  # --num_processes 1 sets no MASTER_ADDR
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    assert "torchrun --nproc_per_node" in distributed.single_launch_warning()
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun: several processes really started
    assert distributed.single_launch_warning() is None


# ---- SnipTrainer -------------------------------------------------------------------------------------

class _DigestCallback(TrainerCallback):
    """After the prior's callback: the replica digest of every optimizer step."""

    def __init__(self, prior):
        self.prior, self.rows = prior, []

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.rows.append(digest(model, optimizer, self.prior))


def _snip_trainer(out: Path, steps: int = 6):
    """Tiny BERT (dropout on) with SN and the prior, batches of 4 per process, a checkpoint every 2 steps."""
    from transformers import TrainingArguments

    from idprior.hf import SnipTrainer
    from tiny_models import tiny_bert

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=3e-3,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
                             logging_steps=1, seed=0)
    trainer = SnipTrainer(model=tiny_bert().train(), args=args, train_dataset=_Data(), target=0.5)
    record = _DigestCallback(trainer.snip_prior)
    trainer.add_callback(record)
    return trainer, record


def _resume_check(out: Path) -> dict:
    """An uninterrupted run, then a fresh trainer resumed from checkpoint-4: their digests from step 5 on."""
    trainer, full = _snip_trainer(out / "full")
    trainer.train()
    ckpt = out / "full" / "checkpoint-4"
    assert (ckpt / "snip_prior.safetensors").is_file() and (ckpt / "snip_prior.json").is_file()
    trainer, resumed = _snip_trainer(out / "full")
    trainer.train(resume_from_checkpoint=str(ckpt))
    return {"full": full.rows, "resumed": resumed.rows}


def _trainer_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port)
    try:
        rows = _resume_check(Path(out))
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"trainer{rank}.json").write_text(json.dumps(rows), encoding="utf-8")


def test_snip_trainer_resumes_bit_identically(tmp_path):
    """One process: the prior's state is in every checkpoint, and a resumed run ends as the uninterrupted one
    (without the state λ and the moment averages would restart)."""
    rows = _resume_check(tmp_path)
    assert len(rows["full"]) == 6 and rows["resumed"] == rows["full"][4:]


@pytest.mark.slow
def test_snip_trainer_replicas_stay_identical(tmp_path):
    """Two processes (DDP by the Trainer, the prior's moments summed over ranks): identical replicas after
    every step; the resumed run (checkpoint written by rank 0, read by both) ends as the uninterrupted one."""
    mp.spawn(_trainer_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (json.loads((tmp_path / f"trainer{r}.json").read_text()) for r in range(WORLD))
    assert len(r0["full"]) == 6
    assert r0 == r1
    assert r0["resumed"] == r0["full"][4:]


def test_prior_state_keeps_the_last_norms():
    """Whether a group has reached its share is read from the last step's norms at the next step: a prior
    loaded from a state_dict must read it as the saved one does."""
    from idprior.method.gates import Gates
    from idprior.method.proximal import ProximalPrior

    model, adapter = _tiny()
    saved, fresh = (ProximalPrior(model, adapter, Gates(model, adapter), target=0.5) for _ in range(2))
    saved.fbar = {"head": 1.0, "neuron": 1.0}
    saved.norms = {(kind, layer): torch.zeros(n, dtype=torch.float64) for kind, n in (("head", 4), ("neuron", 64))
                   for layer in range(adapter.num_layers)}
    assert all(saved._reached().values()) and not any(fresh._reached().values())
    fresh.load_state_dict(saved.state_dict())
    assert fresh._reached() == saved._reached()


# ---- idprior prune under torchrun ----------------------------------------------------------------------

DRIVER = r'''
"""idprior's CLI, recording a replica digest after every training step in $IDPRIOR_TEST_DIGESTS/rank<r>.jsonl;
with IDPRIOR_TEST_KILL=K rank 0 is SIGKILLed right after fine-tuning step K (torchrun then stops the others)."""
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from idprior import distributed
from idprior.pipeline import train
from idprior.cli.main import main
from test_multiprocess import digest

real, kill = train._Loop.step, int(os.environ.get("IDPRIOR_TEST_KILL") or 0)

def step(self, batch, state):
    terms = real(self, batch, state)
    prior = next((h for h in self.hooks if hasattr(h, "state_dict")), None)
    row = {"stage": self.desc, "step": state.global_step + 1, "digest": digest(self.plain, self.opt, prior)}
    with open(os.path.join(os.environ["IDPRIOR_TEST_DIGESTS"], f"rank{distributed.rank()}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    if self.desc == "finetune" and state.global_step + 1 == kill and distributed.is_main():
        os.kill(os.getpid(), signal.SIGKILL)
    return terms

train._Loop.step = step
sys.exit(main(sys.argv[1:]))
'''

PRUNE = ["--target", "0.4", "--epochs", "2", "--batch-size", "16", "--max-length", "24", "--calib-size", "32",
         "--recover-epochs", "1", "--no-bench", "--set", "train.checkpoint_every=2", "--set", "recover.batch_size=8"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A tiny BERT folder without dropout (so one process and two take the same steps) and a 120-row CSV."""
    from tiny_folder import WORDS, make_tiny_bert_folder

    tmp = tmp_path_factory.mktemp("mp")
    folder = make_tiny_bert_folder(tmp / "bert")
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    rows = ["text,label"]
    for i in range(120):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (6,), generator=g)]
        rows.append(" ".join([*words, *(["good", "great"] if i % 2 else ["bad", "dull"])]) + f",{i % 2}")
    (tmp / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp / "driver.py").write_text(DRIVER)
    return {"tmp": tmp, "model": str(folder), "data": str(tmp / "train.csv"), "driver": str(tmp / "driver.py")}


def _prune(inputs: dict, out: Path, *extra: str, procs: int = WORLD, kill: int = 0) -> subprocess.CompletedProcess:
    digests = out.parent / f"{out.name}.digests"
    digests.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               IDPRIOR_TEST_DIGESTS=str(digests), IDPRIOR_TEST_KILL=str(kill))
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    argv = ["prune", "--model", inputs["model"], "--data", inputs["data"], *PRUNE, "--out", str(out), *extra]
    return subprocess.run([*launch, inputs["driver"], *argv], env=env, capture_output=True, text=True, timeout=600)


def _digests(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out.parent / f"{out.name}.digests" / f"rank{rank}.jsonl").read_text().splitlines()]


def _weights(folder: Path) -> dict:
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_prune_in_two_processes_is_the_one_process_run_and_resumes(inputs):
    tmp = inputs["tmp"]
    one, two, killed = tmp / "one", tmp / "two", tmp / "killed"
    r = _prune(inputs, one, procs=1)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _prune(inputs, two)
    assert r.returncode == 0, r.stderr[-3000:]
    # one run folder, the files one process writes
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # replicas identical after every optimizer step of both training stages
    d0, d1 = _digests(two, 0), _digests(two, 1)
    assert d0 == d1
    assert {row["stage"] for row in d0} == {"finetune", "recover"}
    # the one-process plan at the same global batch: the same units; the threshold up to float summation order
    p1, p2 = (json.loads((d / "plan.json").read_text()) for d in (one, two))
    assert p1["units"] and p2["units"] == p1["units"] and p2["counts"] == p1["counts"]
    assert p2["tau"] == pytest.approx(p1["tau"], rel=1e-5)
    w1, w2 = _weights(one / "finetuned"), _weights(two / "finetuned")
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1 if not k.endswith("key.bias")) < 1e-5
    # killed mid fine-tune (after step 5; the checkpoint of step 4 is the last), then --resume
    r = _prune(inputs, killed, kill=5)
    assert r.returncode != 0 and not (killed / "finetuned").exists()
    assert [p.name for p in (killed / "ckpt_finetune").iterdir() if p.name.startswith("e")] == ["e0000-s0000004"]
    r = _prune(inputs, killed, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("plan.json", "scores.json", "train_log.jsonl", "recover_log.jsonl"):
        assert (killed / name).read_bytes() == (two / name).read_bytes(), name
    for folder in ("finetuned", "surgery", "pruned"):
        wk, w2 = _weights(killed / folder), _weights(two / folder)
        assert wk.keys() == w2.keys() and all(torch.equal(wk[k], w2[k]) for k in w2), folder
    assert _digests(killed, 0)[-1] == d0[-1]  # the resumed replicas end where the uninterrupted ones did


def test_prune_in_two_processes_refuses_an_unshared_batch_size(inputs):
    """Rank 0 checks (the pre-run checks used to run on every rank and trip over each other's folder), its
    one-line error stops both ranks and is printed once."""
    out = inputs["tmp"] / "odd"
    r = _prune(inputs, out, "--batch-size", "15")
    assert r.returncode != 0
    message = "train.batch_size 15 is not divisible by the 2 processes"
    assert r.stderr.count(message) == 1, r.stderr[-3000:]  # printed by rank 0 only
    assert not out.exists()
