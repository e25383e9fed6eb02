"""Options shared by the run subcommands, turned into dotted config overrides."""

from __future__ import annotations

import argparse
import json
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
    "lora_rank": ("lora.rank", "with --recover lora: the adapters' rank (default 16; lora.alpha 32)"),
    "lora_targets": ("lora.targets", "with --recover lora: all-linear (default: every linear layer of the body, "
                                     "not the task head) or a comma list of module names, e.g. q_proj,v_proj"),
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
# --recover MODE -> lora.enabled (full: every weight trains; lora: adapters only, merged before pruned/ is saved)
RECOVER_MODES = {"full": "false", "lora": "true"}
RECOVER_HELP = ("how recovery trains: full (default: every weight) or lora (LoRA adapters only, for large decoders "
                "on less memory; the adapters are merged into the weights before pruned/ is saved, so pruned/ is a "
                "plain pruned model; adapters usually want a larger learning rate, e.g. --set recover.lr=2e-4)")

SWITCHES = {
    "sn": ("prune.sn", True, "bounded spectral normalization during the fine-tune (off by default: it barely "
           "bound at our learning rates and changed nothing we measured; docs/results.md)"),
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
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, action=_Once, help=help_)
    if prune:
        for name, (_, _, help_) in SWITCHES.items():
            p.add_argument("--" + name.replace("_", "-"), dest=name, action="store_true", help=help_)
        p.add_argument("--recover", dest="recover", default=None, action=_Once, choices=tuple(RECOVER_MODES),
                       help=RECOVER_HELP)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the idprior run in --out (files idprior did not write are never deleted)")


class _Once(argparse.Action):
    """Store a flag's value; the same flag given again with another value is recorded for `config_from_args`
    to warn about (the last one wins, as in any CLI, so an alias can be overridden; argparse said nothing)."""

    def __call__(self, parser, namespace, values, option_string=None):
        old = getattr(namespace, self.dest, None)
        if old is not None and old != values:
            namespace.__dict__.setdefault("_repeated", []).append(f"{option_string} given twice ({old}, then {values}): "
                                                                   f"the last one, {values}, is used")
        setattr(namespace, self.dest, values)


