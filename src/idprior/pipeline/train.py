"""A short fine-tuning loop of our own: AdamW, linear warm-up/decay, clipping, checkpoints, resume.

The loop knows nothing about pruning. Everything beyond the task loss plugs in as a `TrainHook`:
the identity prior (`AfterStep(method.proximal.ProximalPrior)`, which edits the weights after each
optimizer step), distillation (`Distillation`) and any extra loss term (`AddedLoss`). One call of `train` is a
`TrainState` (progress, checkpointed), a `_Loop.step` per batch, `_Loop.end_epoch` (history, best
weights) and a `Checkpointer`.

Several processes (torchrun, accelerate launch; `distributed`): every rank reads the same global batches, takes
its slice and weights its loss by its share of the batch, the gradients are summed over ranks before clipping,
so a step is the one-process step at the same global batch size up to float summation order; each rank starts
from rank 0's weights and draws its dropout masks from a per-step, per-rank seed. Rank 0 alone writes
checkpoints, logs and the best weights; the others wait for them.

Checkpoints (in `ckpt_dir`): one folder per checkpoint, `e<epoch>-s<step in epoch>/`, holding
`model.safetensors` (spectral-norm u, v and bounds included: they are buffers), `optimizer.safetensors`
(the optimizer's per-parameter tensors; its groups and the scheduler go to `state.json`: no pickle anywhere),
`rng.safetensors` and `state.json`
(`TrainState`: progress, history, the running loss sums of the epoch; Python's RNG) and, for each
hook with a `state_dict()`, its state: plain values in `state.json` under the hook's `state_key`,
tensors in `<state_key>.safetensors` (the proximal prior's: "post_step"). Each folder is written
under a temporary name and renamed when complete, so a crash at any moment leaves only complete
checkpoints; older ones are deleted after the new one is in place. Written each epoch and every
`checkpoint_every` steps. `resume=True` continues from the newest, skipping the batches already
seen in the interrupted epoch (the epoch's order is re-seeded, so it is the same) with every RNG
restored, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from .. import distributed, io
from ..config import TrainConfig
from ..errors import IdpriorError
from ..method.spectral import sn_stats

ExtraLoss = Callable[[torch.nn.Module, dict, int, int], tuple[torch.Tensor, dict]]
PostStep = Callable[[torch.nn.Module, int, int], dict]  # (model, step, total) -> log terms


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)  # one row per epoch (loss terms, eval metrics)
    best_metric: float | None = None
    best_epoch: int | None = None
    steps: int = 0
    wall_s: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class NonFiniteLoss(IdpriorError):
    pass


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norms (the usual BERT recipe)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _scheduler(opt: torch.optim.Optimizer, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _reseed_order(loader, seed: int, epoch: int) -> None:
    gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if gen is not None:
        gen.manual_seed(seed * 1_000_003 + epoch)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def task_loss(outputs, batch: dict) -> torch.Tensor:
    """The model's own loss (HF heads compute it from `labels`)."""
    if getattr(outputs, "loss", None) is None:
        raise RuntimeError("model returned no loss: the batch needs a 'labels' key")
    return outputs.loss


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) on softened logits (Hinton et al.); LM logits averaged over real tokens."""
    t = temperature
    if student_logits.shape[-1] == 1:  # regression head: match values
        return F.mse_loss(student_logits, teacher_logits)
    s = F.log_softmax(student_logits / t, dim=-1)
    p = F.log_softmax(teacher_logits / t, dim=-1)
    kl = (p.exp() * (p - s)).sum(-1) * t * t  # [B] or [B,T]
    if kl.ndim == 2 and mask is not None:
        return (kl * mask).sum() / mask.sum().clamp(min=1)
    return kl.mean()


# ---- hooks: what SNIP adds to a training step ------------------------------------------------------

class TrainHook:
    """One interface for everything that changes a training step beyond the task loss.

    `loss` runs inside the forward's spectral-norm cache, after the task loss, and may return a new
    loss (distillation mixes, the identity prior adds); `after_step` runs after `opt.step()`, before
    the scheduler moves the learning rate (the proximal prior edits the weights there). Both return
    log terms, which join the step's row in hook order. A hook with `state_dict()` /
    `load_state_dict()` is checkpointed: plain values in state.json under `state_key`, tensors in
    `<state_key>.safetensors`.
    """

    state_key = "hook"

    def start(self, device: torch.device) -> None:
        """Called once before the first step, with the device training runs on."""

    def loss(self, model: torch.nn.Module, batch: dict, outputs, loss: torch.Tensor, step: int,
             total: int) -> tuple[torch.Tensor, dict]:
        return loss, {}

    def after_step(self, model: torch.nn.Module, step: int, total: int) -> dict:
        return {}


class Distillation(TrainHook):
    """loss <- (1 - alpha) loss + alpha KD(teacher || student) (`distill_loss`)."""

    def __init__(self, teacher: torch.nn.Module, alpha: float = 0.5, temperature: float = 2.0):
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature

    def start(self, device):
        self.teacher.eval().to(device)

    def loss(self, model, batch, outputs, loss, step, total):
        with torch.no_grad():
            t_logits = self.teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
        kd = distill_loss(outputs.logits, t_logits, self.temperature, batch.get("attention_mask"))
        return (1 - self.alpha) * loss + self.alpha * kd, {"distill_loss": float(kd.detach())}


class AddedLoss(TrainHook):
    """An `ExtraLoss` callable (a term added to the task loss) as a hook: loss <- loss + extra."""

    def __init__(self, fn: ExtraLoss):
        self.fn = fn

    def loss(self, model, batch, outputs, loss, step, total):
        extra, terms = self.fn(model, batch, step, total)
        return loss + extra, terms


class AfterStep(TrainHook):
    """A `PostStep` callable (the proximal prior) as a hook, its state kept under "post_step" (the
    name checkpoints have always used for it)."""

    state_key = "post_step"

    def __init__(self, fn: PostStep):
        self.fn = fn
        if hasattr(fn, "state_dict") and hasattr(fn, "load_state_dict"):
            self.state_dict, self.load_state_dict = fn.state_dict, fn.load_state_dict
        if hasattr(fn, "bind_optimizer"):
            self.bind_optimizer = fn.bind_optimizer

    def after_step(self, model, step, total):
        return self.fn(model, step, total)


# ---- state and checkpoints -------------------------------------------------------------------------

@dataclass
class TrainState:
    """Progress of a training run: what a checkpoint's state.json holds, so a resume continues it."""

    epoch: int = 0  # epochs finished
    step_in_epoch: int = 0  # batches of the current epoch already done
    global_step: int = 0
    best_metric: float | None = None
    best_epoch: int | None = None  # 1-based, as in the history
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    epoch_sums: dict[str, float] = field(default_factory=dict)  # running sums of the log terms this epoch
    epoch_count: int = 0  # steps in those sums

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> TrainState:
        """Also reads the state.json of earlier versions (a plain dict with these keys; the running
        sums only in mid-epoch checkpoints)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def end_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums, self.epoch_count = {}, 0


class Checkpointer:
    """Checkpoint folders in `ckpt_dir` (see the module docstring) and the best epoch's weights.

    Without a folder the best weights are kept in memory, so the end of training restores them
    through the same `restore_best` either way. Writes happen on rank 0 only; the other ranks wait.
    """

    def __init__(self, ckpt_dir: str | Path | None, hooks: list[TrainHook] = ()):
        self.dir = Path(ckpt_dir) if ckpt_dir else None
        self.stateful = [h for h in hooks if hasattr(h, "state_dict") and hasattr(h, "load_state_dict")]
        self._best_in_memory: dict[str, torch.Tensor] | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.dir)

    def save(self, model, opt, sched, state: TrainState) -> None:
        """Weights, optimizer, scheduler, RNG, progress and hook state in one folder that appears
        complete or not at all; the other ranks wait for it."""
        if self.dir is None:
            return
        if distributed.is_main():
            _write_checkpoint(self.dir, model, opt, sched, state, self.stateful)
        distributed.barrier()

    def load(self, folder: Path, model, opt, sched) -> TrainState:
        return _load_checkpoint(folder, model, opt, sched, self.stateful)

    def keep_best(self, epoch: int, model: torch.nn.Module) -> None:
        """best-e<epoch>.safetensors (the only best file), or a copy in memory without a folder."""
        if self.dir is None:
            self._best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        if distributed.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            name = f"best-e{epoch:04d}.safetensors"
            _save_weights(self.dir / name, model)
            for old in self.dir.glob("best-e*.safetensors"):
                if old.name != name:
                    old.unlink(missing_ok=True)
        distributed.barrier()

    def restore_best(self, model: torch.nn.Module, epoch: int) -> None:
        """Load the weights `keep_best` kept for `epoch` (nothing if they are gone)."""
        best_file = self.dir / f"best-e{epoch:04d}.safetensors" if self.dir else None
        if best_file is not None and best_file.is_file():
            model.load_state_dict(load_file(str(best_file)), strict=True)
        elif self._best_in_memory is not None:
            model.load_state_dict(self._best_in_memory, strict=True)
            self._best_in_memory = None


# ---- the loop --------------------------------------------------------------------------------------

@dataclass
class _Loop:
    """What every step of one `train` call shares."""

    model: torch.nn.Module  # as prepared by accelerate (possibly wrapped)
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    acc: object
    cfg: TrainConfig
    hooks: list[TrainHook]
    total: int
    desc: str
    seed: int = 0
    world: int = 1  # processes sharing each batch (`distributed`)

    @property
    def plain(self) -> torch.nn.Module:
        return self.acc.unwrap_model(self.model)

    def step(self, batch: dict, state: TrainState) -> dict:
        """One optimizer step on `batch`; returns its log terms. Raises NonFiniteLoss on a NaN/inf
        loss or gradient norm, before the weights change. With several processes: this rank's slice of the
        global batch, its loss weighted by its share, gradients and log terms summed over ranks."""
        weight = 1.0
        if self.world > 1:
            batch, weight = distributed.shard(batch)
            torch.manual_seed(distributed.step_seed(self.seed, state.global_step))
        batch = _to(batch, self.acc.device)
        with parametrize.cached():  # spectral norm: one power-iteration step per training step
            outputs = self.model(**batch)
            loss = task_loss(outputs, batch)
            terms = {"task_loss": float(loss.detach())}
            for hook in self.hooks:
                loss, hook_terms = hook.loss(self.plain, batch, outputs, loss, state.global_step, self.total)
                terms.update(hook_terms)
        value = float(loss.detach())
        if self.world > 1:  # the global batch's values, the same on every rank (a NaN anywhere stops all)
            terms = distributed.weighted_sum({**terms, " loss": value}, weight)
            value = terms.pop(" loss")
            loss = loss * weight
        terms.update(sn_stats(self.plain))  # where spectral normalization binds in this forward ({} without SN)
        where = f"at step {state.global_step + 1}/{self.total}"
        if not math.isfinite(value):
            raise NonFiniteLoss(
                f"{self.desc}: loss became {value} {where} (epoch {state.epoch + 1}, {terms}); lower "
                "the learning rate (train.lr), or use --dtype float32; "
                "the last good checkpoint is kept")
        self.acc.backward(loss)
        if self.world > 1:
            distributed.sum_grads(self.model.parameters())
        if self.cfg.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
            if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                raise NonFiniteLoss(
                    f"{self.desc}: the gradient norm became {float(grad_norm)} {where} (loss "
                    f"{float(loss.detach()):.4g}); lower the learning rate (train.lr) or use --dtype float32; "
                    "the last good checkpoint is kept")
        self.opt.step()
        for hook in self.hooks:
            terms.update(hook.after_step(self.plain, state.global_step, self.total))
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return terms

    def end_epoch(self, state: TrainState, eval_fn, main_metric: str | None, higher_is_better: bool,
                  ckpt: Checkpointer) -> None:
        """The epoch's row (mean log terms, eval metrics) into the history; a new best is kept."""
        epoch = state.epoch
        count = state.epoch_count
        row = {"epoch": epoch + 1, "steps": state.global_step, **{k: v / max(1, count) for k, v in state.epoch_sums.items()}}
        if eval_fn is not None:
            metrics = eval_fn(self.plain)
            row.update({f"eval_{k}": v for k, v in metrics.items()})
            value = metrics[main_metric or next(iter(metrics))]
            best = state.best_metric
            if best is None or (value > best if higher_is_better else value < best):
                state.best_metric, state.best_epoch = value, epoch + 1
                ckpt.keep_best(epoch + 1, self.plain)
        state.history.append(row)
        if distributed.is_main():
            tqdm.write(f"{self.desc} epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                                     if isinstance(v, float)))
        state.end_epoch()


def _hooks(hooks, extra_loss, post_step, teacher, distill_alpha, distill_temperature) -> list[TrainHook]:
    """The keyword forms of `train` as hooks, in the order they act: distillation, added loss, post-step."""
    out: list[TrainHook] = []
    if teacher is not None:
        out.append(Distillation(teacher, distill_alpha, distill_temperature))
    if extra_loss is not None:
        out.append(AddedLoss(extra_loss))
    if post_step is not None:
        out.append(AfterStep(post_step))
    return out + list(hooks or [])


def _open_log(log_path, last_step: int):
    """The step log, appended to; rows past `last_step` (a resumed run redoes them) are dropped first."""
    if not log_path or not distributed.is_main():
        return None
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    _trim_log(Path(log_path), last_step)  # drop rows past the checkpoint (and a torn last line)
    return open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - append-only log, whole rows, trimmed on resume


def train(
    model: torch.nn.Module,
    train_loader,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    main_metric: str | None = None,
    higher_is_better: bool = True,
    hooks: list[TrainHook] | None = None,
    extra_loss: ExtraLoss | None = None,
    post_step: PostStep | None = None,
    teacher: torch.nn.Module | None = None,
    distill_alpha: float = 0.5,
    distill_temperature: float = 2.0,
    ckpt_dir: str | Path | None = None,
    resume: bool = False,
    desc: str = "train",
    log_path: str | Path | None = None,
    accelerator=None,
) -> TrainResult:
    """Fine-tune `model` in place; with `eval_fn`, keep (and finally load) the best epoch's weights.

    `hooks` change each step (see `TrainHook`); `teacher` (distillation), `extra_loss` (an added
    loss term) and `post_step(model, step, total)` (after every `opt.step()`) are the same hooks
    in keyword form, acting in that order before `hooks`.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    set_seed(seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise IdpriorError("the training split is empty; check the task data or max_train")
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(cfg.epochs) if cfg.epochs > 0 else 0
    world = distributed.world()
    if world > 1:  # every rank iterates the global batches (same order) and takes its slice of each
        bad = distributed.batch_problems({"batch size": getattr(train_loader, "batch_size", None) or world}, world)
        if bad:
            raise IdpriorError(bad[0])
        model.to(acc.device)
        distributed.broadcast_module(model)
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, total, int(cfg.warmup_ratio * total))
    if world == 1:
        model, opt = acc.prepare(model, opt)
    hooks = _hooks(hooks, extra_loss, post_step, teacher, distill_alpha, distill_temperature)
    for hook in hooks:
        hook.start(acc.device)
        if hasattr(hook, "bind_optimizer"):  # a proximal step in the optimizer's metric reads its state
            hook.bind_optimizer(getattr(opt, "optimizer", opt))
    loop = _Loop(model, opt, sched, acc, cfg, hooks, total, desc, seed=seed, world=world)
    ckpt = Checkpointer(ckpt_dir, hooks)
    last = ckpt.latest() if resume else None
    state = ckpt.load(last, loop.plain, opt, sched) if last is not None else TrainState()
    t0 = time.perf_counter()
    log = _open_log(log_path, state.global_step)
    try:
        while state.global_step < total and state.epoch < n_epochs:
            _run_epoch(loop, train_loader, state, seed, steps_per_epoch, n_epochs, log, ckpt)
            loop.end_epoch(state, eval_fn, main_metric, higher_is_better, ckpt)
            if log:
                log.flush()
            ckpt.save(loop.plain, opt, sched, state)
    finally:
        if log:
            log.close()
    model = loop.plain
    if eval_fn is not None and state.best_epoch is not None:
        ckpt.restore_best(model, state.best_epoch)
    model.eval()
    return TrainResult(history=state.history, best_metric=state.best_metric, best_epoch=state.best_epoch,
                       steps=state.global_step, wall_s=time.perf_counter() - t0)


def _run_epoch(loop: _Loop, loader, state: TrainState, seed: int, steps_per_epoch: int, n_epochs: int, log,
               ckpt: Checkpointer) -> None:
    """The rest of the current epoch: steps, log rows, running means, mid-epoch checkpoints. A
    resumed epoch skips the batches it has seen (its order is re-seeded, so they are the same)."""
    epoch = state.epoch
    loop.model.train()
    _reseed_order(loader, seed, epoch)
    bar = tqdm(total=min(steps_per_epoch, loop.total - epoch * steps_per_epoch), initial=state.step_in_epoch,
               desc=f"{loop.desc} epoch {epoch + 1}/{n_epochs}", disable=not distributed.is_main(),
               dynamic_ncols=True, leave=False)
    every = loop.cfg.checkpoint_every
    for i, batch in enumerate(loader):
        if i < state.step_in_epoch:
            continue  # resumed: these batches were already seen
        if state.global_step >= loop.total:
            break
        terms = loop.step(batch, state)
        state.global_step += 1
        state.step_in_epoch = i + 1
        for k, v in terms.items():
            state.epoch_sums[k] = state.epoch_sums.get(k, 0.0) + v
        state.epoch_count += 1
        bar.update(1)
        bar.set_postfix({k: f"{v / state.epoch_count:.4f}" for k, v in state.epoch_sums.items()}, refresh=False)
        if log:
            log.write(json.dumps({"step": state.global_step, **terms, "lr": loop.sched.get_last_lr()[0],
                                  "batch": batch_digest(batch)}) + "\n")
        if ckpt.dir and every and state.global_step % every == 0:
            if log:
                log.flush()
            ckpt.save(loop.plain, loop.opt, loop.sched, state)
    bar.close()


def batch_digest(batch: dict) -> str | None:
    """A short hash of a batch's token ids, logged per step: two runs saw the same data in the same
    order exactly when their logs hold the same digests (the quality grid's from-pretrained protocol)."""
    ids = batch.get("input_ids")
    if not torch.is_tensor(ids):
        return None
    return f"{zlib.crc32(ids.detach().cpu().numpy().tobytes()):08x}"


def _state_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with shared storages broken (safetensors refuses aliased tensors)."""
    out, seen = {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.stride()) if v.numel() else None
        out[k] = v.detach().clone().contiguous() if key in seen else v.detach().contiguous()
        if key is not None:
            seen[key] = k
    return out


def _save_weights(path: Path, model: torch.nn.Module) -> None:
    io.write_with(path, lambda tmp: save_file(_state_tensors(model), str(tmp)))


_CKPT_NAME = re.compile(r"e(\d{4,})-s(\d{7,})")


def _ckpt_name(state: TrainState) -> str:
    return f"e{state.epoch:04d}-s{state.step_in_epoch:07d}"


def latest_checkpoint(ckpt: Path | None) -> Path | None:
    """The newest complete checkpoint folder in `ckpt` (only complete ones carry a final name)."""
    if ckpt is None or not ckpt.is_dir():
        return None
    found = [(tuple(map(int, m.groups())), p) for p in ckpt.iterdir()
             if (m := _CKPT_NAME.fullmatch(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Every RNG the loop may draw from: torch (CPU, CUDA), NumPy and Python's `random`."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, gauss_next = random.getstate()
    extra = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(py_state), gauss_next]}
    return tensors, extra


def _set_rng_state(tensors: dict[str, torch.Tensor], extra: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in extra and "numpy_keys" in tensors:
        kind, pos, has_gauss, gauss = extra["numpy"]
        np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "python" in extra:
        version, py_state, gauss_next = extra["python"]
        random.setstate((version, tuple(py_state), gauss_next))


def _write_checkpoint(ckpt: Path, model, opt, sched, state: TrainState, hooks: list = ()) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    name = _ckpt_name(state)
    rng, rng_extra = _rng_state()
    with io.atomic_dir(ckpt / name) as tmp:
        save_file(_state_tensors(model), str(tmp / "model.safetensors"))
        opt_tensors, opt_plain = _optimizer_state(opt, sched)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        extra = {"optimizer": opt_plain}
        for hook in hooks:
            plain, tensors = _hook_state(hook)
            if tensors:
                save_file(tensors, str(tmp / f"{hook.state_key}.safetensors"))
            extra[hook.state_key] = plain
        io.write_json(tmp / "state.json", {**state.to_json(), **extra, "rng": rng_extra})
    for old in ckpt.iterdir():  # older checkpoints (and leftovers of interrupted writes)
        if old.name != name and (_CKPT_NAME.fullmatch(old.name) or old.name.startswith(".e")):
            shutil.rmtree(old, ignore_errors=True)


def _optimizer_state(opt, sched) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer and scheduler state as (tensors for safetensors, JSON values): per-parameter tensors
    (Adam's step, exp_avg, exp_avg_sq) under `<param index>.<name>`, everything else plain."""
    sd = opt.state_dict()
    tensors, plain_state = {}, {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "state": plain_state, "sched": sched.state_dict()}


def _load_optimizer_state(opt, sched, tensors: dict[str, torch.Tensor], plain: dict) -> None:
    state: dict[int, dict] = {int(pid): dict(values) for pid, values in plain["state"].items()}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": plain["param_groups"]})
    sched.load_state_dict(plain["sched"])


def _hook_state(hook) -> tuple[dict, dict[str, torch.Tensor]]:
    """`hook.state_dict()` split into JSON values and tensors."""
    full = hook.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in full.items() if torch.is_tensor(v)}
    return {k: v for k, v in full.items() if not torch.is_tensor(v)}, tensors


def _load_checkpoint(folder: Path, model, opt, sched, hooks: list = ()) -> TrainState:
    state = io.read_json(folder / "state.json")
    if "optimizer" not in state or not (folder / "optimizer.safetensors").is_file():
        raise IdpriorError(f"checkpoint {folder} was written by an older idprior (optimizer state in a pickle file, "
                           "which idprior no longer reads); start the run over with --overwrite")
    for hook in hooks:
        plain = state.get(hook.state_key)
        if plain is None:
            raise IdpriorError(f"checkpoint {folder} holds no state for the {hook.state_key} hook (the prior); "
                               "resume with the same settings or start over with --overwrite")
        tensors = folder / f"{hook.state_key}.safetensors"
        hook.load_state_dict({**plain, **(load_file(str(tensors)) if tensors.is_file() else {})})
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    _load_optimizer_state(opt, sched, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    _set_rng_state(load_file(str(folder / "rng.safetensors")), state.get("rng", {}))
    return TrainState.from_json(state)


def _trim_log(path: Path, last_step: int) -> None:
    """Keep the rows of steps up to `last_step`: the steps a resumed run redoes are logged again."""
    if not path.is_file():
        return
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by a crash
        if isinstance(row, dict) and row.get("step", 0) <= last_step:
            rows.append(line)
    io.write_text(path, "".join(r + "\n" for r in rows))
