"""Waiting for a study's short-axis stack to stop growing before it is segmented (``SettleTimer``).

A stack stored as a series per slice reaches the service as one push per slice series, each
``StableAge`` after that slice's last instance: segmenting at every push re-segmented the stack once
per slice as it grew, each time storing SEGs of a partial stack and replacing them. Imports nothing of
raysegment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class SettleTimer:
    """Calls ``fire(key, items)`` once no ``add(key, item)`` came for ``wait_s`` seconds, with every
    item added to ``key`` meanwhile (sorted); each key has its own clock. ``pending(key)``: the items
    waiting. A process that ends drops what waits (the scheduled job is the safety net)."""

    def __init__(self, wait_s: float, fire: Callable[[str, list[str]], None]):
        self.wait_s, self.fire = wait_s, fire
        self._lock = threading.Lock()
        self._waiting: dict[str, tuple[float, set[str]]] = {}  # key → (due, monotonic s; items)

    def add(self, key: str, item: str) -> None:
        due = time.monotonic() + self.wait_s
        with self._lock:
            items = self._waiting.get(key, (0.0, set()))[1] | {item}
            self._waiting[key] = (due, items)
        timer = threading.Timer(self.wait_s, self._due, (key, due))
        timer.daemon = True
        timer.start()

    def pending(self, key: str) -> set[str]:
        with self._lock:
            return set(self._waiting.get(key, (0.0, set()))[1])

    def _due(self, key: str, due: float) -> None:
        with self._lock:
            if key not in self._waiting or self._waiting[key][0] != due:  # a later add moved the clock
                return
            items = self._waiting.pop(key)[1]
        self.fire(key, sorted(items))
