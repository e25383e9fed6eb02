"""Resident-memory probes for the benchmark scripts (Linux).

`peak_mb()` is the process's high-water RSS (`resource.getrusage().ru_maxrss`, the same number
as VmHWM). `reset_peak()` writes 5 to /proc/self/clear_refs, which resets that high-water mark to
the current RSS, so the peak of one stage can be read on its own; it returns False where the
kernel does not allow it (then peaks are cumulative since process start).
"""

from __future__ import annotations

import re
import resource
from pathlib import Path


def rss_mb() -> float:
    """Current resident set size."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def peak_mb() -> float:
    """High-water resident set size since process start or the last `reset_peak()`."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
