"""One backend's measurement, run in its own process so peak RSS is that backend's alone.

Prints one JSON object: per-run stage timings, per-image outputs (for the match check),
peak RSS. The onnxruntime worker never imports torch.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# Fixed object words for comparable runs (--objects N): vocabulary words, in this order.
BENCH_WORDS = ("person", "car", "dog", "tree", "chair", "cup", "bicycle", "bird")


def _words(args) -> list[str] | None:
    return None if args.objects is None else list(BENCH_WORDS[: args.objects])


def run_onnxruntime(args) -> dict:
    from itemrt import Runtime

    t0 = time.perf_counter()
    rt = Runtime(args.bundle, threads=args.threads, parallel=args.parallel)
    load_s = time.perf_counter() - t0

    def once(path):
        r = rt.detect(path, max_new_tokens=args.tokens, words=_words(args))
        out = {"tokens": r.caption_tokens, "words": [o.word for o in r.objects],
               "found": [o.found for o in r.objects], "p_fake": r.p_fake}
        return out, dict(r.timings_ms)

    return _measure(once, args, load_s)


def run_reference(args) -> dict:
    import torch

    from itemrt.export.reference import reference_for_bundle
    from itemrt.images import load_image

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ref = reference_for_bundle(args.bundle)
    load_s = time.perf_counter() - t0

    def once(path):
        t = time.perf_counter()
        img = load_image(path)
        decode = (time.perf_counter() - t) * 1e3
        r = ref.run(img, max_new_tokens=args.tokens, words=_words(args))
        timings = {"decode": decode, **r.timings_ms}
        timings["total"] = timings["total"] + decode
        return {"tokens": r.tokens, "words": r.words, "found": r.found, "p_fake": r.p_fake}, timings

    return _measure(once, args, load_s)


def _measure(once, args, load_s: float) -> dict:
    outputs = {}
    for path in args.images[: max(1, args.warmup)]:
        once(path)
    runs = []
    for i in range(args.runs):
        path = args.images[i % len(args.images)]
        out, timings = once(path)
        outputs[path] = out
        runs.append(timings)
        print(f"  run {i + 1}/{args.runs}: {timings['total']:.0f} ms", file=sys.stderr, flush=True)
    return {"load_s": load_s, "runs": runs, "outputs": outputs, "peak_rss_mb": _peak_rss_mb(),
            "torch_imported": "torch" in sys.modules}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["onnxruntime", "reference"], required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--objects", type=int, default=None)
    args = p.parse_args()
    result = run_onnxruntime(args) if args.backend == "onnxruntime" else run_reference(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
