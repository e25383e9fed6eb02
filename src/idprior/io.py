"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash leaves either the old file or the new one, never half of one. Every file and folder that
idprior writes goes through here (`write_json`, `write_text`, `write_with`, `atomic_dir`,
`copy_dir`); a crash can only leave hidden `.NAME.*.tmp` / `.NAME.old` leftovers, which
`remove_leftovers` deletes when a run resumes. Results get the usual permissions (0666 / 0777
less the umask), not the owner-only ones of `tempfile`.

`check_owned` is the one rule of every writer that replaces something (`prune`/`finetune
--overwrite`, `evaluate`/`bench`/`report --out`, `export`, `save_pruned`): it replaces only what
idprior wrote, recognised by a marker (`marked`, `md_marker`, `PNG_METADATA`, a model folder's
manifest, a run folder's stages.json), and otherwise stops with a one-line error, deleting nothing.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import IdpriorError


@contextmanager
def _made_parents(path: Path):
    """Create `path`'s missing parent folders; if the block fails, remove those of them left empty (a write
    that failed, on a full disk say, leaves no empty output folder behind)."""
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield
    except BaseException:
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`."""
    path = Path(path)
    with _made_parents(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            if e.filename is None:  # a failed write (a full disk) names no file: name the one being written
                raise OSError(e.errno, e.strerror, str(path)) from e
            raise
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` as a whole."""
    path = Path(path)
    with _made_parents(path), _atomic_dir(path) as tmp:
        yield tmp


@contextmanager
def _atomic_dir(path: Path):
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and rename the result onto `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)


def copy_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy folder `src` onto `dst` atomically (replacing it): a crash never leaves a partial copy."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(dst)


def create_exclusive(path: str | os.PathLike, text: str) -> bool:
    """Create `path` holding `text` unless it exists; False when it does. The file appears complete or
    not at all: written under a temporary name, then hard-linked, which fails if `path` exists (O_EXCL's
    guarantee without a moment in which a reader sees an empty file). Where hard links are not
    supported it falls back to O_EXCL itself."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
        return True
    finally:
        os.unlink(tmp)


def writable_problem(target: str | os.PathLike, what: str) -> str | None:
    """Why `target` (a file to be written atomically) cannot be written, or None. Probes by creating and
    removing a temporary folder in the nearest existing ancestor, which also catches read-only file
    systems and root-owned paths that `os.access` reports as writable to root."""
    target = Path(target).expanduser()
    if target.is_dir():
        return f"{what} {target} is a folder; give a file path inside it, e.g. {target / 'out'}"
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        return f"{what} {target}: {parent} is a file, not a folder; choose another path"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".idprior-probe.", dir=parent))
    except OSError as e:
        return f"{what} {target} cannot be written ({e.strerror or type(e).__name__} in {parent}); choose another path"
    return None


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete what interrupted atomic writes left in `folder` (top level only); returns them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))]
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


# ---- ownership: idprior replaces only what it wrote ------------------------------------------------
PRODUCER = "idprior"
PNG_METADATA = {"producer": PRODUCER}  # + "kind": savefig(metadata=...) writes them as PNG text chunks
# What pipeline.Run (and bench-quality's shared fine-tunes) write at the top of a run folder.
RUN_NAMES = ("stages.json", "config.yaml", ".idprior.lock", "finetuned", "ckpt_finetune", "train_log.jsonl",
             "scores.json", "plan.json", "surgery", "ckpt_recover", "recover_log.jsonl", "pruned", "round[0-9]*",
             "predictions.safetensors", "metrics.json", "bench_tmp", "bench.json", "bench.md", "report.md",
             "structure.png", "norms.png", "stages.png", "start.json", "dense_metrics.json",
             "dense_predictions.safetensors", ".*.tmp", ".*.old")
MANIFEST = "idprior.json"  # a model folder's list of the files idprior wrote in it (model_folder)
PRUNED, ONNX = "pruned-model", "onnx"  # manifest kinds
# What save_pretrained / tokenizers wrote into folders of idprior versions without a manifest.
_LEGACY_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*.safetensors",
                       "model.safetensors.index.json", "plan.json", "tokenizer.json", "tokenizer_config.json",
                       "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                       "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                       "chat_template.json")
_MD_MARKER = re.compile(r"<!-- producer: idprior, kind: ([\w-]+) -->\s*$")


def marked(obj: dict, kind: str) -> dict:
    """`obj` with the marker by which `check_owned` knows a JSON file as idprior's `kind` output."""
    return {"producer": PRODUCER, "kind": kind, **obj}


def md_marker(kind: str) -> str:
    """The last line of a markdown file idprior writes as `kind` output (an HTML comment: not rendered)."""
    return f"<!-- producer: {PRODUCER}, kind: {kind} -->\n"


def is_run_folder(folder: str | os.PathLike) -> bool:
    """A folder `pipeline.Run` made: its stages.json (written first) is a run status."""
    try:
        status = read_json(Path(folder) / "stages.json")
    except (OSError, ValueError):
        return False
    return isinstance(status, dict) and isinstance(status.get("stages"), dict)


