"""`item doctor [BUNDLE]`: what this machine can run, and for what it cannot, why and the fix.

It reads the machine (CPU features, ONNX Runtime and its providers, OpenVINO, the NVIDIA
driver, the GPU, the CUDA, cuDNN and TensorRT libraries, JetPack) and says, per backend,
whether it can run here; with a bundle, which precision and engine each graph would get on
each backend. Every probe is guarded: a missing or broken library is a finding, never a crash.
`--backend NAME` makes the exit status say whether that backend can run here.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

# onnxruntime-gpu on PyPI for CUDA 13 (x86-64, Python 3.10-3.13), the build `ort-cuda` is written for
ORT_GPU = "1.31.1"
ORT_GPU_INSTALL = f"pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda,cudnn]=={ORT_GPU}'"
TENSORRT_INSTALL = "pip install 'itemrt[tensorrt]' (x86; on Jetson TensorRT comes with JetPack)"
DRIVER_FIX = "install the NVIDIA driver (580 or newer for CUDA 13); in a container, run it with the GPU passed in"
ISA = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
       "avx512_bf16": "AVX512-BF16", "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}
JETPACK = {32: "4.x", 35: "5.x", 36: "6.x", 38: "7.x"}  # L4T major -> JetPack
# A one-node ONNX model (Identity, float[1], opset 13): a session on a provider proves it loads.
PROBE_MODEL = bytes.fromhex(
    "080812003a3b0a100a017812017922084964656e74697479120570726f62655a0f0a0178120a0a08080112040a"
    "020801620f0a0179120a0a08080112040a02080142040a00100d"
)


@dataclass
class Finding:
    """One fact about this machine; `fix` says what would change it, when it matters."""

    ok: bool
    detail: str
    fix: str | None = None


@dataclass
class BackendCheck:
    ok: bool
    why: str | None = None  # why it cannot run here
    fix: str | None = None
    plan: dict[str, dict[str, str]] | None = None  # graph -> {precision, engine}, with a bundle
    precision: str | None = None  # the precision it runs the bundle in by default


@dataclass
class Report:
    itemrt: str
    system: str
    machine: dict[str, Finding] = field(default_factory=dict)
    backends: dict[str, BackendCheck] = field(default_factory=dict)
    bundle: str | None = None
    gpus: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# --- the machine ---------------------------------------------------------------------------------


def guarded(probe):
    """A probe that raises reports the exception as its finding instead."""

    def run(*a, **k) -> Finding:
        try:
            return probe(*a, **k)
        except Exception as e:  # noqa: BLE001 - a doctor must not die of what it examines
            return Finding(False, f"the probe failed: {type(e).__name__}: {e}")

    run.__name__, run.__doc__ = probe.__name__, probe.__doc__
    return run


@guarded
def cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Finding:
    """Model, cores and the vector/matrix features the INT8 and BF16 paths use."""
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() in ("flags", "Features"):
                flags |= set(value.split())
    have = [name for flag, name in ISA.items() if flag in flags]
    return Finding(True, f"{model}, {os.cpu_count()} cores; " + (", ".join(have) if have else "none of "
                                                                 + ", ".join(ISA.values())))


@guarded
def onnxruntime_build() -> Finding:
    import onnxruntime as ort

    package = next((p for p in ("onnxruntime-gpu", "onnxruntime") if _installed(p)), "onnxruntime")
    cuda = getattr(ort, "cuda_version", "") or ""
    build = f"a CUDA {cuda} build" if cuda else "a CPU build"
    return Finding(True, f"{ort.__version__} ({package}, {build}); providers: {', '.join(ort.get_available_providers())}")


@guarded
def openvino() -> Finding:
    if importlib.util.find_spec("openvino") is None:
        return Finding(False, "not installed (precisions bf16 and mixed need it)", "pip install 'itemrt[openvino]'")
    from .backends.openvino import bf16_support

    import openvino as ov

    why = bf16_support()
    return Finding(True, f"{ov.__version__}; BF16 on this CPU: " + ("yes" if why is None else f"no ({why})"))


@dataclass
class CudaState:
    """What the NVIDIA driver says: its CUDA version (e.g. 13.0) and the devices it sees."""

    driver: str | None = None
    driver_major: int | None = None
    gpus: list[dict] = field(default_factory=list)
    error: str | None = None


def cuda_state() -> CudaState:
    """From cuda-bindings where importable, else from libcuda.so.1 through ctypes; never raises."""
    first = None
    try:
        return _cuda_bindings()
    except Exception as e:  # noqa: BLE001 - not installed, or no driver behind it
        first = f"{type(e).__name__}: {e}"
    try:
        return _cuda_ctypes()
    except Exception as e:  # noqa: BLE001
        return CudaState(error=f"{e} ({first})" if first and "cuda" not in first.lower() else str(e))


def _version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


def _cuda_bindings() -> CudaState:
    from cuda.bindings import driver as cu

    ok = cu.CUresult.CUDA_SUCCESS

    def check(result):
        err, *rest = result
        if err != ok:
            raise RuntimeError(f"CUDA driver error {err}")
        return rest[0] if len(rest) == 1 else rest

    v = check(cu.cuDriverGetVersion())
    state = CudaState(_version(v), v // 1000)
    try:
        check(cu.cuInit(0))
        A = cu.CUdevice_attribute
        for i in range(check(cu.cuDeviceGetCount())):
            dev = check(cu.cuDeviceGet(i))
            name = check(cu.cuDeviceGetName(256, dev))
            cc = (check(cu.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev)),
                  check(cu.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev)))
            mem = check(cu.cuDeviceTotalMem(dev))
            state.gpus.append(_gpu(name, cc, mem))
    except Exception as e:  # noqa: BLE001 - a driver without a usable device
        state.error = str(e)
    return state


def _cuda_ctypes() -> CudaState:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise RuntimeError("no NVIDIA driver: libcuda.so.1 cannot be loaded") from None
    v, n = ctypes.c_int(), ctypes.c_int()
    if lib.cuDriverGetVersion(ctypes.byref(v)):
        raise RuntimeError("libcuda.so.1 loads but cuDriverGetVersion fails")
    state = CudaState(_version(v.value), v.value // 1000)
    if (rc := lib.cuInit(0)) or (rc := lib.cuDeviceGetCount(ctypes.byref(n))):
        state.error = f"cuInit / cuDeviceGetCount returned CUDA error {rc}"
        return state
    for i in range(n.value):
        dev, major, minor, mem = ctypes.c_int(), ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        name = ctypes.create_string_buffer(256)
        lib.cuDeviceGet(ctypes.byref(dev), i)
        lib.cuDeviceGetName(name, 256, dev)
        lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
        lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
        lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        state.gpus.append(_gpu(name.value, (major.value, minor.value), mem.value))
    return state


def _gpu(name, cc: tuple[int, int], mem: int) -> dict:
    name = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return {"name": name.strip("\x00"), "compute_capability": f"{cc[0]}.{cc[1]}", "memory_gib": round(mem / 2**30, 1)}


def driver_finding(state: CudaState) -> Finding:
    if state.driver is None:
        return Finding(False, f"CUDA is unavailable: {state.error}", DRIVER_FIX)
    return Finding(True, f"CUDA {state.driver} (the newest CUDA this driver runs)")


def gpu_finding(state: CudaState) -> Finding:
    if state.gpus:
        return Finding(True, "; ".join(f"{g['name']} (compute capability {g['compute_capability']}, "
                                       f"{g['memory_gib']} GiB)" for g in state.gpus))
    if state.driver is None:
        return Finding(False, "none: no NVIDIA driver (above)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return Finding(False, f"the driver sees no device ({state.error or 'count 0'}"
                          + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")


def _library_version(path: str, symbol: str) -> int | None:
    lib = ctypes.CDLL(path)
    fn = getattr(lib, symbol)
    if symbol == "cudnnGetVersion":
        fn.restype = ctypes.c_size_t
        return int(fn())
    v = ctypes.c_int()
    return v.value if fn(ctypes.byref(v)) == 0 else None


@guarded
def cuda_libraries(major: int) -> Finding:
    """The libraries ONNX Runtime's CUDA provider needs, found by the loader or in pip packages."""
    from .backends.ort_cuda import cuda_libraries as needed
    from .backends.ort_cuda import find_library

    found = {soname: find_library(soname) for soname in needed(major)}
    missing = [s for s, required in needed(major).items() if required and found[s] is None]
    have = ", ".join(f"{s} ({'system' if w == 'system' else 'pip'})" for s, w in found.items() if w)
    runtime = found.get(f"libcudart.so.{major}")
    version = _library_version(f"libcudart.so.{major}" if runtime == "system" else runtime,
                               "cudaRuntimeGetVersion") if runtime else None
    head = f"CUDA runtime {_version(version)}; " if version else ""
    if missing:
        return Finding(False, f"{head}missing {', '.join(missing)}" + (f"; found {have}" if have else ""),
                       f"pip install 'onnxruntime-gpu[cuda,cudnn]=={ORT_GPU}' (brings NVIDIA's CUDA {major} "
                       f"and cuDNN 9 wheels), or put CUDA {major}'s lib folder on LD_LIBRARY_PATH")
    return Finding(True, head + have)


