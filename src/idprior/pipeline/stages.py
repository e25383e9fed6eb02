"""`idprior prune` as stages that hand off through files in the output folder.

    finetune   fine-tune with SN + identity prior      -> finetuned/ (SN folded), train_log.jsonl
    score      function norms on calibration data      -> scores.json
    select     threshold to the target                 -> plan.json
    surgery    physical removal                         -> surgery/ (pruned, before recovery)
    recover    fine-tune the pruned model (or LoRA     -> pruned/  (the result)
               adapters, merged before saving)
    evaluate   dense vs pruned on the test split(s)    -> metrics.json
    bench      measured speed, dense vs pruned         -> bench.json
    report     everything above in one page            -> report.md (+ plots)

Each stage can be called alone (`stage_score(run)`, ...) or through `run_stages(run, names)`, the
one stage runner (used by `prune`, `finetune`, the quality harness and the benchmark scripts):
`stages.json` records the stages that finished, with wall times; with `resume=True` a finished stage
is never redone and an interrupted training stage continues from its last checkpoint.

Several processes (`torchrun --nproc_per_node N`; `distributed`): rank 0 runs the pre-run checks and opens the
folder, the other ranks follow it (`Run.follower`); fine-tuning, scoring and recovery run on every rank
(data-parallel; rank 0 writes their results), the other stages on rank 0 alone; every stage ends at a barrier,
so the next one reads what the last one wrote.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import gc
import math
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from .. import distributed, io, lock, memory
from ..arch import get_adapter
from ..config import (
    CONFIG_VERSION,
    PruneConfig,
    RunConfig,
    dump_config,
    proximal_phase,
    recipe_for,
    recovery_name,
    resume_differences,
    resume_key,
    training_name,
    training_of,
)
from ..data import load_task
from ..data.labels import align_labels
from ..errors import IdpriorError
from ..method.plan import PruningPlan, measure_total, measure_totals
from ..method.units import parse_kinds
from ..model import load as models
from .evaluate import evaluate, evaluate_with_predictions, save_predictions
from .metrics import greater_is_better, main_metric
from .preflight import OVERWRITE_FIX, preflight

STAGES = ("finetune", "score", "select", "surgery", "recover", "evaluate", "bench", "report")
PARALLEL_STAGES = ("finetune", "score", "recover")  # run on every rank of a multi-process launch; the rest on rank 0


# ---- run folder -------------------------------------------------------------------------------

class Run:
    """An output folder: resolved config, task data, stage status and wall times."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, overwrite: bool = False):
        self.cfg = cfg = resolved(cfg)
        self.out = Path(cfg.out)
        self.resume = resume
        status = self.out / "stages.json"
        if resume and overwrite:
            raise IdpriorError("--resume and --overwrite contradict each other (continue the run, or delete it): "
                               "give one of them")
        occupied = self.out.is_dir() and any(p.name != lock.NAME for p in self.out.iterdir())
        if occupied and not overwrite:
            if not resume:
                what = "holds another run" if status.is_file() else "is not empty"
                raise IdpriorError(f"output folder {self.out} {what}; pass --resume to continue it, --overwrite to replace it, or choose another --out")
            elif status.is_file():
                saved = io.read_json(status).get("config", {})
                if saved and resume_differences(saved, cfg):
                    raise IdpriorError(f"--resume: {self.out} was started with a different config; use the same options, --overwrite, or another --out")
        if occupied and overwrite:  # only a run folder holding nothing but the run's files is deleted
            io.check_owned(self.out, "run", OVERWRITE_FIX)
        self.out.mkdir(parents=True, exist_ok=True)
        self.lock = lock.Lock(self.out).acquire()  # before --overwrite deletes anything: never under a live run
        if occupied and overwrite:
            for entry in self.out.iterdir():
                if entry.name != lock.NAME:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        if resume:
            io.remove_leftovers(self.out)  # temp files of writes a crash interrupted
        self.status = (io.read_json(status) if status.is_file()
                       else {"version": CONFIG_VERSION, "config": resume_key(cfg), "stages": {}})
        if not status.is_file():  # written first: marks the folder as a run, so --resume can compare configs
            io.write_json(status, self.status)
        io.write_text(self.out / "config.yaml", dump_config(cfg))
        self._data = None

    @classmethod
    def follower(cls, cfg: RunConfig, *, resume: bool = False) -> Run:
        """The run folder as a non-zero rank of a multi-process launch opens it, after rank 0 created it with
        `Run(...)`: its config and stage status, read; nothing written, no lock held."""
        run = cls.__new__(cls)
        run.cfg = resolved(cfg)
        run.out, run.resume, run._data = Path(run.cfg.out), resume, None
        run.lock = lock.Lock(run.out)  # never acquired: rank 0 holds the folder for the launch
        run.status = io.read_json(run.out / "stages.json")
        return run

    def close(self) -> None:
        """Release the run folder's lock (also done at interpreter exit)."""
        self.lock.release()

    def resume_note(self) -> str:
        """Where a resumed run continues: the finished stages and the training checkpoint, if any."""
        from .train import latest_checkpoint

        done = list(self.status["stages"])
        if not done and not any(self.out.glob("ckpt_*")):
            return f"resuming {self.out}: nothing finished yet, starting from the beginning"
        parts = [f"resuming {self.out}: finished stage(s) {', '.join(done) if done else 'none'}"]
        for ckpt in sorted(self.out.glob("ckpt_*")):
            last = latest_checkpoint(ckpt)
            if last is not None:
                parts.append(f"training continues from checkpoint {last.relative_to(self.out)}")
        return "; ".join(parts)

    # stage bookkeeping
    def done(self, stage: str) -> bool:
        return self.resume and stage in self.status["stages"]

    def mark(self, stage: str, wall_s: float, **info) -> None:
        self.status["stages"][stage] = {"wall_s": round(wall_s, 2), **info}
        if distributed.is_main():
            io.write_json(self.out / "stages.json", self.status)

    def path(self, name: str) -> Path:
        return self.out / name

    def load_model(self, spec: str):
        """(model, tokenizer) of a model folder or alias, with this run's task head, dtype and trust setting."""
        return self.model_loader(spec)()

    def model_loader(self, spec: str) -> Callable[[], tuple]:
        """`load_model(spec)` as a picklable callable (for timing in fresh processes)."""
        m = self.cfg.model
        return functools.partial(models.load, spec, self.task, dtype=m.dtype, trust_remote_code=m.trust_remote_code)

    # shared inputs
    @property
    def data(self):
        if self._data is None:
            d = self.cfg.data
            files = {k: v for k, v in {"train": d.train_file, "validation": d.validation_file, "test": d.test_file}.items() if v}
            self._data = load_task(
                d.task, data_dir=d.data_dir, max_train=d.max_train, max_eval=d.max_eval, seed=self.cfg.seed,
                data_files=files or None, text_column=d.text_column, text_pair_column=d.text_pair_column,
                label_column=d.label_column, problem_type=d.problem_type,
            )
            if d.max_validation is not None and "validation" in self._data.splits:
                from ..data.tasks import TaskData, subsample

                val = TaskData(self._data.task, {"validation": self._data.splits["validation"]})
                self._data.splits["validation"] = subsample(val, max_train=None, max_eval=d.max_validation,
                                                            seed=self.cfg.seed).splits["validation"]
            self._data = align_labels(self._data, models.labels_of_spec(self.cfg.model.name), self.cfg.model.name)
        return self._data

    @property
    def task(self):
        return self.data.task

    def loader(self, split: str, tokenizer, *, train: bool, batch_size: int | None = None, limit: int | None = None):
        from ..data import make_dataloader, make_lm_dataloader

        examples = self.data.splits[split]
        if limit is not None:
            examples = examples[:limit]
        bs = batch_size or (self.cfg.train.batch_size if train else self.cfg.train.eval_batch_size)
        if self.task.kind == "lm":
            return make_lm_dataloader(examples, tokenizer, batch_size=bs, block_size=self.cfg.data.max_length,
                                      shuffle=train, seed=self.cfg.seed)
        return make_dataloader(examples, tokenizer, self.task, batch_size=bs, max_length=self.cfg.data.max_length,
                               shuffle=train, seed=self.cfg.seed)

    def test_splits(self) -> list[str]:
        return [s for s in self.data.splits if s.startswith("test")]


