"""ONNX Runtime with its tensors on the device: the `ort-cuda` backend's sessions.

`OrtDeviceSession` runs a graph through ONNX Runtime's I/O binding:

- Host inputs are bound as they are (`bind_cpu_input`): ONNX Runtime copies each one to the
  device once, inside the run. Inputs that are already `DeviceTensor`s are bound in place, by
  address; nothing is copied.
- The outputs the chain hands to another graph unchanged (`keep`: captioner vision ->
  cross K/V, detector image side -> class head) stay on the device as `DeviceTensor`s; the
  rest (embeddings, boxes, logits) come back to the host. `run_on_device` keeps them all.
- The captioner's decoder runs step by step through `kv_loop` (`DeviceKV`): cross K/V bound
  per layer in place, the self-attention cache ping-ponged between two device buffers, so a
  step moves only token ids in and logits out. With `Device.graphs` each step is a CUDA graph,
  one per (batch, past length), captured by ONNX Runtime's CUDA EP (`enable_cuda_graph`,
  `gpu_graph_id`) and replayed after that; a decoder that cannot be captured falls back to
  plain runs and says why (`DeviceKV`'s notes, `OrtDeviceSession.graphs_off`).

The device is a parameter: `Device("cpu")` runs the same binding, ping-pong and buffer code
with host OrtValues on ONNX Runtime's CPU provider, which is how the tests check it against
the host path, bit for bit, on machines without a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import site
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError, BundleError, InferenceError
from .base import check_feeds
from .ort import OrtSession, SessionOptions

log = logging.getLogger(__name__)

# Outputs that the chain passes, unchanged, to the next graph (Runtime._run): they stay where
# they were made. Everything else a graph returns is read on the host.
HANDOFFS: dict[str, tuple[str, ...]] = {
    "captioner_vision": ("image_embeds",),  # -> captioner_cross_kv
    "detector_image": ("class_embeds", "logit_shift", "logit_scale"),  # -> detector_head
}


@dataclass(frozen=True)
class Device:
    """Where a session's tensors live. `kind` "cuda" runs on ONNX Runtime's CUDA provider;
    "cpu" runs the same code with host OrtValues on the CPU provider (how the tests run it).
    `graphs`: the decoder steps at fixed addresses, one `gpu_graph_id` per (batch, past
    length); on CUDA they are captured as CUDA graphs. `stream`: a CUDA stream (its address)
    for every session, so a caller can time stages with CUDA events on it."""

    kind: str = "cuda"
    id: int = 0
    graphs: bool = True
    stream: int | None = None
    cuda_options: dict[str, str] = field(default_factory=dict)  # more CUDA EP options, as strings

    @property
    def provider(self) -> str:
        return "CUDAExecutionProvider" if self.kind == "cuda" else "CPUExecutionProvider"

    @property
    def capture(self) -> bool:
        """Whether decoder steps are captured as CUDA graphs (the CPU provider has none)."""
        return self.graphs and self.kind == "cuda"

    def providers(self, capture: bool = False) -> tuple:
        """ONNX Runtime providers for a session on this device; `capture` asks the CUDA EP to
        record CUDA graphs (the decoder's session only)."""
        if self.kind == "cpu":
            return ("CPUExecutionProvider",)
        opts = {"device_id": str(self.id), **self.cuda_options}
        if self.stream is not None:
            opts.update(has_user_compute_stream="1", user_compute_stream=str(self.stream))
        if capture:
            opts["enable_cuda_graph"] = "1"
        return (("CUDAExecutionProvider", opts), "CPUExecutionProvider")


def cuda_libraries(cuda_major: int) -> dict[str, bool]:
    """The shared libraries ONNX Runtime's CUDA provider loads for a CUDA `cuda_major` build ->
    whether it needs them to start (the others serve some operators only)."""
    m = cuda_major
    return {f"libcudart.so.{m}": True, f"libcublasLt.so.{m}": True, f"libcublas.so.{m}": True,
            "libcurand.so.10": True, "libcudnn.so.9": True,  # cuDNN: convolutions (every vision tower)
            f"libcufft.so.{m - 1}": False, f"libnvrtc.so.{m}": False}


def library_dirs() -> list[Path]:
    """Folders where pip-installed CUDA libraries live (NVIDIA's wheels, PyTorch's), in every
    site-packages on the path: ONNX Runtime looks only beside itself and in the system's."""
    roots = [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages(), *sys.path) if p]
    dirs = []
    for root in dict.fromkeys(roots):
        dirs += sorted(root.glob("nvidia/*/lib")) + sorted(root.glob("nvidia/*/lib64")) + [root / "torch" / "lib"]
    return [d for d in dict.fromkeys(dirs) if d.is_dir()]


