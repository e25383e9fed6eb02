"""Recovery after post-training pruning of SmolLM2-135M: full fine-tuning against LoRA adapters, same steps.

    python benchmarks/lora_recovery.py --threads 1                  # 20% and 30%, about 45-60 min on 1 thread
    python benchmarks/lora_recovery.py --smoke                      # a tiny random Llama, seconds (a check)

For each target, two `idprior prune --no-train` runs that differ only in how recovery trains: `--recover full`
(every weight, AdamW state for all of them) and `--recover lora` (rank --rank adapters on every linear layer of
the body, merged before pruned/ is saved). Both see the same data in the same order for the same number of
steps (--max-train lm-rt texts packed into --seq-len blocks, --epochs, --batch); only the learning rate differs
(--lr-full, --lr-lora: adapters start at zero and need a larger one). Each run is a fresh subprocess of this
script (`--child`) that runs the pipeline with the recover stage's high-water RSS reset and read around it
(idprior.memory); the parent also reads the whole child's peak RSS from `os.wait4`. Recovery evaluates
nothing mid-way (recover.eval_each_epoch false), so its wall time is training, one checkpoint and the save.

Test perplexity dense / before recovery / after full / after LoRA, recovery wall s, peak RSS, steps and trainable
parameters go to benchmarks/results/lora_recovery.{json,md}. Run folders go to --runs-dir; a finished run (its
metrics.json and stats file there) is read back, not redone, so an interrupted benchmark resumes.

Sizing: steps = ceil(blocks / batch) x epochs, blocks = the --max-train texts' tokens / --seq-len; 2,000 lm-rt
texts make 51 steps of 8 x 128 tokens. On the 2-core EPYC, full recovery of 30%-pruned SmolLM2 took 256 s for
those 51 steps on 2 threads (smollm2_recovery.json, an evaluation included): about 5 s a step; on 1 thread
expect up to twice that, so the default 2,800 texts (about 71 steps) is about 10 minutes per full recovery,
and LoRA (no weight gradients or AdamW state for the frozen weights) should take less. Each run also loads and
cuts the model and evaluates three models (about 2-3 minutes on 1 thread).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from idprior import io  # noqa: E402
from idprior.memory import peak_mb, reset_peak, rss_mb  # noqa: E402
from idprior.pipeline.bench import environment  # noqa: E402
from idprior.study.benchutil import publish  # noqa: E402

MODES = ("full", "lora")
STATS = "child_stats.json"


def prune_args(args, target: float, mode: str, out: Path) -> list[str]:
    """The `idprior prune` arguments of one run: the same cut and recovery steps for both modes."""
    cli = ["prune", "--model", args.model, "--task", args.task, "--no-train", "--target", f"{target:g}",
           "--measure", "encoder_params", "--calib-size", str(args.calib_size), "--max-train", str(args.max_train),
           "--max-eval", str(args.max_eval), "--max-length", str(args.seq_len), "--dtype", args.dtype,
           "--seed", str(args.seed), "--recover-epochs", f"{args.epochs:g}", "--set", f"recover.batch_size={args.batch}",
           "--set", f"train.eval_batch_size={args.batch}", "--set", "recover.eval_each_epoch=false", "--no-bench",
           "--recover", mode]
    if mode == "lora":
        cli += ["--lora-rank", str(args.rank), "--lora-targets", args.lora_targets, "--set", f"recover.lr={args.lr_lora:g}"]
    else:
        cli += ["--set", f"recover.lr={args.lr_full:g}"]
    return [*cli, "--out", str(out)]


def child(stats_path: Path, threads: int, cli: list[str]) -> int:
    """One run in this process: the pipeline, with each stage's wall time and high-water RSS (reset before it)."""
    import torch

    from idprior.cli.common import config_from_args
    from idprior.cli.main import build_parser
    from idprior.pipeline import stages as pipeline

    torch.set_num_threads(threads)
    stages: dict[str, dict] = {}
    can_reset = reset_peak()

    @contextlib.contextmanager
    def observe(stage: str):
        reset_peak()
        start, t0 = rss_mb(), time.perf_counter()
        yield
        stages[stage] = {"wall_s": round(time.perf_counter() - t0, 2), "rss_start_mb": round(start, 1),
                         "peak_rss_mb": round(peak_mb(), 1)}

    cfg = config_from_args(build_parser().parse_args(cli))
    pipeline.prune(cfg, overwrite=True, observe=observe)
    io.write_json(stats_path, {"stages": stages, "peak_reset": can_reset, "torch_threads": torch.get_num_threads()})
    return 0


