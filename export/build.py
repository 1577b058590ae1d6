"""`item build <bundle>`: TensorRT engines from the bundle's graphs, on the target machine.

Strongly typed networks (precision comes from the graph: the FP16 variant of each part
whose gate passed at export, FP32 otherwise; `BuilderFlag.FP16` is deprecated in 10.12 and
gone in 11), one optimization profile per plan from the manifest's limits, a workspace
limit, and a timing cache kept beside the bundle so rebuilds are fast. Each build is
recorded in the manifest under `tensorrt.<sm..-<gpu>-trt..>` with the TensorRT version, GPU name,
compute capability and settings; the runtime refuses a build made elsewhere.

Thin on purpose: profiles, buffer sizes and the checks live in `itemrt.backends.trt_plan`. Needs
TensorRT and cuda-python, not torch (runs on a Jetson without the export extra).
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import time
from pathlib import Path

from itemrt.backends.tensorrt import device_info, import_tensorrt
from itemrt.backends.trt_plan import (
    ENGINE_COMPONENTS,
    PLANS_DIR,
    BuildSettings,
    profiles,
    rebuild_command,
    target_key,
)
from itemrt.bundle import Bundle, sha256_file, write_manifest
from itemrt.errors import BuildError


def _monitor(trt, name: str, progress):
    """TensorRT's progress callbacks -> one line per top-level phase (thread-safe: only prints)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            if parent_phase is None:
                progress(f"{name}: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engines(
    bundle_dir: str | Path,
    settings: BuildSettings | None = None,
    *,
    precision: str = "fp16",
    progress=print,
) -> dict:
    settings = settings or BuildSettings()
    trt = import_tensorrt()
    bundle = Bundle.open(bundle_dir)
    root, m = bundle.root, bundle.manifest
    if precision not in bundle.precisions() or precision == "int8":
        raise BuildError(f"engines are built from fp16 or fp32 graphs; {root} has {bundle.precisions()}")
    gpu, cc = device_info()
    key = target_key(trt.__version__, cc, gpu)
    progress(f"build: TensorRT {trt.__version__} on {gpu} (sm{cc[0]}{cc[1]}), {precision} graphs, "
             f"max batch {settings.max_batch}, workspace {settings.workspace_gb} GB -> {PLANS_DIR}/{key}/")
    out = root / PLANS_DIR / key
    out.mkdir(parents=True, exist_ok=True)
    cache_path = root / PLANS_DIR / f"timing-{key}.cache"
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    plans = {}
    for i, (name, prof) in enumerate(profiles(m, settings).items(), 1):
        t0 = time.perf_counter()
        onnx_path, prec = bundle.component_path(name, precision)
        progress(f"[{i}/{len(ENGINE_COMPONENTS)}] {name}: parsing {onnx_path.relative_to(root)} ({prec})")
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(j)) for j in range(parser.num_errors))
            raise BuildError(f"{name}: TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * 2**30))
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for tensor, (lo, opt, hi) in prof.items():
            profile.set_shape(tensor, lo, opt, hi)
        config.add_optimization_profile(profile)
        config.progress_monitor = _monitor(trt, name, progress)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise BuildError(f"{name}: TensorRT returned no engine (see its log above); nothing was written")
        rel = f"{PLANS_DIR}/{key}/{name}.plan"
        _write(root / rel, bytes(blob))
        _write(cache_path, bytes(config.get_timing_cache().serialize()))
        plans[name] = {
            "file": rel,
            "onnx": str(onnx_path.relative_to(root)),
            "precision": prec,
            "profile": {t: [list(s) for s in shapes] for t, shapes in prof.items()},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        progress(f"[{i}/{len(ENGINE_COMPONENTS)}] {name}: {plans[name]['seconds']}s, {(root / rel).stat().st_size / 1e6:.1f} MB")

    manifest = copy.deepcopy(m)
    manifest.setdefault("tensorrt", {})[key] = {
        "tensorrt": trt.__version__,
        "gpu": gpu,
        "compute_capability": list(cc),
        "precision": precision,
        "settings": settings.to_dict(),
        "built": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "timing_cache": str(cache_path.relative_to(root)),
        "command": rebuild_command(root, settings.to_dict()) + f" --precision {precision}",
        "plans": plans,
    }
    manifest["files"] = {**m["files"], **{p["file"]: sha256_file(root / p["file"]) for p in plans.values()}}
    write_manifest(root, manifest)
    progress(f"build: {len(plans)} engines recorded in {root}/manifest.json under tensorrt.{key}")
    return manifest["tensorrt"][key]


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
