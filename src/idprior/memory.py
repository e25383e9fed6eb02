"""Memory probes (Linux): resident set size now, its high-water mark, and a reset of that mark; and an
allocator setting that returns freed memory during inference-only stages (`returning_freed_memory`).

`peak_mb()` is the process's high-water RSS, VmHWM in /proc/self/status. `reset_peak()` writes 5 to
/proc/self/clear_refs, which resets VmHWM to the current RSS, so the peak of one stage can be read on its
own; it returns False where the kernel does not allow it (then peaks are cumulative since process start).
`getrusage().ru_maxrss` is not used for stage peaks: the kernel folds VmHWM into it whenever a thread exits
(tqdm's monitor, worker pools), and clear_refs cannot undo that. Elsewhere than Linux every probe is None.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import resource
from pathlib import Path


def write_proc(name: str, text: str) -> None:
    """Write a kernel control file of this process; not through io: /proc takes no atomic rename."""
    Path("/proc/self", name).write_text(text)


def _status_mb(field: str) -> float | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


def rss_mb() -> float | None:
    """Current resident set size."""
    return _status_mb("VmRSS")


def peak_mb() -> float | None:
    """High-water resident set size since process start or the last `reset_peak()`."""
    return _status_mb("VmHWM")


def lifetime_peak_mb() -> float:
    """getrusage's ru_maxrss: at least every VmHWM seen when a thread exited (see module doc)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (peaks are then cumulative)."""
    try:
        write_proc("clear_refs", "5")
        return True
    except OSError:
        return False


# ---- returning freed memory (glibc) ------------------------------------------------------------------------------
M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
_GLIBC_MAX_THRESHOLD = 32 * 2**20  # the most glibc's dynamic threshold grows to on 64-bit systems


def _glibc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        return lib if hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def returning_freed_memory():
    """Inference-only work whose freed blocks go back to the system, and a heap trimmed afterwards.

    glibc raises its mmap threshold after large frees, so a forward pass's activations end up in the heap and
    stay resident when freed: on SmolLM2 scoring a batch of 64 x 128 tokens left ~2 GB resident for ~0.3 GB of
    live tensors, and the stages after it started from there. Inside this block every block over 128 kB is
    mmap'd and unmapped on free (RSS follows live tensors); on leaving it the threshold goes to glibc's
    ceiling (32 MB, where a long run's dynamic threshold ends up: training keeps reusing its heap) and the
    free heap is returned (`malloc_trim`). A no-op elsewhere than glibc.
    """
    lib = _glibc()
    if lib is None:
        yield
        return
    lib.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    try:
        yield
    finally:
        gc.collect()  # a model held in reference cycles (hooks, parametrizations) is freed now, not at the next stage
        lib.mallopt(M_MMAP_THRESHOLD, _GLIBC_MAX_THRESHOLD)
        lib.malloc_trim(0)