def resolved(cfg: RunConfig) -> RunConfig:
    """`cfg` with every prune field left at None set to the measured recipe of the model's family and mode
    (`config.recipe_for`), so that config.yaml, stages.json and every stage read the settings that ran."""
    from ..arch import recipe_of

    return dataclasses.replace(cfg, prune=recipe_for(cfg.prune, recipe_of(models.model_type_of(cfg.model.name))))


def _eval_fn(run: Run, tokenizer, split: str = "validation"):
    loader = run.loader(split, tokenizer, train=False)
    return lambda model: evaluate(model, run.task, loader, desc=f"eval {split}")


# ---- stages -------------------------------------------------------------------------------------

def prior_hooks(p: PruneConfig, model, adapter) -> tuple[list, list]:
    """(training hooks, objects to detach after training, in order) of the identity prior the prune settings ask
    for (`proximal.build_prior`, as `hf.SnipTrainer` builds it), run after each optimizer step; none without."""
    from ..method.proximal import build_prior
    from .train import AfterStep

    prior, gates = build_prior(p, model, adapter)
    return ([AfterStep(prior)], [prior, gates]) if prior is not None else ([], [])


def stage_finetune(run: Run) -> dict:
    """Fine-tune (SNIP: with SN + identity prior; a baseline: plainly; `config.training_of`), or take the model
    as is with prune.finetune_first=false."""
    from ..method import spectral
    from ..model.surgery import save_pruned
    from .train import Distillation, train

    cfg, p = run.cfg, run.cfg.prune
    model, tok = run.load_model(cfg.model.name)
    info: dict = {"training": training_name(p)}
    if p.finetune_first and cfg.train.epochs > 0:
        adapter = get_adapter(model, per_query_head=cfg.model.per_query_head)
        if training_of(p)[0]:
            info["sn_matrices"] = spectral.attach(model, adapter, p.sn_bound)
        hooks, attached = prior_hooks(p, model, adapter)
        if p.finetune_distill:  # the start itself, frozen, as the teacher (a start already tuned on the task)
            hooks = [Distillation(run.load_model(cfg.model.name)[0], p.distill_alpha, p.distill_temperature), *hooks]
        metric = main_metric(run.task)
        result = train(model, run.loader("train", tok, train=True), cfg.train, seed=cfg.seed,
                       eval_fn=_eval_fn(run, tok) if cfg.train.eval_each_epoch else None, main_metric=metric,
                       higher_is_better=greater_is_better(metric), hooks=hooks,
                       ckpt_dir=run.path("ckpt_finetune"), resume=run.resume, desc="finetune",
                       log_path=run.path("train_log.jsonl"))
        for obj in attached:
            obj.detach()
        spectral.fold(model)
        info.update(history=result.history, best_epoch=result.best_epoch, steps=result.steps)
    if distributed.is_main():
        save_pruned(model, tok, run.path("finetuned"))
        shutil.rmtree(run.path("ckpt_finetune"), ignore_errors=True)
    return info


