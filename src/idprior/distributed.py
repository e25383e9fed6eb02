"""Several processes (`torchrun --nproc_per_node N`, `accelerate launch --multi_gpu`): one process group,
rank 0 checks and writes, every rank trains on its shard of each global batch.

Why these rules (docs/scaling.md, "Several processes"):
  * the stages of `idprior prune` hand off through files, so rank 0 runs the pre-run checks, creates the run
    folder and writes every file; the other ranks wait at a barrier and then read what it wrote (`main_first`,
    `barrier`). Work that only rank 0 does runs inside `alone()`, where `world()` is 1, so that nothing in it
    (scoring, the prior) starts a collective the other ranks are not in;
  * training is data-parallel with the one-process semantics: every rank loads the same global batch (same
    seeded order), takes its contiguous slice (`shard`), weights its loss by its share of the batch's loss
    items, and the summed gradients (`sum_grads`) are the gradient of the one-process batch mean, up to the
    order of float additions. A manual all-reduce rather than DDP: it needs no wrapper around the model (the
    SN parametrizations and the prior's hooks see the plain model) and no "unused parameter" bookkeeping;
  * every rank starts from rank 0's weights (`broadcast_module`) and then takes identical steps, so replicas
    stay bit-identical (tests/test_multiprocess.py checks weights, SN vectors and the prior's state).

The backend follows the device: nccl with CUDA, gloo on CPU.

FSDP2 (`fully_shard`) is not how `train.train` runs; the row-shard helpers at the end (`local_rows`, `sum_rows`)
let the identity prior read weights sharded by it (docs/scaling.md, section 3).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys

import torch
import torch.distributed as dist

from .errors import ConfigError, IdpriorError

# Ranks wait at a barrier while rank 0 alone evaluates, benchmarks or writes a model: allow hours, not the
# default 30 minutes. A rank that fails ends the launch anyway (torchrun stops the others).
TIMEOUT = datetime.timedelta(hours=6)
BUCKET = 1 << 24  # gradient elements per all-reduce: bounds the temporary flat copy (64 MB in float32)
IGNORE_INDEX = -100  # labels that carry no loss (Hugging Face's convention)

_alone = 0


def launched_world() -> int:
    """The number of processes the launcher says it started (WORLD_SIZE; 1 without a launcher)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def init() -> bool:
    """Join the launcher's process group (once); True when this run has several processes.

    Under torchrun / accelerate every rank has WORLD_SIZE, RANK, LOCAL_RANK and MASTER_ADDR/PORT in its
    environment. A launch that asked for several processes but started one is reported (`single_launch_warning`).
    """
    if dist.is_available() and dist.is_initialized():
        return world() > 1
    if launched_world() <= 1:
        warning = single_launch_warning()
        if warning:
            print(f"idprior: warning: {warning}", file=sys.stderr)
        return False
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", timeout=TIMEOUT, device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return world() > 1


def single_launch_warning() -> str | None:
    """Why this one process was probably meant to be several, or None.

    `accelerate launch --cpu --num_processes N` (and a MULTI_CPU config) runs the script once, without MPI:
    its simple launcher sets MASTER_ADDR (only when N > 1) and ACCELERATE_USE_CPU, but no WORLD_SIZE.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        return None
    try:
        asked = int(env.get("ACCELERATE_NUM_PROCESSES", "0"))
    except ValueError:
        asked = 0
    if asked > 1 or ("ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env):
        return ("accelerate launch asked for several processes but started one (its CPU launcher runs a single "
                "process); this run uses one process: launch with torchrun --nproc_per_node N instead")
    return None


def world() -> int:
    """Processes taking part in collectives now (1 without a process group, and inside `alone()`)."""
    if _alone or not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def rank() -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


@contextlib.contextmanager
def alone():
    """Work that rank 0 does by itself: collectives are off (`world()` is 1) inside."""
    global _alone
    _alone += 1
    try:
        yield
    finally:
        _alone -= 1


def main_first(fn):
    """`fn()` on rank 0 (alone), then every rank goes on; its result on rank 0, None on the others.

    An error on rank 0 is raised on every rank, the others' copies marked `relayed` so that the CLI prints it
    once; a crash (not an `IdpriorError`) still stops the other ranks with a one-line error.
    """
    if world() <= 1:
        return fn()
    result, failure = None, None
    if is_main():
        try:
            with alone():
                result = fn()
        except ConfigError as e:
            failure = ("config", e.problems)
            raise
        except IdpriorError as e:
            failure = ("error", str(e))
            raise
        except BaseException as e:
            failure = ("error", f"rank 0 failed ({type(e).__name__}: {e}); see its output")
            raise
        finally:
            dist.broadcast_object_list([failure], src=0)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        failure = box[0]
        if failure is not None:
            kind, detail = failure
            err = ConfigError(detail) if kind == "config" else IdpriorError(detail)
            err.relayed = True
            raise err
    return result


def batch_problems(sizes: dict[str, int], n: int) -> list[str]:
    """A global batch size that `n` processes cannot share evenly, one line each ({option: batch size})."""
    return [f"{name} {size} is not divisible by the {n} processes (each takes batch_size / {n} examples of "
            f"every batch); choose a multiple of {n}" for name, size in sizes.items() if n > 1 and size % n]


# ---- data-parallel training ------------------------------------------------------------------------

def _rows(batch: dict) -> int:
    return next(v.shape[0] for v in batch.values() if torch.is_tensor(v) and v.ndim > 0)


def loss_items(batch: dict) -> torch.Tensor:
    """Per row, how many items the model's mean loss averages over: 1 per example, or, for token labels
    (causal LM), the labels after the model's one-token shift that are not IGNORE_INDEX."""
    labels = batch.get("labels")
    if not torch.is_tensor(labels) or labels.ndim < 2:
        return torch.ones(_rows(batch), dtype=torch.long)
    return (labels[:, 1:] != IGNORE_INDEX).sum(1).cpu()


