"""BF16 on CPUs with AMX or AVX512-BF16: the exported FP32 graphs, run by OpenVINO's CPU plugin.

ONNX Runtime's CPU provider has no BF16 matmuls on x86; OpenVINO runs an FP32 ONNX graph with
BF16 weights and activations on the AMX tiles when asked to (`INFERENCE_PRECISION_HINT`).
On this project's 2-core Xeon that made the detector and CLIP image about 3x faster than
ONNX Runtime FP32 (docs/performance.md, "Speed: measured"). No new file: the bf16 "variant" of a graph is its FP32
graph plus this setting, gated like any other variant at export. The decoder, whose K/V cache
grows every step, is not a candidate: OpenVINO timed 2.5x slower than ONNX Runtime there.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BundleError, InferenceError
from .base import HostSession, check_feeds

INSTALL_HINT = "pip install 'itemrt[openvino]'"


def import_openvino():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError(
            f"precisions bf16 and mixed run on OpenVINO, which is not installed; {INSTALL_HINT}, or use fp32 / int8"
        ) from None
    return openvino


@functools.cache
def _core():
    return import_openvino().Core()


@functools.cache
def bf16_support() -> str | None:
    """None when this machine can run bf16 graphs, else why not."""
    try:
        core = _core()
    except BackendUnavailableError as e:
        return str(e)
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in caps:
        # OpenVINO would quietly run FP32 instead: not what the gate checked, and no faster.
        return f"this CPU has no BF16 units (OpenVINO reports {list(caps)}); use fp32 or int8"
    return None


def require_bf16() -> None:
    if (why := bf16_support()) is not None:
        raise BackendUnavailableError(why)


class OvSession(HostSession):
    """Same interface as `OrtSession`. One infer request per calling thread, because a request
    holds its own intermediate buffers and is not thread-safe; outputs are copied out of it."""

    def __init__(self, path: Path, name: str, threads: int = 0):
        require_bf16()
        config = {
            "INFERENCE_PRECISION_HINT": "bf16",
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_NUM_THREADS": threads,  # 0: OpenVINO picks (every physical core)
        }
        core = _core()
        try:
            model = core.read_model(str(path))
            _compress_weights(model)
            self._model = core.compile_model(model, "CPU", config)
        except Exception as e:  # noqa: BLE001 - OpenVINO raises plain RuntimeErrors
            raise BundleError(f"OpenVINO could not load {name} from {path}: {e}") from None
        self.name = name
        # Names from the graph as read: compiling merges tensors, whose ports then carry extra names.
        self.inputs = {p.get_any_name(): p.get_element_type().to_dtype().type for p in model.inputs}
        self.outputs = [p.get_any_name() for p in model.outputs]
        self._local = threading.local()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._model.create_infer_request()
        try:
            got = request.infer(feeds, share_inputs=False, share_outputs=False)
        except RuntimeError as e:  # OpenVINO's errors on shapes its graph does not take
            raise InferenceError(f"{self.name} failed in OpenVINO: {e}") from None
        by_name = dict(zip(self.outputs, got.to_tuple()))  # compiled outputs keep the graph's order
        return {n: by_name[n] for n in outputs or self.outputs}


def _compress_weights(model) -> None:
    """FP32 weights to FP16 before compiling. Otherwise the CPU plugin keeps the FP32 constants
    next to its BF16 copies, at the same cosine to ONNX Runtime FP32 (docs/design.md §10).
    FP16 has 3 more mantissa bits than BF16,
    so the weights end up as BF16 rounding makes them, but for rare double-rounding ties (one
    BF16 step) and weights under FP16's normal range (6e-5; off by 3e-8 at most). The gate at
    export measures exactly this path."""
    try:  # the pass `openvino.save_model(..., compress_to_fp16=True)` runs; private module
        from openvino._offline_transformations import compress_model_transformation
    except ImportError:
        return  # a future OpenVINO without it: more memory, same numbers
    compress_model_transformation(model)
