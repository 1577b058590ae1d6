"""One backend's measurement, in its own process so peak RSS is that backend's alone.

Prints one JSON object (the raw material of the report): per-run stage timings, per-image
outputs for the match check, text-cache counts, throughput at batch sizes and with
concurrent callers, matmul FLOPs per stage (ONNX Runtime's node profile), peak RSS.
The ONNX Runtime workers never import torch.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from itemrt.backends import BACKENDS
from itemrt.stages.words import PROBE_WORDS


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own peak. ru_maxrss survives exec on Linux, so a worker
    # would report at least the bench parent's RSS at fork (torch imported: ~500 MB).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)


def _log(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def _words(args) -> list[str] | None:
    return None if args.objects is None else list(PROBE_WORDS[: args.objects])


# --- ONNX Runtime ---------------------------------------------------------------------------


def run_runtime(args) -> dict:
    from itemrt import Runtime
    from itemrt.stages.images import load_image

    images = [load_image(p) for p in args.images]  # decode is timed below, from the file bytes
    blobs = [Path(p).read_bytes() for p in args.images]
    cuda = _cuda_stages() if args.backend == "ort-cuda" else None  # device time per stage, GPU memory
    t0 = time.perf_counter()
    rt = Runtime(args.bundle, precision=args.precision, backend=args.backend, threads=args.threads,
                 parallel=args.parallel, max_batch=max([1, *args.batch_sizes]))  # a batch size is one pass
    load_s = time.perf_counter() - t0
    cache = rt.clip.cache
    if cuda is not None:
        cuda.instrument(rt)

    def once(i: int):
        if args.text_cache == "cold":
            cache.clear()
        r = rt.detect(blobs[i], max_new_tokens=args.tokens, words=_words(args))
        timings = {}
        for k, v in r.timings_ms.items():
            timings[k] = v
            if k == "captioner_decoder":
                timings["captioner_decoder_per_token"] = v / max(1, len(r.caption_tokens))
        out = {"tokens": r.caption_tokens, "words": [o.word for o in r.objects],
               "found": [o.found for o in r.objects], "p_fake": r.p_fake}
        if cuda is not None:
            gpu_runs.append(cuda.take())
        return out, timings

    gpu_runs: list[dict[str, float]] = []
    result = _measure(once, args, load_s)
    if cuda is not None:
        cuda.on = False  # concurrent callers below: one pair of events cannot time them
        result.update(gpu=cuda.name, gpu_runs=gpu_runs[len(gpu_runs) - args.runs:])
    hits0, misses0 = cache.hits, cache.misses
    result["text_cache"] = {"mode": args.text_cache, "hits": hits0, "misses": misses0,
                            "hit_rate": hits0 / max(1, hits0 + misses0)}
    result["word_queries"] = "bank"  # object-word queries and CLIP word embeddings come from the bundle's bank
    result["precisions"] = rt.precisions
    result["throughput"] = _throughput(rt, images, args)
    result["throughput"]["peak_rss_mb"] = _peak_rss_mb()  # larger batches hold more activations
    if cuda is not None:
        result["gpu_peak_mb"] = cuda.memory.stop()
        _log(f"decoder CUDA graphs: {rt.sessions['captioner_decoder'].graphs_off or 'on'}")
        try:
            result["gpu_busy"] = _gpu_busy(once)  # imports torch, after RSS was read
        except Exception as e:  # noqa: BLE001 - the profiler is an extra; the timings above stand
            result["gpu_busy"] = {"error": f"{type(e).__name__}: {e}"}
    rt.close()
    rt = None  # free its sessions before the profiling pass loads the graphs again
    gc.collect()
    if args.backend == "onnxruntime":  # ORT's CPU profiles: FLOPs against the CPU matmul peak, time by op
        result["flops"], result["ops_ms"] = _profile(args, Runtime, blobs, result["precisions"])
    return result


def _throughput(rt, images, args) -> dict:
    """Images/s of detect_batch at each batch size, and of single detects from concurrent callers."""
    words, out = _words(args), {"batch": {}, "callers": {}}
    for b in args.batch_sizes:
        batch = [images[i % len(images)] for i in range(b)]
        rt.detect_batch(batch, max_new_tokens=args.tokens, words=words)  # warm this shape
        times = []
        for _ in range(args.throughput_repeats):
            t0 = time.perf_counter()
            rt.detect_batch(batch, max_new_tokens=args.tokens, words=words)
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        out["batch"][str(b)] = {"images_per_s": b / med, "batch_ms": med * 1e3}
        _log(f"batch {b}: {b / med:.2f} images/s")
    for c in args.callers:
        per_caller = args.throughput_repeats * 2

        def caller(k: int, per_caller: int = per_caller):
            for j in range(per_caller):
                rt.detect(images[(k + j) % len(images)], max_new_tokens=args.tokens, words=words)

        wall = run_concurrently(caller, c)
        out["callers"][str(c)] = {"images_per_s": c * per_caller / wall, "requests": c * per_caller}
        _log(f"{c} concurrent callers: {c * per_caller / wall:.2f} images/s")
    return out


def run_concurrently(fn, n: int) -> float:
    """fn(0) .. fn(n-1) on n threads at once; wall seconds until all have returned."""
    threads = [threading.Thread(target=fn, args=(k,)) for k in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


# Matmul-like ops and their FLOPs from ONNX Runtime's recorded shapes: 2 * output elements * K.
_MATMUL_OPS = {"MatMul", "FusedMatMul", "Gemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}


def node_flops(op: str, in_shapes: list[list[int]], out_shapes: list[list[int]]) -> int:
    if not out_shapes or not in_shapes:
        return 0
    out = int(np.prod(out_shapes[0], dtype=np.int64))
    if op in _MATMUL_OPS:
        return 2 * out * int(in_shapes[0][-1])
    if op == "Conv" and len(in_shapes) > 1:
        w = in_shapes[1]  # (C_out, C_in / groups, kh, kw)
        return 2 * out * int(np.prod(w[1:], dtype=np.int64))
    return 0


OVERHEAD = "(outside kernels)"  # a run's time not spent in any node: the executor, feeds, fetches


def profile_nodes(path: str) -> dict:
    """Matmul and convolution FLOPs, and kernel milliseconds by op type, of the second half of
    the model runs recorded in one ONNX Runtime profile: the caller ran the same work twice,
    and the first pass pays for first-run allocations. `OVERHEAD` is the runs' time outside
    their kernels (for a KV-cache decoder, hundreds of small nodes a token)."""
    with open(path) as f:
        events = json.load(f)
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    runs = runs[len(runs) // 2:]
    starts = [r[0] for r in runs]
    flops, ops = 0, {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        j = bisect.bisect_right(starts, e["ts"]) - 1
        if j < 0 or e["ts"] > runs[j][1]:
            continue  # in the first pass
        a = e.get("args", {})
        op = a.get("op_name", "?")
        shapes = [[next(iter(d.values())) for d in a.get(k, [])] for k in ("input_type_shape", "output_type_shape")]
        flops += node_flops(op, *shapes)
        ops[op] = ops.get(op, 0.0) + e["dur"] / 1e3
    if runs:
        ops[OVERHEAD] = max(0.0, sum(b - a for a, b in runs) / 1e3 - sum(ops.values()))
    return {"flops": flops, "ops_ms": ops}


def _profile(args, Runtime, blobs, ran: dict[str, str]) -> tuple[list[dict[str, int]], list[dict[str, dict]]]:
    """FLOPs and op-type milliseconds per stage for each bench image: a fresh runtime with ONNX
    Runtime's profiler on runs each image twice (cold caption cache both times) and counts the
    second pass. `ran`: graph -> the precision it ran in when timed; op times are kept only for
    graphs that ran in the profiled precision on ONNX Runtime (not BF16 ones, on OpenVINO)."""
    flops, ops = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, blob in enumerate(blobs):
            prefix = os.path.join(tmp, f"img{i}-")
            # OpenVINO writes no ORT profile: bf16 runs the FP32 graphs' arithmetic, so count that;
            # mixed is INT8's graphs plus BF16 ones, which are FP32 graphs under precision int8.
            precision = {"bf16": "fp32", "mixed": "int8"}.get(args.precision, args.precision)
            with Runtime(args.bundle, precision=precision, threads=args.threads, verify=False,
                         profile_prefix=prefix) as rt:
                for _ in range(2):
                    rt.clip.cache.clear()
                    rt.detect(blob, max_new_tokens=args.tokens, words=_words(args))
                prof = {name: profile_nodes(s.end_profiling()) for name, s in rt.sessions.items()}
                flops.append({name: p["flops"] for name, p in prof.items()})
                ops.append({name: p["ops_ms"] for name, p in prof.items() if rt.precisions[name] == ran.get(name)})
            _log(f"profiled image {i + 1}/{len(blobs)}")
    return flops, ops


# --- ONNX Runtime on CUDA: device time per stage, GPU memory ---------------------------------


def _check(result):
    """cuda-bindings returns (error, *values): raise on error, return the values."""
    err, *rest = result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def _cuda_stages():
    """CudaStages, or None (said on stderr) where cuda-bindings cannot give it: the wall times
    are measured either way."""
    try:
        return CudaStages()
    except Exception as e:  # noqa: BLE001
        _log(f"no device time per stage: {type(e).__name__}: {e}")
        return None


class CudaStages:
    """Every ort-cuda session runs on one CUDA stream made here (`Device.stream`), so CUDA events
    on it bracket each graph run and decoder step: device time per stage, like the reference's
    `gpu_runs`. Also samples the GPU memory in use (`memory`). cuda-bindings, no torch."""

    def __init__(self):
        from cuda.bindings import runtime as cudart
        from itemrt.backends import BACKENDS, OrtCudaBackend
        from itemrt.backends.ort_cuda import Device

        self.rt = cudart
        self.stream = _check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking))
        self.start, self.end = _check(cudart.cudaEventCreate()), _check(cudart.cudaEventCreate())
        prop = _check(cudart.cudaGetDeviceProperties(0))
        self.name = (prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)).strip("\x00")
        self.ms: dict[str, float] = {}
        self.on = True
        self.memory = GpuMemory()  # the level before the runtime loads: its own context counted out

        class OnThisStream(OrtCudaBackend):
            device = Device("cuda", stream=int(self.stream))

        BACKENDS["ort-cuda"] = OnThisStream  # this worker process only

    def timed(self, stage: str, fn):
        rt = self.rt

        def call(*a, **k):
            if not self.on:
                return fn(*a, **k)
            _check(rt.cudaEventRecord(self.start, self.stream))
            out = fn(*a, **k)  # ONNX Runtime has synchronized the stream when a run returns
            _check(rt.cudaEventRecord(self.end, self.stream))
            _check(rt.cudaEventSynchronize(self.end))
            self.ms[stage] = self.ms.get(stage, 0.0) + _check(rt.cudaEventElapsedTime(self.start, self.end))
            return out

        return call

    def instrument(self, runtime) -> None:
        """Time each session's runs and its decoder steps (instance attributes: the stages call them)."""
        for name, s in runtime.sessions.items():
            s.run, s.run_on_device = self.timed(name, s.run), self.timed(name, s.run_on_device)

            def kv_loop(cross, kv_shape, _open=s.kv_loop, _name=name):
                kv = _open(cross, kv_shape)
                kv.step = self.timed(_name, kv.step)
                return kv

            s.kv_loop = kv_loop

    def take(self) -> dict[str, float]:
        out, self.ms = self.ms, {}
        return out


