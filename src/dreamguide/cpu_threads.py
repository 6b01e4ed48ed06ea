"""CPU threads for torch on a shared machine: the cores other programs leave idle.

Oversubscribed intra-op threads spin against each other, so a small model on a busy machine runs
much slower with all cores than with the idle ones (measured: docs/TOYWORLD.md, the demo).
"""

from __future__ import annotations

import os


def idle_cores() -> int:
    """CPU cores not busy with other programs (by the 1-minute load average), at least one."""
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cores
    return max(1, min(cores, round(cores - busy + 0.5)))


def use_idle_cores(threads: int = 0) -> int:
    """``torch.set_num_threads(threads or idle_cores())``; returns the number set. A negative count is
    a ValueError (``--threads``)."""
    import torch

    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise ValueError(f"--threads must be 0 (the idle cores) or a positive number of threads, got {threads!r}")
    threads = threads or idle_cores()
    torch.set_num_threads(threads)
    return threads
