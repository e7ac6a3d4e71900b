"""How many CPU threads an engine may use by default."""

from __future__ import annotations

import os


def granted_cpus() -> int:
    """What Ray grants the replica (`OMP_NUM_THREADS`), else the CPUs this process may run on."""
    granted = os.environ.get("OMP_NUM_THREADS", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted)
    return len(os.sched_getaffinity(0))
