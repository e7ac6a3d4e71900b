"""How much memory the KV cache may take: a budget, not batch size x the training context.

The default fits a laptop: a quarter of the memory this process may use, at most 2 GiB. A
budget the machine cannot hold is refused at start, with the numbers, instead of failing (or
swapping) later.
"""

from __future__ import annotations

import os
from pathlib import Path

from backend.errors import EngineError

GIB = 2**30
DEFAULT_CAP_BYTES = 2 * GIB
_CGROUP_LIMIT = Path("/sys/fs/cgroup/memory.max")


def machine_memory_bytes(cgroup_limit: Path = _CGROUP_LIMIT) -> int:
    """Memory this process may use: the container's limit (cgroup v2) or the machine's RAM."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        limit = cgroup_limit.read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


def kv_budget_bytes(configured_gib: float, memory: int) -> int:
    """`LLM_KV_CACHE_GIB` in bytes, or the default: a quarter of `memory`, at most 2 GiB."""
    if configured_gib:
        return int(configured_gib * GIB)
    return min(memory // 4, DEFAULT_CAP_BYTES)


def check_fits(kv_bytes: int, host_cache_bytes: int, memory: int) -> None:
    """Refuse KV memory plus host copies that leave less than a quarter of `memory` to the rest."""
    if kv_bytes + host_cache_bytes > memory * 3 // 4:
        raise EngineError(
            f"The KV cache ({kv_bytes / GIB:.2f} GiB) and the host prompt cache "
            f"({host_cache_bytes / GIB:.2f} GiB) would take more than three quarters of the "
            f"{memory / GIB:.2f} GiB this process may use: lower LLM_KV_CACHE_GIB or "
            "LLM_PROMPT_CACHE_GIB."
        )
