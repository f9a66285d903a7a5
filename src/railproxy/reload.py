"""Hot reload: swap the guard to a new index when `railproxy reindex` writes one.

`railproxy reindex` replaces `.index/manifest.json` atomically as its last step,
so a change in the manifest's identity (inode, size, mtime) means a complete new
index is there. The watcher polls that (no inotify dependency, works on every
filesystem and in containers) and `request()` (wired to SIGHUP) forces a check.
With `interval=None` it does not poll: only `request()` reloads (`reload: false`
still honours SIGHUP, the operator's explicit ask). A failed reload keeps the old
snapshot serving and logs why.
"""

from __future__ import annotations

import logging
import os

import anyio
import anyio.to_thread

from railproxy.errors import RailproxyError
from railproxy.guard import Guard
from railproxy.index import MANIFEST, index_dir

logger = logging.getLogger(__name__)

Stamp = tuple[int, int, int] | None


class Reloader:
    def __init__(self, guard: Guard, *, interval: float | None = 1.0) -> None:
        self.guard = guard
        self.interval = interval
        self._manifest = index_dir(guard.root) / MANIFEST
        self._seen = self._stamp()
        self._forced = anyio.Event()
        self.reloads = 0
        self.failures = 0
        self.last_error: str | None = None

    def _stamp(self) -> Stamp:
        try:
            st = os.stat(self._manifest)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def request(self) -> None:
        """Ask for a reload now (e.g. on SIGHUP). Safe to call from the event loop."""
        self._forced.set()

    async def check(self, *, force: bool = False) -> bool:
        """Reload if the manifest changed (or if forced). True when a new snapshot serves."""
        stamp = self._stamp()
        if not force and stamp == self._seen:
            return False
        self._seen = stamp
        try:
            snapshot = await anyio.to_thread.run_sync(self.guard.reload)
        except Exception as exc:  # whatever broke (an unreadable file too), keep serving
            self.failures += 1
            self.last_error = str(exc) if isinstance(exc, RailproxyError) else repr(exc)
            logger.error("reload failed, still serving the previous rails: %s", self.last_error)
            return False
        self.reloads += 1
        self.last_error = None
        logger.info("reloaded rails %s (digest %s)", self.guard.root, snapshot.rails.digest[:12])
        return True

    async def run(self) -> None:
        """Poll (or only wait for `request()`) forever; cancel the task group to stop."""
        while True:
            with anyio.move_on_after(self.interval):
                await self._forced.wait()
            forced = self._forced.is_set()
            self._forced = anyio.Event()
            await self.check(force=forced)
