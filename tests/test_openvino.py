"""BF16 on OpenVINO: the session keeps the runtime's name-based I/O and thread safety, matches
ONNX Runtime FP32 to BF16 accuracy, and its absence fails loudly, up front, with what to install."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from itemrt.backends.openvino import bf16_support
from itemrt.backends.ort import OrtSession


@pytest.fixture(scope="module")
def bf16():
    if (why := bf16_support()) is not None:
        pytest.skip(why)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_session_matches_onnxruntime_and_keeps_graph_names(bf16, tiny_bundle):
    from itemrt.backends.openvino import OvSession

    path = tiny_bundle / "detector_image.onnx"
    ov, ort = OvSession(path, "detector_image"), OrtSession(path, "detector_image")
    # OpenVINO merges tensors while compiling; the session still speaks the graph's own names.
    assert ov.inputs == ort.inputs and ov.outputs == ort.outputs
    x = np.random.default_rng(0).standard_normal((3, 3, 64, 64)).astype(np.float32)
    got, want = ov.run({"pixel_values": x}), ort.run({"pixel_values": x})
    for name in ort.outputs:
        assert got[name].shape == want[name].shape and got[name].dtype == np.float32
        assert _cos(got[name], want[name]) > 0.999, name
        assert not np.array_equal(got[name], want[name]), "BF16 really ran (FP32 would be bit-equal or nearly)"
    assert list(ov.run({"pixel_values": x}, ["pred_boxes"])) == ["pred_boxes"]


def test_session_fails_loudly_on_wrong_inputs(bf16, tiny_bundle):
    from itemrt.backends.openvino import OvSession

    s = OvSession(tiny_bundle / "clip_image.onnx", "clip_image")
    with pytest.raises(ValueError, match="inputs are"):
        s.run({"pixels": np.zeros((1, 3, 32, 32), np.float32)})
    with pytest.raises(TypeError, match="must be float32"):
        s.run({"pixel_values": np.zeros((1, 3, 32, 32), np.float64)})


def test_session_is_safe_across_threads(bf16, tiny_bundle):
    """Each thread gets its own infer request; outputs are copies, not views of its buffers."""
    from itemrt.backends.openvino import OvSession

    s = OvSession(tiny_bundle / "clip_image.onnx", "clip_image")
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((n, 3, 32, 32)).astype(np.float32) for n in (1, 2, 3, 4) * 4]
    serial = [s.run({"pixel_values": x})["image_embeds"] for x in xs]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda x: s.run({"pixel_values": x})["image_embeds"], xs))
    held = s.run({"pixel_values": xs[0]})["image_embeds"]
    s.run({"pixel_values": xs[3]})
    assert np.array_equal(held, serial[0]), "a later call overwrote an earlier result"
    for a, b in zip(serial, threaded):
        np.testing.assert_array_equal(a, b)


def test_bf16_is_a_cpu_path(bf16, tiny_bundle):
    from itemrt import Runtime

    with pytest.raises(ValueError, match="CPU path"):
        Runtime(tiny_bundle, precision="bf16", backend="ort-cuda")


def test_without_openvino_bf16_fails_up_front_with_what_to_install(tiny_bundle, tmp_path):
    """OpenVINO made unimportable in a fresh interpreter: the runtime and the export (before any
    model is loaded) raise BackendUnavailableError naming the extra; fp32 still runs."""
    from itemrt.bundle import Bundle

    has_bf16 = "bf16" in Bundle.open(tiny_bundle).precisions()  # else Runtime refuses for that reason
    script = textwrap.dedent(f"""
        import sys, time
        sys.modules["openvino"] = None  # what `import openvino` meets when it is not installed
        from itemrt import Runtime
        from itemrt.errors import BackendUnavailableError
        from itemrt.export.pipeline import export_bundle
        attempts = [lambda: export_bundle({str(tmp_path / "b")!r}, random_init="tiny", precisions=("bf16",))]
        if {has_bf16}:
            attempts.append(lambda: Runtime({str(tiny_bundle)!r}, precision="bf16"))
        for attempt in attempts:
            t0 = time.perf_counter()
            try:
                attempt()
                raise SystemExit("no error")
            except BackendUnavailableError as e:
                assert "itemrt[openvino]" in str(e), e
                assert time.perf_counter() - t0 < 5, "refused before any work"
        with Runtime({str(tiny_bundle)!r}, precision="fp32") as rt:
            assert rt.sessions
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    assert not (tmp_path / "b").exists()
