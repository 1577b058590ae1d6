"""argparse types for the command lines' numbers.

A value out of range is a usage error that names the flag (exit 2), not a traceback from deep
in a run or a value quietly clamped (`--batch-size 0` used to run as 1, `--runs 0` died in the
report, `--port 70000` in the socket bind).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An int in [low, high]."""
    want = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = None
        if v is None or v < low or (high is not None and v > high):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    parse.__name__ = "integer"
    return parse


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           ) -> Callable[[str], float]:
    """A finite float between low and high (each end closed unless told open)."""
    lo = f"{'(' if low_open else '['}{low:g}"
    want = f"a number in {lo}, {high:g}{')' if high_open else ']'}" if high is not None else \
        f"a number {'>' if low_open else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        ok = math.isfinite(v) and (v > low if low_open else v >= low)
        if high is not None:
            ok = ok and (v < high if high_open else v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


COUNT = integer(1)  # batch sizes, runs, limits: at least one
THREADS = integer(0)  # 0: ONNX Runtime's default (all cores)
PORT = integer(0, 65535)  # 0: any free port
SECONDS = number(0, low_open=True)
FRACTION = number(0, 1)
