"""Options shared by the run subcommands, turned into dotted config overrides."""

from __future__ import annotations

import argparse
import sys

import yaml

from ..config import RunConfig, load_config
from ..errors import ConfigError

# flag -> dotted config key (values are parsed as YAML scalars, like `--set`)
RUN_FLAGS = {
    "model": ("model.name", "model: alias (minilm-l6, smollm2-135m), local HF folder, or .gguf file"),
    "task": ("data.task", "task name (idprior tasks lists them) or 'custom' with --data"),
    "data_dir": ("data.data_dir", "local GLUE folder in the official TSV layout"),
    "data": ("data.train_file", "user CSV/TSV/JSONL training file (implies --task custom)"),
    "data_validation": ("data.validation_file", "user validation file (task custom)"),
    "data_test": ("data.test_file", "user test file (task custom)"),
    "text_column": ("data.text_column", "text column of the user files (default: text)"),
    "text_pair_column": ("data.text_pair_column", "second text column for pair tasks (default: a known pair such as "
                         "sentence1/sentence2 when the file has one)"),
    "label_column": ("data.label_column", "label column of the user files (default: label)"),
    "problem_type": ("data.problem_type", "what the label column of the user files is: classification or "
                                          "regression (default: inferred; a numeric column with a few other "
                                          "values is refused until you say)"),
    "max_train": ("data.max_train", "use at most N training examples (seeded subset)"),
    "max_eval": ("data.max_eval", "use at most N examples per evaluation split"),
    "max_length": ("data.max_length", "tokens per example (LM: block size)"),
    "epochs": ("train.epochs", "fine-tuning epochs"),
    "lr": ("train.lr", "fine-tuning learning rate"),
    "batch_size": ("train.batch_size", "training batch size"),
    "seed": ("seed", "random seed"),
    "out": ("out", "output folder"),
    "dtype": ("model.dtype", "float32, bfloat16 or float16"),
}
ATTENTION_HELP = ("how attention is exported to ONNX: auto (default; encoders fused at opset 23, decoders their "
                  "own), fused (one ONNX Attention node per layer, opset >= 23), eager (matmul, mask, softmax, matmul)")

PRUNE_FLAGS = {
    "method": ("prune.method", "snip (default) or a baseline: random, magnitude, michel, fisher, shortgpt, top-layers, "
                               "flap, wanda-sp"),
    "target": ("prune.target", "fraction of --measure to remove, in (0, 1)"),
    "measure": ("prune.measure", "encoder_params (default), linear_params or flops"),
    "tau": ("prune.tau", "raw function-norm threshold instead of --target"),
    "kinds": ("prune.kinds", "comma list of unit kinds: head, attn, ffn, neuron"),
    "selection": ("prune.selection", "auto (default: after the prior phase 'prior', the units at the identity "
                                     "first; otherwise the model family's tuned default, share 0.3 for encoders, "
                                     "norm for decoders), prior, norm or share"),
    "head_share": ("prune.head_share", "with --selection share: fraction of the budget taken from heads"),
    "score": ("prune.score", "absolute (the branch's own norm) or residual (norm / RMS of the residual stream it "
                             "writes into); default: the model family's recipe (residual for post-training decoders)"),
    "sn_bound": ("prune.sn_bound", "'init' (each matrix's pretrained sigma) or a number"),
    "calib_size": ("prune.calib_size", "calibration examples for the function norms"),
    "iterative": ("prune.iterative", "reach the target in K prune/recover rounds"),
    "recover_epochs": ("recover.epochs", "fine-tuning epochs after surgery (recovery)"),
    "zero_shot": ("data.zero_shot", "LM tasks: also classify this task's test split (rt-polarity, sst2) zero-shot "
                                    "by label-word likelihood, dense vs pruned"),
    "min_keep": ("prune.min_keep", "fraction of each layer's head units and of its FFN neurons that always stays "
                                   "(no sub-layer is then removed whole; the prior does not pull them); default: "
                                   "the family's recipe (0.25 for decoders, 0 for encoders)"),
    "protect_first": ("prune.protect_first", "never prune the first N layers"),
    "protect_last": ("prune.protect_last", "never prune the last N layers"),
    "compensate": ("prune.compensate", "after surgery, from calibration activations: none, bias (FLAP's bias "
                                       "compensation), lsq (ridge re-fit of the kept columns), or auto (default: "
                                       "the method's own: bias for flap and wanda-sp, lsq for SNIP on post-training "
                                       "decoders, else none)"),
}
SWITCHES = {
    "no_sn": ("prune.sn", False, "ablation: no spectral normalization"),
    "no_prior": ("prune.prior", False, "ablation: no identity prior"),
    "no_train": ("prune.finetune_first", False, "post-training mode: score and prune the model as given"),
    "distill": ("prune.distill", True, "distil from the unpruned model during recovery"),
    "per_query_head": ("model.per_query_head", True, "GQA decoders: a head unit is a query-head slot of every "
                       "KV group (groups stay equal) instead of a whole KV group"),
    "no_bench": ("bench.enabled", False, "skip the speed benchmark"),
    "no_onnx": ("bench.onnx", False, "benchmark PyTorch only"),
}


