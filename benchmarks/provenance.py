"""What reading provenance adds per image: read_provenance's wall time (median and p95) on the
sample images, on a 12-megapixel JPEG made in the run (plain, and signed with C2PA), on signed
small files, on generators' PNGs and on the hostile inputs of the tests; beside it, for scale,
decoding the same bytes (itemrt.stages.images.decode_bytes) where they are an image.

    python -m itemrt.bench.provenance [--runs 200] [--json out.json]

Signed rows need c2pa-python and cryptography (itemrt[provenance], the test extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

from itemrt.argtypes import COUNT
from itemrt.samples import images
from itemrt.stages.images import decode_bytes
from itemrt.provenance import ProvenanceReader

from . import provenance_inputs as pi


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median, p95) in ms over `runs` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, round(0.95 * (len(times) - 1)))]


def inputs(runs: int) -> list[tuple[str, list[bytes], int, bool]]:
    """(row, files, runs per file, decode them too)."""
    rows = [("sample JPEGs (itemrt.samples, 4)", [p.read_bytes() for p in images()], runs, True)]
    big = pi.large_jpeg()
    rows.append(("12 MP JPEG, EXIF + XMP", [big], max(5, runs // 10), True))
    rows.append(("64 MB of noise (the byte limit)", [b"\xff\xd8" + os.urandom(64 * 1024 * 1024 - 2)], max(3, runs // 40), False))
    rows.append(("generator PNGs (8 kinds)", list(pi.generator_pngs().values()), max(5, runs // 4), False))
    try:
        creds = pi.make_credentials()
        kinds = (("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"))
        signed = [pi.sign(pi.image(f), m, creds) for f, m in kinds]
        rows.append(("C2PA-signed JPEG / PNG / WebP (96 x 64)", signed, runs, False))
        rows.append(("12 MP JPEG, C2PA-signed", [pi.sign(big, "image/jpeg", creds)], max(5, runs // 10), True))
        hostile = pi.hostile(signed[0], signed[1])
    except ImportError as e:
        print(f"(no signed rows: {e}; install itemrt[provenance] and cryptography)", file=sys.stderr)
        hostile = pi.hostile()
    for name, (data, _) in hostile.items():
        rows.append((f"hostile: {name}", [data], max(3, runs // 20), False))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.provenance", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=COUNT, default=200, help="calls per small file (large files get fewer)")
    p.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = p.parse_args(argv)

    t = time.perf_counter()
    reader = ProvenanceReader()
    setup_ms = (time.perf_counter() - t) * 1000
    print(f"# read_provenance: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, {reader.c2pa_status}; reader set up in {setup_ms:.0f} ms")
    print("| input | file | provenance p50 | p95 | outcome | decode p50 |")
    print("|---|---:|---:|---:|---|---:|")
    out = []
    for row, files, n, decode in inputs(args.runs):
        stats = [timed(lambda d=d: reader.read(d), n) for d in files]
        p50, p95 = statistics.median(s[0] for s in stats), max(s[1] for s in stats)
        results = [reader.read(d) for d in files]
        outcome = ", ".join(sorted({_outcome(r) for r in results}))
        dec = statistics.median(timed(lambda d=d: decode_bytes(d), max(3, n // 10))[0] for d in files) if decode else None
        size = statistics.median(len(d) for d in files)
        print(f"| {row} | {_size(size)} | {p50:.3f} ms | {p95:.3f} ms | {outcome} | "
              + (f"{dec:.1f} ms |" if dec is not None else "|"))
        out.append({"input": row, "files": len(files), "bytes": size, "runs": n, "p50_ms": p50, "p95_ms": p95,
                    "outcome": outcome, "decode_p50_ms": dec})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": platform.processor(), "cpus": os.cpu_count(), "c2pa": reader.c2pa_status,
                       "rows": out}, f, indent=1)
    return 0


def _outcome(p) -> str:
    if p.invalid:
        return "invalid: " + ", ".join(sorted({i.source for i in p.invalid}))
    if p.c2pa.present:
        return f"C2PA {p.c2pa.state}"
    return {True: "declares AI", False: "declares not AI", None: "nothing declared"}[p.declared_ai]


def _size(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.0f} KB" if n >= 1e3 else f"{n:.0f} B"


if __name__ == "__main__":
    sys.exit(main())
