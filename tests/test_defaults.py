"""One home for defaults (issue 34): library defaults agree with the config's, every config field is read,
the prune section stays small, the measured recipe is resolved per model family and mode (an explicit value
always wins, a baseline gets none of it), `prune --help` states it, and a run folder of an earlier idprior
is refused by --resume."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import pytest

import idprior
from idprior import config as C
from idprior.cli.common import config_from_args
from idprior.cli.main import build_parser, main
from idprior.config import PruneConfig, load_config, recipe_for, resume_key, training_of
from idprior.method.units import parse_kinds
from idprior.pipeline.stages import resolved
from tiny_decoder_folder import make_tiny_decoder_folder
from tiny_folder import make_tiny_bert_folder

SRC = Path(idprior.__file__).resolve().parent

# ---- (a) library defaults are the config's ---------------------------------------------------------

# A parameter named like a prune field (or one of these aliases) takes that field's value by default.
ALIASES = {"gamma": "prior_gamma", "after_ln": "norm_after_ln", "debias": "prior_debias", "seq_len": "flops_seq_len",
           "bound": "sn_bound", "residual": "score"}
# Where one name means another field in one place: the prior's head_share is prune.prior_head_share (selection's
# is prune.head_share).
OWN = {("idprior.method.proximal.ProximalPrior.__init__", "head_share"): "prior_head_share"}
# Parameters named like a prune field that are not that setting, and why.
NOT_SETTINGS = {
    ("idprior.method.scoring.score", "kinds"): "measures every kind; what is pruned is select's kinds",
    ("idprior.method.scoring.BranchNorms.__init__", "kinds"): "as score",
    ("idprior.method.selection.select", "target"): "None means not given (exactly one of target and tau)",
    ("idprior.method.plan.PruningPlan.__init__", "target"): "a record of the plan",
    ("idprior.method.plan.PruningPlan.__init__", "selection"): "a record of the plan ('auto' is resolved before it)",
    ("idprior.baselines.base.Method.__init__", "selection"): "each baseline's own rule",
    ("idprior.baselines.fisher.FisherMethod.__init__", "selection"): "the baseline's own rule",
    ("idprior.baselines.flap.FlapMethod.__init__", "selection"): "the baseline's own rule",
    ("idprior.method.spectral.BoundedSpectralNorm.__init__", "bound"): "None: the matrix's own sigma (attach maps 'init')",
    ("idprior.model.export.export_onnx", "seq_len"): "the exported graph's example length, not the FLOPs length",
}
# What each compared default must be equal to, given the resolved encoder recipe.
CONVERT = {"kinds": lambda p: parse_kinds(p.kinds), "residual": lambda p: p.score == "residual"}


def _callables():
    """(qualified name, function) of every function and method defined in idprior's modules."""
    for info in pkgutil.walk_packages(idprior.__path__, "idprior."):
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj
            elif inspect.isclass(obj):
                for attr, fn in vars(obj).items():
                    fn = getattr(fn, "__func__", fn)
                    if inspect.isfunction(fn):
                        yield f"{module.__name__}.{name}.{attr}", fn


def _prune_parameters():
    """(callable, parameter, prune field, default) for every parameter with a default whose name is a prune field."""
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for qualname, fn in _callables():
        if qualname.startswith("idprior.config."):
            continue
        for param in inspect.signature(fn).parameters.values():
            field = OWN.get((qualname, param.name)) or ALIASES.get(param.name) or (param.name if param.name in fields else None)
            if field is not None and param.default is not inspect.Parameter.empty:
                yield qualname, param.name, field, param.default


