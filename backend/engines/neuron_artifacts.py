"""Compiled Neuron artifacts on a volume that several replicas share.

Layout under `LLM_NEURON_ARTIFACTS_DIR`:

    <fingerprint>/               a published compile: the NEFFs and `compiled.json`
    .<fingerprint>.lock/         a replica is compiling this configuration
    .<fingerprint>.staging-*/    a compile being written (renamed into place when complete)

The fingerprint is a hash of the marker (model, tp degree, batch size, buckets, SDK version), so
artifacts of another configuration are never loaded, and a compile is published by one rename:
no replica ever sees half of one. `mkdir` is atomic on local disks and on NFS/EFS, so it is the
lock; the owner refreshes it while compiling and a lock left by a crashed replica goes stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

logger = logging.getLogger(__name__)

MARKER = "compiled.json"
# A lock not refreshed for this long belongs to a replica that died while compiling.
STALE_LOCK_S = 600.0
_HEARTBEAT_S = 30.0


def fingerprint(marker: dict[str, Any]) -> str:
    """A short stable name for one compile configuration."""
    return hashlib.sha256(json.dumps(marker, sort_keys=True).encode()).hexdigest()[:16]


class ArtifactStore:
    """The published compile for one configuration, and the lock to produce it."""

    poll_s: ClassVar[float] = 5.0  # between looks at a lock another replica holds

    def __init__(
        self, root: Path, marker: dict[str, Any], *, stale_after_s: float = STALE_LOCK_S
    ) -> None:
        self.root = root
        self.marker = marker
        self.name = fingerprint(marker)
        self.published = root / self.name
        self._lock = root / f".{self.name}.lock"
        self._stale_after_s = stale_after_s

    def find(self) -> Path | None:
        """The published directory if it holds this configuration's compile, else None."""
        try:
            found = json.loads((self.published / MARKER).read_text())
        except (OSError, ValueError):
            return None
        if found != self.marker:
            logger.warning(
                "ignoring %s: its marker %s is not %s", self.published, found, self.marker
            )
            return None
        return self.published

    def publish(self, save: Callable[[Path], None]) -> Path:
        """Write with `save` into a staging directory, add the marker, rename into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{self.name}.staging-", dir=self.root))
        try:
            save(staging)
            (staging / MARKER).write_text(json.dumps(self.marker, sort_keys=True, indent=1))
            os.replace(staging, self.published)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("published compiled artifacts in %s", self.published)
        return self.published

    @contextmanager
    def compiling(self) -> Iterator[Path | None]:
        """Hold the compile lock; yields None to compile, or the directory another replica
        published while this one waited for it."""
        while not self._try_lock():
            if (done := self.find()) is not None:
                yield done
                return
            logger.info("another replica is compiling into %s; waiting", self.published)
            time.sleep(self.poll_s)
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(stop,), daemon=True)
        beat.start()
        try:
            yield self.find()  # it may have been published just before the lock was taken
        finally:
            stop.set()
            beat.join()
            shutil.rmtree(self._lock, ignore_errors=True)

    def _try_lock(self) -> bool:
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.mkdir()
            return True
        except FileExistsError:
            pass
        try:
            age = time.time() - self._lock.stat().st_mtime
        except FileNotFoundError:
            return False  # released just now: try again at once
        if age > self._stale_after_s:
            logger.warning("removing %s: not refreshed for %.0f s", self._lock, age)
            shutil.rmtree(self._lock, ignore_errors=True)
        return False

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(min(_HEARTBEAT_S, self._stale_after_s / 4)):
            os.utime(self._lock)

    def log_foreign(self) -> None:
        """Say which artifacts in the directory belong to other configurations (not loaded)."""
        if not self.root.is_dir():
            return
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(".") or entry.name == self.name:
                continue
            logger.info("not loading %s: compiled for another configuration", entry)
