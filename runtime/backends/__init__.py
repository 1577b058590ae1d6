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
from .ort_cuda import HANDOFFS, Device, OrtDeviceSession, ort_cuda_major, preload_cuda_libraries
from .tensorrt import TrtSession, device_info, import_tensorrt
from .trt_plan import ENGINE_COMPONENTS, PLANS_DIR, rebuild_command, select_plans

CPU_ONLY = ("bf16", "mixed")  # OpenVINO's BF16 on AMX / AVX512-BF16 CPUs
GRAPHS = (*ENGINE_COMPONENTS, "head")  # every graph a Runtime opens


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
    engine = "ONNX Runtime, CPU"  # what runs each graph (engine_for)

    def __init__(self, name: str, bundle: Bundle, precision: str | None, threads: int = 0,
                 profile_prefix: str | None = None):
        self.name, self.bundle = name, bundle
        self.max_batch: int | None = None
        self.precision = precision or self.default_precision()
        self._check_precision(precision)
        self.options = SessionOptions(threads=threads, profile_prefix=profile_prefix, providers=self.providers())

    def default_precision(self) -> str:
        return self.preferred(self.bundle)

    @classmethod
    def preferred(cls, bundle: Bundle) -> str:
        """The precision this backend runs `bundle` in when the caller names none."""
        return bundle.default_precision

    @classmethod
    def engine_for(cls, graph: str, precision: str) -> str:
        return cls.engine

    @classmethod
    def plan(cls, bundle: Bundle, precision: str | None = None) -> dict[str, tuple[str, str]]:
        """graph -> (the precision it would run in, what would run it), opening nothing and
        checking nothing about this machine: what `item doctor` shows for each backend."""
        asked = precision or cls.preferred(bundle)
        return {g: (p, cls.engine_for(g, p)) for g in GRAPHS for p in [bundle.component_path(g, asked)[1]]}

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

    @classmethod
    def engine_for(cls, graph: str, precision: str) -> str:
        return "OpenVINO, CPU" if precision == "bf16" else cls.engine


class OrtGpuBackend(Backend):
    """ONNX Runtime's CUDA or TensorRT execution provider; the TensorRT one caches its engines
    in the bundle."""

    gpu = True
    engine = "ONNX Runtime, TensorRT EP"

    @classmethod
    def preferred(cls, bundle: Bundle) -> str:
        return "fp16" if "fp16" in bundle.precisions() else "fp32"

    def providers(self) -> tuple:
        return ort_providers(self.name, self.bundle.root / PLANS_DIR / "ort-cache")


class OrtCudaBackend(OrtGpuBackend):
    """ONNX Runtime's CUDA provider with the data on the device (`ort_cuda.OrtDeviceSession`):
    I/O binding, what one graph hands the next left on the GPU, the decoder's cache in device
    buffers and its steps as CUDA graphs. `device` is a class attribute so the same backend
    runs on the CPU provider (`Device("cpu")`: how the tests exercise it without a GPU)."""

    device = Device("cuda")
    engine = "ONNX Runtime, CUDA EP"

    def providers(self) -> tuple:
        if self.device.kind == "cuda":
            ort_providers(self.name)  # fails with the package to install when there is no CUDA EP
            if (major := ort_cuda_major()) is not None:
                preload_cuda_libraries(major)  # pip's CUDA libraries, where the loader would not look
        return self.device.providers()

    def open(self, graph: str) -> tuple[Session, str]:
        path, precision = self.bundle.component_path(graph, self.precision)
        options = replace(self.options, optimization=self.options.optimization_for(precision))
        steps = self.bundle.spec.captioner.decoding.max_new_tokens
        session = OrtDeviceSession(path, graph, options, self.device, keep=HANDOFFS.get(graph, ()),
                                   capture=graph == "captioner_decoder", max_steps=steps)
        return session, precision


class TensorrtBackend(Backend):
    """The plans `item build` made for this GPU and TensorRT version; a graph without a plan
    (the head) runs on ONNX Runtime on the CPU."""

    gpu = True
    engine = "TensorRT plan"

    def __init__(self, name: str, bundle: Bundle, precision: str | None, threads: int = 0,
                 profile_prefix: str | None = None):
        self.build = self._plans(bundle, precision)
        super().__init__(name, bundle, precision, threads, profile_prefix)
        self.max_batch = int(self.build["settings"]["max_batch"])

    def default_precision(self) -> str:
        return self.build["precision"]

    @classmethod
    def preferred(cls, bundle: Bundle) -> str:
        """A build's precision where the manifest has one; else what `item build` makes by default."""
        builds = bundle.manifest.get("tensorrt") or {}
        if builds:
            return next(iter(builds.values()))["precision"]
        return OrtGpuBackend.preferred(bundle)

    @classmethod
    def engine_for(cls, graph: str, precision: str) -> str:
        return cls.engine if graph in ENGINE_COMPONENTS else CpuBackend.engine

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
    "ort-cuda": OrtCudaBackend,
    "ort-tensorrt": OrtGpuBackend,
    "tensorrt": TensorrtBackend,
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, got {name!r}")
    return BACKENDS[name]
