"""One process per run folder: `OUT/.idprior.lock` names the pid, host and start time of its holder.

Why: two processes in one run folder (a second `prune`, a `--resume`, or an `--overwrite` while the
first still runs) would interleave stages.json, checkpoints and model folders, or delete them under
the running one, and lose work. The lock is created exclusively (`io.create_exclusive`), so of two
runs started at once exactly one gets it; the other is refused with a message naming the holder.

A lock whose pid is no longer running on this host (the run was killed) is stale: the next run takes
it over and says so. A lock from another host cannot be checked and is respected; its message says
to delete the file if that run is known to be gone. The same process may open its own folder again
(the quality grid does), the ranks of one `accelerate launch` share rank 0's lock, and the lock is
removed when the run ends, also at interpreter exit.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import io
from .errors import IdpriorError

NAME = ".idprior.lock"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {self.started}"

    def is_me(self) -> bool:
        return self.pid == os.getpid() and self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """True / False on this host; None for another host (cannot be checked)."""
        if self.host != socket.gethostname():
            return None
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, owned by someone else
            return True
        return True


def read(folder: str | os.PathLike) -> Holder | None:
    """The holder of `folder`'s lock; None without a lock. An unreadable lock file counts as stale."""
    path = Path(folder) / NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw.get("started", "?")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return Holder(0, socket.gethostname(), "?")


def _follower() -> bool:
    """A non-zero rank of a multi-process launch (`accelerate launch`, torchrun): every rank runs the
    same command on the same folder, and rank 0 holds the lock for the job."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0
    except ValueError:
        return False


def in_use(folder: str | os.PathLike) -> str | None:
    """Why `folder` cannot be used now (another live run holds it), or None; writes nothing."""
    if _follower():
        return None
    holder = read(folder)
    if holder is None or holder.is_me() or holder.alive() is False:
        return None
    return _busy(Path(folder), holder)


def _busy(folder: Path, holder: Holder) -> str:
    hint = "" if holder.alive() else f"; if that run is gone, delete {folder / NAME}"
    return (f"output folder {folder} is in use by another idprior run ({holder.describe()}): wait for it to "
            f"finish or choose another --out{hint}")


class Lock:
    """The lock of one run folder, held from `acquire()` to `release()` (or the end of the process)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / NAME
        self.owned = False

    def acquire(self) -> Lock:
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
        if _follower():
            return self
        for _ in range(3):
            if io.create_exclusive(self.path, json.dumps(me) + "\n"):
                self.owned = True
                atexit.register(self.release)
                return self
            holder = read(self.folder)
            if holder is None:
                continue  # released in between: try again
            if holder.is_me():
                return self  # this process opened the folder before; the first opener releases it
            if holder.alive() is not False:
                raise IdpriorError(_busy(self.folder, holder))
            print(f"idprior: {self.folder} was locked by a run that is no longer running ({holder.describe()}); "
                  "taking the lock over", file=sys.stderr)
            if read(self.folder) == holder:  # not taken over by another process meanwhile
                self.path.unlink(missing_ok=True)
        raise IdpriorError(f"could not lock {self.folder}: other runs keep taking it; choose another --out")

    def release(self) -> None:
        if self.owned:
            self.owned = False
            holder = read(self.folder)
            if holder is not None and holder.is_me():
                self.path.unlink(missing_ok=True)
