"""Bounded load on `item serve`, loopback only: throughput, p50/p99 and errors per
concurrency level, with micro-batching on and off. It starts and stops its own servers.

    python -m itemrt.bench.load engines/tiny --concurrency 1 4 16 --requests 64
    python -m itemrt.bench.load engines/tiny --engines local ray --ray-replicas 1 2

With `--engines local ray` the same clients also load `item serve --engine ray` (a new Ray
cluster on loopback for each configuration: the Detector replicas share this machine's cores,
the ingress reserves none), and each Ray row gets its p50 minus the local row's at the same
batching and callers: what Ray adds to a request.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .worker import run_concurrently


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: str, port: int, *extra: str, timeout_s: float = 300.0) -> subprocess.Popen:
    """`item serve` on loopback; returns once /readyz answers 200."""
    cmd = [sys.executable, "-m", "itemrt.cli", "serve", bundle, "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    # Its log goes to a file, read with server_log(): a pipe that nobody drains fills at 64 KB,
    # and then the server blocks on its next log line (it froze a fuzzing test that way).
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - lives as long as the server: proc.log
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True)
    proc.log = log
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"item serve exited with {proc.returncode}: {server_log(proc)[-2000:]}")
        try:
            status, _ = request(port, "GET", "/readyz", timeout=2)
            if status == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("item serve did not become ready")


def server_log(proc: subprocess.Popen) -> str:
    """What a server from start_server has written to stderr so far."""
    proc.log.seek(0)
    return proc.log.read()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            timeout: float = 120.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def run_level(port: int, images: list[bytes], concurrency: int, requests: int) -> dict:
    """`requests` POSTs from `concurrency` threads; every request ends (answer or error)."""
    latencies, statuses, lock = [], Counter(), threading.Lock()
    counter = iter(range(requests))

    def worker(_: int):
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                status, _ = request(port, "POST", "/v1/detect", images[i % len(images)], {"content-type": "image/jpeg"})
            except OSError as e:
                status = type(e).__name__
            dt = time.perf_counter() - t0
            with lock:
                statuses[str(status)] += 1
                if status == 200:
                    latencies.append(dt)

    wall = run_concurrently(worker, concurrency)
    lat = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    return {"concurrency": concurrency, "requests": requests, "ok": statuses.get("200", 0),
            "errors": {k: v for k, v in statuses.items() if k != "200"},
            "throughput_rps": statuses.get("200", 0) / wall, "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)), "wall_s": wall}


@dataclass(frozen=True)
class Engine:
    """One server configuration under load: its name in the table and its `item serve` flags."""

    name: str
    flags: tuple[str, ...] = ()


def engines(names: list[str], ray_replicas: list[int]) -> list[Engine]:
    out = []
    cores = os.cpu_count() or 1
    for name in names:
        if name == "local":
            out.append(Engine("local"))
        else:  # the replicas split the cores; threads per replica follow their CPUs
            out += [Engine(f"ray x{n}", ("--engine", "ray", "--replicas", str(n), "--num-cpus", f"{cores / n:g}",
                                          "--ingress-num-cpus", "0")) for n in ray_replicas]
    return out


def overheads(rows: list[dict]) -> None:
    """Each Ray row's p50 minus the local row's at the same batching and callers (in place)."""
    local = {(r["max_batch"], r["concurrency"]): r for r in rows if r["engine"] == "local"}
    for r in rows:
        base = local.get((r["max_batch"], r["concurrency"]))
        if r["engine"] != "local" and base is not None:
            r["p50_overhead_ms"] = r["p50_ms"] - base["p50_ms"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.load", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="per concurrency level")
    p.add_argument("--batching", type=int, nargs="+", default=[1, 8],
                   help="--max-batch values to compare (1: micro-batching off)")
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local"],
                   help="item serve (local) and/or item serve --engine ray, same clients")
    p.add_argument("--ray-replicas", type=int, nargs="+", default=[1],
                   help="Detector replicas of each Ray configuration (they split the cores)")
    p.add_argument("--images", nargs="+", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if args.images is None:
        from itemrt.samples import images as sample_images

        args.images = sample_images()
    images = [path.read_bytes() for path in args.images]
    rows = []
    for engine in engines(args.engines, args.ray_replicas):
        for max_batch in args.batching:
            port = free_port()
            print(f"[load] item serve ({engine.name}) --max-batch {max_batch} on 127.0.0.1:{port}", file=sys.stderr,
                  flush=True)
            t0 = time.monotonic()
            proc = start_server(args.bundle, port, "--max-batch", str(max_batch), "--max-in-flight",
                                str(args.max_in_flight), *engine.flags)
            print(f"[load]   ready in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
            try:
                for c in args.concurrency:
                    row = {"engine": engine.name, "max_batch": max_batch, **run_level(port, images, c, args.requests)}
                    rows.append(row)
                    print(f"[load]   concurrency {c}: {row['throughput_rps']:.2f} req/s", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=180)
    overheads(rows)
    print(f"{'engine':>8} {'max batch':>9} {'callers':>8} {'req/s':>8} {'p50 ms':>9} {'p99 ms':>9} {'+p50 ms':>8} "
          f"{'ok':>5}  errors")
    for r in rows:
        extra = f"{r['p50_overhead_ms']:>8.1f}" if "p50_overhead_ms" in r else f"{'':>8}"
        print(f"{r['engine']:>8} {r['max_batch']:>9} {r['concurrency']:>8} {r['throughput_rps']:>8.2f} "
              f"{r['p50_ms']:>9.1f} {r['p99_ms']:>9.1f} {extra} {r['ok']:>5}  {r['errors'] or '-'}")
    if args.json:
        meta = {"bundle": args.bundle, "cpu_count": os.cpu_count(), "command": " ".join(sys.argv)}
        args.json.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
