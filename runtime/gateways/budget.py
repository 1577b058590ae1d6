"""The decode budget: how many pixels the server's decoding threads may hold at once."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class PixelBudget:
    """At most `limit` pixels being decoded at once, across the server's decoding threads
    (`load_image`'s hold, weighed by format: images.decode_cost). Without it, a handful of
    concurrent small PNGs that claim 64 MP each took the server to gigabytes of RSS
    (`python -m itemrt.bench.decode_memory`; docs/reliability.md). An image larger than the
    whole budget still runs, alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.waiting = limit, 0, 0
        self._cond = threading.Condition()

    @property
    def exhausted(self) -> bool:
        """A decode is waiting for room: a new image would wait too (/readyz says not ready)."""
        return self.waiting > 0

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._cond:
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            finally:
                self.waiting -= 1
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()
