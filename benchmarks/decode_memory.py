"""Peak memory of `item serve` under small uploads that decode big: concurrent POSTs of one
highly compressible 64-megapixel RGBA PNG (about 265 KB). Prints the server's peak RSS
(VmHWM, Linux) and the wall time. Loopback only; it starts and stops its own server.

    python -m itemrt.bench.decode_memory engines/demo --requests 8 [--decode-budget-mp 1000]

Flags it does not know go to `item serve`.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from itemrt.argtypes import COUNT

from .hostile import pixel_bomb_png, rss_mb
from .load import free_port, request, start_server


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.decode_memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle")
    p.add_argument("--requests", type=COUNT, default=8, help="sent at once")
    args, serve_args = p.parse_known_args(argv)
    png = pixel_bomb_png(8000, 7999)
    proc = start_server(args.bundle, port := free_port(), *serve_args)
    try:
        before, statuses = rss_mb(pid=proc.pid), []

        def post() -> None:
            statuses.append(request(port, "POST", "/v1/detect", png, {"content-type": "image/png"}, timeout=600)[0])

        start = time.monotonic()
        threads = [threading.Thread(target=post) for _ in range(args.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - start
        print(f"{args.requests} x {len(png) / 1e3:.0f} KB PNG (8000x7999 RGBA): statuses {sorted(statuses)}, "
              f"{wall:.1f} s, server peak RSS {before} MB before, {rss_mb(pid=proc.pid)} MB after")
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
