"""Progress lines for long work: done/total, rate, ETA; at most one line every few seconds."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
    def __init__(self, label: str, total: int, emit: Callable[[str], None] | None, every_s: float = 2.0):
        self.label, self.total, self.emit, self.every_s = label, total, emit, every_s
        self.done = 0
        self.t0 = self._last = time.perf_counter()

    def update(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if self.emit and (now - self._last >= self.every_s or self.done >= self.total):
            self._last = now
            self.emit(self.line(note))

    def line(self, note: str = "") -> str:
        elapsed = time.perf_counter() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta = f", eta {_clock(left)}" if self.done < self.total and rate > 0 else ""
        tail = f", {note}" if note else ""
        return f"{self.label}: {self.done}/{self.total} ({pct:.1f}%), {rate:.2f}/s{eta}{tail}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
