"""Measured peak memory: the resident set size (RSS) of this process, sampled in a thread.

tracemalloc cannot see tensor memory (torch allocates outside Python's allocator), so
:class:`PeakRSS` polls ``/proc/self/statm`` every few milliseconds and keeps the largest
value. Freed memory an allocator keeps for reuse still counts as resident, so compare
runs made in fresh processes. Where ``/proc`` is missing the process's lifetime peak
(``getrusage``) is used, which cannot measure a phase that follows a larger one.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from types import TracebackType

_STATM = Path("/proc/self/statm")


def current_rss() -> int:
    """Return the resident set size in bytes (the lifetime peak where /proc is missing)."""
    if _STATM.exists():
        return int(_STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakRSS:
    """``with PeakRSS() as m: ...`` then ``m.peak``: the largest RSS rise over entry, in bytes.

    Costs one small file read per ``interval`` seconds in a daemon thread.
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = 0
        self._max = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @property
    def peak(self) -> int:
        """Largest RSS seen minus the RSS at entry (bytes, at least 0)."""
        return max(0, self._max - self.start)

    def _sample(self) -> None:
        self._max = max(self._max, current_rss())

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakRSS:
        self.start = self._max = current_rss()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
