"""Ctrl-C and SIGTERM held while a durable record is written, so that it is written whole."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends, then arrive as they would have (to the
    handler that was there: ignored stays ignored). Landing inside numpy's zip writer, a
    KeyboardInterrupt turned into its ValueError ("Can't close the ZIP file ...") and a
    traceback instead of the clean interrupted exit. Handlers, not a signal mask: the runtime's
    threads would take a masked signal instead. Only the main thread can hold them; elsewhere
    this does nothing (signals run there anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not None:  # None: set outside Python, cannot be put back
            held[sig] = signal.signal(sig, lambda n, _frame: caught.append(n))
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
        if caught:
            signal.raise_signal(caught[0])
