"""What hostile uploads cost: small files that are cheap to send and were expensive to process.

    python -m itemrt.bench.hostile engines/demo [--inputs NAME ...] [--small 10] [--no-server] [--modes]

1. Each input, in a fresh process: decoding and the three models' preprocessing at the
   full-size settings (BLIP 384, OWL-ViT 768, CLIP 224 shortest edge and crop), where hostile
   inputs cost; its outcome, wall time and peak RSS (VmHWM, Linux).
2. `item serve` on BUNDLE (loopback, its own server): the answer times of small valid images,
   sent one after another, alone and while two uploads of each hostile input are kept in flight.
3. With --modes: peak bytes a pixel while decoding, by format and mode (images.DECODE_BYTES).

The generators below also make the inputs of tests/test_images.py and tests/test_preprocess.py.
Flags it does not know go to `item serve`.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable

import numpy as np
from itemrt.argtypes import COUNT
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _texture(w: int, h: int, seed: int = 0, cell: int = 16) -> Image.Image:
    """A smooth random RGB image (compresses like a photo, not like noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, h // cell), max(1, w // cell), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)


def thin_png(w: int, h: int) -> bytes:
    """About 100 bytes for 1 x 20000 px; CLIP's shortest-edge resize made it 224 x 4,480,000."""
    return _encode(Image.new("RGB", (w, h), (40, 90, 160)), "PNG")


def scan_bomb_jpeg(w: int, h: int, scans: int) -> bytes:
    """A progressive JPEG whose smallest scan is repeated until it has `scans` scans: each scan is
    a pass over the whole image for the decoder, and a few bytes in the file."""
    data = _encode(_texture(w, h), "JPEG", progressive=True, quality=80)
    starts = [i for i in range(len(data) - 1) if data[i] == 0xFF and data[i + 1] == 0xDA]
    ends = starts[1:] + [len(data) - 2]  # a scan runs to the next one, the last to EOI
    smallest = min(zip(starts, ends), key=lambda se: se[1] - se[0])
    scan = data[smallest[0] : smallest[1]]
    return data[:-2] + scan * max(0, scans - len(starts)) + data[-2:]


def high_depth(w: int, h: int, mode: str, fmt: str = "TIFF") -> bytes:
    """A float, int32 or 16-bit image: compressed small, several bytes a pixel once decoded."""
    g = np.asarray(_texture(w, h, cell=400).convert("L"))  # smooth: a few MB at 64 MP, under upload limits
    arr = {"F": lambda: g.astype(np.float32) / 255, "I": lambda: g.astype(np.int32) * 257,
           "I;16": lambda: g.astype(np.uint16) * 257}[mode]()
    return _encode(Image.fromarray(arr), fmt, **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))


def pixel_bomb_png(w: int, h: int) -> bytes:
    """One colour, RGBA: about 265 KB for 64 MP."""
    return _encode(Image.new("RGBA", (w, h), (10, 20, 30, 128)), "PNG")


HOSTILE: dict[str, Callable[[], bytes]] = {
    "thin 1x20000 PNG": lambda: thin_png(1, 20000),
    "wide 20000x1 PNG": lambda: thin_png(20000, 1),
    "thin 3x20000 PNG": lambda: thin_png(3, 20000),
    "progressive 2000x2000, 2000 scans": lambda: scan_bomb_jpeg(2000, 2000, 2000),
    "progressive 8000x8000, 5000 scans": lambda: scan_bomb_jpeg(8000, 8000, 5000),
    "progressive 8000x8000, 10 scans": lambda: scan_bomb_jpeg(8000, 8000, 10),
    "float TIFF 8000x8000": lambda: high_depth(8000, 8000, "F"),
    "int32 TIFF 8000x8000": lambda: high_depth(8000, 8000, "I"),
    "16-bit PNG 8000x8000": lambda: high_depth(8000, 8000, "I;16", "PNG"),
    "RGBA PNG 8000x7999": lambda: pixel_bomb_png(8000, 7999),
}
SERVER_INPUTS = ("thin 1x20000 PNG", "progressive 8000x8000, 5000 scans", "float TIFF 8000x8000",
                 "16-bit PNG 8000x8000", "RGBA PNG 8000x7999")


