"""A short fine-tuning loop of our own: AdamW, linear warm-up/decay, clipping, checkpoints, resume.

The loop knows nothing about pruning. SNIP plugs in through `extra_loss` (the loss-term identity
prior, computed from what the gate observers saw during the forward pass) or `post_step` (the
proximal prior, which edits the weights after each optimizer step), and distillation through
`teacher`. Runs under `accelerate launch` with the same code as one process.

Checkpoints (in `ckpt_dir`): one folder per checkpoint, `e<epoch>-s<step in epoch>/`, holding
`model.safetensors` (spectral-norm u, v and bounds included: they are buffers), `optimizer.pt`
(optimizer + scheduler, read back with `weights_only=True`), `rng.safetensors` and `state.json`
(progress, history, the running loss sums of the epoch, Python's RNG) and, when `post_step` has a
`state_dict()`, its state: plain values in `state.json`, tensors in `post_step.safetensors`. Each folder is written
under a temporary name and renamed when complete, so a crash at any moment leaves only complete
checkpoints; older ones are deleted after the new one is in place. Written each epoch and every
`checkpoint_every` steps. `resume=True` continues from the newest, skipping the batches already
seen in the interrupted epoch (the epoch's order is re-seeded, so it is the same) with every RNG
restored, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import io
from .config import TrainConfig
from .errors import IdpriorError

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


def train(
    model: torch.nn.Module,
    train_loader,
    cfg: TrainConfig,
    *,
    seed: int = 0,
    eval_fn: Callable[[torch.nn.Module], dict] | None = None,
    main_metric: str | None = None,
    higher_is_better: bool = True,
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

    `post_step(model, step, total)` runs after every `opt.step()` (before the scheduler moves the
    learning rate); its dict of floats joins the step's log row. If it has `state_dict()` /
    `load_state_dict()`, that state is checkpointed and restored on resume.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    set_seed(seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise IdpriorError("the training split is empty; check the task data or max_train")
    total = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    n_epochs = math.ceil(cfg.epochs) if cfg.epochs > 0 else 0
    opt = _optimizer(model, cfg)
    sched = _scheduler(opt, total, int(cfg.warmup_ratio * total))
    model, opt = acc.prepare(model, opt)
    if post_step is not None and hasattr(post_step, "bind_optimizer"):
        post_step.bind_optimizer(getattr(opt, "optimizer", opt))  # a proximal step in the optimizer's metric
    if acc.num_processes > 1:
        train_loader = acc.prepare(train_loader)
    if teacher is not None:
        teacher.eval().to(acc.device)
    result = TrainResult()
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best_metric": None, "best_epoch": None, "history": []}
    ckpt = Path(ckpt_dir) if ckpt_dir else None
    last = latest_checkpoint(ckpt) if ckpt and resume else None
    if last is not None:
        state = _load_checkpoint(last, acc.unwrap_model(model), opt, sched, post_step)
    result.history = state["history"]
    t0 = time.perf_counter()
    log = None
    if log_path and acc.is_main_process:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        _trim_log(Path(log_path), state["global_step"])  # drop rows past the checkpoint (and a torn last line)
        log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 - append-only log, whole rows, trimmed on resume
    try:
        while state["global_step"] < total and state["epoch"] < n_epochs:
            epoch = state["epoch"]
            model.train()
            _reseed_order(train_loader, seed, epoch)
            sums: dict[str, float] = dict(state.pop("epoch_sums", {}))  # a resumed epoch keeps its running means
            count = state.pop("epoch_count", 0)
            bar = tqdm(total=min(steps_per_epoch, total - epoch * steps_per_epoch), initial=state["step_in_epoch"],
                       desc=f"{desc} epoch {epoch + 1}/{n_epochs}", disable=not acc.is_main_process, dynamic_ncols=True,
                       leave=False)
            for i, batch in enumerate(train_loader):
                if i < state["step_in_epoch"]:
                    continue  # resumed: these batches were already seen
                if state["global_step"] >= total:
                    break
                batch = _to(batch, acc.device)
                with parametrize.cached():  # spectral norm: one power-iteration step per training step
                    outputs = model(**batch)
                    loss = task_loss(outputs, batch)
                    terms = {"task_loss": float(loss.detach())}
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
                        kd = distill_loss(outputs.logits, t_logits, distill_temperature, batch.get("attention_mask"))
                        loss = (1 - distill_alpha) * loss + distill_alpha * kd
                        terms["distill_loss"] = float(kd.detach())
                    if extra_loss is not None:
                        extra, extra_terms = extra_loss(acc.unwrap_model(model), batch, state["global_step"], total)
                        loss = loss + extra
                        terms.update(extra_terms)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(
                        f"{desc}: loss became {float(loss.detach())} at step {state['global_step'] + 1}/{total} "
                        f"(epoch {epoch + 1}, {terms}); lower the learning rate (train.lr) or the prior strength "
                        "(prune.prior_lambda), or use --dtype float32; the last good checkpoint is kept"
                    )
                acc.backward(loss)
                if cfg.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
                        raise NonFiniteLoss(
                            f"{desc}: the gradient norm became {float(grad_norm)} at step {state['global_step'] + 1}"
                            f"/{total} (loss {float(loss.detach()):.4g}); lower the learning rate (train.lr) or use "
                            "--dtype float32; "
                            "the last good checkpoint is kept"
                        )
                opt.step()
                if post_step is not None:
                    terms.update(post_step(acc.unwrap_model(model), state["global_step"], total))
                sched.step()
                opt.zero_grad(set_to_none=True)
                state["global_step"] += 1
                state["step_in_epoch"] = i + 1
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
                bar.update(1)
                bar.set_postfix({k: f"{v / count:.4f}" for k, v in sums.items()}, refresh=False)
                if log:
                    log.write(json.dumps({"step": state["global_step"], **terms, "lr": sched.get_last_lr()[0]}) + "\n")
                if ckpt and cfg.checkpoint_every and state["global_step"] % cfg.checkpoint_every == 0:
                    if log:
                        log.flush()
                    _save_checkpoint(ckpt, acc.unwrap_model(model), opt, sched,
                                     {**state, "epoch_sums": sums, "epoch_count": count}, acc=acc, post_step=post_step)
            bar.close()
            row = {"epoch": epoch + 1, "steps": state["global_step"], **{k: v / max(1, count) for k, v in sums.items()}}
            if eval_fn is not None:
                metrics = eval_fn(acc.unwrap_model(model))
                row.update({f"eval_{k}": v for k, v in metrics.items()})
                key = main_metric or next(iter(metrics))
                value = metrics[key]
                best = state["best_metric"]
                if best is None or (value > best if higher_is_better else value < best):
                    state["best_metric"], state["best_epoch"] = value, epoch + 1
                    if ckpt:
                        _save_best(ckpt, epoch + 1, acc.unwrap_model(model), acc=acc)
                    else:
                        state["_best_weights"] = {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()}
            state["history"].append(row)
            if acc.is_main_process:
                tqdm.write(f"{desc} epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                                    if isinstance(v, float)))
            state["epoch"] += 1
            state["step_in_epoch"] = 0
            if ckpt:
                if log:
                    log.flush()
                _save_checkpoint(ckpt, acc.unwrap_model(model), opt, sched, state, acc=acc, post_step=post_step)
    finally:
        if log:
            log.close()
    model = acc.unwrap_model(model)
    if eval_fn is not None and state["best_epoch"] is not None:
        best_file = ckpt / f"best-e{state['best_epoch']:04d}.safetensors" if ckpt else None
        if best_file is not None and best_file.is_file():
            model.load_state_dict(load_file(str(best_file)), strict=True)
        elif "_best_weights" in state:
            model.load_state_dict(state.pop("_best_weights"), strict=True)
    model.eval()
    result.best_metric, result.best_epoch = state["best_metric"], state["best_epoch"]
    result.steps = state["global_step"]
    result.wall_s = time.perf_counter() - t0
    return result


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


def _ckpt_name(state: dict) -> str:
    return f"e{state['epoch']:04d}-s{state['step_in_epoch']:07d}"


def latest_checkpoint(ckpt: Path | None) -> Path | None:
    """The newest complete checkpoint folder in `ckpt` (only complete ones carry a final name)."""
    if ckpt is None or not ckpt.is_dir():
        return None
    found = [(tuple(map(int, m.groups())), p) for p in ckpt.iterdir()
             if (m := _CKPT_NAME.fullmatch(p.name)) and (p / "state.json").is_file()]
    return max(found)[1] if found else None


def _save_best(ckpt: Path, epoch: int, model: torch.nn.Module, acc=None) -> None:
    """best-e<epoch>.safetensors; the file named by state["best_epoch"] is the one loaded at the end.
    Written by the main process only (the weights are the same on every rank)."""
    if acc is None or acc.is_main_process:
        ckpt.mkdir(parents=True, exist_ok=True)
        name = f"best-e{epoch:04d}.safetensors"
        _save_weights(ckpt / name, model)
        for old in ckpt.glob("best-e*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)
    if acc is not None:
        acc.wait_for_everyone()


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


def _save_checkpoint(ckpt: Path, model, opt, sched, state: dict, acc=None, post_step=None) -> None:
    """Weights, optimizer, scheduler, RNG and progress in one folder that appears complete or not at all.
    Written by the main process only (ranks would race for the folder); the others wait for it."""
    if acc is None or acc.is_main_process:
        _write_checkpoint(ckpt, model, opt, sched, state, post_step)
    if acc is not None:
        acc.wait_for_everyone()


def _write_checkpoint(ckpt: Path, model, opt, sched, state: dict, post_step=None) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    name = _ckpt_name(state)
    rng, rng_extra = _rng_state()
    post_plain, post_tensors = _post_step_state(post_step)
    with io.atomic_dir(ckpt / name) as tmp:
        save_file(_state_tensors(model), str(tmp / "model.safetensors"))
        torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, tmp / "optimizer.pt")
        save_file(rng, str(tmp / "rng.safetensors"))
        if post_tensors:
            save_file(post_tensors, str(tmp / "post_step.safetensors"))
        extra = {"post_step": post_plain} if post_plain is not None else {}
        io.write_json(tmp / "state.json", {**{k: v for k, v in state.items() if not k.startswith("_")}, **extra, "rng": rng_extra})
    for old in ckpt.iterdir():  # older checkpoints (and leftovers of interrupted writes)
        if old.name != name and (_CKPT_NAME.fullmatch(old.name) or old.name.startswith(".e")):
            shutil.rmtree(old, ignore_errors=True)


def _post_step_state(post_step) -> tuple[dict | None, dict[str, torch.Tensor]]:
    """`post_step.state_dict()` split into JSON values and tensors (None if it keeps no state)."""
    if post_step is None or not hasattr(post_step, "state_dict"):
        return None, {}
    full = post_step.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in full.items() if torch.is_tensor(v)}
    return {k: v for k, v in full.items() if not torch.is_tensor(v)}, tensors


def _load_checkpoint(folder: Path, model, opt, sched, post_step=None) -> dict:
    state = io.read_json(folder / "state.json")
    post_plain = state.pop("post_step", None)
    if post_step is not None and hasattr(post_step, "load_state_dict"):
        if post_plain is None:
            raise IdpriorError(f"checkpoint {folder} holds no state for the post-step hook (the prior); "
                               "resume with the same settings or start over with --overwrite")
        tensors = folder / "post_step.safetensors"
        post_step.load_state_dict({**post_plain, **(load_file(str(tensors)) if tensors.is_file() else {})})
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    blob = torch.load(folder / "optimizer.pt", weights_only=True)
    opt.load_state_dict(blob["opt"])
    sched.load_state_dict(blob["sched"])
    _set_rng_state(load_file(str(folder / "rng.safetensors")), state.pop("rng", {}))
    return state


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
