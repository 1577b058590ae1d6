"""The GPU path around TensorRT: profiles from the manifest, buffer planning, build records
and their checks (all on CPU), backend selection errors, every CUDA and TensorRT name the
code uses against the real bindings, the graphs against TensorRT's ONNX support matrix; the
TensorRT build and backend
themselves where TensorRT and a GPU exist (skipped elsewhere, with the reason)."""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from itemrt import Runtime
from itemrt.backends.trt_plan import (
    ALIGN,
    ENGINE_COMPONENTS,
    KV_SCRATCH,
    BufferPlan,
    BuildSettings,
    axis_bounds,
    check_shape,
    profiles,
    rebuild_command,
    select_plans,
    target_key,
    worker_plan,
)
from itemrt.backends.base import HostSession
from itemrt.bundle import Bundle, sha256_file
from itemrt.cli import main as item
from itemrt.errors import BackendUnavailableError, BundleVersionError


def test_profiles_follow_the_bundle_limits(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    k, t = m["words"]["max_objects"], m["captioner"]["decoding"]["max_new_tokens"]
    s = BuildSettings(max_batch=3)
    p = profiles(m, s)
    assert set(p) == set(ENGINE_COMPONENTS) and "detector_text" not in p and "head" not in p
    lo, _, hi = p["captioner_decoder"]["past_kv"]
    assert lo[4] == 0 and hi[4] == t - 1 and lo[2] == 1 and hi[2] == 3  # past 0 on the first step
    assert p["captioner_decoder"]["input_ids"] == ((1, 1), (1, 1), (3, 1))
    assert p["clip_image"]["pixel_values"][2][0] == 3 * (1 + k)  # [I0, crops] of every image
    assert p["clip_image"]["pixel_values"][1][0] == 1 + k
    assert p["clip_text"]["input_ids"][2] == (3, m["clip"]["tokenizer"]["max_length"])
    assert p["detector_head"]["query_embeds"][2][1] == k
    # Static dimensions come from the graph unchanged.
    assert p["captioner_vision"]["pixel_values"][0][1:] == tuple(m["components"]["captioner_vision"]["inputs"][0]["shape"][1:])
    bad = json.loads(json.dumps(m))
    bad["components"]["clip_text"]["inputs"][0]["shape"] = ["batch", "mystery"]
    with pytest.raises(BundleVersionError, match="mystery"):
        profiles(bad, s)


class Recording(HostSession):
    """Wraps a real host session and records the input shapes the runtime feeds it."""

    def __init__(self, session, log):
        self.session, self.log = session, log

    def run(self, feeds, outputs=None):
        for k, v in feeds.items():
            self.log.append((self.session.name, k, v.shape))
        return self.session.run(feeds, outputs)


def test_profiles_accept_every_shape_the_runtime_feeds(tiny_bundle, samples):
    """Run detect_batch at the profile's max batch (caption words and forced probe words, full
    captions) and check every input shape against the profiles built from the manifest."""
    s = BuildSettings(max_batch=len(samples))
    m = Bundle.open(tiny_bundle).manifest
    p = profiles(m, s)
    log: list = []
    with Runtime(tiny_bundle, precision="fp32") as rt:
        cap, det, clip = rt.captioner, rt.detector, rt.clip
        cap.vision, cap.cross, cap.decoder = (Recording(x, log) for x in (cap.vision, cap.cross, cap.decoder))
        det.image, det.head = Recording(det.image, log), Recording(det.head, log)
        clip.image, clip.text.session = Recording(clip.image, log), Recording(clip.text.session, log)
        rt.detect_batch(samples)
        rt.detect_batch(samples[:1], words=["dog", "person", "car", "cat"][: rt.max_objects])
    assert {name for name, _, _ in log} == set(ENGINE_COMPONENTS)
    for name, tensor, shape in log:
        check_shape(name, tensor, shape, p[name][tensor], "item build ...")
    past = [shape[4] for name, tensor, shape in log if tensor == "past_kv"]
    assert min(past) == 0 and max(past) <= m["captioner"]["decoding"]["max_new_tokens"] - 1


def test_device_arrays_split_into_layers_by_address():
    """The TensorRT decoder binds each layer's cross K/V at an offset into the cross-K/V plan's
    output, the way the ONNX Runtime path feeds numpy views: nothing copied."""
    from itemrt.backends.tensorrt import DeviceArray

    host = np.zeros((3, 2, 4), np.float16)
    x = DeviceArray(4096, host.shape, "float16")
    layers = [*x]
    assert len(x) == 3 and [a.shape for a in layers] == [(2, 4)] * 3
    assert [a.address - x.address for a in layers] == [h.ctypes.data - host.ctypes.data for h in host]
    assert {a.dtype for a in layers} == {"float16"}
    # BLIP base's per-layer K/V (batch b, 12 heads, 577 positions, 64 wide) keep TensorRT's alignment
    for dtype in ("float32", "float16"):
        for b in (1, 3):
            kv = DeviceArray(ALIGN * 1000, (12, b, 12, 577, 64), dtype)
            assert all(layer.address % ALIGN == 0 for layer in kv)


def test_shapes_outside_the_profile_name_the_rebuild(tiny_bundle):
    p = profiles(Bundle.open(tiny_bundle).manifest, BuildSettings(max_batch=2))
    _, _, hi = p["captioner_vision"]["pixel_values"]
    with pytest.raises(BundleVersionError, match="item build x --max-batch 8"):
        check_shape("captioner_vision", "pixel_values", (3, *hi[1:]), p["captioner_vision"]["pixel_values"],
                    "item build x --max-batch 8")
    check_shape("captioner_vision", "pixel_values", hi, p["captioner_vision"]["pixel_values"], "")


def test_buffer_plan_holds_the_largest_outputs(tiny_bundle):
    """Buffers sized from the profile maxima hold what the graph really returns at those
    shapes (output shapes computed here by ONNX Runtime, as TensorRT reports them on a GPU)."""
    from itemrt.backends.ort import OrtSession

    b = Bundle.open(tiny_bundle)
    p = profiles(b.manifest, BuildSettings(max_batch=2))
    rng = np.random.default_rng(0)
    for name in ("captioner_decoder", "detector_image", "clip_image"):
        sess = OrtSession(b.file(b.component(name)["file"]), name)
        dtypes = {i["name"]: i["dtype"] for i in b.component(name)["inputs"] + b.component(name)["outputs"]}
        feeds = {}
        for tensor, (_, _, hi) in p[name].items():
            feeds[tensor] = (rng.integers(0, 10, hi) if dtypes[tensor] == "int64" else rng.standard_normal(hi)).astype(dtypes[tensor])
        io = {**feeds, **sess.run(feeds)}
        shapes = {t: (x.shape, dtypes[t]) for t, x in io.items()}
        plan = worker_plan(shapes)
        ends = sorted((s.offset, s.offset + s.nbytes) for s in plan.slots.values())
        assert all(s.offset % ALIGN == 0 for s in plan.slots.values())
        assert all(a_end <= b_start for (_, a_end), (b_start, _) in pairwise(ends))  # no overlap
        assert plan.total >= ends[-1][1] and plan.total % ALIGN == 0
        staged = {t: x for t, x in io.items() if t in plan.slots}
        for t, x in staged.items():
            assert plan.slots[t].nbytes == x.nbytes and plan.fits(t, x.shape)
        if name == "captioner_decoder":
            # only ids and logits cross the bus; the cache ping-pongs in two present_kv-sized
            # buffers; the cross K/V stay where the cross-K/V plan wrote them
            assert set(staged) == {"input_ids", "logits"}
            assert {s: plan.fits(s, io["present_kv"].shape) for s in KV_SCRATCH} == dict.fromkeys(KV_SCRATCH, True)
            cross = sum(x.nbytes for t, x in io.items() if t.startswith("cross_"))
            every = BufferPlan.for_shapes({**shapes, **{s: shapes["present_kv"] for s in KV_SCRATCH}})
            assert cross > 0 and every.total - plan.total >= cross  # what a slot for every tensor wasted
        else:
            assert staged == io
    small = BufferPlan.for_shapes({"x": ((2, 3), "float16")})
    assert small.slots["x"].nbytes == 12 and small.total == ALIGN and not small.fits("x", (3, 3))
    with pytest.raises(BundleVersionError):
        BufferPlan.for_shapes({"x": ((2,), "complex64")})


def test_builds_for_other_machines_fail_closed_with_the_command(tiny_bundle):
    m = json.loads(json.dumps(Bundle.open(tiny_bundle).manifest))
    with pytest.raises(BundleVersionError, match=f"item build {tiny_bundle} --max-batch 4"):
        select_plans(m, tiny_bundle, "10.3.0", "Orin", (8, 7))
    key = target_key("10.3.0", (8, 7), "NVIDIA Jetson AGX Orin")
    assert key == "sm87-nvidia-jetson-agx-orin-trt10.3.0"
    settings = BuildSettings(max_batch=2, workspace_gb=2.0).to_dict()
    m["tensorrt"] = {key: {"gpu": "NVIDIA Jetson AGX Orin", "settings": settings, "precision": "fp16",
                           "plans": {c: {"file": f"tensorrt/{c}.plan"} for c in ENGINE_COMPONENTS}}}
    assert select_plans(m, tiny_bundle, "10.3.0", "NVIDIA Jetson AGX Orin", (8, 7))["precision"] == "fp16"
    # Another TensorRT, another architecture, another GPU model of the same architecture.
    for version, cc, gpu in (("10.16.0", (8, 7), "NVIDIA Jetson AGX Orin"), ("10.3.0", (9, 0), "NVIDIA H100"),
                             ("10.3.0", (8, 7), "NVIDIA Jetson Orin Nano")):
        with pytest.raises(BundleVersionError) as e:
            select_plans(m, tiny_bundle, version, gpu, cc)
        assert f"{key} (NVIDIA Jetson AGX Orin)" in str(e.value) and rebuild_command(tiny_bundle, settings) in str(e.value)
    del m["tensorrt"][key]["plans"]["clip_text"]
    with pytest.raises(BundleVersionError, match="clip_text"):
        select_plans(m, tiny_bundle, "10.3.0", "NVIDIA Jetson AGX Orin", (8, 7))


def test_axis_bounds_respect_opt_within_limits(tiny_bundle):
    m = Bundle.open(tiny_bundle).manifest
    for comp in ENGINE_COMPONENTS:
        for lo, opt, hi in axis_bounds(comp, m, BuildSettings(max_batch=2, opt_batch=8)).values():
            assert lo <= opt <= hi


def test_built_plans_do_not_make_features_stale(tiny_bundle, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    before = Bundle.open(b).feature_fingerprint
    (b / "tensorrt").mkdir()
    (b / "tensorrt" / "x.plan").write_bytes(b"plan")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["tensorrt/x.plan"] = sha256_file(b / "tensorrt" / "x.plan")
    (b / "manifest.json").write_text(json.dumps(m))
    assert Bundle.open(b).feature_fingerprint == before


HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAVE_TRT, reason="checks the error a machine without TensorRT gives")
def test_without_tensorrt_the_backend_and_build_say_what_to_install(tiny_bundle, capsys):
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        Runtime(tiny_bundle, backend="tensorrt")
    assert item(["build", str(tiny_bundle)]) == 2
    assert "BackendUnavailableError" in capsys.readouterr().err


def test_tensorrt_older_than_10_is_refused_up_front():
    from itemrt.backends.tensorrt import check_tensorrt_version

    for old in ("8.6.2.3", "9.3.0"):  # JetPack 6.0 ships 8.6
        with pytest.raises(BackendUnavailableError, match=f"TensorRT {old} is installed.*10.x or newer"):
            check_tensorrt_version(old)
    for ok in ("10.3.0", "10.13.3.9.post1", "11.4.0.106"):
        check_tensorrt_version(ok)


def test_ort_gpu_providers_are_checked(tiny_bundle):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider; the error path cannot be seen here")
    for backend in ("ort-cuda", "ort-tensorrt"):
        with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
            Runtime(tiny_bundle, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        Runtime(tiny_bundle, backend="cuda")


def test_every_cuda_call_exists_with_its_arity():
    """The TensorRT backend never runs here, so check each `cudart.X(...)` it makes against the
    real cuda-python bindings: the name (and enum members) exist and the positional argument
    count matches the binding's signature."""
    import inspect
    import re

    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-bindings is in the test extra")
    import itemrt.backends.tensorrt as backend

    tree = ast.parse(inspect.getsource(backend))

    def chain(node) -> list[str] | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        return parts[::-1] if isinstance(node, ast.Name) and node.id == "cudart" else None

    calls, seen = 0, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (names := chain(node)):
            obj = cudart
            for n in names:
                assert hasattr(obj, n), f"cudart.{'.'.join(names)} does not exist"
                obj = getattr(obj, n)
            seen.add(".".join(names))
        if isinstance(node, ast.Call) and (names := chain(node.func)) and len(names) == 1:
            sig = getattr(cudart, names[0]).__doc__.splitlines()[0]
            params = [p for p in re.search(r"\((.*)\)", sig).group(1).split(",") if p.strip()]
            assert len(node.args) == len(params), f"{names[0]} takes {len(params)} arguments ({sig}), called with {len(node.args)}"
            calls += 1
    assert calls >= 15 and "cudaGraphLaunch" in seen and "cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal" in seen



# TensorRT's compiled Python bindings are a 1 MB wheel that pip can fetch anywhere, though
# without TensorRT's libraries they cannot be imported. JetPack 6's 10.3, the newest 10.x and 11.x.
TRT_BINDINGS = ("10.3.0", "10.13.3.9.post1", "11.4.0.106")


def _trt_names(source_files: list[Path]) -> set[str]:
    """Every TensorRT name the build and the backend use: `trt.X.Y` chains, attributes and keyword
    arguments on values that come from TensorRT (followed through assignments, by name, in each
    file), and the callbacks of the progress monitor."""
    names: set[str] = set()
    for path in source_files:
        names |= _TrtNames(ast.parse(path.read_text())).names
    return names


class _TrtNames:
    def __init__(self, tree: ast.AST):
        self.typed: set[str] = set()  # names assigned a TensorRT value, grown to a fixed point
        assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)]
        while grown := {self.ident(t) for a in assigns if self.from_trt(a.value) for t in a.targets} - {None} - self.typed:
            self.typed |= grown
        self.names: set[str] = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and (self.rooted(n) or self.from_trt(n.value)):
                self.names.add(n.attr)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and self.from_trt(n.func.value):
                self.names |= {k.arg for k in n.keywords if k.arg}
            if isinstance(n, ast.ClassDef) and any(isinstance(b, ast.Attribute) and self.rooted(b) for b in n.bases):
                self.names |= {f.name for f in n.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("__")}

    @staticmethod
    def ident(node) -> str | None:
        return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None

    @staticmethod
    def rooted(node) -> bool:  # trt, trt.X, trt.X.Y
        while isinstance(node, ast.Attribute):
            node = node.value
        return isinstance(node, ast.Name) and node.id == "trt"

    def from_trt(self, node) -> bool:
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            return self.rooted(node.func) or self.from_trt(node.func.value)
        return self.ident(node) in self.typed