def test_no_library_default_differs_from_the_config():
    """A library call with its defaults does what `idprior prune` does on an encoder (the resolved recipe),
    so no default lives in two places that can drift apart."""
    want = recipe_for(PruneConfig())  # the encoder recipe (config.RECIPE): no family recipe
    found, wrong = set(), []
    for qualname, name, field, default in _prune_parameters():
        found.add((qualname, name))
        if (qualname, name) in NOT_SETTINGS:
            continue
        expect = CONVERT.get(name, lambda p, f=field: getattr(p, f))(want)
        if default != expect:
            wrong.append(f"{qualname}({name}={default!r}): prune.{field} is {expect!r}")
    assert not wrong, wrong
    # the scan sees the constructors that take prune settings (a rename must not drop them from the check)
    prior = "idprior.method.proximal.ProximalPrior.__init__"
    assert {(prior, p) for p in ("gamma", "head_share", "after_ln", "min_keep", "debias", "measure", "seq_len",
                                 "kinds")} <= found
    assert {("idprior.method.selection.select", "min_keep"), ("idprior.method.scoring.score", "residual"),
            ("idprior.method.scoring.score", "after_ln"), ("idprior.method.spectral.attach", "bound"),
            ("idprior.pipeline.train.train", "distill_alpha"), ("idprior.baselines.base.Method.__init__", "min_keep")} <= found
    assert set(NOT_SETTINGS) <= found  # no stale exemption


def test_the_prior_built_from_a_config_has_every_default_of_the_constructor():
    """`ProximalPrior.from_config` (what the pipeline and SnipTrainer build) on the resolved defaults equals the
    constructor's defaults, parameter by parameter."""
    import torch

    from idprior.arch import get_adapter
    from idprior.method.gates import Gates
    from idprior.method.proximal import ProximalPrior
    from tiny_models import tiny_bert

    torch.manual_seed(0)
    model = tiny_bert()
    adapter = get_adapter(model)
    p = recipe_for(PruneConfig())
    built = ProximalPrior.from_config(model, adapter, Gates(model, adapter), p)
    plain = ProximalPrior(model, adapter, Gates(model, adapter), target=p.target)
    for attr in ("gamma", "head_share", "min_keep", "debias", "measure", "seq_len", "kinds", "ramp", "gain", "lam"):
        assert getattr(built, attr) == getattr(plain, attr), attr
    assert built.recorder.out_norms == plain.recorder.out_norms == {}  # after_ln: the encoder recipe's False
    assert built.recorder.readout == plain.recorder.readout is True  # [CLS], as the pipeline scores
    built.detach(), plain.detach()


# ---- (b) every config field is read, (c) the prune section stays small -----------------------------

CONFIG_CLASSES = (C.ModelConfig, C.DataConfig, C.TrainConfig, C.PruneConfig, C.LoraConfig, C.BenchConfig,
                  C.RunConfig)
VALIDATORS = {"validate", "_validate_training", "_validate_data", "_validate_prune", "_validate_lora", "_bench_problems"}