def shard(batch: dict) -> tuple[dict, float]:
    """(this rank's contiguous rows of the global `batch`, its share of the batch's loss items).

    Weighting each rank's mean loss by its share makes the summed gradients those of the global mean. A batch
    that some rank would get no loss item of (fewer rows than ranks: the last batch of an epoch) is run whole
    by every rank with weight 1/world: the same gradient, and the prior's moments and token counts both grow
    by the factor world, so their ratio is unchanged.
    """
    n, r = world(), rank()
    rows = _rows(batch)
    items = loss_items(batch)
    parts = torch.arange(rows).tensor_split(n)
    counts = [int(items[p].sum()) for p in parts]
    total = sum(counts)
    if total == 0 or min(counts) == 0:
        return batch, 1.0 / n
    lo, hi = int(parts[r][0]), int(parts[r][-1]) + 1
    mine = {k: v[lo:hi] if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == rows else v for k, v in batch.items()}
    return mine, counts[r] / total


def weighted_sum(values: dict[str, float], weight: float) -> dict[str, float]:
    """Σ over ranks of weight · value, key by key (every rank passes the same keys): the global batch's
    mean of per-rank means."""
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.cpu().tolist(), strict=True))


@torch.no_grad()
def sum_grads(params) -> None:
    """Sum every gradient over ranks in place (flat buckets of at most BUCKET elements, in parameter order,
    which is the same on every rank). Parameters without a gradient have none on every rank (same graph)."""
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and (size + g.numel() > BUCKET or g.dtype != bucket[0].dtype or g.device != bucket[0].device):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel()
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in bucket])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in bucket:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def broadcast_module(model: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers (SN vectors included) on every rank, as DDP does at construction."""
    for t in model.state_dict(keep_vars=True).values():
        data = t.data if isinstance(t, torch.nn.Parameter) else t
        if data.is_contiguous():
            dist.broadcast(data, src=0)
        else:
            tmp = data.contiguous()
            dist.broadcast(tmp, src=0)
            data.copy_(tmp)


def step_seed(seed: int, step: int) -> int:
    """The torch seed of one training step on this rank: dropout masks differ between ranks (as they would
    between the examples of one batch) and a resumed run draws the same masks without per-rank RNG files."""
    return ((seed * 1_000_003 + step) * 4096 + rank() % 4096) % (1 << 63)


# ---- FSDP2 row shards ----------------------------------------------------------------------------------

def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, dist.ProcessGroup | None, int]:
    """(this rank's rows of `t`, the process group holding the other rows, the full row count).

    FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps every parameter, and Adam's state for it, as a
    DTensor sharded on dim 0: each rank holds a block of rows (`shard_rows`), and a sum over rows is the
    all-reduced sum of the per-rank sums (`sum_rows`). A plain tensor is all of its rows (group None).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t, None, t.shape[0]
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, None, t.shape[0]
    if tuple(t.placements) != (Shard(0),):
        raise IdpriorError(f"the identity prior cannot read a weight sharded as {tuple(t.placements)}: it needs [out, in] "
                           "output weights sharded on their rows (fully_shard on a 1-D mesh), and a GPT-2 Conv1D weight "
                           "is stored [in, out], so FSDP2 shards its units; train such a model without FSDP (data "
                           "parallel under torchrun, docs/scaling.md)")
    return t.to_local(), t.device_mesh.get_group(), t.shape[0]


def shard_rows(n: int, group: dist.ProcessGroup) -> slice:
    """The rows of an `n`-row tensor that FSDP2 gives this rank of `group`: torch.chunk's blocks of
    ceil(n / size) rows, so the last rank may get fewer and the ranks after it none."""
    size, r = dist.get_world_size(group), dist.get_rank(group)
    block = -(-n // size)
    return slice(min(n, r * block), min(n, (r + 1) * block))


def sum_rows(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """`x` (a per-rank sum over its rows) summed over the ranks of `group`, in place; `x` itself without one."""
    if group is not None:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def row_mean(x: torch.Tensor, n: int, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Mean over the `n` rows of a row-sharded tensor whose local rows are `x` (`x.mean(0)` without a group)."""
    return x.mean(0) if group is None else sum_rows(x.sum(0), group) / n
