"""The TensorRT backend: plans built by `item build`, run with name-based I/O through
cuda-python. No torch.

Per plan: one engine; per worker thread, one execution context with its own CUDA stream,
one device allocation and one pinned host allocation laid out by `BufferPlan` for the
profile's largest shapes (TensorRT contexts are not thread-safe, buffers are reused across
calls). Independent stages that run on different threads therefore run on different streams.

The captioner's decoder does not go through `run`: `kv_loop` keeps the image's cross K/V (read
in place from the cross-K/V plan's outputs, `run_on_device`, one layer per decoder input) and
the growing self-attention K/V (ping-ponged between two device buffers) on the GPU for the
whole caption, so a step moves only token ids in and logits out, and each step's enqueue is
captured once per (batch, past length) as a CUDA graph and replayed.

Written to the TensorRT 10.x / 11.x Python API (`num_io_tensors`, `get_tensor_name/mode/
dtype`, `set_input_shape`, `set_tensor_address`, `execute_async_v3`); TensorRT is not
obtainable where this project is developed, so the TensorRT calls run only on machines that
have it (tests skip elsewhere). The CUDA half, `DeviceBuffers`, needs only cuda-python and a
GPU, and is tested wherever both exist (it ran on an H100). Everything the backend decides is
in `trt_plan`, tested on CPU.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import (
    BackendUnavailableError,
    BundleIntegrityError,
    BundleVersionError,
    DeviceError,
    GraphCaptureError,
    InferenceError,
)
from .base import check_feeds
from .trt_plan import ALIGN, KV_SCRATCH, BufferPlan, check_shape, worker_plan

MIN_TENSORRT = 10  # strongly typed networks and name-based I/O (`set_tensor_address`, `execute_async_v3`)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailableError(
            f"the tensorrt backend needs TensorRT's Python package (JetPack ships it; on x86: pip install "
            f"'itemrt[tensorrt]'): {e}"
        ) from None
    check_tensorrt_version(trt.__version__)
    return trt


def check_tensorrt_version(version: str) -> None:
    """TensorRT 8.x (JetPack 6.0, 5.x) lacks what the build and the backend use: say so up front."""
    major = int(version.split(".")[0])
    if major < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {version} is installed; the tensorrt backend and item build need TensorRT "
            f"{MIN_TENSORRT}.x or newer (JetPack 6.1 or later on Jetson; on x86: pip install 'itemrt[tensorrt]')"
        )


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
        raise DeviceError(f"CUDA error {err}")
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


class DeviceBuffers:
    """The CUDA side of a worker, apart from TensorRT: one stream, one device allocation and
    its pinned host twin laid out by a `BufferPlan`, and the CUDA graphs captured on that
    stream. Owns all of them (`close` frees them)."""

    def __init__(self, plan: BufferPlan, stream):
        cudart = _cudart()
        self.plan, self.stream = plan, stream
        self.graphs: dict[tuple, object] = {}  # caller's key (fixing shapes and addresses) -> graph exec
        self.device = self.host = None
        try:
            self.device = _check(cudart.cudaMalloc(plan.total))
            self.host = _check(cudart.cudaMallocHost(plan.total))
        except Exception:
            self.close()
            raise
        self.host_bytes = np.ctypeslib.as_array((ctypes.c_uint8 * plan.total).from_address(int(self.host)))

    def address(self, name: str) -> int:
        return int(self.device) + self.plan.slots[name].offset

    def view(self, name: str, shape) -> np.ndarray:
        """The pinned host slot of `name` as an array of `shape`."""
        slot = self.plan.slots[name]
        dtype = np.dtype(slot.dtype)
        n = int(np.prod(shape, dtype=np.int64))
        return self.host_bytes[slot.offset : slot.offset + n * dtype.itemsize].view(dtype).reshape(shape)

    def upload(self, name: str, x: np.ndarray) -> None:
        cudart = _cudart()
        self.view(name, x.shape)[...] = x
        off = self.plan.slots[name].offset
        if x.nbytes:
            kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
            _check(cudart.cudaMemcpyAsync(int(self.device) + off, int(self.host) + off, x.nbytes, kind, self.stream))

    def download(self, name: str, shape) -> None:
        """Queue the copy of `name` (`shape`) to its host slot; `view` it after `sync`."""
        cudart = _cudart()
        slot = self.plan.slots[name]
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(slot.dtype).itemsize
        if nbytes:
            kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
            _check(cudart.cudaMemcpyAsync(int(self.host) + slot.offset, int(self.device) + slot.offset, nbytes, kind, self.stream))

    def sync(self) -> None:
        cudart = _cudart()
        _check(cudart.cudaStreamSynchronize(self.stream))

    def replay(self, key: tuple, enqueue) -> bool:
        """Run `enqueue()` (which queues work on this stream and returns success) through a
        CUDA graph captured for `key`. The first call for a key runs it plainly (its results
        are the call's: TensorRT does shape-dependent setup on the first enqueue after a
        shape change, which must not be captured), waits, then captures a second enqueue for
        the calls to come. Returns False if `enqueue` failed; raises `GraphCaptureError` if
        the work cannot be captured (the caller falls back to plain enqueues)."""
        cudart = _cudart()
        graph = self.graphs.get(key)
        if graph is not None:
            _check(cudart.cudaGraphLaunch(graph, self.stream))
            return True
        if not enqueue():
            return False
        self.sync()
        self.graphs[key] = self._capture(enqueue)
        return True

    def _capture(self, enqueue):
        cudart = _cudart()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal  # other threads keep working
        _check(cudart.cudaStreamBeginCapture(self.stream, mode))
        try:
            ok = enqueue()
        finally:
            err, graph = cudart.cudaStreamEndCapture(self.stream)
        if not ok or err != cudart.cudaError_t.cudaSuccess:
            cudart.cudaGetLastError()  # clear the sticky capture error
            raise GraphCaptureError(f"the work could not be captured as a CUDA graph ({err})")
        try:
            return _check(cudart.cudaGraphInstantiate(graph, 0))
        finally:
            cudart.cudaGraphDestroy(graph)

    def close(self) -> None:
        cudart = _cudart()
        for graph in self.graphs.values():
            cudart.cudaGraphExecDestroy(graph)
        self.graphs.clear()
        if self.host is not None:
            cudart.cudaFreeHost(self.host)
        if self.device is not None:
            cudart.cudaFree(self.device)
        cudart.cudaStreamDestroy(self.stream)
        self.host = self.device = None


class _Worker:
    """One thread's TensorRT execution context on its own `DeviceBuffers`."""

    def __init__(self, engine, inputs: dict, outputs: list[str], profile: dict, dtypes: dict):
        self.ctx = engine.create_execution_context()
        if self.ctx is None:
            raise DeviceError("TensorRT could not create an execution context (out of device memory?)")
        cudart = _cudart()
        stream = _check(cudart.cudaStreamCreate())
        self.ctx.set_optimization_profile_async(0, stream)
        # Largest shapes: every input at its profile maximum, then ask TensorRT for the outputs.
        for name, (_, _, hi) in profile.items():
            self.ctx.set_input_shape(name, hi)
        shapes = {n: (tuple(profile[n][2]), dtypes[n]) for n in inputs}
        shapes.update({n: (tuple(self.ctx.get_tensor_shape(n)), dtypes[n]) for n in outputs})
        self.buf = DeviceBuffers(worker_plan(shapes), stream)
        self.graphable = True
        for name in shapes.keys() & self.buf.plan.slots.keys():  # the decoder's others: DeviceKV binds them
            self.ctx.set_tensor_address(name, self.buf.address(name))

    def execute(self, graph_key: tuple | None = None) -> bool:
        """Enqueue the engine; with a key, through a CUDA graph captured for that key."""
        enqueue = lambda: bool(self.ctx.execute_async_v3(self.buf.stream))
        if graph_key is None or not self.graphable:
            return enqueue()
        try:
            return self.buf.replay(graph_key, enqueue)
        except GraphCaptureError:
            self.graphable = False  # this engine cannot be captured; plain enqueues from now on
            return True  # the plain first enqueue ran and gave this call's results

    def close(self) -> None:
        self.buf.close()