def finetuned_spec(run: Run) -> str:
    return str(run.path("finetuned"))


CALIB_TOKENS = 2048
"""Tokens per calibration batch of a language model (rows = CALIB_TOKENS // max_length, at least 1): the sums
do not depend on the batching, and a scoring or compensation pass holds about one layer's activations of one
batch (SmolLM2: ~26 kB per token), so this bounds that peak whatever `eval_batch_size` is."""


def calibration_batches(run: Run, tokenizer) -> list[dict]:
    """The first `calib_size` training examples (the split is already seeded-shuffled); a language model's
    in blocks of `max_length` tokens, `CALIB_TOKENS` per batch."""
    n = run.cfg.prune.calib_size
    if run.task.kind == "lm":
        rows = max(1, CALIB_TOKENS // run.cfg.data.max_length)
        loader = run.loader("train", tokenizer, train=False, batch_size=rows)
        return [b for _, b in zip(range(max(1, math.ceil(n / rows))), loader, strict=False)]
    return list(run.loader("train", tokenizer, train=False, limit=n))


def stage_score(run: Run) -> dict:
    from ..method.scoring import score, scores_to_json

    model, tok = run.load_model(finetuned_spec(run))
    adapter = get_adapter(model, per_query_head=run.cfg.model.per_query_head)
    scores = score(model, calibration_batches(run, tok), adapter=adapter,
                   residual=run.cfg.prune.score == "residual", readout=True, after_ln=run.cfg.prune.norm_after_ln)
    if distributed.is_main():  # every rank holds the same scores (summed over ranks)
        io.write_json(run.path("scores.json"), {"score": run.cfg.prune.score, "norms": scores_to_json(scores)})
    return {"units": len(scores)}


def resolve_selection(selection: str, head_share: float | None, adapter, *,
                      after_prior: bool = False) -> tuple[str, float | None]:
    """"auto" -> "prior" after a proximal prior phase (`after_prior`: its units at the identity go first),
    else the model family's tuned (mode, head_share); an explicit head_share always wins."""
    if selection == "auto" and after_prior:
        return "prior", head_share
    if selection == "auto":
        selection, default_share = adapter.default_selection
        head_share = head_share if head_share is not None else default_share
    return selection, head_share


def stage_select(run: Run) -> dict:
    from ..method.scoring import scores_from_json
    from ..method.selection import protected_layers, select

    p = run.cfg.prune
    model, tok = run.load_model(finetuned_spec(run))
    adapter = get_adapter(model, per_query_head=run.cfg.model.per_query_head)
    kinds = parse_kinds(p.kinds)
    held = {"min_keep": p.min_keep, "protect": protected_layers(adapter.num_layers, p.protect_first, p.protect_last)}
    if p.method == "snip":
        scores = scores_from_json(io.read_json(run.path("scores.json"))["norms"])
        mode, head_share = resolve_selection(p.selection, p.head_share, adapter, after_prior=proximal_phase(p))
        plan = select(scores, adapter, target=None if p.tau is not None else p.target, tau=p.tau,
                      measure=p.measure, seq_len=p.flops_seq_len, mode=mode, kinds=kinds,
                      head_share=head_share, **held)
    else:
        from ..baselines import get_method

        method = get_method(p.method, **held)
        plan = method.plan(model, adapter, calibration_batches(run, tok), target=p.target, measure=p.measure,
                           seq_len=p.flops_seq_len, kinds=kinds, seed=run.cfg.seed)
    plan.save(run.path("plan.json"))
    for w in plan.warnings:
        print(f"warning: {w}")
    return {"removed": plan.counts(), "removed_fraction": plan.measures["removed_fraction"]}


def stage_surgery(run: Run) -> dict:
    from ..baselines import resolve_compensation
    from ..method.compensate import fit_compensation
    from ..model.surgery import apply_plan, save_pruned

    p = run.cfg.prune
    plan = PruningPlan.load(run.path("plan.json"))
    model, tok = run.load_model(finetuned_spec(run))
    adapter = get_adapter(model, per_query_head=run.cfg.model.per_query_head)
    mode = resolve_compensation(p.compensate, p.method)  # statistics of the unpruned model, so fitted before the cut
    comp = None if mode == "none" else fit_compensation(model, plan.units, calibration_batches(run, tok), mode=mode,
                                                        adapter=adapter)
    apply_plan(model, plan.units, adapter)
    info = {} if comp is None else {"compensation": comp.apply(model, adapter)}
    save_pruned(model, tok, run.path("surgery"), plan=plan.to_dict())
    return {"params": sum(p.numel() for p in model.parameters()), **info}


def stage_recover(run: Run) -> dict:
    """Fine-tune the pruned model: every weight, or with `lora.enabled` LoRA adapters only (`pipeline/lora.py`),
    merged into the weights before pruned/ is saved."""
    from ..model.surgery import save_pruned
    from .train import Distillation, train

    cfg, p = run.cfg, run.cfg.prune
    model, tok = run.load_model(str(run.path("surgery")))
    info: dict = {"recovery": recovery_name(cfg)}
    tcfg = cfg.recover
    lora = cfg.lora.enabled and tcfg.epochs > 0
    if lora:
        from . import lora as lora_mod

        model = lora_mod.wrap(model, cfg.lora, seed=cfg.seed + 1)
        info["trainable_params"] = lora_mod.trainable(model)
    if tcfg.epochs > 0:
        hooks = [Distillation(run.load_model(finetuned_spec(run))[0], p.distill_alpha, p.distill_temperature)] if p.distill else []
        metric = main_metric(run.task)
        loader = run.loader("train", tok, train=True, batch_size=tcfg.batch_size)  # recover.batch_size, not train's
        result = train(model, loader, tcfg, seed=cfg.seed + 1,
                       eval_fn=_eval_fn(run, tok) if tcfg.eval_each_epoch else None, main_metric=metric,
                       higher_is_better=greater_is_better(metric), hooks=hooks, ckpt_dir=run.path("ckpt_recover"),
                       resume=run.resume, desc="recover", log_path=run.path("recover_log.jsonl"))
        info.update(history=result.history, best_epoch=result.best_epoch, steps=result.steps)
    if lora:
        model = lora_mod.merge(model)
    if distributed.is_main():
        save_pruned(model, tok, run.path("pruned"), plan=io.read_json(run.path("plan.json")))
        shutil.rmtree(run.path("ckpt_recover"), ignore_errors=True)
    return info


def model_sizes(model, seq_len: int) -> dict[str, int]:
    """Every compression measure of one real model (not predicted from a plan)."""
    return measure_totals(get_adapter(model), seq_len) | {"total_params": sum(p.numel() for p in model.parameters())}


def compression(dense, pruned, seq_len: int) -> dict:
    """Every measure, measured on the two real models (or on their `model_sizes`)."""
    d = dense if isinstance(dense, dict) else model_sizes(dense, seq_len)
    q = pruned if isinstance(pruned, dict) else model_sizes(pruned, seq_len)
    return {k: {"dense": d[k], "pruned": q[k], "removed_fraction": 1 - q[k] / d[k] if d[k] else 0.0} for k in d} | {
        "seq_len": seq_len}


def stage_evaluate(run: Run, dense_metrics: dict | None = None) -> dict:
    """Dense, pruned-before-recovery and pruned metrics per split; `dense_metrics` ({split: metrics})
    reuses an earlier evaluation of the same fine-tuned model (the quality grid shares fine-tunes).
    Without recovery epochs pruned/ holds the surgery weights, so they are evaluated once. LM tasks
    also get greedy sample generations (KV cache) from dense and pruned.

    One model is in memory at a time (loaded, evaluated on every split, measured, freed): holding the dense,
    pruned and unrecovered models together made this stage the largest memory peak of a post-training run."""
    recovered = run.cfg.recover.epochs > 0
    specs = {"dense": finetuned_spec(run), "pruned": str(run.path("pruned")),
             **({"pruned_no_recovery": str(run.path("surgery"))} if recovered else {})}
    out = {"task": run.task.name, "main_metric": main_metric(run.task), "model": run.cfg.model.name,
           "method": run.cfg.prune.method, "training": training_name(run.cfg.prune),
           "recovery": recovery_name(run.cfg), "target": run.cfg.prune.target, "measure": run.cfg.prune.measure,
           "seed": run.cfg.seed, "sizes": run.data.sizes(), "dense": {}, "pruned_no_recovery": {}, "pruned": {}}
    per_example: dict = {}  # "stage.split" -> per-example outputs, for paired comparisons (predictions.safetensors)
    zero_shot = run.cfg.data.zero_shot if run.task.kind == "lm" else None
    sizes, samples, tok = {}, {}, None
    for which, spec in specs.items():
        model, model_tok = run.load_model(spec)
        tok = tok or model_tok  # the fine-tuned model's tokenizer: every folder saves the same one
        label = {"dense": "dense", "pruned": "pruned", "pruned_no_recovery": "no-recovery"}[which]
        for split in ["validation", *run.test_splits()]:
            if which == "dense" and dense_metrics and split in dense_metrics:
                out["dense"][split] = dense_metrics[split]
                continue
            out[which][split], per_example[f"{which}.{split}"] = evaluate_with_predictions(
                model, run.task, run.loader(split, tok, train=False), f"{label} {split}")
        if zero_shot:  # a capability check beyond perplexity (zeroshot.py)
            from .zeroshot import zero_shot_models

            zs, zs_preds = zero_shot_models({which: model}, tok, zero_shot, max_examples=run.cfg.data.max_zero_shot,
                                            batch_size=run.cfg.train.eval_batch_size)
            out.setdefault("zero_shot", {}).update(zs)
            per_example.update(zs_preds)
        if which in ("dense", "pruned"):
            sizes[which] = model_sizes(model, run.cfg.prune.flops_seq_len)
            if run.task.kind == "lm" and model.can_generate():
                from .evaluate import generate_samples

                samples[which] = generate_samples(model, tok)
        del model
        gc.collect()
    if not recovered:
        for split in out["pruned"]:
            out["pruned_no_recovery"][split] = out["pruned"][split]
            per_example[f"pruned_no_recovery.{split}"] = per_example[f"pruned.{split}"]
        if zero_shot:
            out["zero_shot"]["pruned_no_recovery"] = out["zero_shot"]["pruned"]
    if any(v is not None for v in per_example.values()):
        save_predictions(run.path("predictions.safetensors"), per_example)
    out["compression"] = compression(sizes["dense"], sizes["pruned"], run.cfg.prune.flops_seq_len)
    out["plan"] = io.read_json(run.path("plan.json"))["counts"]
    if samples:
        out["generations"] = [{"prompt": d["prompt"], "dense": d["completion"], "pruned": q["completion"]}
                              for d, q in zip(samples["dense"], samples["pruned"])]
    io.write_json(run.path("metrics.json"), out)
    m = out["main_metric"]
    for split in run.test_splits():
        print(f"{split} {m}: dense {out['dense'][split][m]:.4f}  pruned {out['pruned'][split][m]:.4f}"
              f"  (no recovery {out['pruned_no_recovery'][split][m]:.4f})")
    if zero_shot:
        zs = out["zero_shot"]
        print(f"zero-shot {zero_shot} accuracy ({zs['dense']['examples']} test examples): dense {zs['dense']['accuracy']:.4f}"
              f"  pruned {zs['pruned']['accuracy']:.4f}  (no recovery {zs['pruned_no_recovery']['accuracy']:.4f})")
    for k in ("encoder_params", "linear_params", "flops", "total_params"):
        c = out["compression"][k]
        print(f"{k}: {c['dense']:,} -> {c['pruned']:,} ({c['removed_fraction']:.1%} removed)")
    return {}


def stage_bench(run: Run) -> dict:
    b = run.cfg.bench
    if not b.enabled:
        return {"skipped": "bench.enabled is false"}
    try:
        from .bench import NoiseGuard, benchmark, benchmark_processes, format_bench_markdown
    except ImportError as e:
        return {"skipped": f"benchmark unavailable: {e}"}
    loaders = {"dense": run.model_loader(finetuned_spec(run)), "pruned": run.model_loader(str(run.path("pruned")))}
    guard = NoiseGuard(max_iqr=b.max_iqr_fraction, max_gap=b.max_speedup_gap, retime_rounds=b.retime_rounds)
    timing = dict(batch_sizes=b.batch_sizes, seq_lens=b.seq_lens, threads=b.threads, repeats=b.repeats, warmup=b.warmup,
                  onnx=b.onnx, workdir=run.path("bench_tmp"), noise=guard)
    if b.processes > 1:  # fresh processes: none of this run's state (bench.py docstring)
        result = benchmark_processes(loaders, b.processes, **timing)
    else:
        result = benchmark({name: load()[0] for name, load in loaders.items()}, **timing)
    shutil.rmtree(run.path("bench_tmp"), ignore_errors=True)
    io.write_json(run.path("bench.json"), result)
    io.write_text(run.path("bench.md"), format_bench_markdown(result))
    print(format_bench_markdown(result))
    return {}


def stage_report(run: Run) -> dict:
    from .report import write_run_report

    path = write_run_report(run.out)
    return {"report": str(path)}


# ---- the stage runner ---------------------------------------------------------------------------

StageFn = Callable[[Run], "dict | None"]
# called with a stage's label around its work (not for a stage skipped as done), e.g. to measure memory
StageObserver = Callable[[str], contextlib.AbstractContextManager]

STAGE_FNS: dict[str, StageFn] = {"finetune": stage_finetune, "score": stage_score, "select": stage_select,
                                 "surgery": stage_surgery, "recover": stage_recover, "evaluate": stage_evaluate,
                                 "bench": stage_bench, "report": stage_report}


@contextlib.contextmanager
def torch_settings_kept():
    """Restore torch's intra-op thread count and grad mode after a stage: whatever training (or a
    library it calls) sets must not carry over into a later stage, least of all into the bench
    stage, which should time with the settings a fresh `idprior bench` process has."""
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)


