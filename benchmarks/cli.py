"""`item-bench BUNDLE`: the ONNX Runtime chain against the PyTorch reference chain, same run.

Each backend runs in its own process (peak RSS is its own); stage timings are medians over
the timed runs after warm-up; outputs (caption tokens, words, p(fake)) must match.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

BACKENDS = ("reference", "onnxruntime")


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "system": platform.system()}


def _worker(backend: str, args) -> dict:
    cmd = [sys.executable, "-m", "itemrt.bench.worker", "--backend", backend, "--bundle", str(args.bundle),
           "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--images", *map(str, args.images)]
    cmd += ["--tokens", str(args.tokens)] if args.tokens else []
    cmd += ["--objects", str(args.objects)] if args.objects is not None else []
    cmd += ["--parallel"] if args.parallel and backend == "onnxruntime" else []
    print(f"[bench] {backend}: {args.runs} runs after {args.warmup} warm-up", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"item-bench: the {backend} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean())}


def report(results: dict, manifest: dict, args) -> dict:
    out = {"bundle": str(args.bundle), "random_init": manifest.get("random_init"), "machine": _machine(),
           "versions": manifest.get("versions"), "runs": args.runs, "warmup": args.warmup,
           "tokens": args.tokens, "objects": args.objects, "parallel": args.parallel, "threads": args.threads,
           "backends": {}}
    for name, r in results.items():
        stages = list(r["runs"][0])  # in the order the chain ran them, total last
        out["backends"][name] = {
            "stages_ms": {k: _stats([run.get(k, 0.0) for run in r["runs"]]) for k in stages},
            "peak_rss_mb": r["peak_rss_mb"],
            "load_s": r["load_s"],
            "torch_imported": r["torch_imported"],
        }
    ref, ort = results["reference"]["outputs"], results["onnxruntime"]["outputs"]
    out["outputs_match"] = all(
        ref[k]["tokens"] == ort[k]["tokens"] and ref[k]["words"] == ort[k]["words"]
        and ref[k]["found"] == ort[k]["found"] and abs(ref[k]["p_fake"] - ort[k]["p_fake"]) <= 1e-4
        for k in ref
    )
    out["per_image"] = {k: {"tokens": len(v["tokens"]), "words": len(v["words"]), "found": sum(v["found"])} for k, v in ort.items()}
    b = out["backends"]
    out["speedup_p50"] = b["reference"]["stages_ms"]["total"]["p50"] / b["onnxruntime"]["stages_ms"]["total"]["p50"]
    return out


def print_table(rep: dict) -> None:
    m = rep["machine"]
    print(f"item-bench  {rep['bundle']}  (random-init: {rep['random_init']})  {m['cpu']}, {m['cores']} cores")
    for name, b in rep["backends"].items():
        print(f"\n{name}: peak RSS {b['peak_rss_mb']:.0f} MB, load {b['load_s']:.1f} s, torch imported: {b['torch_imported']}")
        print(f"  {'stage':<22}{'p50 ms':>10}{'p90 ms':>10}")
        for stage, s in b["stages_ms"].items():
            print(f"  {stage:<22}{s['p50']:>10.1f}{s['p90']:>10.1f}")
    per = list(rep["per_image"].values())
    print(f"\nper image: tokens {[p['tokens'] for p in per]}, words {[p['words'] for p in per]}, found {[p['found'] for p in per]}")
    print(f"end to end p50: reference {rep['backends']['reference']['stages_ms']['total']['p50']:.0f} ms, "
          f"onnxruntime {rep['backends']['onnxruntime']['stages_ms']['total']['p50']:.0f} ms, "
          f"speedup {rep['speedup_p50']:.2f}x; outputs match: {rep['outputs_match']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="item-bench", description=__doc__.splitlines()[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--images", nargs="+", type=Path, default=None, help="default: the shipped sample images")
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="0: all cores")
    p.add_argument("--tokens", type=int, default=None, help="caption token limit (default: the bundle's)")
    p.add_argument("--objects", type=int, default=None,
                   help="look for this many fixed words instead of the caption's (same work in every run)")
    p.add_argument("--parallel", action="store_true", help="run the runtime's image-only stages side by side")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if args.images is None:
        from itemrt.cli import SAMPLES

        args.images = sorted(SAMPLES.glob("*.jpg"))
    results = {b: _worker(b, args) for b in BACKENDS}
    rep = report(results, manifest, args)
    print_table(rep)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0 if rep["outputs_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