def run_child(args, cli: list[str]) -> dict:
    """Run one `idprior prune` in a fresh process of this script, unless its folder holds a finished one; its
    stats, metrics and recover stage, with the child's wall time and whole-process peak RSS."""
    out = Path(cli[cli.index("--out") + 1])
    stats = out.parent / f"{out.name}.{STATS}"
    if not ((out / "metrics.json").is_file() and stats.is_file()):
        print("$ idprior " + " ".join(shlex.quote(a) for a in cli), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", str(stats),
                                 "--threads", str(args.threads), "--", *cli], env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"run failed (exit {proc.returncode}): idprior {' '.join(cli)}")
        record = io.read_json(stats)
        record.update(process_wall_s=round(time.perf_counter() - t0, 1),
                      process_peak_rss_mb=round(usage.ru_maxrss / 1024, 1))  # Linux: kB
        io.write_json(stats, record)
    record = io.read_json(stats)
    recover = io.read_json(out / "stages.json")["stages"]["recover"]
    return {"command": "idprior " + " ".join(shlex.quote(a) for a in cli), "stats": record,
            "metrics": io.read_json(out / "metrics.json"),
            "recover": {k: recover.get(k) for k in ("wall_s", "steps", "recovery", "trainable_params", "history")}}


def tiny_decoder(folder: Path) -> Path:
    """A seeded tiny random Llama with a word-level tokenizer (the --smoke model), written once."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>", "the", "a", "and", "of", "to", "is", "in", "it", "that", "this", "film",
             "movie", "story", "good", "bad", "great", "funny", "dull", "best", "worst", "plot", "characters", "love",
             "boring", "fun", "not", "no", "very", "too", "more", "most", "one", "just", "as", "but", "with", "for", "on",
             ",", ".", "'", "-"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, bos_token_id=2,
                         eos_token_id=3, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--task", default="lm-rt")
    p.add_argument("--targets", default="0.2,0.3", help="comma list of fractions of decoder-layer parameters")
    p.add_argument("--max-train", type=int, default=2800, help="training texts (the recovery steps' knob, with --epochs)")
    p.add_argument("--epochs", type=float, default=1.0, help="recovery epochs (a fraction cuts the last one short)")
    p.add_argument("--batch", type=int, default=8, help="recovery and evaluation batch (blocks of --seq-len tokens)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-eval", type=int, default=100, help="texts per evaluation split (a fixed subset)")
    p.add_argument("--calib-size", type=int, default=64, help="calibration blocks for the cut")
    p.add_argument("--lr-full", type=float, default=5e-5, help="learning rate of full recovery")
    p.add_argument("--lr-lora", type=float, default=2e-4, help="learning rate of LoRA recovery")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--lora-targets", default="all-linear")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="a tiny random Llama and a few steps: checks the script, "
                   "writes to --runs-dir only")
    p.add_argument("--runs-dir", default=None, help="run folders (default runs/lora_recovery, runs/lora_recovery_smoke)")
    p.add_argument("--out-dir", default=None, help="results (default benchmarks/results; --smoke: the runs dir)")
    p.add_argument("--name", default="lora_recovery")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    own, rest = _split(argv)
    args = p.parse_args(own)
    if args.child:
        return child(Path(args.child), args.threads, rest)
    command = "python benchmarks/lora_recovery.py " + " ".join(shlex.quote(a) for a in argv)
    runs = Path(args.runs_dir or ("runs/lora_recovery_smoke" if args.smoke else "runs/lora_recovery"))
    if args.smoke:
        args.model = str(tiny_decoder(runs / "tiny-llama"))
        args.max_train, args.max_eval, args.seq_len, args.calib_size, args.batch = 64, 16, 32, 16, 4
        args.lr_full, args.lr_lora, args.rank = 1e-3, 1e-2, 4
    out_dir = Path(args.out_dir or (runs if args.smoke else Path(__file__).resolve().parent / "results"))
    started = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    result = {"command": command, "smoke": args.smoke, "environment": environment(args.threads),
              "peft": _version("peft"),
              "settings": {k: getattr(args, k) for k in ("model", "task", "max_train", "epochs", "batch", "seq_len",
                                                         "max_eval", "calib_size", "lr_full", "lr_lora", "rank",
                                                         "lora_targets", "dtype", "seed", "threads")},
              "targets": {}}
    result["environment"]["dtype"] = args.dtype
    for target in (float(t) for t in args.targets.split(",")):
        cell = {mode: run_child(args, prune_args(args, target, mode, runs / f"t{round(target * 100)}_{mode}"))
                for mode in MODES}
        result["targets"][f"{target:g}"] = cell
    result["loadavg"] = {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]}
    result["script_wall_s"] = round(time.perf_counter() - started, 1)
    publish(out_dir, args.name, result, render(result))
    return 0


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """This script's own arguments and, after `--`, the child's idprior arguments."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _ppl(metrics: dict, which: str, split: str) -> str:
    value = metrics.get(which, {}).get(split, {}).get("perplexity")
    return "–" if value is None else f"{value:.2f}"