def stage_needed(cfg: RunConfig, stage: str) -> bool:
    """Scoring is SNIP's: a baseline plans from the fine-tuned model itself."""
    return not (stage == "score" and cfg.prune.method != "snip")


def trains(cfg: RunConfig, stage: str) -> bool:
    """Whether the stage runs an optimizer (else it is inference only: see `memory.returning_freed_memory`)."""
    if stage == "finetune":
        return cfg.prune.finetune_first and cfg.train.epochs > 0
    return stage == "recover" and cfg.recover.epochs > 0


def run_stages(run: Run, names: Iterable[str], *, on: Run | None = None, suffix: str = "",
               fns: Mapping[str, StageFn] | None = None, observe: StageObserver | None = None) -> None:
    """Run the named stages on `on` (default: `run`) in order, each unless `run` records it as done.

    Each is timed and recorded in `run`'s stages.json as name + `suffix` (the iterative rounds record
    theirs in the parent run as "score@2", ...); a stage `stage_needed` rules out is passed over. `fns`
    replaces the function of a stage (default `STAGE_FNS`); `observe(label)` wraps each stage's work.
    With several processes a stage not in `PARALLEL_STAGES` runs on rank 0 alone, and every stage ends at a
    barrier (module docstring).
    """
    target = on or run
    for name in names:
        if not stage_needed(target.cfg, name):
            continue
        label = name + suffix
        if run.done(label):
            if distributed.is_main():
                print(f"[{label}] done earlier, skipped")
            continue
        fn = (fns or {}).get(name) or STAGE_FNS[name]
        memory.reset_peak()  # so the stage's recorded peak RSS is its own
        t0 = time.perf_counter()
        parallel = name in PARALLEL_STAGES
        info = {}
        if parallel or distributed.is_main():
            with (observe(label) if observe is not None else contextlib.nullcontext(), torch_settings_kept(),
                  contextlib.nullcontext() if parallel else distributed.alone(),
                  contextlib.nullcontext() if trains(target.cfg, name) else memory.returning_freed_memory()):
                info = fn(target) or {}
        distributed.barrier()  # the next stage reads what this one wrote
        peak = memory.peak_mb()
        run.mark(label, time.perf_counter() - t0, **info, **({"peak_rss_mb": round(peak, 1)} if peak else {}))
        if distributed.is_main():
            print(f"[{label}] {time.perf_counter() - t0:.1f} s")