def add_run_args(p: argparse.ArgumentParser, prune: bool = False) -> None:
    p.add_argument("--config", metavar="PRESET", help="preset name under configs/ or a YAML file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, e.g. --set train.lr=3e-5 (repeatable)")
    flags = dict(RUN_FLAGS, **(PRUNE_FLAGS if prune else {}))
    for name, (_, help_) in flags.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, help=help_)
    if prune:
        for name, (_, _, help_) in SWITCHES.items():
            p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=help_)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the idprior run in --out (files idprior did not write are never deleted)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config of the flags; `--data` alone means `--task custom`, and `--tau` with `--target` is
    refused (the threshold would silently win over the target)."""
    overrides = list(args.overrides)
    if getattr(args, "data", None) is not None and getattr(args, "task", None) is None:
        print("idprior: --data given without --task: using --task custom", file=sys.stderr)
        args.task = "custom"
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o and o.split("=", 1)[1].strip() not in ("", "null")}
    given |= {key for name, (key, _) in PRUNE_FLAGS.items() if getattr(args, name, None) is not None}
    if {"prune.tau", "prune.target"} <= given:
        raise ConfigError(["--tau and --target both given: --tau removes every unit under a threshold and would "
                           "ignore --target; give one of them"])
    flagged = {}  # dotted key -> (flag, value) of every flag and switch given
    for name, (key, _) in {**RUN_FLAGS, **PRUNE_FLAGS}.items():
        value = getattr(args, name, None)
        if value is not None:
            flagged[key] = ("--" + name.replace("_", "-"), str(value))
    for name, (key, value, _) in SWITCHES.items():
        if getattr(args, name, False):
            flagged[key] = ("--" + name.replace("_", "-"), str(value).lower())
    problems = contradictions(overrides, flagged)
    if problems:
        raise ConfigError(problems)
    return load_config(args.config, overrides + [f"{key}={value}" for key, (_, value) in flagged.items()])


# flags that set the fine-tune, which post-training mode (--no-train) skips
FINETUNE_KEYS = ("train.epochs", "train.lr")


def contradictions(overrides: list[str], flagged: dict[str, tuple[str, str]]) -> list[str]:
    """Two sides of one command line that cannot both hold, one line each naming both: a flag and a `--set` of
    the same key with other values (the flag used to win silently), and fine-tune flags with --no-train."""
    problems = []
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key in flagged:
            flag, value = flagged[key]
            if yaml.safe_load(raw or "null") != yaml.safe_load(value):
                problems.append(f"{flag} {value} and --set {key}={raw.strip()} set the same option to different "
                                "values; give one of them")
    if flagged.get("prune.finetune_first", ("", ""))[1] == "false":
        for key in FINETUNE_KEYS:
            if key in flagged:
                problems.append(f"--no-train skips the fine-tune, so {flagged[key][0]} {flagged[key][1]} would do "
                                f"nothing; drop one of them (recovery after the cut: --recover-epochs, --set recover.*)")
    return problems