def find_library(soname: str) -> str | None:
    """Where `soname` would come from: "system" when the loader finds it by name, else its path
    in a pip-installed package, else None."""
    try:
        ctypes.CDLL(soname)
        return "system"
    except OSError:
        pass
    return next((str(d / soname) for d in library_dirs() if (d / soname).exists()), None)


def preload_cuda_libraries(cuda_major: int) -> dict[str, str | None]:
    """Load the CUDA provider's libraries from pip-installed packages when the loader cannot
    find them by name (no LD_LIBRARY_PATH, no system CUDA): once loaded, the provider's own
    dependencies resolve to them. Returns soname -> where it came from (None: nowhere)."""
    found = {}
    for soname in cuda_libraries(cuda_major):  # in dependency order: cublasLt before cublas
        where = find_library(soname)
        if where not in (None, "system"):
            try:
                ctypes.CDLL(where, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                where = f"{where} (does not load: {e})"
        found[soname] = where
    return found


def ort_cuda_major() -> int | None:
    """The CUDA major this onnxruntime was built for (onnxruntime-gpu), or None (a CPU build)."""
    import onnxruntime as ort

    version = getattr(ort, "cuda_version", "") or ""
    return int(version.split(".")[0]) if version.split(".")[0].isdigit() else None


class CaptureGate:
    """ONNX Runtime's CUDA EP captures in cudaStreamCaptureModeGlobal: while one thread captures,
    a CUDA call from any other thread (an upload, an arena growing) fails that call and spoils
    the capture. Device work holds the gate shared; a capturing step holds it alone, and
    waiting captures go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


GATE = CaptureGate()  # one per process: capture mode is global to the CUDA context
HOST = Device("cpu")


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor in an OrtValue's memory on a session's device: the whole value, or a part of it
    along axis 0 (`offset` bytes in). `np.asarray` copies it to the host."""

    base: object  # the onnxruntime.OrtValue that owns the memory (kept alive by this reference)
    shape: tuple[int, ...]
    dtype: np.dtype
    device: Device
    offset: int = 0

    @classmethod
    def of(cls, value, device: Device) -> DeviceTensor:
        return cls(value, tuple(value.shape()), _ORT_ELEMENT[value.data_type()], device)

    @property
    def address(self) -> int:
        return int(self.base.data_ptr()) + self.offset

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __iter__(self) -> Iterator[DeviceTensor]:
        """Parts along axis 0, as numpy iterates: address offsets, nothing copied."""
        step = self.nbytes // max(1, self.shape[0])
        return (replace(self, shape=self.shape[1:], offset=self.offset + i * step) for i in range(self.shape[0]))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self.base.numpy().reshape(-1).view(np.uint8)  # a device value is copied to the host here
        x = whole[self.offset : self.offset + self.nbytes].view(self.dtype).reshape(self.shape)
        return x.astype(dtype) if dtype is not None else x.copy()

    def bind(self, io, name: str) -> None:
        io.bind_input(name, self.device.kind, self.device.id, self.dtype.type, list(self.shape), self.address)


_ORT_ELEMENT = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(bool)": np.dtype(np.bool_),
}