# Flags whose values are names or paths: passed on as YAML strings, never parsed as YAML (a '#' in a path
# started a comment and cut the path, 'a: b' became a mapping, a line break folded, 'yes' became true)
STRING_FLAGS = {"model", "task", "data_dir", "data", "data_validation", "data_test", "text_column", "text_pair_column",
                "label_column", "problem_type", "out", "dtype", "method", "measure", "kinds", "selection", "score",
                "sn_bound", "compensate", "zero_shot", "lora_targets"}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config of the flags; `--data` alone means `--task custom`. Refused, one line each naming both
    sides: `--tau` with `--target`, a flag and a `--set` of one option with two values, and the epochs or learning
    rate of a training that does not run. A warning line each: a flag (or `--set` key) given twice with two values
    (the last is used), other options of a training that does not run, and options the chosen mode never reads
    (`inert_options`)."""
    overrides = list(args.overrides)
    if getattr(args, "data", None) is not None and getattr(args, "task", None) is None:
        print("idprior: --data given without --task: using --task custom", file=sys.stderr)
        args.task = "custom"
    given = {o.split("=", 1)[0].strip() for o in overrides if "=" in o and o.split("=", 1)[1].strip() not in ("", "null")}
    given |= {key for name, (key, _) in PRUNE_FLAGS.items() if getattr(args, name, None) is not None}
    if {"prune.tau", "prune.target"} <= given:
        raise ConfigError(["--tau and --target both given: --tau removes every unit under a threshold and would "
                           "ignore --target; give one of them"])
    flagged = {}  # dotted key -> (flag, value as shown, value as YAML) of every flag and switch given
    for name, (key, _) in {**RUN_FLAGS, **PRUNE_FLAGS}.items():
        value = getattr(args, name, None)
        if value is not None:
            flagged[key] = ("--" + name.replace("_", "-"), str(value),
                            json.dumps(str(value)) if name in STRING_FLAGS else str(value))
    for name, (key, value, _) in SWITCHES.items():
        if getattr(args, name, False):
            flagged[key] = ("--" + name.replace("_", "-"), "", str(value).lower())
    if getattr(args, "recover", None) is not None:
        flagged["lora.enabled"] = ("--recover", args.recover, RECOVER_MODES[args.recover])
    for note in getattr(args, "_repeated", []):
        print(f"idprior: warning: {note}", file=sys.stderr)
    problems = contradictions(overrides, flagged)
    if problems:
        raise ConfigError(problems)
    cfg = load_config(args.config, overrides + [f"{key}={value}" for key, (_, _, value) in flagged.items()])
    source = _sources(overrides, flagged)
    problems, notes = idle_training(cfg, source, prune=getattr(args, "command", "prune") == "prune")
    if problems:
        raise ConfigError(problems)
    for note in notes + inert_options(cfg, source, command=getattr(args, "command", "prune")):
        print(f"idprior: warning: {note}", file=sys.stderr)
    return cfg


def _yaml(text: str):
    try:
        return yaml.safe_load(text or "null")
    except yaml.YAMLError:
        return text  # load_config reports it


def _sources(overrides: list[str], flagged: dict) -> dict[str, str]:
    """{dotted key: how the command line set it ('--epochs 3', '--no-train', '--set train.lr=1e-4')}."""
    source = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        if raw.strip() and raw.strip() != "null":
            source[key.strip()] = f"--set {key.strip()}={raw.strip()}"
    for key, (flag, shown, _) in flagged.items():
        source[key] = f"{flag} {shown}".strip()
    return source


# flags that set the fine-tune, which post-training mode (--no-train) skips
FINETUNE_KEYS = ("train.epochs", "train.lr")


def contradictions(overrides: list[str], flagged: dict[str, tuple]) -> list[str]:
    """Two sides of one command line that cannot both hold, one line each naming both: a flag and a `--set` of
    the same key with other values (the flag used to win silently), and fine-tune flags with --no-train. Two
    `--set` of one key with other values get a warning (the last is used, as for a repeated flag)."""
    problems = []
    seen: dict[str, str] = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        key = key.strip()
        if key in flagged:
            flag, shown, value = flagged[key]
            if _yaml(raw) != _yaml(value):
                problems.append(f"{f'{flag} {shown}'.strip()} and --set {key}={raw.strip()} set the same option to "
                                "different values; give one of them")
        if key in seen and _yaml(seen[key]) != _yaml(raw):
            print(f"idprior: warning: --set {key} given twice ({seen[key].strip()}, then {raw.strip()}): the last one, "
                  f"{raw.strip()}, is used", file=sys.stderr)
        seen[key] = raw
    if flagged.get("prune.finetune_first", ("", "", ""))[2] == "false":
        for key in FINETUNE_KEYS:
            if key in flagged:
                problems.append(f"--no-train skips the fine-tune, so {flagged[key][0]} {flagged[key][1]} would do "
                                f"nothing; drop one of them (recovery after the cut: --recover-epochs, --set recover.*)")
    return problems


def idle_training(cfg: RunConfig, source: dict[str, str], prune: bool = True) -> tuple[list[str], list[str]]:
    """(refusals, warnings) for training options given for a training that does not run (--no-train or 0 fine-tune
    epochs; 0 recovery epochs): its epochs or learning rate are refused, as --no-train --epochs always was; the
    other options (batch size, weight decay, ...) get a warning. train.eval_batch_size also sizes evaluation.
    LoRA options (--lora-rank, lora.*) without --recover lora are refused: a run the user meant to recover with
    adapters would fine-tune every weight (a large decoder: several times the memory)."""
    problems, notes, skipped = [], [], []
    if prune and not cfg.prune.finetune_first:
        skipped.append(("train.", source.get("prune.finetune_first", "--no-train") + " skips the fine-tune", ()))
    elif cfg.train.epochs == 0:
        skipped.append(("train.", f"{source.get('train.epochs', 'train.epochs 0')} runs no fine-tune", ("train.epochs",)))
    if prune and cfg.recover.epochs == 0:
        skipped.append(("recover.", f"{source.get('recover.epochs', 'recover.epochs 0')} runs no recovery",
                        ("recover.epochs",)))
    for prefix, why, keep in skipped:
        for key, how in source.items():
            if key.startswith(prefix) and key not in (*keep, "train.eval_batch_size"):
                if key.endswith((".epochs", ".lr")):
                    problems.append(f"{why}, so {how} would do nothing; drop one of them")
                else:
                    notes.append(f"{how} does nothing here: {why}; drop it")
    if prune and not cfg.lora.enabled:  # refused: the run meant to recover with adapters would train every weight
        problems += [f"{how} sets LoRA recovery, and recovery trains every weight without --recover lora; add "
                     "--recover lora or drop it" for key, how in source.items()
                     if key.startswith("lora.") and key != "lora.enabled"]
    return problems, notes


LAYER_DROPS = ("shortgpt", "top-layers")


def inert_options(cfg: RunConfig, source: dict[str, str], command: str = "prune") -> list[str]:
    """Options given on the command line that the chosen mode never reads, one line each (a warning: the run
    is what it would be without them, which the user should know)."""
    from ..config import RunConfig as Defaults
    from ..config import prior_active, training_of

    default = Defaults().to_dict()

    def is_default(key: str) -> bool:
        section, _, name = key.rpartition(".")
        value = (default.get(section, {}) if section else default).get(name, object())
        got = getattr(getattr(cfg, section) if section else cfg, name, None)
        return got == value

    notes = []

    def unused(keys, why: str) -> None:
        for key in keys:
            if key in source and not is_default(key):
                notes.append(f"{source[key]} does nothing here: {why}; drop it")

    if command == "finetune":
        unused([k for k in source if k.startswith(("prune.", "recover.", "lora.", "bench."))],
               "idprior finetune only fine-tunes and evaluates (prune.*, recover.*, lora.* and bench.* are idprior "
               "prune's)")
        return notes
    p = cfg.prune
    sn, _ = training_of(p)
    trains = p.finetune_first and cfg.train.epochs > 0
    prior = prior_active(p) and cfg.train.epochs > 0
    if p.method != "snip":
        unused(["prune.selection", "prune.head_share", "prune.score"],
               f"--method {p.method} ranks units by its own criterion (selection, head share and score are SNIP's)")
        if not prior:
            unused(["prune.norm_after_ln"], f"--method {p.method} without the identity prior never reads it")
    if p.method in LAYER_DROPS:
        unused(["prune.kinds", "prune.min_keep", "model.per_query_head"],
               f"--method {p.method} drops whole layers (attention and FFN together)")
    if not (sn and trains):
        why = ("the fine-tune is skipped" if not trains else
               "SN is off unless --sn")
        unused(["prune.sn_bound"], f"it bounds spectral normalization, and this run has none ({why})")
    if not prior:
        why = ("the fine-tune is skipped" if not trains else
               "--no-prior" if p.method == "snip" else f"--method {p.method} fine-tunes without it unless "
               "--set prune.prior=true")
        unused(["prune.prior_gamma", "prune.prior_head_share", "prune.prior_debias"],
               f"it shapes the identity prior, and this run has none ({why})")
    if p.method == "snip" and (p.tau is not None or p.selection in ("norm", "prior") or (p.selection == "auto" and prior)):
        mode = "--tau" if p.tau is not None else f"selection {'prior' if p.selection == 'auto' else p.selection}"
        unused(["prune.head_share"], f"only --selection share reads it, and this run uses {mode}")
    if not cfg.bench.enabled:
        unused([k for k in source if k.startswith("bench.") and k != "bench.enabled"], "--no-bench skips the benchmark")
    return notes
