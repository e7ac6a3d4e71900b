"""Writing a directory of the model cache so that an interrupted start never leaves half of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomically(target: Path, write: Callable[[Path], None], marker: str) -> None:
    """`write(staging)` into a directory beside `target`, then rename it to `target`.

    Another process that got there first wins: its `target/marker` is kept and ours dropped.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / marker).exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