def open_run(cfg: RunConfig, *, resume: bool, overwrite: bool, prune: bool = True) -> Run:
    """Pre-run checks and the run folder. With several processes (the launcher's process group is joined here)
    rank 0 does both, its error is every rank's, and the other ranks then follow the folder it opened."""
    distributed.init()
    world = distributed.world()

    def first() -> Run:
        sizes = {"train.batch_size": cfg.train.batch_size}
        if prune and cfg.recover.epochs > 0:
            sizes["recover.batch_size"] = cfg.recover.batch_size
        bad = distributed.batch_problems(sizes, world)
        if bad:
            raise IdpriorError(bad[0])
        preflight(cfg, resume=resume, overwrite=overwrite, prune=prune)  # every input problem at once, before anything is written
        return Run(cfg, resume=resume, overwrite=overwrite)

    run = distributed.main_first(first)
    return run if distributed.is_main() else Run.follower(cfg, resume=resume)


def prune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False,
          observe: StageObserver | None = None) -> Path:
    """Run every stage of `idprior prune`; returns the output folder. `observe`: see `run_stages`.
    A baseline (`prune.method` other than snip) fine-tunes and recovers plainly unless `prune.sn` /
    `prune.prior` ask for SN or the prior (`config.training_of`)."""
    cfg = resolved(cfg)
    run = open_run(cfg, resume=resume, overwrite=overwrite)
    torch.manual_seed(cfg.seed)
    try:
        if resume and distributed.is_main():
            print(run.resume_note())
        _ = run.data  # load and check the data before any heavy work
        if cfg.prune.iterative > 1:
            return _prune_iterative(run, observe)
        run_stages(run, STAGES, observe=observe)
        return run.out
    finally:
        run.close()