class TrtSession:
    """`run(feeds) -> outputs by name`, like OrtSession, on a TensorRT plan."""

    resident = True  # run_on_device leaves outputs in this thread's worker buffers

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

    def _set_shape(self, w: _Worker, name: str, shape) -> None:
        check_shape(self.name, name, shape, self.profile[name], self.rebuild)
        if not w.ctx.set_input_shape(name, shape):
            raise BundleVersionError(f"{self.name}: TensorRT refused shape {shape} for {name}; rebuild: {self.rebuild}")

    def _output_shape(self, w: _Worker, name: str) -> tuple:
        shape = tuple(w.ctx.get_tensor_shape(name))
        if not w.buf.plan.fits(name, shape):
            raise BundleVersionError(f"{self.name}: output {name} {shape} exceeds its buffer; rebuild: {self.rebuild}")
        return shape

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        w = self._enqueue(feeds)
        shapes = {name: self._output_shape(w, name) for name in outputs or self.outputs}
        for name, shape in shapes.items():
            w.buf.download(name, shape)
        w.buf.sync()
        return {name: w.buf.view(name, shape).copy() for name, shape in shapes.items()}

    def run_on_device(self, feeds: dict[str, np.ndarray]) -> dict[str, DeviceArray]:
        """Like `run`, but the outputs stay in this thread's worker buffers, finished (the
        stream is synchronized) and valid until this session runs again on this thread."""
        w = self._enqueue(feeds)
        w.buf.sync()
        return {
            name: DeviceArray(w.buf.address(name), self._output_shape(w, name), w.buf.plan.slots[name].dtype)
            for name in self.outputs
        }

    def _enqueue(self, feeds: dict[str, np.ndarray]) -> _Worker:
        if "present_kv" in self.outputs:  # its workers hold no slots for K/V (trt_plan.worker_plan)
            raise InferenceError(f"{self.name}: a decoder plan runs step by step through kv_loop, not run()")
        check_feeds(self.name, self.inputs, feeds)
        w = self._worker()
        for name, x in feeds.items():
            self._set_shape(w, name, x.shape)
            w.buf.upload(name, x)
        if not w.execute():
            raise InferenceError(f"{self.name}: TensorRT execution failed")
        return w

    def kv_loop(self, cross: dict[str, DeviceArray], kv_shape: tuple[int, ...]) -> DeviceKV:
        """Greedy-decoding state for the captioner's decoder plan (see DeviceKV); `cross`: input
        name -> that layer's cross K or V, left on the GPU by the cross-K/V plan."""
        return DeviceKV(self, self._worker(), cross, kv_shape)

    def close(self) -> None:
        with self._lock:
            for w in self._workers:
                w.close()
            self._workers.clear()