def read_names(src: Path = SRC) -> set[str]:
    """Attribute names read (`x.name`) and string constants ("name": getattr, dict keys, field lists) anywhere in
    `src`, except where a field is only declared or checked: config.py's dataclasses and validation, and
    cli/common.py's module-level flag tables."""
    names: set[str] = set()
    classes = {c.__name__ for c in CONFIG_CLASSES}
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        rel = path.relative_to(src).as_posix()
        skip = [node for node in tree.body
                if rel == "config.py" and (isinstance(node, ast.ClassDef) and node.name in classes
                                           or isinstance(node, ast.FunctionDef) and node.name in VALIDATORS)
                or rel == "cli/common.py" and isinstance(node, (ast.Assign, ast.AnnAssign))]
        skipped = {id(n) for node in skip for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.add(node.value)
    return names


def test_every_config_field_is_read_by_some_code_path():
    """A field that only the dataclass, validation and the CLI's flag tables mention changes nothing: it is an
    option no study adopted (remove it) or a setting that lost its reader (a bug)."""
    names = read_names()
    unread = [f"{cls.__name__}.{f.name}" for cls in CONFIG_CLASSES for f in dataclasses.fields(cls)
              if f.name not in names]
    assert not unread, f"config fields no code path reads: {unread}"


def test_the_scan_finds_a_field_that_only_config_mentions(tmp_path):
    """The scan behind the test above: a field declared and validated in config.py and given a flag in
    cli/common.py, and read nowhere else, is not found; one read elsewhere is."""
    (tmp_path / "cli").mkdir()
    (tmp_path / "config.py").write_text(
        "class PruneConfig:\n    lonely_knob: int = 0\n    used_knob: int = 0\n\n"
        "def _validate_prune(pr, need):\n    need(pr.lonely_knob >= 0, 'lonely_knob')\n")
    (tmp_path / "cli" / "common.py").write_text("PRUNE_FLAGS = {'lonely_knob': ('prune.lonely_knob', 'help')}\n")
    (tmp_path / "stage.py").write_text("def run(p):\n    return p.used_knob\n")
    names = read_names(tmp_path)
    assert "used_knob" in names and "lonely_knob" not in names


def test_the_prune_section_stays_small():
    assert len(dataclasses.fields(PruneConfig)) <= 28, [f.name for f in dataclasses.fields(PruneConfig)]


# ---- (d) the recipe, per family and mode ------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    return {"llama": make_tiny_decoder_folder(root / "llama", "llama"), "bert": make_tiny_bert_folder(root / "bert")}


def _resolved(folder, *flags: str) -> PruneConfig:
    """The prune settings `idprior prune --model FOLDER FLAGS` runs with."""
    task = "lm-rt" if "llama" in str(folder) else "rt-polarity"
    return resolved(config_from_args(build_parser().parse_args(["prune", "--model", str(folder), "--task", task,
                                                                *flags]))).prune


def test_a_post_training_decoder_gets_the_decoder_recipe(folders):
    p = _resolved(folders["llama"], "--no-train")
    assert (p.score, p.min_keep, p.compensate) == ("residual", 0.25, "lsq")
    assert (p.norm_after_ln, p.prior_gamma, p.prior_debias) == (False, 3.0, False)  # the rest: config.RECIPE


def test_a_fine_tuned_decoder_gets_the_decoder_recipe(folders):
    p = _resolved(folders["llama"])
    assert (p.sn, p.prior, p.norm_after_ln, p.prior_gamma, p.prior_debias, p.min_keep) == (False, True, True, 1.0,
                                                                                         True, 0.25)
    assert (p.score, p.compensate) == ("absolute", "none")  # SNIP's "auto", resolved once


def test_a_resolved_fine_tune_keeps_its_recipe_when_run_post_training(folders):
    """A grid cell resolves in fine-tune mode, then prunes in post-training mode: resolving again must not mix
    in the post-training recipe (lsq compensation after a prior phase)."""
    from idprior.pipeline.stages import resolved

    p = _resolved(folders["llama"])
    cfg = C.load_config(None, [f"model.name={folders['llama']}", "data.task=lm-rt"])
    cfg = dataclasses.replace(cfg, prune=dataclasses.replace(p, finetune_first=False))
    assert resolved(cfg).prune == dataclasses.replace(p, finetune_first=False)


@pytest.mark.parametrize("flags", [[], ["--no-train"]], ids=["finetune", "posttrain"])
def test_an_encoder_gets_the_encoder_recipe(folders, flags):
    p = _resolved(folders["bert"], *flags)
    assert {k: getattr(p, k) for k in C.RECIPE} == C.RECIPE
    assert p.compensate == "none" and (p.sn, p.prior) == (False, True)  # SN only with --sn (issue 32)
    assert _resolved(folders["bert"], "--sn", *flags).sn is True


def test_an_explicit_value_always_wins(folders):
    p = _resolved(folders["llama"], "--no-train", "--set", "prune.min_keep=0", "--set", "prune.score=absolute",
                  "--compensate", "none")
    assert (p.min_keep, p.score, p.compensate) == (0.0, "absolute", "none")
    p = _resolved(folders["llama"], "--set", "prune.sn=true", "--set", "prune.prior_gamma=2",
                  "--set", "prune.norm_after_ln=false", "--set", "prune.prior_debias=false")
    assert (p.sn, p.prior_gamma, p.norm_after_ln, p.prior_debias) == (True, 2.0, False, False)
    p = _resolved(folders["bert"], "--min-keep", "0.5", "--set", "prune.prior_gamma=0")
    assert (p.min_keep, p.prior_gamma) == (0.5, 0.0)


@pytest.mark.parametrize("flags", [[], ["--no-train"]], ids=["finetune", "posttrain"])
def test_a_baseline_gets_no_snip_recipe_and_trains_plainly(folders, flags):
    p = _resolved(folders["llama"], "--method", "fisher", *flags)
    assert (p.min_keep, p.compensate, p.score) == (0.0, "auto", "absolute")
    assert (p.sn, p.prior) == (False, False) == training_of(p)


def test_python_api_and_trainer_resolve_the_same_recipe(folders, tmp_path):
    """`pipeline.resolved` of a hand-built config and `hf.SnipTrainer` on a Llama take the family's recipe too."""
    from transformers import TrainingArguments

    from idprior.hf import SnipTrainer
    from tiny_models import tiny_llama

    cfg = load_config(None, [f"model.name={folders['llama']}", "data.task=lm-rt"])
    assert cfg.prune.min_keep is None  # left to the recipe until the model's family is known
    assert resolved(cfg).prune == _resolved(folders["llama"])
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    trainer = SnipTrainer(model=tiny_llama(), args=args)
    p = trainer.snip_config
    assert (p.sn, p.norm_after_ln, p.prior_gamma, p.prior_debias, p.min_keep) == (False, True, 1.0, True, 0.25)
    assert (trainer.snip_prior.gamma, trainer.snip_prior.min_keep, trainer.snip_prior.debias) == (1.0, 0.25, True)
    trainer.finish()


# ---- (e) the help states the recipes ------------------------------------------------------------------

def test_prune_help_states_the_recipes(capsys):
    from idprior.arch.base import PRE_LN_DECODER_RECIPE

    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the epilog
    for value in ("prior_gamma 3.0", "min_keep 0.25", "score residual", "compensate lsq", "norm_after_ln True",
                  "prior_gamma 1.0", "spectral normalization only with --sn"):
        assert value in text, value
    for recipe in (C.RECIPE, *PRE_LN_DECODER_RECIPE.values()):
        assert all(f"{k} {v}" in text for k, v in recipe.items()), recipe


# ---- (f) --resume refuses a run folder of an earlier idprior -----------------------------------------

def _started(folders, out: Path, version: int | None) -> list[str]:
    """A run folder as Run writes it (stages.json, config.yaml), with `version` (None: none, as before it
    existed); returns the argv that resumes it."""
    argv = ["prune", "--model", str(folders["bert"]), "--task", "rt-polarity", "--max-train", "16", "--max-eval", "8",
            "--no-bench", "--out", str(out)]
    cfg = resolved(config_from_args(build_parser().parse_args(argv)))
    out.mkdir(parents=True)
    status = {"config": resume_key(cfg), "stages": {"finetune": {"wall_s": 1.0}}}
    (out / "stages.json").write_text(json.dumps(status if version is None else {"version": version, **status}))
    (out / "config.yaml").write_text(C.dump_config(cfg))
    (out / "finetuned").mkdir()  # the finished stage's output (a resume refuses a run whose output is gone)
    return [*argv, "--resume"]


@pytest.mark.parametrize("version", [None, 1], ids=["no-version", "version-1"])
def test_resume_of_an_earlier_run_folder_is_refused_in_one_line(folders, tmp_path, capsys, version):
    out = tmp_path / "old"
    argv = _started(folders, out, version)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "CHANGELOG.md" in err and "earlier idprior" in err and "--overwrite" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # nothing written


def test_resume_of_a_current_run_folder_passes_the_version_check(folders, tmp_path):
    from idprior.pipeline.preflight import check_output

    out = tmp_path / "now"
    argv = _started(folders, out, C.CONFIG_VERSION)
    cfg = resolved(config_from_args(build_parser().parse_args(argv[:-1])))
    assert check_output(cfg, resume=True, overwrite=False) == []


def test_a_retired_option_is_named_as_retired():
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, ["prune.prior_mode=loss", "prune.sn_out_scale=0.8"])
    assert len(e.value.problems) == 2 and all("retired" in p and "docs/history.md" in p for p in e.value.problems)