def _prune_iterative(run: Run, observe: StageObserver | None = None) -> Path:
    """K rounds of score -> select -> surgery -> recover, each removing an equal share of the original measure."""
    cfg = run.cfg
    k_rounds = cfg.prune.iterative
    run_stages(run, ["finetune"], observe=observe)
    base = run.out
    dense = run.load_model(finetuned_spec(run))[0]
    total = _measure_total(dense, cfg)
    previous = str(run.path("finetuned"))
    for r in range(1, k_rounds + 1):
        cum = cfg.prune.target * r / k_rounds
        current = _measure_total(run.load_model(previous)[0], cfg)
        frac = 1 - (1 - cum) * total / current  # of what is left now
        sub = copy.copy(run)  # shares the task data and the stage status of the parent run
        sub.out = base / f"round{r}"
        sub.cfg = dataclasses.replace(cfg, out=str(sub.out), prune=dataclasses.replace(
            cfg.prune, target=max(1e-6, min(frac, 0.999)), iterative=1))
        if distributed.is_main() and not (sub.out / "finetuned").exists():  # atomic: a copy cut short by a crash is never reused
            io.copy_dir(previous, sub.out / "finetuned")
        distributed.barrier()
        run_stages(run, ["score", "select", "surgery", "recover"], on=sub, suffix=f"@{r}", observe=observe)
        previous = str(sub.out / "pruned")
    if distributed.is_main():
        for name in ("pruned", "surgery"):
            if not run.done("assemble"):
                io.copy_dir(base / f"round{k_rounds}" / name, run.path(name))
        plans = [io.read_json(base / f"round{r}" / "plan.json") for r in range(1, k_rounds + 1)]
        io.write_json(run.path("plan.json"), {"rounds": plans, "counts": _sum_counts(plans), "units": []})
    distributed.barrier()
    run.mark("assemble", 0.0)
    run_stages(run, ["evaluate", "bench", "report"], observe=observe)
    return run.out