class OrtDeviceSession(OrtSession):
    """One graph on ONNX Runtime with its tensors on `device` (see the module's docstring).
    `keep`: outputs `run` leaves on the device. `capture`: this graph is the decoder and its
    steps are to be CUDA graphs (where `device.capture`). `max_steps`: tokens a caption may
    have, for the size of the decoder's cache buffers (longer captions run on, unbuffered)."""

    resident = True  # run_on_device leaves outputs on the device; kv_loop takes them as they are

    def __init__(self, path: Path, name: str, options: SessionOptions = SessionOptions(), device: Device = Device(),
                 keep: tuple[str, ...] = (), capture: bool = False, max_steps: int = 32):
        self.device, self.keep, self.max_steps = device, frozenset(keep), max(1, max_steps)
        self.path, self._options = Path(path), options
        self.graphs_off: str | None = None  # why the decoder's steps are not CUDA graphs (None: they are)
        self.fixed = device.graphs  # decoder steps at fixed addresses, one graph id per (batch, past length)
        self.captures = capture and device.capture
        if capture and device.graphs and not device.capture:
            self.graphs_off = f"the {device.kind} provider has no CUDA graphs; steps run at fixed addresses"
        try:
            super().__init__(path, name, replace(options, providers=device.providers(self.captures)))
            if self.captures and not self._on_device():  # ORT's own fallback: the CPU provider, silently
                raise BundleError("ONNX Runtime fell back to its CPU provider")
        except BundleError as e:
            if not self.captures:
                raise
            self._fall_back(f"ONNX Runtime cannot capture {name}: {e}", reopen=False)
            super().__init__(path, name, replace(options, providers=device.providers(False)))
        if not self._on_device():
            raise BackendUnavailableError(
                f"{name}: ONNX Runtime's {device.provider} did not load, and ort-cuda does not run on the CPU "
                f"(ONNX Runtime's 'EP Error' above says why; `item doctor` checks the CUDA libraries)"
            )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._workers: list[_KVWorker] = []

    def _on_device(self) -> bool:
        return self.device.provider in self._sess.get_providers()

    def _fall_back(self, reason: str, reopen: bool = True) -> None:
        """From now on, decoder steps run plainly (no CUDA graphs), on a session opened without
        graph capture: a failed capture can leave the EP's stream state unusable."""
        self.graphs_off, self.captures = reason, False
        log.warning("%s; decoder steps run without CUDA graphs", reason)
        if reopen:
            plain = OrtSession(self.path, self.name, replace(self._options, providers=self.device.providers(False)))
            self._sess = plain._sess
            with self._lock:
                for w in self._workers:
                    w.graphs.clear()

    # --- whole graphs -------------------------------------------------------------------

    def run(self, feeds: dict, outputs: list[str] | None = None) -> dict:
        """Outputs by name: host arrays, except those in `keep` (DeviceTensors)."""
        return self._run(feeds, outputs or self.outputs, self.keep)

    def run_on_device(self, feeds: dict) -> dict[str, DeviceTensor]:
        """Every output left on the device: valid for as long as the caller holds it."""
        return self._run(feeds, self.outputs, frozenset(self.outputs))

    def _run(self, feeds: dict, names: list[str], on_device: frozenset[str]) -> dict:
        check_feeds(self.name, self.inputs, feeds)
        with GATE.shared():
            io = self._sess.io_binding()
            for k, x in feeds.items():
                if isinstance(x, DeviceTensor):
                    x.bind(io, k)  # already on the device: bound where it lies
                else:
                    io.bind_cpu_input(k, np.ascontiguousarray(x))  # one copy to the device, inside the run
            for k in names:
                where = self.device if k in on_device else HOST
                io.bind_output(k, where.kind, where.id)
            self._execute(io, _run_options(None))
            values = io.get_outputs()  # in the order bound
            return {k: DeviceTensor.of(v, self.device) if k in on_device else v.numpy()
                    for k, v in zip(names, values)}

    def _execute(self, io, run_options) -> None:
        try:
            self._sess.run_with_iobinding(io, run_options)
        except Exception as e:  # noqa: BLE001 - ORT raises its own opaque types
            raise InferenceError(f"{self.name} failed in ONNX Runtime: {e}") from None

    # --- the decoder, step by step ---------------------------------------------------------

    def kv_loop(self, cross: dict, kv_shape: tuple[int, ...]) -> DeviceKV:
        """Greedy-decoding state on the device (see DeviceKV); `cross`: input name -> that
        layer's cross K or V, as `run_on_device` of the cross-K/V graph left them."""
        return DeviceKV(self, self._worker(), cross, tuple(kv_shape))

    def _worker(self) -> _KVWorker:
        w = getattr(self._local, "worker", None)
        if w is None:
            w = self._local.worker = _KVWorker(self.device)
            with self._lock:
                self._workers.append(w)
        return w

    def close(self) -> None:
        """Release captured graphs and device buffers; the session goes with the object."""
        release = getattr(self._sess, "release_captured_graph", None)  # newer onnxruntime only
        with self._lock:
            for w in self._workers:
                if release is not None:
                    for gid in w.graphs.values():
                        try:
                            release(gid)
                        except Exception:  # noqa: BLE001, S110 - nothing to release for this id
                            pass
                w.close()
            self._workers.clear()


