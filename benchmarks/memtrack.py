"""Resident-memory probes for the benchmark scripts (Linux).

`peak_mb()` is the process's high-water RSS, VmHWM in /proc/self/status. `reset_peak()` writes 5
to /proc/self/clear_refs, which resets VmHWM to the current RSS, so the peak of one stage can be
read on its own; it returns False where the kernel does not allow it (then peaks are cumulative
since process start). `getrusage().ru_maxrss` is not used for stage peaks: the kernel folds VmHWM
into it whenever a thread exits (tqdm's monitor, worker pools), and clear_refs cannot undo that.
"""

from __future__ import annotations

import re
import resource
from pathlib import Path


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) / 1024


def rss_mb() -> float:
    """Current resident set size."""
    return _status_mb("VmRSS")


def peak_mb() -> float:
    """High-water resident set size since process start or the last `reset_peak()`."""
    return _status_mb("VmHWM")


def lifetime_peak_mb() -> float:
    """getrusage's ru_maxrss: at least every VmHWM seen when a thread exited (see module doc)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
