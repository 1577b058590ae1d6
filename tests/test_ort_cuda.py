"""The ort-cuda backend's sessions (I/O binding, tensors left on the device between graphs,
the decoder's ping-pong cache, fixed addresses per CUDA graph, the fallback when capture
fails) run here on ONNX Runtime's CPU provider with host OrtValues (`Device("cpu")`): the
same code the GPU runs, checked bit for bit against the plain host path. The last tests run
the real CUDA provider where onnxruntime-gpu and a GPU exist, and skip elsewhere."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest
from itemrt import Runtime
from itemrt.backends import BACKENDS, OrtCudaBackend, OrtGpuBackend
from itemrt.backends.ort_cuda import GATE, HANDOFFS, CaptureGate, Device, DeviceTensor, OrtDeviceSession
from itemrt.errors import BackendUnavailableError, InferenceError
from itemrt.stages.captioner import cross_inputs
from itemrt.stages.images import load_image
from itemrt.stages.preprocess import preprocess

PAIRS = ("global_image", "global_text", "local_image", "local_text", "scores")


def device_backend(monkeypatch, name: str, device: Device, session: type = OrtDeviceSession, steps: int | None = None):
    """Register the ort-cuda backend on another device (and session class) under `name`."""

    class Backend(OrtCudaBackend):
        def open(self, graph):
            s, precision = super().open(graph)
            if session is OrtDeviceSession and steps is None:
                return s, precision
            path, _ = self.bundle.component_path(graph, self.precision)
            return session(path, graph, s._options, self.device, keep=HANDOFFS.get(graph, ()),
                           capture=graph == "captioner_decoder", max_steps=steps or s.max_steps), precision

    Backend.device = device
    monkeypatch.setitem(BACKENDS, name, Backend)
    return name


def same(host, dev, images):
    """Both runtimes give exactly the same answers and matched pairs."""
    want, got = host.analyze_batch(images), dev.analyze_batch(images)
    for a, b in zip(want, got):
        assert b.result.caption_tokens == a.result.caption_tokens
        assert b.result.p_fake == a.result.p_fake
        assert [(o.word, o.found, o.box, o.score) for o in b.result.objects] == \
               [(o.word, o.found, o.box, o.score) for o in a.result.objects]
        for f in PAIRS:
            assert np.array_equal(getattr(b.pairs, f), getattr(a.pairs, f)), f
    return [a.result.caption for a in want]


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graphs", [True, False], ids=["fixed", "plain"])
def test_device_sessions_match_the_host_path_bit_for_bit(tiny_bundle, samples, monkeypatch, precision, graphs):
    """Batches of 1 and 3, images repeated after others: with fixed addresses, what a step reads
    (ids, cross K/V, the cache) must be the new image's, not the one before (the CUDA-graph
    replay pitfall: a graph keeps reading the addresses it was captured with)."""
    name = device_backend(monkeypatch, "cpu-device", Device("cpu", graphs=graphs))
    with Runtime(tiny_bundle, precision=precision, threads=1) as host, \
         Runtime(tiny_bundle, precision=precision, threads=1, backend=name) as dev:
        assert dev.precisions == host.precisions
        assert all(isinstance(s, OrtDeviceSession) for s in dev.sessions.values())
        captions = []
        for batch in ([samples[0]], samples[:3], [samples[1]], [samples[0]], [samples[2]]):
            captions += same(host, dev, batch)
        decoder = dev.sessions["captioner_decoder"]
        assert decoder.fixed == graphs
    assert len(set(captions)) >= 2  # different images do give different captions here


def test_handoffs_stay_on_the_device_and_the_rest_comes_back(tiny_bundle, samples, monkeypatch):
    name = device_backend(monkeypatch, "cpu-device", Device("cpu"))
    with Runtime(tiny_bundle, precision="fp32", threads=1, backend=name) as rt, \
         Runtime(tiny_bundle, precision="fp32", threads=1) as host:
        img = [load_image(samples[0])]
        px_cap, px_det = preprocess([(img, rt.specs["captioner"]), (img, rt.specs["detector"])])
        emb = rt.captioner.encode_image(px_cap)
        assert isinstance(emb, DeviceTensor)  # captioner vision -> cross K/V: never on the host
        assert np.array_equal(np.asarray(emb), host.captioner.encode_image(px_cap))
        k, v = rt.captioner.cross_kv(emb)
        assert isinstance(k, DeviceTensor) and isinstance(v, DeviceTensor)
        hk, hv = host.captioner.cross_kv(host.captioner.encode_image(px_cap))
        assert np.array_equal(np.asarray(k), hk) and np.array_equal(np.asarray(v), hv)
        # one decoder input per layer, each a part of the stacked value: addresses, nothing copied
        layers = list(k)
        assert [x.address - k.address for x in layers] == [i * k.nbytes // len(k) for i in range(len(k))]
        assert all(x.base is k.base for x in layers)
        assert np.array_equal(np.asarray(layers[1]), hk[1])
        out = rt.detector.encode_image(px_det)
        kept = set(HANDOFFS["detector_image"])
        assert {n for n, x in out.items() if isinstance(x, DeviceTensor)} == kept
        assert isinstance(out["pred_boxes"], np.ndarray)  # boxes are read on the host
        want = host.detector.encode_image(px_det)
        queries = host.bank.detector[host.bank.rows(list(host.vocabulary.objects)[:3])][None]
        logits = rt.detector.logits(out, queries)
        assert isinstance(logits, np.ndarray) and np.array_equal(logits, host.detector.logits(want, queries))
        everything = rt.sessions["detector_image"].run_on_device({"pixel_values": px_det})
        assert all(isinstance(x, DeviceTensor) for x in everything.values())


def test_decoder_steps_past_the_buffers_run_unbuffered(tiny_bundle, samples, monkeypatch):
    """Buffers hold the bundle's max_new_tokens; a caller asking for more (or a smaller
    buffer, as here) carries on from the last buffered half, with the same tokens."""
    name = device_backend(monkeypatch, "cpu-short", Device("cpu"), steps=3)
    with Runtime(tiny_bundle, precision="fp32", threads=1) as host, \
         Runtime(tiny_bundle, precision="fp32", threads=1, backend=name) as dev:
        assert dev.sessions["captioner_decoder"].max_steps == 3
        for batch in ([samples[0]], samples[1:3]):
            same(host, dev, batch)
        assert len(host.detect(samples[0]).caption_tokens) > 3  # the unbuffered steps did run


def test_buffers_and_graph_ids_are_per_thread_and_batch(tiny_bundle, samples, monkeypatch):
    name = device_backend(monkeypatch, "cpu-device", Device("cpu"))
    with Runtime(tiny_bundle, precision="fp32", threads=1, backend=name) as rt:
        decoder = rt.sessions["captioner_decoder"]
        r = rt.detect(samples[0])
        rt.detect_batch(samples[:2])
        rt.detect(samples[1])
        (worker,) = decoder._workers
        assert set(worker.buffers) == {1, 2}
        steps = len(r.caption_tokens)
        # one id per (batch, past length) used, never the default 0
        assert (1, steps - 1) in worker.graphs and 0 not in worker.graphs.values()
        assert len(set(worker.graphs.values())) == len(worker.graphs)
        b = worker.buffers[1]
        first = (b.kv[0].data_ptr(), b.kv[1].data_ptr(), b.ids.data_ptr(), b.logits.data_ptr())
        rt.detect(samples[2])  # the same thread, the same addresses: what a captured graph needs
        assert (b.kv[0].data_ptr(), b.kv[1].data_ptr(), b.ids.data_ptr(), b.logits.data_ptr()) == first
        # fixed mode binds cross K/V from the worker's buffers (copied once), not where they were made
        img = [load_image(samples[3])]
        k, v = rt.captioner.cross_kv(rt.captioner.encode_image(preprocess([(img, rt.specs["captioner"])])[0]))
        spec = rt.captioner.spec
        kv = decoder.kv_loop(dict(zip(cross_inputs(spec.layers), [*k, *v])),
                             (spec.layers, 2, 1, spec.heads, 0, spec.head_dim))
        assert {id(x.base) for x in kv.cross.values()} == {id(x) for x in b.cross.values()} and len(b.cross) == 2
        assert np.array_equal(np.asarray(kv.cross["cross_v.1"]), np.asarray(v)[1])
        done = []
        t = threading.Thread(target=lambda: done.append(rt.detect(samples[0]).caption_tokens))
        t.start()
        t.join()
        assert done == [r.caption_tokens] and len(decoder._workers) == 2  # another thread, its own buffers
    assert not decoder._workers  # closed: buffers released


class RefusedCapture(OrtDeviceSession):
    """A decoder whose CUDA-graph capture fails the way ONNX Runtime reports it (an error from
    the capturing run); everything else runs on ONNX Runtime as usual."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        if self.fixed and "present_kv" in self.outputs:
            self.captures, self.graphs_off = True, None  # as on CUDA: the first run of each graph id captures
        self.refused = 0

    def _execute(self, io, run_options):
        if self.captures and run_options.get_run_config_entry("gpu_graph_id") != "-1":
            self.refused += 1
            raise InferenceError(f"{self.name} failed in ONNX Runtime: operation not permitted when stream is capturing")
        super()._execute(io, run_options)


