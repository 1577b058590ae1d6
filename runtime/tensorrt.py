"""The TensorRT backend: plans built by `item build`, run with name-based I/O through
cuda-python. No torch.

Per plan: one engine; per worker thread, one execution context with its own CUDA stream,
one device allocation and one pinned host allocation laid out by `BufferPlan` for the
profile's largest shapes (TensorRT contexts are not thread-safe, buffers are reused across
calls). Independent stages that run on different threads therefore run on different streams.

Written to the TensorRT 10.x / 11.x Python API (`num_io_tensors`, `get_tensor_name/mode/
dtype`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`); TensorRT is not
obtainable where this project is developed, so this module is exercised only on machines
that have it (tests skip elsewhere). Everything it decides is in `trt_plan`, tested on CPU.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np

from .backend import check_feeds
from .errors import BackendUnavailableError, BundleIntegrityError, BundleVersionError
from .trt_plan import BufferPlan, check_shape


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            f"the tensorrt backend needs TensorRT's Python package (JetPack ships it; on x86: pip install "
            f"'itemrt[tensorrt]'): {e}"
        ) from None
    return trt


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise BackendUnavailableError(f"the tensorrt backend needs cuda-python (pip install cuda-python): {e}") from None
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on error, return the values."""
    cudart = _cudart()
    err, rest = result[0], result[1:]
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def device_info(device: int = 0) -> tuple[str, tuple[int, int]]:
    """GPU name and compute capability, as recorded with every plan."""
    cudart = _cudart()
    count = _check(cudart.cudaGetDeviceCount())
    if count <= device:
        raise BackendUnavailableError(f"no CUDA device {device} (found {count})")
    prop = _check(cudart.cudaGetDeviceProperties(device))
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.strip("\x00"), (int(prop.major), int(prop.minor))


class _Worker:
    """One thread's context, stream and buffers for one engine."""

    def __init__(self, engine, inputs: dict, outputs: list[str], profile: dict, dtypes: dict):
        cudart = _cudart()
        self.ctx = engine.create_execution_context()
        if self.ctx is None:
            raise RuntimeError("TensorRT could not create an execution context (out of device memory?)")
        self.stream = _check(cudart.cudaStreamCreate())
        self.ctx.set_optimization_profile_async(0, self.stream)
        # Largest shapes: every input at its profile maximum, then ask TensorRT for the outputs.
        for name, (_, _, hi) in profile.items():
            self.ctx.set_input_shape(name, hi)
        shapes = {n: (tuple(profile[n][2]), dtypes[n]) for n in inputs}
        shapes.update({n: (tuple(self.ctx.get_tensor_shape(n)), dtypes[n]) for n in outputs})
        self.plan = BufferPlan.for_shapes(shapes)
        self.device = _check(cudart.cudaMalloc(self.plan.total))
        self.host = _check(cudart.cudaMallocHost(self.plan.total))
        self.host_bytes = np.ctypeslib.as_array((ctypes.c_uint8 * self.plan.total).from_address(int(self.host)))
        for name, slot in self.plan.slots.items():
            self.ctx.set_tensor_address(name, int(self.device) + slot.offset)

    def view(self, name: str, shape) -> np.ndarray:
        slot = self.plan.slots[name]
        dtype = np.dtype(slot.dtype)
        n = int(np.prod(shape, dtype=np.int64))
        return self.host_bytes[slot.offset : slot.offset + n * dtype.itemsize].view(dtype).reshape(shape)

    def close(self) -> None:
        cudart = _cudart()
        cudart.cudaFreeHost(self.host)
        cudart.cudaFree(self.device)
        cudart.cudaStreamDestroy(self.stream)


class TrtSession:
    """`run(feeds) -> outputs by name`, like OrtSession, on a TensorRT plan."""

    def __init__(self, path: Path, name: str, rebuild: str):
        trt = import_tensorrt()
        self.name, self.rebuild = name, rebuild
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(path).read_bytes())
        if engine is None:  # never pass an empty engine on
            raise BundleIntegrityError(f"TensorRT could not deserialize {path} ({name}); rebuild: {rebuild}")
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        is_input = {n: engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))).name for n in names}
        self.inputs = {n: np.dtype(self.dtypes[n]).type for n in names if is_input[n]}
        self.outputs = [n for n in names if not is_input[n]]
        self.profile = {n: tuple(tuple(s) for s in engine.get_tensor_profile_shape(n, 0)) for n in self.inputs}
        self._local = threading.local()
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def _worker(self) -> _Worker:
        w = getattr(self._local, "worker", None)
        if w is None:
            w = _Worker(self.engine, self.inputs, self.outputs, self.profile, self.dtypes)
            self._local.worker = w
            with self._lock:
                self._workers.append(w)
        return w

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        check_feeds(self.name, self.inputs, feeds)
        cudart = _cudart()
        w = self._worker()
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, x in feeds.items():
            check_shape(self.name, name, x.shape, self.profile[name], self.rebuild)
            if not w.ctx.set_input_shape(name, x.shape):
                raise BundleVersionError(f"{self.name}: TensorRT refused shape {x.shape} for {name}; rebuild: {self.rebuild}")
            w.view(name, x.shape)[...] = x
            slot = w.plan.slots[name]
            if x.nbytes:
                _check(cudart.cudaMemcpyAsync(int(w.device) + slot.offset, int(w.host) + slot.offset, x.nbytes, h2d, w.stream))
        if not w.ctx.execute_async_v3(w.stream):
            raise RuntimeError(f"{self.name}: TensorRT execution failed")
        shapes = {}
        for name in outputs or self.outputs:
            shape = tuple(w.ctx.get_tensor_shape(name))
            if not w.plan.fits(name, shape):
                raise BundleVersionError(f"{self.name}: output {name} {shape} exceeds its buffer; rebuild: {self.rebuild}")
            shapes[name] = shape
            slot = w.plan.slots[name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(slot.dtype).itemsize
            if nbytes:
                _check(cudart.cudaMemcpyAsync(int(w.host) + slot.offset, int(w.device) + slot.offset, nbytes, d2h, w.stream))
        _check(cudart.cudaStreamSynchronize(w.stream))
        return {name: w.view(name, shape).copy() for name, shape in shapes.items()}

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.close()
            self._workers.clear()