@guarded
def cudnn() -> Finding:
    from .backends.ort_cuda import find_library

    where = find_library("libcudnn.so.9")
    if where is None:
        return Finding(False, "libcudnn.so.9 not found", "pip install nvidia-cudnn-cu13 (or -cu12 for a CUDA 12 build)")
    v = _library_version("libcudnn.so.9" if where == "system" else where, "cudnnGetVersion")
    text = f"{v // 10000}.{v % 10000 // 100}.{v % 100}" if v else "version unknown"
    return Finding(True, f"cuDNN {text} ({where})")


@guarded
def tensorrt() -> Finding:
    from .backends.ort_cuda import find_library

    lib = find_library("libnvinfer.so.10")
    if importlib.util.find_spec("tensorrt") is None:
        extra = f"; libnvinfer.so.10: {lib}" if lib else ""
        return Finding(False, f"the tensorrt Python package is not installed{extra}", TENSORRT_INSTALL)
    version = _distribution_version("tensorrt") or "?"
    return Finding(True, f"TensorRT {version}; libnvinfer.so.10: {lib or 'not found by the loader'}")


@guarded
def jetpack(release: Path = Path("/etc/nv_tegra_release")) -> Finding:
    if not release.exists():
        return Finding(False, f"not a Jetson (no {release})")
    first = release.read_text(errors="replace").splitlines()[0].strip()
    major = re.search(r"\bR(\d+)", first)
    revision = re.search(r"REVISION:\s*([\d.]+)", first)
    if major is None:
        return Finding(False, f"{release} does not name an L4T release: {first!r}")
    m = int(major.group(1))
    return Finding(True, f"L4T R{m}.{revision.group(1) if revision else '?'}, JetPack {JETPACK.get(m, '?')} ({first})")