def test_a_failed_capture_falls_back_to_plain_steps(tiny_bundle, samples, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="itemrt.backends.ort_cuda")  # the export lifts the root level
    name = device_backend(monkeypatch, "cpu-refused", Device("cpu"), session=RefusedCapture)
    with Runtime(tiny_bundle, precision="fp32", threads=1) as host, \
         Runtime(tiny_bundle, precision="fp32", threads=1, backend=name) as dev:
        decoder = dev.sessions["captioner_decoder"]
        assert decoder.captures and decoder.graphs_off is None
        same(host, dev, [samples[0]])  # the step that failed to capture ran again, plainly
        assert decoder.refused == 1 and not decoder.captures
        assert "capture failed at past length 0" in decoder.graphs_off
        assert "without CUDA graphs" in caplog.text
        same(host, dev, samples[1:3])
        assert decoder.refused == 1  # never tried again


def test_a_decoder_that_cannot_be_captured_opens_without_graphs(tiny_bundle):
    """ONNX Runtime refuses `enable_cuda_graph` at session creation when a graph has nodes off
    the CUDA EP, memcpy nodes or control flow. Here a device refuses it the same way (the
    CPU provider has no capture to refuse); the session then opens plainly and says why."""
    from itemrt.bundle import Bundle
    from itemrt.errors import BundleError

    refusal = "This session cannot use the graph capture feature as requested by the user"

    class Refusing(Device):
        @property
        def capture(self):
            return True

        def providers(self, capture=False):
            if capture:
                raise BundleError(f"ONNX Runtime could not load captioner_decoder: {refusal}")
            return ("CPUExecutionProvider",)

    path, _ = Bundle.open(tiny_bundle).component_path("captioner_decoder", "fp32")
    s = OrtDeviceSession(path, "captioner_decoder", device=Refusing("cpu"), capture=True)
    assert not s.captures and s.graphs_off.startswith("ONNX Runtime cannot capture captioner_decoder") and refusal in s.graphs_off
    assert s._sess.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(BundleError):  # a graph that does not load at all still fails loudly
        OrtDeviceSession(path.with_name("missing.onnx"), "captioner_decoder", device=Device("cpu"), capture=True)


