"""Atomic file output: write to a temporary name in the same folder, then rename.

A crash leaves either the old file or the new one, never half of one. Every file and folder that
idprior writes goes through here (`write_json`, `write_text`, `write_with`, `atomic_dir`,
`copy_dir`); a crash can only leave hidden `.NAME.*.tmp` / `.NAME.old` leftovers, which
`remove_leftovers` deletes when a run resumes. Results get the usual permissions (0666 / 0777
less the umask), not the owner-only ones of `tempfile`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success rename it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
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
    path.parent.mkdir(parents=True, exist_ok=True)
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
