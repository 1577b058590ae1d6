"""`item serve`: the runtime behind HTTP (Starlette under uvicorn), for upload gateways.

POST /v1/detect        one image: multipart (any file field) or a raw image body
POST /v1/detect/batch  several images: multipart, one file field each
GET  /healthz          the process is up          GET /readyz   bundle loaded and warmed
GET  /metrics          Prometheus text            GET /v1/info  the bundle and the settings

Requests coalesce into `detect_batch` (see batcher.py). Every error is JSON
{"error": code, "message": ...} with a 4xx/5xx status; no input takes the server down.
On SIGTERM uvicorn stops accepting, the admitted requests are answered, then it exits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import HTTPError, ImageError, ImageTooLargeError, ItemError, PathError, QueueFull
from ..samples import images as sample_images
from ..stages.images import DEFAULT_LIMITS, load_image
from .batcher import Batcher

STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    precision: str | None = None
    backend: str = "onnxruntime"
    threads: int = 0
    max_batch: int = 4  # images per detect_batch call; 1 turns micro-batching off
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_in_flight: int = 32  # images admitted at once (decoding, queued, running); beyond: 429
    timeout_s: float = 60.0  # per request, from admission to answer; beyond: 504
    max_upload_bytes: int = 20 << 20  # per request body; beyond: 413
    max_uploads: int = 32  # request bodies being received at once; beyond: 429 (bounds their memory)
    upload_timeout_s: float = 30.0  # to receive one body; beyond: 408 (a trickling client holds no slot)
    header_timeout_s: float = 20.0  # to receive a request's line and headers; beyond: 408, connection closed
    max_batch_images: int = 16  # files in one /v1/detect/batch request
    # Pixels being decoded at once, all requests together: a 265 KB PNG can claim 64 MP. Counted
    # in pixels of images.DECODE_BYTES_REF bytes, each format weighed by its decoding peak.
    # Default: two of the largest images accepted.
    decode_budget_pixels: int = 2 * DEFAULT_LIMITS.max_pixels
    token: str | None = None  # bearer token for everything but /healthz and /readyz
    retry_after_s: int = 1


class PixelBudget:
    """At most `limit` pixels being decoded at once, across the server's decoding threads
    (`load_image`'s hold, weighed by format: images.decode_cost). Without it, 8 concurrent 64 MP
    PNGs of 265 KB each took the server to a 9.1-10.4 GB peak RSS
    (`python -m itemrt.bench.decode_memory`). An image larger than the whole budget still runs,
    alone."""

    def __init__(self, limit: int):
        self.limit, self.used, self.waiting = limit, 0, 0
        self._cond = threading.Condition()

    @property
    def exhausted(self) -> bool:
        """A decode is waiting for room: a new image would wait too (/readyz says not ready)."""
        return self.waiting > 0

    @contextmanager
    def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        with self._cond:
            self.waiting += 1
            try:
                self._cond.wait_for(lambda: self.used + pixels <= self.limit)
            finally:
                self.waiting -= 1
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()


def _image_status(e: ImageError) -> int:
    return 413 if isinstance(e, ImageTooLargeError) else 422


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("itemrt_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.errors = Counter("itemrt_errors", "Errors by kind", ["kind"], registry=r)
        self.latency = Histogram("itemrt_request_seconds", "Request latency", ["endpoint"], registry=r,
                                 buckets=STAGE_BUCKETS)
        self.stages = Histogram("itemrt_stage_seconds", "Runtime stage latency per batch", ["stage"], registry=r,
                                buckets=STAGE_BUCKETS)
        self.batch = Histogram("itemrt_batch_size", "Images per detect_batch call", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32))
        self.in_flight = Gauge("itemrt_in_flight_images", "Images admitted and not yet answered", registry=r)
        self.queued = Gauge("itemrt_queued_images", "Images waiting for a batch (queue depth)", registry=r)
        self.uploads = Gauge("itemrt_uploads_in_progress", "Request bodies being received", registry=r)
        self.cache_hit_rate = Gauge("itemrt_text_cache_hit_rate", "Caption text-cache hit rate", registry=r)
        self.ready = Gauge("itemrt_ready", "1 when the bundle is loaded and warmed", registry=r)

    def on_batch(self, n: int, results) -> None:
        self.batch.observe(n)
        for stage, ms in results[0].timings_ms.items():  # one timing per batch, shared by its results
            self.stages.labels(stage).observe(ms / 1e3)

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class CloseWhileDraining:
    """ASGI middleware: from SIGTERM on, every answer says Connection: close, so a kept-alive
    client sends its next request elsewhere instead of into a connection that is closing
    (uvicorn closes it after the answer without saying so)."""

    def __init__(self, app, draining):
        self.app, self.draining = app, draining

    async def __call__(self, scope, receive, send):
        async def send_closing(message):
            if message["type"] == "http.response.start" and self.draining():
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing if scope["type"] == "http" else send)


def create_app(cfg: ServeConfig):
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from ..runtime import Runtime

    metrics = Metrics()
    # detect requests a handler took, by the status it answered; "cancelled": cut by a shutdown
    # past its grace period, so no client got an answer
    answered: Counter[str] = Counter()
    state: dict = {"ready": False, "uploading": 0, "draining": False}
    metrics.uploads.set_function(lambda: state["uploading"])
    limits = DEFAULT_LIMITS

    @asynccontextmanager
    async def lifespan(app):
        # a batch is one pass; a /v1/detect/batch request of more images runs in passes of it
        rt = await run_in_threadpool(Runtime, cfg.bundle, precision=cfg.precision, backend=cfg.backend,
                                      threads=cfg.threads, max_batch=cfg.max_batch)
        samples = sample_images()[:1]
        if samples:  # warm: first runs allocate and plan
            await run_in_threadpool(rt.detect, samples[0])
        batcher = Batcher(rt, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1e3,
                          max_in_flight=cfg.max_in_flight, on_batch=metrics.on_batch)
        metrics.in_flight.set_function(lambda: batcher.in_flight)
        metrics.queued.set_function(lambda: batcher.queued)
        cache = rt.clip.cache
        metrics.cache_hit_rate.set_function(lambda: cache.hits / max(1, cache.hits + cache.misses))
        state.update(runtime=rt, batcher=batcher, ready=True)
        metrics.ready.set(1)
        try:
            yield
        finally:
            state["ready"] = False
            metrics.ready.set(0)
            await run_in_threadpool(batcher.close, cfg.timeout_s)
            rt.close()
            # The server's own account at exit: a connection it closed before any request reached
            # a handler (uvicorn's shutdown, the listen backlog) is not here, every request taken is.
            print(f"item serve: stopped; answered detect requests by status {json.dumps(dict(answered))}",
                  file=sys.stderr, flush=True)

    def drain() -> None:
        """SIGTERM: /readyz turns 503 at once and every answer from now on says Connection: close."""
        state["draining"] = True

    def error(e: HTTPError) -> JSONResponse:
        metrics.errors.labels(e.code).inc()
        return JSONResponse({"error": e.code, "message": str(e)}, status_code=e.status, headers=e.headers)

    def authorize(request: Request) -> None:
        if cfg.token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {cfg.token}".encode()):
            raise HTTPError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_upload_bytes:
            raise HTTPError(413, "payload_too_large", f"body of {declared} bytes; limit {cfg.max_upload_bytes}")
        # Bodies are buffered before admission, so their number is bounded here (the event loop is
        # one thread: a plain counter is exact).
        if state["uploading"] >= cfg.max_uploads:
            raise HTTPError(429, "too_many_uploads", f"{cfg.max_uploads} uploads already in progress",
                            {"Retry-After": str(cfg.retry_after_s)})
        chunks, size = [], 0

        async def receive():
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_upload_bytes:
                    raise HTTPError(413, "payload_too_large", f"body over the limit of {cfg.max_upload_bytes} bytes")
                chunks.append(chunk)

        state["uploading"] += 1
        try:
            await asyncio.wait_for(receive(), cfg.upload_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(408, "upload_timeout",
                            f"body not received within {cfg.upload_timeout_s} s ({size} bytes came)") from None
        except ClientDisconnect:  # gone, or its body broke HTTP's framing (uvicorn answered 400)
            raise HTTPError(499, "client_disconnected", f"the client left after {size} bytes of the body") from None
        finally:
            state["uploading"] -= 1
        return b"".join(chunks)

    async def uploads(request: Request, many: bool) -> list[bytes]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            body = await read_body(request)

            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=cfg.max_batch_images,
                                                                 max_fields=16)
            except Exception as e:  # noqa: BLE001 - starlette raises its own types for malformed multipart
                why = str(getattr(e, "detail", e))
                if why.startswith("Too many files"):  # one cause, one answer, however many files
                    raise HTTPError(413, "too_many_images", f"over {cfg.max_batch_images} images; limit "
                                    f"{cfg.max_batch_images}") from None
                raise HTTPError(400, "bad_multipart", f"could not parse the multipart body: {why}") from None
            files = [v for _, v in form.multi_items() if hasattr(v, "read")]
            blobs = [await f.read() for f in files]
            await form.close()
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            if many:
                raise HTTPError(415, "unsupported_media_type", "/v1/detect/batch takes multipart/form-data")
            blobs = [await read_body(request)]
        else:
            raise HTTPError(415, "unsupported_media_type",
                            f"content type {ctype or 'missing'}; send multipart/form-data or an image/* body")
        if not blobs:
            raise HTTPError(400, "no_image", "no file in the request")
        if not many and len(blobs) != 1:
            raise HTTPError(400, "one_image", f"{len(blobs)} files; /v1/detect takes one (see /v1/detect/batch)")
        if len(blobs) > cfg.max_batch_images:
            raise HTTPError(413, "too_many_images", f"{len(blobs)} images; limit {cfg.max_batch_images}")
        return blobs

    budget = PixelBudget(cfg.decode_budget_pixels)

    def decode(blobs: list[bytes]):
        images = []
        for i, b in enumerate(blobs):
            try:
                images.append(load_image(b, limits, budget.hold))
            except ImageError as e:
                where = f"image {i}: " if len(blobs) > 1 else ""
                raise HTTPError(_image_status(e), e.code, f"{where}{e}") from None
        return images

    def bundle_info() -> dict:
        rt = state["runtime"]
        m = rt.bundle.manifest
        return {"name": rt.bundle.name, "created": m["created"], "format_version": m["format_version"],
                "itemrt_version": m["itemrt_version"], "precision": rt.precision,
                "backend": rt.backend}

    async def detect(request: Request, many: bool):
        endpoint = "/v1/detect/batch" if many else "/v1/detect"
        t0 = time.perf_counter()
        status: int | str = 500
        try:
            authorize(request)
            if not state["ready"]:
                raise HTTPError(503, "not_ready", "the bundle is not loaded yet", {"Retry-After": "1"})
            blobs = await uploads(request, many)
            batcher: Batcher = state["batcher"]
            try:
                with batcher.admit(len(blobs)) as places:
                    # One deadline from admission, decoding included. A decode that runs past it
                    # is abandoned, not stopped (a thread cannot be): the image limits bound what
                    # it can still cost, and its pixels stay in the budget until it ends.
                    deadline = time.monotonic() + cfg.timeout_s
                    try:
                        images = await asyncio.wait_for(run_in_threadpool(decode, blobs), cfg.timeout_s)
                        fut = asyncio.wrap_future(batcher.submit(images, places))
                        results = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        raise HTTPError(504, "timeout", f"no answer within {cfg.timeout_s} s") from None
            except QueueFull as e:
                raise HTTPError(429, e.code, str(e), {"Retry-After": str(cfg.retry_after_s)}) from None
            info = bundle_info()
            body = [{**r.to_dict(), "bundle": info} for r in results]
            status = 200
            return JSONResponse({"results": body} if many else body[0])
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except HTTPError as e:
            status = e.status
            return error(e)
        except ItemError as e:
            status = 500
            return error(HTTPError(500, e.code, str(e)))
        except Exception as e:  # noqa: BLE001 - the server answers, whatever broke
            status = 500
            return error(HTTPError(500, "internal", f"{type(e).__name__}: {e}"))
        finally:
            metrics.requests.labels(endpoint, str(status)).inc()
            answered[str(status)] += 1
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def detect_one(request: Request):
        return await detect(request, many=False)

    async def detect_many(request: Request):
        return await detect(request, many=True)

    async def healthz(request: Request):
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request):
        # Not ready while draining, and while decodes wait for room in the decode budget: a load
        # balancer then sends the next images to a replica that can start on them now.
        if state["draining"]:
            why = "draining"
        elif budget.exhausted:
            why = "decode budget exhausted"
        elif not state["ready"]:
            why = "loading"
        else:
            return JSONResponse({"status": "ready", "bundle": bundle_info()})
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503, headers={"Retry-After": "1"})

    async def metrics_endpoint(request: Request):
        try:
            authorize(request)
        except HTTPError as e:
            return error(e)
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    async def info(request: Request):
        try:
            authorize(request)
            if not state["ready"]:
                raise HTTPError(503, "not_ready", "the bundle is not loaded yet", {"Retry-After": "1"})
        except HTTPError as e:
            return error(e)
        rt = state["runtime"]
        m = rt.bundle.manifest
        settings = {k: v for k, v in asdict(cfg).items() if k != "token"}
        return JSONResponse({
            "bundle": bundle_info(), "random_init": m.get("random_init"), "trained": rt.bundle.trained,
            "sources": m.get("sources"), "precisions": rt.precisions, "threshold": rt.threshold,
            "settings": {**settings, "auth": cfg.token is not None},
        })

    routes = [
        Route("/v1/detect", detect_one, methods=["POST"]),
        Route("/v1/detect/batch", detect_many, methods=["POST"]),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/v1/info", info),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(CloseWhileDraining, draining=lambda: state["draining"])])
    app.state.metrics = metrics  # for the protocol's header deadline (serve)
    app.state.drain = drain  # called by serve() on SIGTERM / SIGINT, before uvicorn's own shutdown
    return app


def require() -> None:
    """ImportError naming what the `serve` extra would have installed."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "multipart", "prometheus_client") if not importlib.util.find_spec(m)]
    if missing:
        raise ImportError(f"missing {', '.join(missing)}")


def read_token(token_file: str | None, env: str = "ITEM_SERVE_TOKEN") -> str | None:
    """The bearer token from a file (first line) or the environment; None: no auth."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise PathError(f"cannot read the token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise PathError(f"token file {token_file} is empty")
        return token
    return os.environ.get(env) or None


LINGER_S = 2.0  # how long a closing connection still reads (and drops) what its client sends


class LingeringTransport:
    """A transport whose close() lets the answer arrive. Closing a socket with unread bytes
    in it sends a TCP reset, and a reset can destroy an answer the client has not read yet.
    uvicorn closes as soon as it has answered, and the early answers (401, 413, 415, 429, 503,
    its own 400) come before the body has been read. So close() sends FIN once the answer is
    flushed, drops whatever still comes, and closes when the client does, or after LINGER_S.
    Found by fuzzing: a client sending a body with `Connection: close` sometimes got a reset
    in place of its answer."""

    def __init__(self, transport, loop):
        self._transport, self._loop = transport, loop
        self.lingering = False

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def close(self) -> None:
        if self.is_closing():
            return
        self.lingering = True
        try:
            self._transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):  # already broken: nothing to wait for
            self._transport.close()
            return
        self._transport.resume_reading()  # flow control may have paused it: keep draining
        self._loop.call_later(LINGER_S, self._transport.close)


def gateway_protocol(timeout_s: float, on_timeout):
    """uvicorn's h11 protocol with three repairs for traffic a gateway meets.

    A lingering close (LingeringTransport above).

    A deadline for each request's line and headers. uvicorn has none: a client that connects and
    sends nothing, or trickles its headers a byte at a time, keeps its connection (a file descriptor) for ever, and enough of them leave the
    server unable to accept anyone. The deadline is armed when a connection opens and after each
    response (the next request on a kept-alive connection), and it fires only if no request
    has begun since and none is running, so a request being answered is never cut. A kept-alive
    connection that stays silent is left to uvicorn's keep-alive timeout, which closes it quietly.

    A body that breaks HTTP's framing (bad chunked encoding, found by fuzzing) gets uvicorn's own
    400 while the app may already be answering from the headers alone (a 415, say). The app's
    answer then went to a connection h11 had finished with, and each one logged a
    LocalProtocolError traceback. The request is now marked disconnected, as when a client goes
    away, so the app's answer is dropped quietly."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": "header_timeout",
                       "message": f"request line and headers not received within {timeout_s:g} s"}).encode()
    answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
              b"content-length: %d\r\n\r\n" % len(body)) + body

    class GatewayProtocol(H11Protocol):
        _deadline = None
        _heard = False  # bytes since the deadline was armed

        def data_received(self, data: bytes) -> None:
            if self.transport.lingering:
                return  # answered and closing: the rest of the body is dropped
            self._heard = True
            super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(LingeringTransport(transport, self.loop))
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def send_400_response(self, msg: str) -> None:
            super().send_400_response(msg)
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.disconnected = True

        def connection_lost(self, exc) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._heard = False
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._expire, self.cycle)

        def _expire(self, cycle) -> None:
            if self.cycle is not cycle or self.transport.is_closing():
                return  # a request began since
            if cycle is None or (cycle.response_complete and self._heard):
                on_timeout()
                self.transport.write(answer)  # h11 cannot answer a request it has not parsed
                self.transport.close()

    return GatewayProtocol


def serve(cfg: ServeConfig, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    import uvicorn

    app = create_app(cfg)
    protocol = gateway_protocol(cfg.header_timeout_s, app.state.metrics.errors.labels("header_timeout").inc)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.drain()
            super().handle_exit(sig, frame)

    # Grace: the longest a request admitted before the signal can take (its upload, then its
    # deadline), so that no answer a client waits for is cut.
    grace = math.ceil(cfg.upload_timeout_s + cfg.timeout_s) + 5
    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_graceful_shutdown=grace)).run()