@functools.lru_cache(maxsize=4096)
def _run_options(graph_id: int | None):
    """RunOptions naming a CUDA graph (`gpu_graph_id`); -1 skips capture and replay. Made once
    per id: a step should not pay for building them."""
    import onnxruntime as ort

    ro = ort.RunOptions()
    ro.add_run_config_entry("gpu_graph_id", str(-1 if graph_id is None else graph_id))
    return ro


@dataclass
class _Buffers:
    """One thread's fixed device memory for a batch size: the cache's two halves, the step's
    ids and logits, and (for CUDA graphs) cross K/V copied to addresses a graph can keep."""

    kv: tuple  # two OrtValues, each (layers, 2, batch, heads, max_steps, head_dim)
    ids: object  # OrtValue (batch, 1) int64
    logits: object | None  # OrtValue, or None where the graph's logits shape is not fixed
    cross: dict = field(default_factory=dict)  # (stacked shape, K or V by order) -> OrtValue


class _KVWorker:
    """A thread's decoder buffers (per batch size) and the graph ids it has used."""

    def __init__(self, device: Device):
        self.device = device
        self.buffers: dict[int, _Buffers] = {}
        self.graphs: dict[tuple[int, int], int] = {}  # (batch, past length) -> gpu_graph_id

    def graph_id(self, batch: int, t: int) -> tuple[int, bool]:
        """The graph id for (batch, t), and whether it is new (its first run captures)."""
        key = (batch, t)
        if key in self.graphs:
            return self.graphs[key], False
        self.graphs[key] = len(self.graphs) + 1  # 0 is ONNX Runtime's default id, kept unused
        return self.graphs[key], True

    def alloc(self, shape, dtype) -> object:
        import onnxruntime as ort

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device.kind, self.device.id)

    def close(self) -> None:
        self.buffers.clear()
        self.graphs.clear()


