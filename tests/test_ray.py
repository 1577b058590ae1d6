"""ITEM-RT on a real Ray cluster on this machine: `item serve --engine ray` (Ray Serve replicas
behind the gateway's HTTP contract) and `item features --engine ray` (a Ray Data actor pool
writing the same store). One cluster for the module, 2 CPUs, every Ray port on loopback, no
dashboard; it stops with the module. The serve tests run in file order: the last one drains
and removes the app."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

# Before ray is imported: Ray's single-machine mode, every server on 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np  # noqa: E402
import ray  # noqa: E402
from itemrt.bench.hostile import pixel_bomb_png, scan_bomb_jpeg, thin_png  # noqa: E402
from itemrt.bench.load import free_port, request, server_log, start_server  # noqa: E402
from itemrt.cli import main as item  # noqa: E402
from itemrt.datasets.features import LOG, read_features  # noqa: E402
from ray import serve  # noqa: E402
from test_images import _png_claiming  # noqa: E402
from test_serve import _cmyk, _multipart, _png16  # noqa: E402
from test_train import make_dataset, make_image  # noqa: E402

TOKEN = "s3cret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def cluster(tiny_bundle):
    """A local Ray cluster; its address for the commands' --address, its metrics port."""
    metrics_port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=metrics_port, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 500})
    try:
        yield {"address": ray.get_runtime_context().gcs_address, "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest.fixture(scope="module")
def ray_app(cluster, tiny_bundle, token_file):
    """`item serve --engine ray` with two replicas of the tiny bundle on the module's cluster."""
    port = free_port()
    proc = start_server(str(tiny_bundle), port, "--engine", "ray", "--address", cluster["address"],
                        "--replicas", "2", "--num-cpus", "0.5", "--precision", "fp32", "--max-batch", "4",
                        "--max-wait-ms", "50", "--max-upload-mb", "1", "--token-file", token_file)
    yield {"port": port, "proc": proc}
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=120)


@pytest.fixture(scope="module")
def item_serve(tiny_bundle, token_file):
    """`item serve` with the same settings: the answers the Ray app must give."""
    port = free_port()
    proc = start_server(str(tiny_bundle), port, "--precision", "fp32", "--max-upload-mb", "1",
                        "--token-file", token_file)
    yield port
    proc.terminate()
    proc.wait(timeout=60)


def _post(port: int, data: bytes, ctype: str = "image/jpeg", path: str = "/v1/detect",
          headers: dict | None = None) -> tuple[int, dict | str]:
    status, body = request(port, "POST", path, data, {"content-type": ctype, **AUTH, **(headers or {})})
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def _differences(answer: dict, expected: dict) -> dict:
    """Fields where an HTTP answer and Runtime.detect's result differ: (answer's, result's)."""
    # `bundle`: the gateway answers with the bundle's details, the result has its name
    got, want = (json.loads(json.dumps(d)) for d in (answer, expected))
    return {k: (got.get(k), v) for k, v in want.items() if k not in ("timings_ms", "bundle") and got.get(k) != v}