def render(r: dict) -> str:
    env, s = r["environment"], r["settings"]
    lines = [f"# Recovery after post-training pruning: full fine-tuning against LoRA (rank {s['rank']}), same steps",
             "", "Command:", "", "```", r["command"], "```", "",
             f"Model `{s['model']}`, task {s['task']}, {s['dtype']}. Machine: {env['cpu']}, {env['usable_cores']} usable "
             f"cores, {s['threads']} torch thread(s), torch {env['torch']}, transformers {env['transformers']}, peft "
             f"{r['peft']}. Load average (1 min) {r['loadavg']['start'][0]} at start, {r['loadavg']['end'][0]} at end; "
             f"script wall {r['script_wall_s']} s.", "",
             f"Both recoveries: the first {s['max_train']} {s['task']} training texts packed into {s['seq_len']}-token "
             f"blocks, batch {s['batch']}, {s['epochs']:g} epoch(s), the same order; learning rate {s['lr_full']:g} "
             f"(full) and {s['lr_lora']:g} (LoRA). Perplexity on fixed subsets of the validation and test splits. "
             "One seed. Recovery as the runs recorded it:", ""]
    first = next(iter(r["targets"].values()), {})
    lines += [f"- {mode}: {first[mode]['recover']['recovery']}" for mode in MODES if mode in first] + [""]
    if r["smoke"]:
        lines += ["**Smoke run on a tiny random model: checks the script, measures nothing.**", ""]
    lines += ["| target | model | validation ppl | test ppl | recovery wall s | recover stage peak RSS MB | "
              "run peak RSS MB | steps | trainable params |", "|---|---|---|---|---|---|---|---|---|"]
    for target, cell in r["targets"].items():
        first = cell["full"]["metrics"]
        t = f"{float(target):.0%}"
        lines.append(f"| {t} | dense | {_ppl(first, 'dense', 'validation')} | {_ppl(first, 'dense', 'test')} | | | | | |")
        lines.append(f"| {t} | pruned, before recovery | {_ppl(first, 'pruned_no_recovery', 'validation')} | "
                     f"{_ppl(first, 'pruned_no_recovery', 'test')} | | | | | |")
        for mode in MODES:
            run = cell[mode]
            rec, stats = run["recover"], run["stats"]
            stage = stats["stages"].get("recover", {})
            peak = f"{stage['peak_rss_mb']} (+{stage['peak_rss_mb'] - stage['rss_start_mb']:.1f})" if stage else "–"
            params = rec.get("trainable_params") or run["metrics"]["compression"]["total_params"]["pruned"]
            lines.append(f"| {t} | after {mode} recovery | {_ppl(run['metrics'], 'pruned', 'validation')} | "
                         f"{_ppl(run['metrics'], 'pruned', 'test')} | {rec['wall_s']} | {peak} | "
                         f"{max(v['peak_rss_mb'] for v in stats['stages'].values())} | {rec['steps']} | {params:,} |")
    lines += ["", "Recovery wall s: the recover stage (load surgery/, train, merge for LoRA, save pruned/). Recover "
              "stage peak RSS: its high-water mark, reset when the stage starts, and in brackets its rise above the RSS "
              "at the start (what earlier stages left resident is in the first figure, not the second). Run peak RSS: the largest stage peak (getrusage's "
              "whole-process figure cannot be used: resetting the high-water mark per stage hides earlier peaks from "
              "it). Full recovery trains every parameter, so its trainable count is the pruned "
              "model's size.", "", "Runs:", ""]
    for target, cell in r["targets"].items():
        for mode in MODES:
            lines.append(f"- {float(target):.0%} {mode}: `{cell[mode]['command']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