class DeviceKV:
    """One caption's decoder state on the session's device, with the step protocol of
    `base.HostKV`.

    The self-attention cache alternates between two buffers of the thread's worker: step t
    reads t positions from one and writes t + 1 to the other (both bound by address), so a
    step moves only ids in and logits out. Cross K/V are bound per layer where the cross-K/V
    graph left them. In fixed mode (`Device.graphs`) ids and logits live in fixed buffers too
    and cross K/V are first copied (device to device, once a caption) into buffers of the
    worker, so every address a step binds is fixed per (batch, t): each such step is one
    `gpu_graph_id`, captured once on CUDA and replayed with new contents after that. Steps
    past the buffers' `max_steps` run unbuffered and without a graph; once capture has failed,
    every step runs without one. One caption at a time per thread: the worker's buffers are reused.
    """

    def __init__(self, session: OrtDeviceSession, worker: _KVWorker, cross: dict, kv_shape: tuple[int, ...]):
        self.s, self.w, self.t = session, worker, 0
        self.kv_shape = kv_shape  # (layers, 2, batch, heads, 0, head_dim): axis 4 grows
        self.batch = kv_shape[2]
        self.dtype = np.dtype(session.inputs["past_kv"])
        with GATE.shared():
            self.buf = self._buffers()
            # fixed addresses need a logits buffer of fixed shape; a graph without one runs plainly
            self.fixed = session.fixed and self.buf.logits is not None
            placed: dict[int, object] = {}
            self.cross = {name: self._place(x, placed) for name, x in cross.items()}
        self.past: DeviceTensor | None = None  # the unbuffered cache, past max_steps
        self._bind_cross()

    def _bind_cross(self) -> None:
        self.io = self.s._sess.io_binding()  # bindings belong to the session that made them
        self._io_session = self.s._sess
        for name, x in self.cross.items():
            x.bind(self.io, name)

    def _buffers(self) -> _Buffers:
        b = self.w.buffers.get(self.batch)
        if b is None:
            full = (*self.kv_shape[:4], self.s.max_steps, *self.kv_shape[5:])
            b = _Buffers((self.w.alloc(full, self.dtype), self.w.alloc(full, self.dtype)),
                         self.w.alloc((self.batch, 1), np.int64), self._logits_buffer())
            self.w.buffers[self.batch] = b
        return b

    def _logits_buffer(self):
        out = next(o for o in self.s._sess.get_outputs() if o.name == "logits")
        shape = [self.batch, *out.shape[1:]]
        if not all(isinstance(d, int) for d in shape) or out.type not in _ORT_ELEMENT:
            return None
        return self.w.alloc(shape, _ORT_ELEMENT[out.type])

    def _place(self, x, placed: dict[int, object]) -> DeviceTensor:
        """A cross K/V input where a step binds it: in place, or (fixed mode) in the worker's
        buffer for it, so a captured graph keeps reading the same address. The copy is one per
        stacked value (all layers' K, all layers' V), device to device."""
        if not isinstance(x, DeviceTensor):  # host arrays (a caller outside the chain): uploaded once
            import onnxruntime as ort

            x = DeviceTensor.of(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), self.s.device.kind,
                                                                 self.s.device.id), self.s.device)
        if not self.fixed:
            return x
        fixed = placed.get(id(x.base))
        if fixed is None:
            key = (tuple(x.base.shape()), len(placed))  # K and V have one shape: told apart by order
            fixed = self.buf.cross.get(key)
            if fixed is None:
                fixed = self.buf.cross[key] = self.w.alloc(key[0], x.dtype)
            fixed.update_inplace(x.base)
            placed[id(x.base)] = fixed
        return replace(x, base=fixed)

    def step(self, ids: np.ndarray) -> np.ndarray:
        s, t = self.s, self.t
        if ids.shape != (self.batch, 1) or ids.dtype != np.int64:
            raise TypeError(f"{s.name}: a step takes int64 ids of shape {(self.batch, 1)}, got {ids.dtype} {ids.shape}")
        buffered = t < s.max_steps
        graph_id, new = self.w.graph_id(self.batch, t) if self.fixed and buffered else (None, False)
        new = new and s.captures  # the first run of a graph id captures it (ORT warms up and captures in one call)
        try:
            with GATE.alone() if new else GATE.shared():
                logits = self._step(ids, t, buffered, graph_id)
        except InferenceError as e:
            if not new:
                raise
            s._fall_back(f"{s.name}: CUDA graph capture failed at past length {t}: {e}")
            with GATE.shared():
                logits = self._step(ids, t, buffered, graph_id)
        self.t += 1
        return logits

    def _step(self, ids: np.ndarray, t: int, buffered: bool, graph_id: int | None) -> np.ndarray:
        if self._io_session is not self.s._sess:  # another thread's failed capture reopened the session
            self._bind_cross()
        s, io, b = self.s, self.io, self.buf
        kind, dev = s.device.kind, s.device.id
        past = [*self.kv_shape[:4], t, *self.kv_shape[5:]]
        present = [*self.kv_shape[:4], t + 1, *self.kv_shape[5:]]
        if self.fixed:
            b.ids.update_inplace(ids)  # same address every step: a captured graph reads it there
            io.bind_ortvalue_input("input_ids", b.ids)
        else:
            io.bind_cpu_input("input_ids", ids)
        # outputs always bound in this order (present_kv, logits): get_outputs() follows it
        if buffered:
            src, dst = b.kv[t % 2], b.kv[(t + 1) % 2]
            io.bind_input("past_kv", kind, dev, self.dtype.type, past, int(src.data_ptr()))
            io.bind_output("present_kv", kind, dev, self.dtype.type, present, int(dst.data_ptr()))
        else:
            if self.past is None:  # leaving the buffers: the last present is in the half step t reads
                self.past = DeviceTensor(b.kv[t % 2], tuple(past), self.dtype, s.device)
            self.past.bind(io, "past_kv")
            io.bind_output("present_kv", kind, dev)
        if self.fixed:
            io.bind_ortvalue_output("logits", b.logits)
        else:
            io.bind_output("logits", kind, dev)
        s._execute(io, _run_options(graph_id if s.captures else None))
        if self.fixed and buffered:
            return b.logits.numpy().copy()  # the buffer is overwritten by the next step
        present_kv, logits = io.get_outputs()
        if not buffered:
            self.past = DeviceTensor.of(present_kv, s.device)
        return logits.numpy()