def rss_mb(key: str = "VmHWM", pid: int | str = "self") -> int:
    """A process's peak (VmHWM) or current (VmRSS) resident memory in MB; Linux."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) // 1024


def _measured(fn: Callable[[], object]) -> tuple[object, dict]:
    """fn()'s result, and its wall time and this process's peak RSS while it ran (the peak is
    reset first: Linux 4.0+), with the RSS before."""
    before = rss_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t = time.perf_counter()
    out = fn()
    return out, {"wall_s": time.perf_counter() - t, "rss_before_mb": before, "peak_rss_mb": rss_mb()}


def _full_specs():
    from itemrt.export.models import image_spec
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.owlvit.image_processing_pil_owlvit import OwlViTImageProcessorPil

    return [image_spec(p()) for p in (BlipImageProcessorPil, OwlViTImageProcessorPil, CLIPImageProcessorPil)]


def _child(path: str, with_preprocess: bool) -> dict:
    """In a fresh process: decode the file's image (and preprocess it for the three models at
    full size); what that cost. The input is made by the parent, so that nothing its making
    allocated is counted or reused here."""
    from itemrt.errors import ImageError
    from itemrt.stages.images import load_image
    from itemrt.stages.preprocess import preprocess

    data = open(path, "rb").read()  # noqa: SIM115 - read whole, closed at once
    specs = _full_specs() if with_preprocess else []
    preprocess([([Image.new("RGB", (64, 48))], s) for s in specs])  # warm: first calls allocate

    def run() -> tuple[str, int]:
        try:
            img = load_image(data)
            preprocess([([img], s) for s in specs])
            return f"ok {img.size[0]}x{img.size[1]}", img.size[0] * img.size[1]
        except ImageError as e:
            return e.code, 0

    (outcome, pixels), cost = _measured(run)
    return {"outcome": outcome, "pixels": pixels, **cost}


def _in_fresh_process(data: bytes, with_preprocess: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".img") as f:
        f.write(data)
        f.flush()
        cmd = [sys.executable, "-m", "itemrt.bench.hostile", "--child", f.name] + (["--preprocess"] * with_preprocess)
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"the measuring process failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.splitlines()[-1])


def _inputs_table(names: list[str]) -> None:
    print("| input | file | outcome | wall | peak RSS (before) |\n|---|---:|---|---:|---:|")
    for name in names:
        data = HOSTILE[name]()
        r = _in_fresh_process(data, with_preprocess=True)
        size = f"{len(data) / 1e3:.1f} KB" if len(data) < 1e6 else f"{len(data) / 1e6:.1f} MB"
        print(f"| {name} | {size} | {r['outcome']} | {r['wall_s']:.2f} s | "
              f"{r['peak_rss_mb']} MB ({r['rss_before_mb']} MB) |", flush=True)


def _server_table(bundle: str, names: list[str], small: int, serve_args: list[str]) -> None:
    from itemrt.samples import images as sample_images

    from .load import free_port, request, start_server

    valid = sample_images()[0].read_bytes()
    port = free_port()
    proc = start_server(bundle, port, *serve_args)

    def post(body: bytes, ctype: str = "image/jpeg") -> tuple[int, float]:
        t = time.monotonic()
        status, _ = request(port, "POST", "/v1/detect", body, {"content-type": ctype}, timeout=600)
        return status, time.monotonic() - t

    def small_images() -> tuple[list[float], Counter]:
        times, statuses = [], Counter()
        for _ in range(small):
            status, dt = post(valid)
            statuses[status] += 1
            times.append(dt)
        return times, statuses

    print(f"\n`item serve {bundle}`: {small} small valid images ({len(valid) / 1e3:.0f} KB JPEG) one after "
          "another, alone and with two uploads of a hostile input kept in flight\n")
    print("| in flight | small images: p50 | max | statuses | hostile answers | /readyz 503 seen |\n"
          "|---|---:|---:|---|---|---:|")
    try:
        post(valid)  # warm
        times, statuses = small_images()
        print(f"| nothing | {statistics.median(times):.2f} s | {max(times):.2f} s | {dict(statuses)} | | |", flush=True)
        for name in names:
            data, stop, hostile, not_ready = HOSTILE[name](), threading.Event(), Counter(), [0]

            def attacker() -> None:
                while not stop.is_set():
                    hostile[post(data, "application/octet-stream")[0]] += 1

            def prober() -> None:
                while not stop.is_set():
                    not_ready[0] += request(port, "GET", "/readyz", timeout=30)[0] == 503
                    time.sleep(0.05)

            threads = [threading.Thread(target=f) for f in (attacker, attacker, prober)]
            for t in threads:
                t.start()
            time.sleep(0.5)  # both uploads under way
            times, statuses = small_images()
            stop.set()
            for t in threads:
                t.join()
            print(f"| 2 x {name} | {statistics.median(times):.2f} s | {max(times):.2f} s | {dict(statuses)} | "
                  f"{dict(hostile)} | {not_ready[0]} |", flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=180)


_MODES = [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"),
          ("LA", "PNG"), ("P", "PNG"), ("1", "PNG"), ("I;16", "PNG"), ("RGB", "TIFF"), ("I", "TIFF"), ("F", "TIFF"),
          ("RGB", "GIF"), ("RGB", "BMP"), ("RGB", "PPM"), ("RGBA", "WEBP"), ("RGB", "AVIF")]


def _mode_input(mode: str, fmt: str, n: int = 4000) -> bytes:
    if mode in ("F", "I", "I;16"):
        return high_depth(n, n, mode, fmt)
    img = _texture(n, n)
    return _encode(img.convert(mode) if mode != "RGB" else img, fmt)


def _modes_table() -> None:
    from itemrt.stages.images import DECODE_BYTES, DECODE_BYTES_REF

    print("\nload_image, 4000 x 4000, fresh process each: peak RSS over the decoded pixels\n")
    print("| format | mode | peak bytes a pixel | budgeted (images.DECODE_BYTES) |\n|---|---|---:|---:|")
    for mode, fmt in _MODES:
        r = _in_fresh_process(_mode_input(mode, fmt), with_preprocess=False)
        per_pixel = (r["peak_rss_mb"] - r["rss_before_mb"]) * 2**20 / r["pixels"]
        print(f"| {fmt} | {mode} | {per_pixel:.1f} | {DECODE_BYTES.get(fmt, DECODE_BYTES_REF)} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", help="for the server part; without it, only the inputs' costs")
    p.add_argument("--inputs", nargs="+", choices=sorted(HOSTILE), metavar="NAME", help="default: all")
    p.add_argument("--small", type=COUNT, default=10, help="small valid images per server measurement")
    p.add_argument("--no-server", action="store_true")
    p.add_argument("--modes", action="store_true", help="also the decode bytes per pixel by format and mode")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--preprocess", action="store_true", help=argparse.SUPPRESS)
    args, serve_args = p.parse_known_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.preprocess)))
        return 0
    names = args.inputs or list(HOSTILE)
    _inputs_table(names)
    if args.bundle and not args.no_server:
        _server_table(args.bundle, [n for n in names if n in SERVER_INPUTS] or names[:2], args.small, serve_args)
    if args.modes:
        _modes_table()
    return 0


if __name__ == "__main__":
    sys.exit(main())