class GpuMemory:
    """Peak GPU memory in use while measuring, over the level when it started, sampled every
    2 ms on a thread (NVML where nvidia-ml-py is installed, else cudaMemGetInfo)."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.used = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # noqa: BLE001 - no NVML: the runtime API answers too
            from cuda.bindings import runtime as cudart

            def used():
                free, total = _check(cudart.cudaMemGetInfo())
                return total - free

            self.used = used
        self.base = self.peak = self.used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self.used())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) / 2**20


# --- PyTorch reference ----------------------------------------------------------------------


def run_reference(args) -> dict:
    import torch
    from itemrt.export.reference import reference_for_bundle
    from itemrt.stages.images import load_image

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    blobs = [Path(p).read_bytes() for p in args.images]
    t0 = time.perf_counter()
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[args.precision]
    ref = reference_for_bundle(args.bundle).to(args.device, dtype)
    if args.backend == "reference-compile":
        compile_reference(ref)  # compiled lazily: the warm-up runs pay for it
    load_s = time.perf_counter() - t0

    gpu_runs = []

    def once(i: int):
        t = time.perf_counter()
        img = load_image(blobs[i])
        decode = (time.perf_counter() - t) * 1e3
        r = ref.run(img, max_new_tokens=args.tokens, words=_words(args))
        timings = {"decode": decode, **r.timings_ms}
        timings["total"] = timings["total"] + decode
        gpu_runs.append(r.gpu_ms)
        return {"tokens": r.tokens, "words": r.words, "found": r.found, "p_fake": r.p_fake}, timings

    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_warm = time.perf_counter()
    result = _measure(once, args, load_s)
    how = "torch.compile, compiled during warm-up (in load_s)" if args.backend == "reference-compile" else "PyTorch eager"
    result["precisions"] = {"all": f"{args.precision} ({how}, {args.device}; head fp32 on the CPU)"}
    if args.backend == "reference-compile":  # warm-up (compilation) and timed runs together
        result["load_s"] += time.perf_counter() - t_warm - sum(r["total"] for r in result["runs"]) / 1e3
    if args.device == "cuda":
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name(0)
        result["gpu_runs"] = gpu_runs[len(gpu_runs) - args.runs:]  # the timed runs, not the warm-up
        result["gpu_busy"] = _gpu_busy(once)
    result["word_queries"] = "text towers on every image"
    return result


def compile_reference(ref) -> None:
    """torch.compile each model's forward in place (what `generate` and the stages call): the
    vision towers, BLIP's text decoder (dynamic shapes: its cache grows a token a step), the
    detector and CLIP's towers. The default mode: CUDA graphs (reduce-overhead) would re-record
    at every cache length."""
    import torch

    torch._dynamo.config.suppress_errors = True  # a part that does not compile runs eagerly, not fails the run
    m = ref.m
    for module in (m.blip.vision_model, m.owl, m.clip.vision_model, m.clip.text_model):
        module.compile()
    m.blip.text_decoder.compile(dynamic=True)


def _gpu_busy(once) -> dict:
    """One more run (the first image) under PyTorch's profiler: the summed device time of the
    kernels and copies it ran, and how many. Against the run's wall time this says how much of
    it the GPU spent computing; the rest it waited on the host (Python, kernel launches)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, timings = once(0)
    ops = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    if not ops:
        return {"error": "the profiler recorded no CUDA activity"}
    busy = sum(e.self_device_time_total for e in ops) / 1e3
    h2d = sum(e.self_device_time_total for e in ops if "HtoD" in e.key) / 1e3  # host-to-device copies
    return {"device_ms": busy, "ops": sum(e.count for e in ops), "wall_ms": timings["total"],
            "busy_share": busy / timings["total"], "h2d_ms": h2d}