def _installed(name: str) -> bool:
    return _distribution_version(name) is not None


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the backends ----------------------------------------------------------------------------


def probe_session(provider: str) -> str | None:
    """None when ONNX Runtime opens a one-node session on `provider`, else why not, in its own
    words: a provider whose libraries do not load is only logged (to the process's stderr, read
    back here) while the session quietly opens on the CPU."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # errors only
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(record=True) as warned:
                warnings.simplefilter("always")
                s = ort.InferenceSession(PROBE_MODEL, so, providers=[provider], enable_fallback=0)  # it prints EP errors
            failure = None if provider in s.get_providers() else f"the session opened on {s.get_providers()} instead"
        except Exception as e:  # noqa: BLE001 - ORT raises its own types
            failure, warned = str(e).strip(), []
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        logged = err.read().decode(errors="replace")
    if failure is None:
        return None
    said = [line.split("] ", 1)[-1].strip() for line in logged.splitlines() if "error" in line.lower()]
    return "; ".join([failure, *said[:2], *(str(w.message) for w in warned[:1])])


def check_ort_cuda(state: CudaState, provider: str = "CUDAExecutionProvider") -> tuple[str | None, str | None]:
    """(why not, fix) for ONNX Runtime's CUDA (or TensorRT) provider; (None, None) when it runs."""
    import onnxruntime as ort

    from .backends.ort_cuda import ort_cuda_major, preload_cuda_libraries

    if provider not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no {provider}",
                ORT_GPU_INSTALL + ("" if provider == "CUDAExecutionProvider" else f"; and TensorRT 10: {TENSORRT_INSTALL}"))
    if state.driver is None:
        return f"CUDA is unavailable: {state.error}", DRIVER_FIX
    major = ort_cuda_major()
    if major is not None and state.driver_major is not None and state.driver_major < major:
        return (f"onnxruntime-gpu {ort.__version__} is built for CUDA {major}, and this driver runs CUDA "
                f"{state.driver} at most", f"update the NVIDIA driver (CUDA {major}: 580 or newer)")
    if not state.gpus:
        return gpu_finding(state).detail, None
    if major is not None:
        missing = [s for s, w in preload_cuda_libraries(major).items() if w is None]
        if missing:
            return f"missing {', '.join(missing)}", f"pip install 'onnxruntime-gpu[cuda,cudnn]=={ort.__version__}'"
    if why := probe_session(provider):
        return f"{provider} does not start: {why}", "see the CUDA library findings above"
    return None, None