def _ray_metrics(cluster, want: str, timeout_s: float = 90.0) -> str:
    """Ray's Prometheus text for this node, once it has a line matching `want`."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = request(cluster["metrics_port"], "GET", "/metrics", timeout=10)[1].decode()
        if re.search(want, text) or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _load(port: int, images: list[bytes], stop: threading.Event, callers: int) -> tuple[list, list[threading.Thread]]:
    """Clients posting until `stop`: (status, start, end) for every request."""
    out, lock = [], threading.Lock()

    def client(i: int):
        n = i
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                status = _post(port, images[n % len(images)])[0]
            except OSError as e:
                status = type(e).__name__
            with lock:
                out.append((status, t0, time.monotonic()))
            n += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    return out, threads


# --- Ray Serve ---------------------------------------------------------------------------------


def test_concurrent_answers_equal_runtime_detect_in_batches(cluster, ray_app, runtime, samples):
    """Concurrent HTTP clients on two replicas: every answer is Runtime.detect's on the same image,
    images from different requests shared a pass, and both replicas ran; Ray's metrics and the
    per-stage latencies are exported."""
    port = ray_app["port"]
    blobs = [p.read_bytes() for p in samples]
    expected = [runtime.detect(b).to_dict() for b in blobs]  # provenance too: read from the bytes sent
    answers, lock = [], threading.Lock()

    def client(i: int):
        for j in range(6):
            k = (i + j) % len(blobs)
            status, r = _post(port, blobs[k])
            with lock:
                answers.append((k, status, r))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    body, h = _multipart([("images", b) for b in blobs])
    status, many = _post(port, body, h["content-type"], "/v1/detect/batch")
    for t in threads:
        t.join()
    assert status == 200 and len(many["results"]) == len(blobs)
    assert [_differences(r, e) for r, e in zip(many["results"], expected)] == [{}] * len(blobs)
    assert [s for _, s, _ in answers] == [200] * 48, [r for _, s, r in answers if s != 200][:3]
    assert [_differences(r, expected[k]) for k, _, r in answers] == [{}] * 48
    assert answers[0][2]["bundle"]["name"] == "tiny" and answers[0][2]["bundle"]["precision"] == "fp32"
    # the results of one pass share its timings: a repeated timing is a batch of more than one
    passes = Counter(json.dumps(r["timings_ms"], sort_keys=True) for _, _, r in answers)
    assert max(passes.values()) > 1, passes.values()

    text = _ray_metrics(cluster, r'ray_itemrt_batch_size_count\{[^}]*deployment="Detector"[^}]*replica="[^"]+"}')
    batches = re.findall(r'ray_itemrt_batch_size_(sum|count)\{[^}]*replica="([^"]+)"[^}]*\} (\S+)', text)
    per_replica = Counter(r for kind, r, _ in batches if kind == "count")
    assert len(per_replica) == 2, batches  # both replicas took work
    total = {kind: sum(float(v) for k, _, v in batches if k == kind) for kind in ("sum", "count")}
    assert total["sum"] > total["count"]  # images per pass above one on average
    assert re.search(r'ray_itemrt_stage_seconds_bucket\{[^}]*stage="clip_image"', text)
    assert re.search(r'ray_serve_num_http_requests_total\{[^}]*application="itemrt"', text)
    assert re.search(r'ray_serve_deployment_processing_latency_ms_bucket\{[^}]*deployment="Detector"', text)
    gateway = request(port, "GET", "/metrics", headers=AUTH)[1].decode()
    assert 'itemrt_requests_total{endpoint="/v1/detect",status="200"} 48.0' in gateway
    assert "itemrt_in_flight_images 0.0" in gateway and "itemrt_queued_images 0.0" in gateway
    status, info = request(port, "GET", "/v1/info", headers=AUTH)
    info = json.loads(info)
    assert status == 200 and info["precisions"] == runtime.precisions and info["settings"]["auth"] is True


def _retries(port: int) -> float:
    text = request(port, "GET", "/metrics", headers=AUTH)[1].decode()
    return float(re.search(r"^itemrt_replica_retries_total (\S+)$", text, re.MULTILINE).group(1))


def _healthy(timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s  # Serve replaces a replica that died
    while serve.status().applications["itemrt"].deployments["Detector"].status != "HEALTHY":
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.2)


def test_killing_a_replica_under_load_fails_no_request(cluster, ray_app, samples):
    """ray.kill of a replica while clients keep sending: every client gets its 200. Ray's router
    re-sends on its own a request that its replica had not yet taken; one that the replica had
    taken reaches the ingress as ActorDiedError and the ingress sends it again. A kill lands on
    such a request most of the time, not always: up to five kills, until one did."""
    port = ray_app["port"]
    detector = serve.get_deployment_handle("Detector", app_name="itemrt")
    stop = threading.Event()
    out, threads = _load(port, [p.read_bytes() for p in samples], stop, callers=8)
    kills = 0
    try:
        while kills < 5 and _retries(port) == 0:
            answered = len(out)
            while len(out) < answered + 12:  # traffic on both replicas
                time.sleep(0.01)
            victim = detector.whoami.remote().result(timeout_s=60)
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            kills += 1
            time.sleep(0.5)
            _healthy()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    statuses = Counter(s for s, _, _ in out)
    assert statuses == {200: len(out)}, statuses
    assert _retries(port) >= 1, f"{kills} kills and no image was in flight on its replica"


def test_the_ingress_admits_images_as_item_serve_does():
    """The gateway's bound on images in flight, kept by the ingress (Ray queues nothing in front
    of it): past it QueueFull (429), and none once closing. Admission never touches Ray."""
    from itemrt.errors import QueueFull
    from itemrt.gateways.ray_serve import RemoteBatcher

    b = RemoteBatcher(None, max_in_flight=3, retries=2)
    with b.admit(2):
        with pytest.raises(QueueFull, match="2 images in flight"):
            with b.admit(2):
                pass
        with b.admit(1):
            assert b.in_flight == 3
    assert b.in_flight == 0
    b.close(timeout_s=1)
    with pytest.raises(QueueFull, match="shutting down"):
        with b.admit(1):
            pass


def _hostile_inputs(jpg: bytes) -> dict[str, tuple]:
    """name -> (body, content type, path, extra headers): bad and hostile uploads of every kind."""
    body, h = _multipart([("images", jpg), ("images", b"not an image")])
    many, hm = _multipart([("images", b"x")] * 17)
    return {
        "body over --max-upload-mb": (b"x" * (2 << 20), "image/jpeg", "/v1/detect", {}),
        "text": (b"hello", "text/plain", "/v1/detect", {}),
        "no content type": (b"hello", "", "/v1/detect", {}),
        "not an image": (b"this is not an image", "image/jpeg", "/v1/detect", {}),
        "empty": (b"", "image/jpeg", "/v1/detect", {}),
        "truncated JPEG": (jpg[:300], "image/jpeg", "/v1/detect", {}),
        "header claims 10^10 pixels": (_png_claiming(100_000, 100_000), "image/png", "/v1/detect", {}),
        "thin 1x20000 PNG": (thin_png(1, 20000), "image/png", "/v1/detect", {}),
        "wide 20000x1 PNG": (thin_png(20000, 1), "image/png", "/v1/detect", {}),
        "progressive JPEG, 2000 scans": (scan_bomb_jpeg(2000, 2000, 2000), "image/jpeg", "/v1/detect", {}),
        "RGBA PNG 2000x2000": (pixel_bomb_png(2000, 2000), "image/png", "/v1/detect", {}),
        "CMYK JPEG": (_cmyk(), "image/jpeg", "/v1/detect", {}),
        "16-bit PNG": (_png16(), "application/octet-stream", "/v1/detect", {}),
        "broken multipart": (b"--nope\r\ngarbage", "multipart/form-data; boundary=nope", "/v1/detect", {}),
        "batch with a bad image": (body, h["content-type"], "/v1/detect/batch", {}),
        "batch of 17": (many, hm["content-type"], "/v1/detect/batch", {}),
        "raw body to batch": (jpg, "image/jpeg", "/v1/detect/batch", {}),
        "no token": (jpg, "image/jpeg", "/v1/detect", {"authorization": ""}),
        "wrong token": (jpg, "image/jpeg", "/v1/detect", {"authorization": "Bearer wrong"}),
    }


def test_hostile_inputs_get_the_same_answers_as_item_serve(ray_app, item_serve, samples):
    jpg = samples[0].read_bytes()
    for name, (data, ctype, path, headers) in _hostile_inputs(jpg).items():
        answers = [_post(port, data, ctype, path, headers) for port in (ray_app["port"], item_serve)]
        (ray_status, on_ray), (status, local) = answers
        assert ray_status == status, (name, on_ray, local)
        if status != 200:
            assert on_ray == local and on_ray["error"], (name, on_ray, local)
        else:  # the whole answer but the timings
            assert {**on_ray, "timings_ms": None} == {**local, "timings_ms": None}, name
    for path in ("/healthz", "/readyz"):  # no token needed, as in item serve
        assert request(ray_app["port"], "GET", path)[0] == 200
    assert request(ray_app["port"], "GET", "/metrics")[0] == 401


def test_the_lean_runtime_never_imports_ray():
    code = ("import sys, itemrt, itemrt.cli, itemrt.gateways.server, itemrt.datasets.features, itemrt.ray_cluster; "
            "itemrt.cli.build_parser(); sys.exit('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120, check=False).returncode == 0


def test_config_file_is_a_valid_serve_config(tiny_bundle, token_file, tmp_path):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    out = tmp_path / "serve.yaml"
    assert item(["serve", str(tiny_bundle), "--engine", "ray", "--min-replicas", "1", "--max-replicas", "4",
                 "--num-gpus", "0.5", "--host", "0.0.0.0", "--port", "8000", "--token-file", token_file,
                 "--write-config", str(out)]) == 0
    config = ServeDeploySchema.model_validate(yaml.safe_load(out.read_text()))
    (application,) = config.applications
    assert application.import_path == "itemrt.gateways.ray_serve:app"
    assert application.args == {"bundle": str(tiny_bundle.resolve()), "min_replicas": 1, "max_replicas": 4,
                                "num_gpus": 0.5, "token_file": token_file}
    assert TOKEN not in out.read_text()
    from itemrt.gateways.ray_serve import app

    assert isinstance(app(application.args), serve.Application)  # what `serve deploy` builds from it
    with pytest.raises(ValueError, match="unknown arguments"):
        app({"bundle": str(tiny_bundle), "replicaz": "2"})
    with pytest.raises(ValueError, match="token_file"):
        app({"bundle": str(tiny_bundle), "token": TOKEN})


def test_sigterm_drains_and_removes_the_app(cluster, ray_app, samples):
    """SIGTERM to `item serve --engine ray` while clients keep sending: Serve stops routing to
    the app and answers what it routed, then the command removes the app and exits. Every answer
    is a 200, or the proxy's refusal of a request that never reached the gateway (404 / 503 once
    the app is going); none is lost or cut, and requests in flight at the signal were answered."""
    port, proc = ray_app["port"], ray_app["proc"]
    stop = threading.Event()
    out, threads = _load(port, [p.read_bytes() for p in samples], stop, callers=6)
    try:
        while len(out) < 12:
            time.sleep(0.01)
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, server_log(proc)[-3000:]
        gone = time.monotonic()
        while sum(1 for _, t0, _ in out if t0 > gone) < 6:  # the app is gone: what do clients get now
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    log = server_log(proc)
    assert "draining 'itemrt'" in log and "item serve: stopped" in log
    statuses = Counter(s for s, _, _ in out)
    assert set(statuses) <= {200, 404, 503}, statuses
    assert all(s != 200 for s, t0, _ in out if t0 > gone)  # routed nowhere once removed
    assert any(s == 200 and t0 < signalled < t1 for s, t0, t1 in out)  # in flight at the signal: answered
    assert "itemrt" not in serve.status().applications


# --- Ray Data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ray-dataset"))


def test_features_on_ray_equal_a_single_machine_run(cluster, dataset, tiny_bundle, tmp_path):
    """The same store: every column of every row (in the dataset's order), the meta, bad.jsonl."""
    common = [str(dataset), "--bundle", str(tiny_bundle), "--precision", "fp32", "--batch-size", "2"]
    assert item(["features", *common, "--out", str(tmp_path / "local")]) == 0
    assert item(["features", *common, "--out", str(tmp_path / "ray"), "--engine", "ray",
                 "--address", cluster["address"], "--actors", "2", "--num-cpus", "0.25"]) == 0
    local, on_ray = read_features(tmp_path / "local"), read_features(tmp_path / "ray")
    assert on_ray.meta == local.meta and len(on_ray) == len(local) == 88
    assert on_ray.columns.keys() == local.columns.keys()
    for k, col in local.columns.items():
        assert on_ray.columns[k].dtype == col.dtype and np.array_equal(on_ray.columns[k], col, equal_nan=col.dtype.kind == "f"), k
    assert on_ray.bad == local.bad and [b["key"] for b in on_ray.bad] == ["train/fake/gan/broken.png"]


def test_a_bad_bundle_on_the_cluster_is_a_one_line_error(cluster, dataset, tmp_path, capsys):
    rc = item(["features", str(dataset), "--bundle", str(tmp_path / "no-bundle"), "--out", str(tmp_path / "out"),
               "--engine", "ray", "--address", cluster["address"], "--num-cpus", "0.25"])
    err = capsys.readouterr().err
    assert rc == 2 and "BundleNotFoundError: no bundle at" in err and "Traceback" not in err, err[-2000:]


def test_a_killed_ray_job_resumes_without_redoing_finished_images(cluster, tiny_bundle, tmp_path, capsys):
    rng = np.random.default_rng(5)
    for i in range(120):
        label = "fake" if i % 2 else "real"
        (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
        make_image(rng, label == "fake").resize((48, 48)).save(tmp_path / "data" / label / f"{i:03d}.png")
    out = tmp_path / "store"
    args = ["features", str(tmp_path / "data"), "--bundle", str(tiny_bundle), "--out", str(out), "--engine", "ray",
            "--address", cluster["address"], "--actors", "2", "--num-cpus", "0.25"]
    proc = subprocess.Popen([sys.executable, "-m", "itemrt.cli", *args], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOG).is_file() and (out / LOG).stat().st_size > 0):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:] if proc.poll() else ""
            time.sleep(0.01)
    finally:
        proc.kill()  # a crash: no handler runs
        proc.communicate(timeout=60)
    done = len(read_features(out))
    assert 0 < done < 120
    capsys.readouterr()
    assert item(args) == 0
    assert f"{120 - done} images extracted, {done} already done" in capsys.readouterr().err
    keys = read_features(out).columns["key"].tolist()
    assert len(keys) == len(set(keys)) == 120