# --- shared ---------------------------------------------------------------------------------


def _measure(once, args, load_s: float) -> dict:
    n = len(args.images)
    for i in range(max(args.warmup, 0)):
        once(i % n)
    outputs, runs, run_images = {}, [], []
    for k in range(args.runs):
        i = k % n
        out, timings = once(i)
        outputs[str(args.images[i])] = out
        runs.append(timings)
        run_images.append(i)
        _log(f"run {k + 1}/{args.runs}: {timings['total']:.0f} ms")
    return {"load_s": load_s, "runs": runs, "run_images": run_images, "outputs": outputs,
            "peak_rss_mb": _peak_rss_mb(), "torch_imported": "torch" in sys.modules}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["reference", "reference-compile", *BACKENDS], required=True)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="cpu", help="the reference chain's device (cpu, cuda)")
    p.add_argument("--bundle", required=True)
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--parallel", action="store_true")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--objects", type=int, default=None)
    p.add_argument("--text-cache", choices=["cold", "warm"], default="cold")
    p.add_argument("--batch-sizes", type=int, nargs="*", default=[1])
    p.add_argument("--callers", type=int, nargs="*", default=[1])
    p.add_argument("--throughput-repeats", type=int, default=2)
    args = p.parse_args()
    result = run_reference(args) if args.backend.startswith("reference") else run_runtime(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