def _measure_total(model, cfg: RunConfig) -> float:
    return measure_total(get_adapter(model), cfg.prune.measure, cfg.prune.flops_seq_len)


def _sum_counts(plans: list[dict]) -> dict:
    out: dict[str, int] = {}
    for p in plans:
        for k, v in p.get("counts", {}).items():
            out[k] = out.get(k, 0) + v
    return out


def finetune(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False) -> dict:
    """`idprior finetune`: plain fine-tuning (no SN, no prior) and test metrics -> out/metrics.json (on rank 0;
    the other ranks of a multi-process launch return {})."""
    cfg = resolved(dataclasses.replace(cfg, prune=dataclasses.replace(cfg.prune, sn=False, prior=False,
                                                                       finetune_first=True)))
    run = open_run(cfg, resume=resume, overwrite=overwrite, prune=False)
    try:
        if resume and distributed.is_main():
            print(run.resume_note())
        _ = run.data
        run_stages(run, ["finetune"])
        if not distributed.is_main():
            return {}
        model, tok = run.load_model(finetuned_spec(run))
        metrics = {"task": run.task.name, "model": cfg.model.name, "seed": cfg.seed, "sizes": run.data.sizes()}
        for split in ["validation", *run.test_splits()]:
            metrics[split] = evaluate(model, run.task, run.loader(split, tok, train=False), desc=f"eval {split}")
        metrics["stages"] = run.status["stages"]
        io.write_json(run.path("metrics.json"), metrics)
        return metrics
    finally:
        run.close()