def test_cuda_provider_options():
    d = Device("cuda", 1, stream=1234, cuda_options={"arena_extend_strategy": "kSameAsRequested"})
    (name, opts), cpu = d.providers()
    assert name == "CUDAExecutionProvider" and cpu == "CPUExecutionProvider"
    assert opts == {"device_id": "1", "arena_extend_strategy": "kSameAsRequested",
                    "has_user_compute_stream": "1", "user_compute_stream": "1234"}
    assert d.providers(capture=True)[0][1]["enable_cuda_graph"] == "1"
    assert d.capture and not Device("cpu").capture and not Device("cuda", graphs=False).capture
    assert Device("cpu").providers(capture=True) == ("CPUExecutionProvider",)


def test_capture_runs_alone_and_waiting_captures_go_first():
    gate, log = CaptureGate(), []

    def reader(tag, hold):
        with gate.shared():
            log.append(f"{tag}+")
            time.sleep(hold)
            log.append(f"{tag}-")

    def writer():
        with gate.alone():
            log.append("W+")
            time.sleep(0.05)
            log.append("W-")

    r1 = threading.Thread(target=reader, args=("r1", 0.2))
    r1.start()
    time.sleep(0.05)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.05)
    r2 = threading.Thread(target=reader, args=("r2", 0))
    r2.start()
    for t in (r1, w, r2):
        t.join()
    # the capture waited for r1 to finish, and r2 (arriving while it waited) waited for the capture
    assert log == ["r1+", "r1-", "W+", "W-", "r2+", "r2-"]
    assert GATE is not gate


def test_backend_entries():
    assert BACKENDS["ort-cuda"] is OrtCudaBackend and BACKENDS["ort-tensorrt"] is OrtGpuBackend
    assert issubclass(OrtCudaBackend, OrtGpuBackend)  # fp16 where gated, fp32/fp16 only


# --- the prepared GPU check, rehearsed ----------------------------------------------------------