@dataclass(frozen=True)
class DeviceArray:
    """A tensor left on the GPU by `TrtSession.run_on_device`."""

    address: int
    shape: tuple[int, ...]
    dtype: str

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self):
        """Sub-arrays along axis 0, as numpy iterates: address offsets, nothing copied."""
        step = int(np.prod(self.shape[1:], dtype=np.int64)) * np.dtype(self.dtype).itemsize
        return (DeviceArray(self.address + i * step, self.shape[1:], self.dtype) for i in range(self.shape[0]))


class DeviceKV:
    """One caption's decoder state on the GPU, with the step protocol of `base.HostKV`.

    Cross K/V are read in place from the cross-K/V plan's output buffers (same thread, so
    the addresses are fixed and no later image overwrites them mid-caption): nothing is
    copied. The self-attention cache alternates between the worker's two
    buffers `KV_SCRATCH` (each sized for the longest `present_kv`): step t reads t positions
    from one and writes t + 1 to the other, so nothing but ids and logits crosses the bus.
    Each (batch, t) enqueue is a CUDA graph after its first use; the addresses it binds are
    fixed per (batch, t), so the graph stays valid while the worker lives.
    """

    def __init__(self, session: TrtSession, worker: _Worker, cross: dict[str, DeviceArray], kv_shape):
        self.s, self.w, self.t = session, worker, 0
        self.kv_shape = tuple(kv_shape)  # (layers, 2, batch, heads, 0, head_dim): axis 4 grows
        for name, x in cross.items():
            if x.dtype != session.dtypes[name]:  # both plans keep FP32 I/O; a mix means a stale build
                raise BundleVersionError(
                    f"{session.name}: {name} is {session.dtypes[name]} but the cross-K/V plan gives {x.dtype}; "
                    f"rebuild: {session.rebuild}"
                )
            if x.address % ALIGN:  # offsets of B*H*S*Dh*itemsize bytes: BLIP's (H=12, Dh=64) always are
                raise DeviceError(f"{session.name}: {name} at a device address not aligned to {ALIGN} bytes")
            session._set_shape(worker, name, x.shape)
            worker.ctx.set_tensor_address(name, x.address)
        self.buffers = tuple(worker.buf.address(b) for b in KV_SCRATCH)

    def step(self, ids: np.ndarray) -> np.ndarray:
        s, w, t = self.s, self.w, self.t
        past = (*self.kv_shape[:4], t, *self.kv_shape[5:])
        s._set_shape(w, "input_ids", ids.shape)
        s._set_shape(w, "past_kv", past)
        w.ctx.set_tensor_address("past_kv", self.buffers[t % 2])
        w.ctx.set_tensor_address("present_kv", self.buffers[(t + 1) % 2])
        w.buf.upload("input_ids", ids)
        if not w.execute(graph_key=(ids.shape, t)):
            raise InferenceError(f"{s.name}: TensorRT execution failed at decoder step {t}")
        shape = s._output_shape(w, "logits")
        w.buf.download("logits", shape)
        w.buf.sync()
        self.t += 1
        return w.buf.view("logits", shape).copy()
