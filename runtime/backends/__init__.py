"""Inference engines behind one `Session` interface, and the one place that decides which
engine runs each graph of a bundle.

A backend is a class in `BACKENDS`: made with the bundle and the caller's wishes, it settles
the precision and opens each graph (`open(graph) -> (session, precision it runs in)`). The chain
only sees sessions. Adding a backend is one class and one entry in `BACKENDS`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..bundle import PRECISIONS, Bundle
from ..errors import BundleVersionError
from .base import Session
from .openvino import OvSession
from .ort import OrtSession, SessionOptions, ort_providers
from .tensorrt import TrtSession, device_info, import_tensorrt
from .trt_plan import PLANS_DIR, rebuild_command, select_plans

CPU_ONLY = ("bf16", "mixed")  # OpenVINO's BF16 on AMX / AVX512-BF16 CPUs


def open_cpu(path: Path, name: str, precision: str, options: SessionOptions | None = None) -> Session:
    """A graph of `precision` on the CPU: bf16 on OpenVINO, the rest on ONNX Runtime."""
    options = options or SessionOptions()
    if precision == "bf16":
        return OvSession(path, name, options.threads)
    return OrtSession(path, name, replace(options, optimization=options.optimization_for(precision)))


class Backend:
    """Opens a bundle's graphs. `precision` is what the caller asked for (None: the backend's
    default); `self.precision` is what it settled on, `self.max_batch` a cap it imposes (or None)."""

    gpu = False

    def __init__(self, name: str, bundle: Bundle, precision: str | None, threads: int = 0,
                 profile_prefix: str | None = None):
        self.name, self.bundle = name, bundle
        self.max_batch: int | None = None
        self.precision = precision or self.default_precision()
        self._check_precision(precision)
        self.options = SessionOptions(threads=threads, profile_prefix=profile_prefix, providers=self.providers())

    def default_precision(self) -> str:
        return self.bundle.default_precision

    def providers(self) -> tuple:
        return ort_providers("onnxruntime")

    def open(self, graph: str) -> tuple[Session, str]:
        path, precision = self.bundle.component_path(graph, self.precision)
        return open_cpu(path, graph, precision, self.options), precision

    def _check_precision(self, asked: str | None) -> None:
        b = self.bundle
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {asked!r}")
        if self.precision not in b.precisions():
            again = "int8 bf16" if self.precision == "mixed" else self.precision
            raise BundleVersionError(
                f"bundle {b.root} has no {self.precision} graphs (it has {b.precisions()}); "
                f"re-export it with `item export --precisions {again} ...`"
            )
        if self.gpu and self.precision in CPU_ONLY:
            raise ValueError(f"precision {self.precision} is a CPU path (OpenVINO on AMX); backend {self.name} "
                             f"runs fp32 / fp16")


class CpuBackend(Backend):
    """ONNX Runtime on the CPU; BF16 graphs on OpenVINO."""


class OrtGpuBackend(Backend):
    """ONNX Runtime's CUDA or TensorRT execution provider; the TensorRT one caches its engines
    in the bundle."""

    gpu = True

    def default_precision(self) -> str:
        return "fp16" if "fp16" in self.bundle.precisions() else "fp32"

    def providers(self) -> tuple:
        return ort_providers(self.name, self.bundle.root / PLANS_DIR / "ort-cache")


class TensorrtBackend(Backend):
    """The plans `item build` made for this GPU and TensorRT version; a graph without a plan
    (the head) runs on ONNX Runtime on the CPU."""

    gpu = True

    def __init__(self, name: str, bundle: Bundle, precision: str | None, threads: int = 0,
                 profile_prefix: str | None = None):
        self.build = self._plans(bundle, precision)
        super().__init__(name, bundle, precision, threads, profile_prefix)
        self.max_batch = int(self.build["settings"]["max_batch"])

    def default_precision(self) -> str:
        return self.build["precision"]

    def open(self, graph: str) -> tuple[Session, str]:
        rec = self.build["plans"].get(graph)
        if rec is None:
            return super().open(graph)
        rebuild = rebuild_command(self.bundle.root, self.build["settings"])
        return TrtSession(self.bundle.file(rec["file"]), graph, rebuild), rec["precision"]

    @staticmethod
    def _plans(b: Bundle, precision: str | None) -> dict:
        """This machine's TensorRT build from the manifest; fails closed with the rebuild command."""
        trt = import_tensorrt()
        gpu, cc = device_info()
        build = select_plans(b.manifest, b.root, trt.__version__, gpu, cc)
        if precision not in (None, build["precision"]):
            raise BundleVersionError(
                f"the TensorRT engines of {b.root} were built from {build['precision']} graphs, not {precision}; "
                f"run with precision={build['precision']!r} or rebuild: {rebuild_command(b.root, build['settings'])} "
                f"--precision {precision}"
            )
        return build


BACKENDS: dict[str, type[Backend]] = {
    "onnxruntime": CpuBackend,
    "ort-cuda": OrtGpuBackend,
    "ort-tensorrt": OrtGpuBackend,
    "tensorrt": TensorrtBackend,
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]