def test_wheel_parts_are_joined_and_checked(tmp_path):
    import hashlib

    from itemrt.bench.gpu_check import join_parts

    sent, joined = tmp_path / "sent", tmp_path / "joined"
    sent.mkdir()
    data = bytes(range(256)) * 1000
    name = "pkg-1.0-py3-none-any.whl"
    (sent / f"{name}.sha256").write_text(hashlib.sha256(data).hexdigest() + f"  {name}\n")
    for i in range(3):
        (sent / f"{name}.part-{i:02d}").write_bytes(data[i * 100_000 : (i + 1) * 100_000])
    (sent / "other-2.0-py3-none-any.whl").write_bytes(b"whole")
    wheels = join_parts(sent, joined)
    assert [w.name for w in wheels] == ["other-2.0-py3-none-any.whl", name]
    assert (joined / name).read_bytes() == data
    (sent / f"{name}.part-01").unlink()  # a part that never arrived
    with pytest.raises(ValueError, match="sha256"):
        join_parts(sent, joined)


def test_gpu_check_rehearses_on_cpu(tiny_bundle, tmp_path):
    """The whole prepared GPU run on this CPU: every step runs or says why not, and the report
    is written; ort-cuda's parity step runs its own code on the CPU provider."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    cmd = [sys.executable, str(root / "benchmarks" / "gpu_check.py"), "--cpu", "--bundle", str(tiny_bundle),
           "--work", str(tmp_path / "work"), "--out", str(out), "--runs", "1", "--warmup", "1", "--batch-sizes", "1",
           "--skip", "tests", "bench-compile", "--budget-s", "500"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads((out / "gpu-check.json").read_text())
    steps = rep["steps"]
    assert rep["mode"] == "cpu rehearsal"
    assert [steps[s]["status"] for s in ("environment", "install", "export", "doctor", "parity")] == ["ok"] * 5
    assert steps["doctor"]["detail"].startswith("ort-cuda cannot run here")
    parity = steps["parity"]["data"]
    assert parity["passed"] and parity["backend"] == "ort-cuda-cpu" and len(parity["runs"]) >= 5
    assert all(r["same_as_first_time"] for r in parity["runs"])
    bench = steps["bench-ort"]["data"]["backends"]
    assert bench["ort-cuda-fp16"]["status"] == "skipped" and "CUDAExecutionProvider" in bench["ort-cuda-fp16"]["reason"]
    assert bench["ort-fp16"]["status"] == "ok" and bench["ort-fp16"]["outputs_match_reference"]
    eager = steps["bench-eager"]["data"]["backends"]["reference-cuda-fp16"]
    assert eager["status"] == "skipped" and "CUDA" in eager["reason"]
    assert "bench-compile" not in steps
    assert rep["goals"]["p50_ms"]["status"] == "not measured" and rep["goals"]["outputs_kept"]["status"] == "met"
    assert (out / "gpu-check.md").read_text().startswith("# GPU check (cpu rehearsal)")
    assert (out / "bench-ort.json").exists()


# --- the CUDA provider itself, where it exists -------------------------------------------------


def _cuda_ready() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)"
    return None


def test_without_the_cuda_provider_ort_cuda_names_the_package(tiny_bundle):
    if _cuda_ready() is None:
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        Runtime(tiny_bundle, backend="ort-cuda")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ort_cuda_on_a_gpu_keeps_the_answers(tiny_bundle, samples, monkeypatch, precision):
    """On the CUDA provider, every image again after others (replayed CUDA graphs must read the
    new image): each gives the caption it gave the first time, and different images different
    ones. FP32 without TF32 gives the host's tokens too; FP16 keeps the decisions."""
    if why := _cuda_ready():
        pytest.skip(why)
    name = device_backend(monkeypatch, "ort-cuda-exact", Device("cuda", cuda_options={"use_tf32": "0"}))
    with Runtime(tiny_bundle, precision="fp32") as host, Runtime(tiny_bundle, precision=precision, backend=name) as gpu:
        decoder = gpu.sessions["captioner_decoder"]
        order = [0, 1, 0, 2, 1, 3, 0, 3, 2]
        want = {i: host.detect(samples[i]) for i in set(order)}
        first = {}
        for i in order:
            got = gpu.detect(samples[i])
            assert first.setdefault(i, got.caption_tokens) == got.caption_tokens, (i, decoder.graphs_off)
            assert got.label == want[i].label
            if precision == "fp32":
                assert got.caption_tokens == want[i].caption_tokens, (i, decoder.graphs_off)
                assert [o.word for o in got.objects] == [o.word for o in want[i].objects]
                assert abs(got.p_fake - want[i].p_fake) < 1e-4
        if len({tuple(w.caption_tokens) for w in want.values()}) > 1:
            assert len({tuple(t) for t in first.values()}) > 1
        batch = gpu.detect_batch(samples)
        assert [r.caption_tokens for r in batch] == [first[i] for i in range(len(samples))]
        print(f"ort-cuda {precision}: decoder CUDA graphs: {decoder.graphs_off or 'on'}")