@pytest.mark.parametrize("version", TRT_BINDINGS)
def test_every_tensorrt_name_exists_in_the_bindings(version, request):
    """TensorRT never runs here, so check each name the build and the backend use against the
    string table of TensorRT's compiled bindings (and the package's Python part). This proves a
    name exists in that release, not which class owns it. The linker shares string tails, so a
    name counts when it ends a stored string: INPUT is kept as the end of CONDITIONAL_INPUT and
    Builder as the end of IBuilder. A typo or a name a release removed still fails."""
    import re
    import subprocess
    import sys
    import zipfile

    from itemrt.backends import tensorrt as backend
    from itemrt.export import build

    folder = request.config.cache.mkdir("tensorrt-bindings")
    wheels = list(folder.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.11", "--platform", "manylinux_2_17_x86_64", "--platform",
               "manylinux_2_28_x86_64", "-d", str(folder), f"tensorrt-cu12-bindings=={version}"]
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            pytest.skip(f"fetching tensorrt-cu12-bindings {version} took over 300 s")
        wheels = list(folder.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
        if done.returncode or not wheels:
            pytest.skip(f"tensorrt-cu12-bindings {version} could not be fetched: {done.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        binary = z.read(next(n for n in z.namelist() if re.search(r"tensorrt_bindings/tensorrt[^/]*\.so$", n)))
        python = z.read("tensorrt_bindings/__init__.py").decode()
    names = _trt_names([Path(backend.__file__), Path(build.__file__)])
    assert {"execute_async_v3", "set_tensor_address", "set_optimization_profile_async", "STRONGLY_TYPED",
            "build_serialized_network", "ignore_mismatch", "phase_start", "nptype"} <= names
    in_python = {n for n in names if re.search(rf"^(def {n}\(|{n} = )", python, re.MULTILINE)}
    missing = sorted(n for n in names - in_python if n.encode() + b"\0" not in binary)
    assert not missing, f"not in TensorRT {version}'s bindings: {missing}"


# TensorRT's ONNX parser, from onnx-tensorrt's docs/operators.md for TensorRT 10 (opsets 9 to 20):
# each operator the engine graphs use, with the types the matrix lists for it. An operator an
# export change adds must be looked up there and added here (or the export changed back).
TRT_OPSETS = (9, 20)
TRT_ONNX_OPS = {
    "BOOL": {"And"},
    "FP32 FP16": {"Conv", "Einsum", "Elu", "Erf", "Gemm", "LayerNormalization", "MatMul", "Sigmoid", "Softmax"},
    "FP32 FP16 INT32 INT64": {"Add", "ArgMax", "Div", "Equal", "IsNaN", "LessOrEqual", "Mul", "Range", "ReduceL2"},
    "FP32 FP16 INT32 INT64 BOOL": {"Cast", "Concat", "Constant", "ConstantOfShape", "Expand", "Flatten", "Gather",
                                   "Identity", "Reshape", "Shape", "Slice", "Squeeze", "Transpose", "Unsqueeze", "Where"},
}
# Inputs the matrix requires to be initializers (the parser takes Constant outputs as such).
TRT_CONSTANT_INPUTS = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "ReduceL2": (1,)}
TRT_TYPE = {"FLOAT": "FP32", "FLOAT16": "FP16", "INT32": "INT32", "INT64": "INT64", "BOOL": "BOOL"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_graphs_use_only_what_tensorrt_parses(tiny_bundle, precision):
    """`item build` is never run here, so hold every graph it would parse to the ONNX checker
    (full check: sorted nodes, consistent types, which a strongly typed build relies on) and to
    TensorRT's ONNX support matrix: opset, operators, their types, the inputs that must be constant."""
    import onnx

    supported = {op: set(types.split()) for types, ops in TRT_ONNX_OPS.items() for op in ops}
    b = Bundle.open(tiny_bundle)
    problems, checked = [], 0
    for name in ENGINE_COMPONENTS:
        path, prec = b.component_path(name, precision)
        if prec != precision:
            continue  # this part's variant failed its gate; the build uses its FP32 graph, checked above
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)  # valid ONNX, sorted, types consistent
        model = onnx.shape_inference.infer_shapes(model)
        g = model.graph
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        if not TRT_OPSETS[0] <= opset <= TRT_OPSETS[1]:
            problems.append(f"{name}: opset {opset}")
        types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
        types |= {t.name: t.data_type for t in g.initializer}
        constants = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        for n in g.node:
            checked += 1
            where = f"{name}: {n.op_type} {n.name}"
            if n.domain not in ("", "ai.onnx") or n.op_type not in supported:
                problems.append(f"{where}: not in the matrix")
                continue
            tensors = [x for x in ((n.input[1],) if n.op_type == "Where" else n.input[:1]) if x]
            dtypes = [onnx.TensorProto.DataType.Name(types.get(x, 0)) for x in tensors]
            dtypes += [onnx.TensorProto.DataType.Name(a.i) for a in n.attribute if n.op_type == "Cast" and a.name == "to"]
            dtypes += [onnx.TensorProto.DataType.Name(a.t.data_type) for a in n.attribute if a.name == "value"]
            bad = [t for t in dtypes if TRT_TYPE.get(t) not in supported[n.op_type]]
            if bad:
                problems.append(f"{where}: type {bad}")
            for i in TRT_CONSTANT_INPUTS.get(n.op_type, ()):
                if i < len(n.input) and n.input[i] and n.input[i] not in constants:
                    problems.append(f"{where}: input {i} is computed, TensorRT needs it constant")
            if n.op_type == "LayerNormalization" and len([o for o in n.output if o]) > 1:
                problems.append(f"{where}: TensorRT gives only its first output")
    assert checked > 100 and not problems, problems

def _cuda_gpu() -> str | None:
    """None where cuda-python reaches a GPU, else why not (TensorRT is not needed)."""
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed"
    try:
        from itemrt.backends.tensorrt import device_info

        device_info()
    except Exception as e:  # noqa: BLE001 - any failure means no usable GPU here
        return f"no usable CUDA device: {e}"
    return None


def _gpu() -> str | None:
    if not HAVE_TRT:
        return "TensorRT is not installed (not obtainable in this workplace)"
    return _cuda_gpu()


@pytest.mark.skipif(_gpu() is not None, reason=str(_gpu()))
def test_tensorrt_build_and_backend_match_onnx_runtime(tiny_bundle, tmp_path, samples):
    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    assert item(["build", str(b), "--precision", "fp32", "--max-batch", "2", "--workspace-gb", "1"]) == 0
    rec = next(iter(Bundle.open(b).manifest["tensorrt"].values()))
    assert set(rec["plans"]) == set(ENGINE_COMPONENTS) and rec["compute_capability"]
    with Runtime(b, precision="fp32") as ort_rt, Runtime(b, backend="tensorrt", precision="fp32") as trt_rt:
        expected = ort_rt.detect_batch(samples[:2])
        # the second pass replays the decoder's CUDA graphs captured in the first
        for _ in range(2):
            for r_ort, r_trt in zip(expected, trt_rt.detect_batch(samples[:2])):
                assert r_trt.caption_tokens == r_ort.caption_tokens
                assert [o.word for o in r_trt.objects] == [o.word for o in r_ort.objects]
                assert r_trt.label == r_ort.label
                assert abs(r_trt.p_fake - r_ort.p_fake) < 1e-3


@pytest.mark.skipif(_cuda_gpu() is not None, reason=str(_cuda_gpu()))
def test_device_buffers_move_data_and_replay_captured_graphs_on_a_gpu():
    """The CUDA half of the TensorRT backend on a real GPU: pinned views, uploads, downloads, and
    the capture-once-then-replay protocol the decoder steps use. The work enqueued in place of
    an engine is a device-to-device copy, so every replay must see the data uploaded just before."""
    from itemrt.backends.tensorrt import (
        DeviceBuffers,
        _check,
        _cudart,
        device_info,
    )
    from itemrt.errors import GraphCaptureError

    cudart = _cudart()
    name, cc = device_info()
    assert name and cc[0] >= 5
    plan = BufferPlan.for_shapes({"ids": ((2, 5), "int64"), "a": ((4, 3), "float32"), "b": ((4, 3), "float32")})
    buf = DeviceBuffers(plan, _check(cudart.cudaStreamCreate()))
    d2d = cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
    enqueued = []

    def copy_a_to_b() -> bool:
        enqueued.append(1)
        _check(cudart.cudaMemcpyAsync(buf.address("b"), buf.address("a"), plan.slots["a"].nbytes, d2d, buf.stream))
        return True

    try:
        assert all(buf.address(n) % ALIGN == 0 for n in plan.slots)
        for k in range(3):  # plain run + capture, then two replays of the graph
            x = np.arange(12, dtype=np.float32).reshape(4, 3) * (k + 1)
            buf.upload("a", x)
            buf.view("b", (4, 3))[...] = -1
            assert buf.replay(("copy",), copy_a_to_b)
            buf.download("b", (4, 3))
            buf.sync()
            np.testing.assert_array_equal(buf.view("b", (4, 3)), x)
        assert len(enqueued) == 2 and list(buf.graphs) == [("copy",)]
        ids = np.arange(5, dtype=np.int64)[None]  # a smaller shape than the slot's maximum
        buf.upload("ids", ids)
        buf.view("ids", (1, 5))[...] = 0
        buf.download("ids", (1, 5))
        buf.sync()
        np.testing.assert_array_equal(buf.view("ids", (1, 5)), ids)

        def sync_inside() -> bool:  # synchronizing a capturing stream is illegal: the capture fails
            cudart.cudaStreamSynchronize(buf.stream)
            return True

        with pytest.raises(GraphCaptureError):
            buf.replay(("sync",), sync_inside)
        assert ("sync",) not in buf.graphs
        buf.upload("a", np.ones((4, 3), np.float32))  # the stream still works after the failed capture
        assert buf.replay(("copy",), copy_a_to_b)
        buf.download("b", (4, 3))
        buf.sync()
        assert (buf.view("b", (4, 3)) == 1).all()
    finally:
        buf.close()
