"""`item-bench BUNDLE`: the ITEM chain stage by stage, every backend side by side, one run.

Each backend runs in its own process (its peak RSS is its own), on the same images with
the same fixed work (`--tokens`, `--objects`). Reported: p50/p90/p99 per stage after
warm-up, decoder time per token, images/s at several batch sizes and with concurrent
callers, caption-cache hit rate, matmul GFLOP/s per stage against the machine's measured
matmul peak, peak RSS, and whether each backend's outputs match the PyTorch reference.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from itemrt.argtypes import COUNT, THREADS, integer
from itemrt.errors import PathError
from itemrt.paths import writable_folder

from . import peak
from .report import (
    SCHEMA,
    backend_report,
    comparable,
    compare,
    markdown,
    outputs_match,
    table,
)

# name -> (worker backend, precision, device). The reference chain on CUDA (FP32 and FP16) is
# the baseline a datacenter user would otherwise run; the GPU backends skip, with the reason,
# where there is no GPU, no GPU provider or no engines.
BACKENDS = {
    "reference": ("reference", "fp32", "cpu"),
    "reference-cuda": ("reference", "fp32", "cuda"),
    "reference-cuda-fp16": ("reference", "fp16", "cuda"),
    # torch.compile'd FP16 on CUDA: the fastest thing a PyTorch user would otherwise deploy
    "reference-compile": ("reference-compile", "fp16", "cuda"),
    "ort-fp32": ("onnxruntime", "fp32", "cpu"),
    "ort-int8": ("onnxruntime", "int8", "cpu"),
    "ort-fp16": ("onnxruntime", "fp16", "cpu"),
    "ov-bf16": ("onnxruntime", "bf16", "cpu"),  # gated graphs on OpenVINO (AMX), the rest on ORT FP32
    "mixed": ("onnxruntime", "mixed", "cpu"),  # per graph INT8 (ORT), else BF16 (OpenVINO), else FP32
    "ort-cuda-fp16": ("ort-cuda", "fp16", "cuda"),
    "tensorrt": ("tensorrt", "fp16", "cuda"),
}
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def machine() -> dict:
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem, 1), "isa": [f for f in ISA if f in flags],
            "gpu": _cuda_device(), "system": platform.system(), "python": platform.python_version()}


def _versions() -> dict:
    import itemrt
    import numpy
    import onnxruntime

    v = {"itemrt": itemrt.__version__, "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}
    try:
        import torch

        v["torch"] = torch.__version__
    except ImportError:
        pass
    return v


def _cuda_device() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _skip_reason(name: str, bundle) -> str | None:
    kind, precision, device = BACKENDS[name]
    reference = kind.startswith("reference")
    if reference and device == "cuda" and _cuda_device() is None:
        return "no CUDA device visible to PyTorch here"
    if kind == "ort-cuda":  # the same checks as `item doctor --backend ort-cuda`, with its fix
        from itemrt.doctor import check_ort_cuda, cuda_state

        why, fix = check_ort_cuda(cuda_state())
        if why is not None:
            return f"{why}" + (f"; fix: {fix}" if fix else "")
    if kind == "tensorrt":
        if importlib.util.find_spec("tensorrt") is None:
            return "TensorRT is not installed here (the GPU path: `item build` on the target machine)"
        if not bundle.manifest.get("tensorrt"):
            return f"the bundle has no TensorRT engines: run `item build {bundle.root}` on this machine"
    if precision in ("bf16", "mixed"):  # the machine first: a bundle exported here without BF16 units has none either
        from itemrt.backends.openvino import bf16_support

        if (why := bf16_support()) is not None:
            return why
    if not reference and precision not in bundle.precisions():  # the reference runs torch, not graphs
        return f"the bundle has no {precision} graphs (not in `item export --precisions`, or none passed its gate)"
    return None


def _worker(name: str, args) -> dict:
    kind, precision, device = BACKENDS[name]
    cmd = [sys.executable, "-m", "itemrt.bench.worker", "--backend", kind, "--precision", precision, "--device", device,
           "--bundle", str(args.bundle), "--runs", str(args.runs), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--text-cache", args.text_cache,
           "--batch-sizes", *map(str, args.batch_sizes), "--callers", *map(str, args.callers),
           "--throughput-repeats", str(args.throughput_repeats), "--images", *map(str, args.images)]
    cmd += ["--tokens", str(args.tokens)] if args.tokens else []
    cmd += ["--objects", str(args.objects)] if args.objects is not None else []
    cmd += ["--parallel"] if args.parallel else []
    print(f"[bench] {name}: {args.warmup} warm-up, {args.runs} timed runs", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"item-bench: the {name} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args) -> dict:
    from itemrt.bundle import Bundle

    bundle = Bundle.open(args.bundle, verify=False)  # the workers' runtimes verify hashes
    manifest = bundle.manifest
    print("[bench] matmul peak", file=sys.stderr, flush=True)
    rep = {
        "schema": SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "item-bench " + " ".join(shlex.quote(a) for a in (args.argv or [])),
        "bundle": str(args.bundle),
        "bundle_name": bundle.name,
        "random_init": manifest.get("random_init"),
        "machine": machine(),
        "versions": _versions(),
        "settings": {k: getattr(args, k) for k in ("runs", "warmup", "tokens", "objects", "threads", "parallel",
                                                   "text_cache", "batch_sizes", "callers", "throughput_repeats")},
        "images": [str(p) for p in args.images],
        "matmul_peak": peak.measure(args.threads),
        "backends": {},
    }
    raws = {}
    for name in args.backends:
        reason = _skip_reason(name, bundle)
        if reason:
            rep["backends"][name] = {"status": "skipped", "reason": reason}
            continue
        raws[name] = _worker(name, args)
    # The clock of a shared machine drifts over a long run: the peak is the best of a
    # measurement before and one after the backends, and every stage is set against it.
    rep["matmul_peak"] = peak.merge(rep["matmul_peak"], peak.measure(args.threads))
    for name, raw in raws.items():
        rep["backends"][name] = backend_report(raw, rep["matmul_peak"], BACKENDS[name][1])
    rep["backends"] = {n: rep["backends"][n] for n in args.backends}  # in the order asked
    if "reference" in raws:
        ref_total = rep["backends"]["reference"]["stages_ms"]["total"]["p50"]
        for name, raw in raws.items():
            if name == "reference":
                continue
            b = rep["backends"][name]
            b["speedup_vs_reference"] = ref_total / b["stages_ms"]["total"]["p50"]
            exact = BACKENDS[name][1:] == ("fp32", "cpu")  # GPU kernels (TF32 convolutions) differ a little
            b["mismatches"] = outputs_match(raws["reference"]["outputs"], raw["outputs"], exact)
            b["outputs_match_reference"] = not b["mismatches"]
    first = next(iter(raws.values()), None)
    if first:
        rep["per_image"] = {k: {"tokens": len(v["tokens"]), "words": len(v["words"]), "found": sum(v["found"])}
                            for k, v in first["outputs"].items()}
    return rep


def build_parser() -> argparse.ArgumentParser:
    """The `item-bench` command line (the README's commands are checked against it)."""
    p = argparse.ArgumentParser(prog="item-bench", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    p.add_argument("--images", nargs="+", type=Path, default=None, help="default: the shipped sample images")
    p.add_argument("--runs", type=COUNT, default=8)
    p.add_argument("--warmup", type=integer(0), default=1)
    p.add_argument("--threads", type=THREADS, default=0, help="0: all cores")
    p.add_argument("--tokens", type=COUNT, default=None, help="caption token limit (default: the bundle's)")
    p.add_argument("--objects", type=integer(0), default=None,
                   help="look for this many fixed words instead of the caption's (same work in every run)")
    p.add_argument("--text-cache", choices=["cold", "warm"], default="cold",
                   help="cold: caption cache cleared before each run (every caption new); warm: kept")
    p.add_argument("--batch-sizes", type=COUNT, nargs="+", default=[1, 2, 4])
    p.add_argument("--callers", type=COUNT, nargs="+", default=[1, 2], help="concurrent detect() callers")
    p.add_argument("--throughput-repeats", type=COUNT, default=2)
    p.add_argument("--parallel", action="store_true", help="run the runtime's image-only stages side by side")
    p.add_argument("--json", type=Path, default=None, help="write the report (schema in benchmarks/README.md)")
    p.add_argument("--markdown", type=Path, default=None, help="write a markdown table")
    p.add_argument("--charts", type=Path, default=None, help="folder for stages.png and batch.png")
    p.add_argument("--compare", type=Path, default=None, help="an earlier --json report: print p50 deltas")
    return p


def _check_paths(p: argparse.ArgumentParser, args) -> dict | None:
    """Before the run: the --compare report read, the output folders made and writable.
    Returns the --compare report."""
    files = {flag: path for flag, path in (("--json", args.json), ("--markdown", args.markdown)) if path is not None}
    folders = {flag: path.parent for flag, path in files.items()}
    if args.charts is not None:
        folders["--charts"] = args.charts
    for flag, folder in folders.items():
        try:
            writable_folder(folder)
        except PathError as e:
            p.error(f"{flag}: {e}")
    for flag, path in files.items():
        if path.is_dir():
            p.error(f"{flag}: {path} is a folder")
    if args.compare is None:
        return None
    try:
        old = json.loads(args.compare.read_text())
    except (OSError, ValueError) as e:
        p.error(f"--compare: cannot read a report from {args.compare}: {e}")
    if why := comparable(old):
        p.error(f"--compare: {args.compare}: {why}")
    return old


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    old = _check_paths(p, args)  # a long run must not end in a path error
    if args.images is None:
        from itemrt.samples import images as sample_images

        args.images = sample_images()
    rep = run(args)
    print(table(rep))
    if old is not None:
        print("\n" + compare(old, rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rep))
    if args.charts:
        from .charts import write

        for path in write(rep, args.charts):
            print(f"chart: {path}")
    matched = [b.get("outputs_match_reference", True) for b in rep["backends"].values() if b["status"] == "ok"]
    return 0 if all(matched) else 1


if __name__ == "__main__":
    sys.exit(main())