def file_owner(path: str | os.PathLike) -> str | None:
    """The kind of output idprior wrote `path` as ("run" for a run folder's own files), or None."""
    path = Path(path)
    if any(fnmatch.fnmatch(path.name, p) for p in RUN_NAMES) and is_run_folder(path.parent):
        return "run"
    try:
        if path.suffix == ".json":
            data = read_json(path)
            return str(data.get("kind")) if isinstance(data, dict) and data.get("producer") == PRODUCER else None
        if path.suffix == ".md":
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - 200))
                found = _MD_MARKER.search(f.read().decode("utf-8", "replace"))
            return found.group(1) if found else None
        if path.suffix == ".png":
            text = _png_text(path)
            return text.get("kind") if text.get("producer") == PRODUCER else None
        import onnx  # anything else idprior writes outside a run folder is an exported ONNX model

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        return "export" if meta.get("producer") == PRODUCER else None
    except Exception:  # noqa: BLE001 - unreadable, or not the format its name says: not ours
        return None


def _png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks before a PNG's image data."""
    out: dict[str, str] = {}
    with open(path, "rb") as f:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return out
        while len(head := f.read(8)) == 8 and head[4:] not in (b"IDAT", b"IEND"):
            body = f.read(int.from_bytes(head[:4], "big"))
            f.read(4)  # CRC
            if head[4:] == b"tEXt":
                key, _, value = body.partition(b"\0")
                out[key.decode("latin-1")] = value.decode("latin-1")
    return out


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder`, as relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def manifest_files(folder: Path) -> tuple[set[str] | None, str | None]:
    """(files the folder's manifest lists, plus the manifest; the kind it records). For a folder
    written by an idprior without manifests: the names save_pruned wrote then, "pruned-model".
    (None, None) when idprior did not write the folder."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            data = read_json(manifest)
        except (OSError, ValueError):
            return None, None
        if not isinstance(data, dict) or data.get("producer") != PRODUCER:
            return None, None
        return {*map(str, data.get("files", [])), MANIFEST}, data.get("kind")
    try:
        legacy = "idprior_layers" in read_json(folder / "config.json")
    except (OSError, ValueError, TypeError):
        legacy = False
    if not legacy:
        return None, None
    return {f for f in folder_files(folder) if "/" not in f
            and any(fnmatch.fnmatch(f, p) for p in _LEGACY_MODEL_FILES)}, PRUNED


def folder_owner(folder: Path) -> tuple[str | None, list[str]]:
    """(the kind of idprior folder: "run", "pruned-model", "onnx", or None; the entries in it that
    idprior did not write). A run folder is judged by its top-level names and, inside it, each model folder
    by its manifest (a user's file in RUN/pruned/ is foreign too); a model folder by its manifest; for any
    other folder every top-level entry is foreign."""
    if is_run_folder(folder):
        foreign = sorted(p.name for p in folder.iterdir() if not any(fnmatch.fnmatch(p.name, n) for n in RUN_NAMES))
        for manifest in sorted(folder.rglob(MANIFEST)):  # its model folders (finetuned/, pruned/, ...): by manifest
            listed, _ = manifest_files(manifest.parent)
            if listed is not None:
                where = manifest.parent.relative_to(folder).as_posix()
                foreign += [f"{where}/{f}" for f in folder_files(manifest.parent) if f not in listed]
        return "run", foreign
    listed, kind = manifest_files(folder)
    if listed is None:
        return None, sorted(p.name for p in folder.iterdir())
    return kind, [f for f in folder_files(folder) if f not in listed]


def _by(kind: str | None) -> str:
    return "an idprior run (prune/finetune)" if kind == "run" else f"idprior {kind}"


def check_owned(path: str | os.PathLike, kind: str, fix: str) -> None:
    """Raise IdpriorError unless `path` may be replaced by idprior's `kind` writer: it is absent, an
    empty file or folder, or something idprior wrote as `kind`, holding nothing else.

    The one rule of every writer that replaces or deletes. Files carry a marker (JSON: `marked`,
    markdown: `md_marker`, PNG: `PNG_METADATA`, ONNX: metadata), folders a manifest or a run
    status; a run folder's own files belong to the run. `fix` ends the one-line message, e.g.
    "choose another --out or remove it yourself". Reads only; deletes nothing.
    """
    path = Path(path).expanduser()
    if not path.exists():
        return
    if path.is_dir():
        if next((p for p in path.rglob("*") if not p.is_dir()), None) is None:
            return  # nothing to lose (empty folders at most)
        found, foreign = folder_owner(path)
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise IdpriorError(f"{path} holds files idprior did not write ({shown}), so it is not replaced; {fix}")
        if found != kind:
            raise IdpriorError(f"{path} holds an idprior {found} folder, not a {kind} one, so it is not replaced; {fix}")
        return
    if path.stat().st_size == 0:
        return  # nothing to lose
    found = file_owner(path)
    if found is None:
        raise IdpriorError(f"{path} exists and was not written by {_by(kind)}, so it is not replaced; {fix}")
    if found != kind:
        raise IdpriorError(f"{path} was written by {_by(found)}, not by {_by(kind)}, so it is not replaced; {fix}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