def check_backend(name: str, state: CudaState, bundle=None) -> tuple[str | None, str | None]:
    """(why not, fix) for backend `name` on this machine (and this bundle); (None, None): it runs."""
    if name == "onnxruntime":
        return None, None
    if name == "ort-cuda":
        return check_ort_cuda(state)
    if name == "ort-tensorrt":
        why, fix = check_ort_cuda(state, "TensorrtExecutionProvider")
        if why is None and _find("libnvinfer.so.10") is None:
            return "TensorRT 10's libnvinfer.so.10 is not found", TENSORRT_INSTALL
        return why, fix
    if name == "tensorrt":
        from .backends.tensorrt import device_info, import_tensorrt
        from .backends.trt_plan import select_plans
        from .errors import ItemError

        try:
            trt = import_tensorrt()
            gpu, cc = device_info()
            if bundle is not None:
                select_plans(bundle.manifest, bundle.root, trt.__version__, gpu, cc)
        except ItemError as e:
            text = str(e)
            fix = text[text.index("item build"):] if "item build" in text else TENSORRT_INSTALL
            return text, fix
        except Exception as e:  # noqa: BLE001 - cuda-python without a driver, and the like
            return f"{type(e).__name__}: {e}", DRIVER_FIX
        return None, None
    return f"unknown backend {name}", None


def _find(soname: str) -> str | None:
    from .backends.ort_cuda import find_library

    return find_library(soname)


def examine(bundle_path: str | Path | None = None) -> Report:
    import itemrt

    from .backends import BACKENDS
    from .backends.ort_cuda import ort_cuda_major

    report = Report(itemrt.__version__, f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")
    state = cuda_state()
    major = ort_cuda_major() or state.driver_major or 13
    report.machine = {
        "cpu": cpu(),
        "onnxruntime": onnxruntime_build(),
        "openvino": openvino(),
        "cuda-driver": driver_finding(state),
        "gpu": gpu_finding(state),
        "cuda-libraries": cuda_libraries(major),
        "cudnn": cudnn(),
        "tensorrt": tensorrt(),
        "jetpack": jetpack(),
    }
    report.gpus = state.gpus
    bundle = None
    if bundle_path is not None:
        from .bundle import Bundle

        bundle = Bundle.open(bundle_path, verify=False)  # presence only: hashes are checked when it runs
        report.bundle = str(bundle.root)
    for name, cls in BACKENDS.items():
        try:
            why, fix = check_backend(name, state, bundle)
        except Exception as e:  # noqa: BLE001
            why, fix = f"the check failed: {type(e).__name__}: {e}", None
        check = BackendCheck(why is None, why, fix)
        if bundle is not None:
            check.precision = cls.preferred(bundle)
            check.plan = {g: {"precision": p, "engine": e} for g, (p, e) in cls.plan(bundle).items()}
        report.backends[name] = check
    return report


# --- the command -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .backends import BACKENDS

    p.add_argument("bundle", nargs="?", default=None, help="a bundle: which precision and engine each graph would use")
    p.add_argument("--backend", choices=list(BACKENDS), default=None,
                   help="exit 1 unless this backend can run here (with BUNDLE: this bundle on it)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object")


def run(args) -> int:
    report = examine(args.bundle)
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print("\n".join(text(report)))
    if args.backend is None:
        return 0
    return 0 if report.backends[args.backend].ok else 1


def text(r: Report) -> list[str]:
    lines = [f"item doctor: itemrt {r.itemrt}, {r.system}", "", "this machine"]
    w = max(map(len, r.machine))
    for name, f in r.machine.items():
        lines.append(f"  {'ok' if f.ok else '--'}  {name:<{w}}  {f.detail}")
        if f.fix and not f.ok:
            lines.append(f"      {'':<{w}}  fix: {f.fix}")
    lines += ["", "backends"]
    w = max(map(len, r.backends))
    for name, b in r.backends.items():
        lines.append(f"  {'ok' if b.ok else 'no'}  {name:<{w}}  {'runs here' if b.ok else b.why}")
        if b.fix and not b.ok:
            lines.append(f"      {'':<{w}}  fix: {b.fix}")
    if r.bundle is not None:
        lines += ["", f"bundle {r.bundle}: the precision of each graph on each backend (default precision in the header)"]
        lines += _plan_table(r)
    return lines


def _plan_table(r: Report) -> list[str]:
    from .backends import BACKENDS

    names = list(r.backends)
    graphs = list(next(iter(r.backends.values())).plan)
    cells = {}
    for n in names:
        main = BACKENDS[n].engine
        cells[n] = {g: v["precision"] + ("" if v["engine"] == main else f" ({v['engine']})")
                    for g, v in r.backends[n].plan.items()}
    heads = {n: f"{n} [{r.backends[n].precision}]" for n in names}
    widths = {n: max(len(heads[n]), *(len(c) for c in cells[n].values())) for n in names}
    gw = max(map(len, graphs))
    out = [("  " + f"{'graph':<{gw}}  " + "  ".join(f"{heads[n]:<{widths[n]}}" for n in names)).rstrip()]
    for g in graphs:
        out.append(("  " + f"{g:<{gw}}  " + "  ".join(f"{cells[n][g]:<{widths[n]}}" for n in names)).rstrip())
    out.append("  engines: " + "; ".join(f"{n}: {BACKENDS[n].engine}" for n in names))
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="item doctor")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
