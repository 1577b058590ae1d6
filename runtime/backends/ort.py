"""ONNX Runtime sessions: on the CPU, or with its CUDA / TensorRT execution providers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BundleError, InferenceError
from .base import HostSession, check_feeds

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC"}


@dataclass(frozen=True)
class SessionOptions:
    """How graphs run. `threads` 0 lets ONNX Runtime use every core."""

    threads: int = 0
    providers: tuple = ("CPUExecutionProvider",)  # names, or (name, options) pairs
    # Spinning threads burn the cores that concurrently running stages need.
    spin: bool = False
    # Write ONNX Runtime's per-node profile (item-bench counts FLOPs from it); slows runs a little.
    profile_prefix: str | None = None
    optimization: str = "all"  # "all" | "extended" | "basic"

    @staticmethod
    def optimization_for(precision: str) -> str:
        # ORT's highest level has crashed on FP16 graphs on CPU (docs/export.md). onnxruntime 1.32 runs the
        # sorted full-size FP16 graphs at either level; the floor here is 1.17, so stay at extended.
        return "extended" if precision == "fp16" else "all"


class OrtSession(HostSession):
    def __init__(self, path: Path, name: str, options: SessionOptions = SessionOptions()):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[options.optimization])
        so.intra_op_num_threads = options.threads or (os.cpu_count() or 1)
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options.spin else "0")
        if options.profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = f"{options.profile_prefix}{name}"
        try:
            self._sess = ort.InferenceSession(str(path), sess_options=so, providers=list(options.providers))
        except Exception as e:  # noqa: BLE001 - ORT raises its own opaque types
            raise BundleError(f"ONNX Runtime could not load {name} from {path}: {e}") from None
        self.name = name
        self.inputs = {i.name: _ORT_DTYPES.get(i.type) for i in self._sess.get_inputs()}
        self.shapes = {i.name: tuple(i.shape) for i in self._sess.get_inputs()}  # a str marks a dynamic axis
        self.outputs = [o.name for o in self._sess.get_outputs()]

    def end_profiling(self) -> str:
        """Path of the profile JSON (profiling must have been on)."""
        return self._sess.end_profiling()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        names = outputs or self.outputs
        try:
            return dict(zip(names, self._sess.run(names, feeds)))
        except Exception as e:  # noqa: BLE001 - ORT raises its own opaque types
            raise InferenceError(f"{self.name} failed in ONNX Runtime: {e}") from None


def ort_providers(backend: str, cache_dir: Path | None = None) -> tuple:
    """ONNX Runtime providers for a backend, after checking this onnxruntime build has them.
    The TensorRT EP keeps its engine and timing caches in `cache_dir` (inside the bundle)."""
    import onnxruntime as ort

    want = {
        "onnxruntime": ("CPUExecutionProvider",),
        "ort-cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
        "ort-tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    }[backend]
    have = ort.get_available_providers()
    if want[0] not in have:
        raise BackendUnavailableError(
            f"backend {backend} needs ONNX Runtime's {want[0]}, and this onnxruntime has {have}; "
            f"install onnxruntime-gpu (x86) or the JetPack onnxruntime wheel (Jetson) instead of onnxruntime"
        )
    if backend != "ort-tensorrt":
        return want
    trt_options = {
        # Precision lives in the graphs (FP16 variants where their gate passed): no global flag.
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
    }
    return (("TensorrtExecutionProvider", trt_options), *want[1:])

