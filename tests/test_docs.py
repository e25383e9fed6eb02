"""The documentation stays true: the README's size, its commands and Python snippet, the benchmark index,
and every relative link in README.md, CHANGELOG.md and docs/."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from idprior.cli.main import build_parser
from tiny_folder import make_tiny_bert_folder

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_LIMIT = 15_000


def _blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _readme_commands() -> list[list[str]]:
    """Every `idprior ...` line of the README's bash blocks, as argv (comments dropped)."""
    return [shlex.split(line, comments=True) for block in _blocks(README.read_text(encoding="utf-8"), "bash")
            for line in block.splitlines() if line.strip().startswith("idprior ")]


def test_readme_stays_short():
    """The README is user documentation; results and history live in docs/."""
    assert len(README.read_text(encoding="utf-8")) <= README_LIMIT


def test_every_readme_command_parses():
    commands = _readme_commands()
    assert len(commands) >= 10 and {c[1] for c in commands} >= {"prune", "evaluate", "export", "bench", "report"}
    parser = build_parser()
    for argv in commands:
        try:
            parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"README command does not parse: {shlex.join(argv)}")


def test_readme_compares_snip_with_fisher_on_the_same_preset():
    """The fair comparison the README shows: SNIP and fisher through the same preset and budget."""
    commands = [c for c in _readme_commands() if c[1] == "prune"]
    assert ["idprior", "prune", "--config", "demo", "--out", "runs/snip"] in commands
    assert ["idprior", "prune", "--config", "demo", "--method", "fisher", "--out", "runs/fisher"] in commands


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    """The Quick start's Python API block, on a tiny BERT folder instead of MiniLM; only `idprior.prune(cfg)`
    (the whole pipeline on MiniLM) is replaced by a stub that checks the config it gets."""
    import idprior.pipeline.stages

    code = re.search(r"### Python API\n\n```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    line = 'model_name = "minilm-l6"'
    assert line in code and "max_train=256" in code
    tiny = make_tiny_bert_folder(tmp_path / "tiny")
    code = code.replace(line, f"model_name = {str(tiny)!r}").replace("max_train=256", "max_train=64")
    seen = []
    monkeypatch.setattr(idprior.pipeline.stages, "prune", lambda cfg: seen.append(cfg))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "pruned" / "config.json").is_file()
    dense = idprior.load(str(tiny), namespace["data"].task)[0]
    pruned = namespace["model"]
    assert namespace["plan"].units
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    assert seen and seen[0].prune.target == 0.3 and seen[0].out == "runs/x"


def test_readme_layout_lists_every_module():
    """The Layout block names every top-level module and package of src/idprior (and nothing that is not
    there), and every module inside a package by its name."""
    layout = re.search(r"## Layout\n\n```\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    src = ROOT / "src" / "idprior"
    on_disk = {p.name for p in src.glob("*.py")} | {f"{p.name}/" for p in src.iterdir()
                                                   if p.is_dir() and p.name != "__pycache__"}
    listed = set(re.findall(r"^  (\w+\.py|\w+/)\s", layout, re.M))
    assert listed == on_disk, f"missing: {sorted(on_disk - listed)}; not in src: {sorted(listed - on_disk)}"
    words = set(re.findall(r"\w+", layout))
    inner = {p.stem for p in src.glob("*/*.py") if p.stem != "__init__"}
    assert inner <= words, f"modules the layout does not name: {sorted(inner - words)}"


def _tracked(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return out.stdout.split()


def test_benchmark_index_lists_every_file_and_cites_only_committed_results():
    index = (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8")
    files = [f for f in _tracked("benchmarks") if not f.startswith("benchmarks/results/") and f != "benchmarks/README.md"]
    assert files
    missing = [f for f in files if f"`{Path(f).name}`" not in index]
    assert not missing, f"benchmarks/README.md does not list {missing}"
    # every file name it cites (`x.{json,md}` names both, `x*` any file starting so, `x` any extension) is
    # a committed result, or one of the scripts and grids beside them
    cited = set(re.findall(r"`((?:demo|int8|onnx|ort|quality|scoring|smollm2|speed|timing)[\w.{},*]*)`", index))
    assert len(cited) > 20
    for name in cited:
        for variant in _expand(name):
            found = [p for folder in ("benchmarks/results", "benchmarks") for p in (ROOT / folder).glob(variant)]
            assert any(p.is_file() for p in found), f"benchmarks/README.md cites {variant}: no such file"


def _expand(name: str) -> list[str]:
    m = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
    if m:
        return [f"{m.group(1)}{alt}{m.group(3)}" for alt in m.group(2).split(",")]
    return [name if "." in name or "*" in name else f"{name}.*"]


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", md.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc):
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.S)
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        assert target.exists(), f"{doc.name}: link {link} points to nothing"
        if anchor and target.suffix == ".md":
            assert anchor in _anchors(target), f"{doc.name}: {link}: no heading #{anchor} in {target.name}"
