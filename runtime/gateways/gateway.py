"""The gateway's request handling, for any host that speaks Starlette.

POST /v1/detect        one image: multipart (any file field) or a raw image body
POST /v1/detect/batch  several images: multipart, one file field each
GET  /healthz          the process is up          GET /readyz   bundle loaded and warmed
GET  /metrics          Prometheus text            GET /v1/info  the bundle and the settings

Requests coalesce into `detect_batch` (see batcher.py). Every error is JSON
{"error": code, "message": ...} with a 4xx/5xx status; no input takes the server down.

`Gateway` holds the state (runtime, batcher, decode budget, metrics, counters) and answers the
endpoints; a host mounts `routes()`, calls `start()` before the first request, `drain()` when
told to stop and `stop()` last. Its handlers take a Starlette Request and return a Response,
which is what uvicorn (server.py) and Ray Serve deployments both hand over; what belongs to
one HTTP server (connections, header deadlines, signals) stays in that host.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import HTTPError, ImageError, ImageTooLargeError, ItemError, QueueFull
from ..runtime import Runtime
from ..samples import images as sample_images
from ..stages.images import DEFAULT_LIMITS, read_image
from .batcher import Batcher
from .budget import PixelBudget
from .config import ServeConfig
from .metrics import Metrics


def _image_status(e: ImageError) -> int:
    return 413 if isinstance(e, ImageTooLargeError) else 422


async def local_engine(cfg: ServeConfig, metrics: Metrics) -> tuple[Runtime, Batcher]:
    """What runs the images in `item serve`: a Runtime in this process behind the micro-batcher."""
    # a batch is one pass; a /v1/detect/batch request of more images runs in passes of it
    rt = await run_in_threadpool(Runtime, cfg.bundle, **cfg.runtime_options())
    samples = sample_images()[:1]
    if samples:  # warm: first runs allocate and plan
        await run_in_threadpool(rt.detect, samples[0])
    cache = rt.clip.cache
    metrics.cache_hit_rate.set_function(lambda: cache.hits / max(1, cache.hits + cache.misses))
    return rt, Batcher(rt, max_batch=cfg.max_batch, max_wait_s=cfg.max_wait_ms / 1e3,
                       max_in_flight=cfg.max_in_flight, on_batch=metrics.on_batch)


# Makes the (runtime, batcher) pair a Gateway answers with. Another host brings its own pair with
# the same attributes and methods (ray_serve.py: the runtimes live in Ray Serve replicas).
Engine = Callable[[ServeConfig, Metrics], Awaitable[tuple[Any, Any]]]


class Gateway:
    def __init__(self, cfg: ServeConfig, engine: Engine = local_engine):
        self.cfg = cfg
        self.engine = engine
        self.metrics = Metrics()
        self.budget = PixelBudget(cfg.decode_budget_pixels)
        self.limits = DEFAULT_LIMITS
        self.runtime: Runtime | None = None  # both set by start()
        self.batcher: Batcher | None = None
        self.ready = False
        self.draining = False
        # Bodies being received. The event loop is one thread: a plain counter is exact.
        self.uploading = 0
        # detect requests a handler took, by the status it answered; "cancelled": cut by a shutdown
        # past its grace period, so no client got an answer
        self.answered: Counter[str] = Counter()
        self.metrics.uploads.set_function(lambda: self.uploading)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/detect", self.detect_one, methods=["POST"]),
            Route("/v1/detect/batch", self.detect_many, methods=["POST"]),
            Route("/healthz", self.healthz),
            Route("/readyz", self.readyz),
            Route("/metrics", self.prometheus),
            Route("/v1/info", self.info),
        ]

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the bundle, warm it, start the batcher; /readyz then says ready."""
        rt, batcher = await self.engine(self.cfg, self.metrics)
        self.metrics.in_flight.set_function(lambda: batcher.in_flight)
        self.metrics.queued.set_function(lambda: batcher.queued)
        self.runtime, self.batcher, self.ready = rt, batcher, True
        self.metrics.ready.set(1)

    def drain(self) -> None:
        """Told to stop: /readyz turns 503 at once (and the host closes connections after answering)."""
        self.draining = True

    async def stop(self) -> dict[str, int]:
        """Answer every admitted request, then close the runtime. Returns the detect requests
        answered, by status: the gateway's own account of what it took."""
        self.ready = False
        self.metrics.ready.set(0)
        await run_in_threadpool(self.batcher.close, self.cfg.timeout_s)
        self.runtime.close()
        return dict(self.answered)

    # --- endpoints --------------------------------------------------------------------------

    async def detect_one(self, request: Request) -> Response:
        return await self._detect(request, many=False)

    async def detect_many(self, request: Request) -> Response:
        return await self._detect(request, many=True)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        # Not ready while draining, and while decodes wait for room in the decode budget: a load
        # balancer then sends the next images to a replica that can start on them now.
        if self.draining:
            why = "draining"
        elif self.budget.exhausted:
            why = "decode budget exhausted"
        elif not self.ready:
            why = "loading"
        else:
            return JSONResponse({"status": "ready", "bundle": self._bundle_info()})
        return JSONResponse({"status": "not ready", "reason": why}, status_code=503, headers={"Retry-After": "1"})

    async def prometheus(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except HTTPError as e:
            return self._error(e)
        return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

    async def info(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._require_ready()
        except HTTPError as e:
            return self._error(e)
        rt, cfg = self.runtime, self.cfg
        m = rt.bundle.manifest
        settings = {k: v for k, v in asdict(cfg).items() if k != "token"}
        return JSONResponse({
            "bundle": self._bundle_info(), "random_init": m.get("random_init"), "trained": rt.bundle.trained,
            "sources": m.get("sources"), "precisions": rt.precisions, "threshold": rt.threshold,
            "settings": {**settings, "auth": cfg.token is not None},
        })

    # --- detection --------------------------------------------------------------------------

    async def _detect(self, request: Request, many: bool) -> Response:
        endpoint = "/v1/detect/batch" if many else "/v1/detect"
        t0 = time.perf_counter()
        status: int | str = 500
        try:
            self._authorize(request)
            self._require_ready()
            blobs = await self._uploads(request, many)
            results = await self._run(blobs)
            info = self._bundle_info()
            body = [{**r.to_dict(), "bundle": info} for r in results]
            status = 200
            return JSONResponse({"results": body} if many else body[0])
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        except HTTPError as e:
            status = e.status
            return self._error(e)
        except ItemError as e:
            status = 500
            return self._error(HTTPError(500, e.code, str(e)))
        except Exception as e:  # noqa: BLE001 - the server answers, whatever broke
            status = 500
            return self._error(HTTPError(500, "internal", f"{type(e).__name__}: {e}"))
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.answered[str(status)] += 1
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    async def _run(self, blobs: list[bytes]) -> list:
        """Admit, decode and detect the request's images, within its deadline."""
        cfg, batcher = self.cfg, self.batcher
        try:
            with batcher.admit(len(blobs)) as places:
                # One deadline from admission, decoding included. A decode that runs past it
                # is abandoned, not stopped (a thread cannot be): the image limits bound what
                # it can still cost, and its pixels stay in the budget until it ends.
                deadline = time.monotonic() + cfg.timeout_s
                try:
                    images = await asyncio.wait_for(run_in_threadpool(self._decode, blobs), cfg.timeout_s)
                    fut = asyncio.wrap_future(batcher.submit(images, places))
                    return await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise HTTPError(504, "timeout", f"no answer within {cfg.timeout_s} s") from None
        except QueueFull as e:
            raise HTTPError(429, e.code, str(e), {"Retry-After": str(cfg.retry_after_s)}) from None

    def _decode(self, blobs: list[bytes]) -> list:
        images = []
        for i, b in enumerate(blobs):
            try:
                images.append(read_image(b, self.limits, self.budget.hold))  # bytes kept: provenance
            except ImageError as e:
                where = f"image {i}: " if len(blobs) > 1 else ""
                raise HTTPError(_image_status(e), e.code, f"{where}{e}") from None
        return images

    # --- protocol ---------------------------------------------------------------------------

    def _error(self, e: HTTPError) -> JSONResponse:
        self.metrics.errors.labels(e.code).inc()
        return JSONResponse({"error": e.code, "message": str(e)}, status_code=e.status, headers=e.headers)

    def _authorize(self, request: Request) -> None:
        if self.cfg.token is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.cfg.token}".encode()):
            raise HTTPError(401, "unauthorized", "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})

    def _require_ready(self) -> None:
        if not self.ready:
            raise HTTPError(503, "not_ready", "the bundle is not loaded yet", {"Retry-After": "1"})

    def _bundle_info(self) -> dict:
        rt = self.runtime
        m = rt.bundle.manifest
        return {"name": rt.bundle.name, "created": m["created"], "format_version": m["format_version"],
                "itemrt_version": m["itemrt_version"], "precision": rt.precision,
                "backend": rt.backend}

    async def _read_body(self, request: Request) -> bytes:
        cfg = self.cfg
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > cfg.max_upload_bytes:
            raise HTTPError(413, "payload_too_large", f"body of {declared} bytes; limit {cfg.max_upload_bytes}")
        # Bodies are buffered before admission, so their number is bounded here.
        if self.uploading >= cfg.max_uploads:
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

        self.uploading += 1
        try:
            await asyncio.wait_for(receive(), cfg.upload_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPError(408, "upload_timeout",
                            f"body not received within {cfg.upload_timeout_s} s ({size} bytes came)") from None
        except ClientDisconnect:  # gone, or its body broke HTTP's framing (the HTTP server answered 400)
            raise HTTPError(499, "client_disconnected", f"the client left after {size} bytes of the body") from None
        finally:
            self.uploading -= 1
        return b"".join(chunks)

    async def _uploads(self, request: Request, many: bool) -> list[bytes]:
        cfg = self.cfg
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            blobs = await self._form_files(request, await self._read_body(request))
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            if many:
                raise HTTPError(415, "unsupported_media_type", "/v1/detect/batch takes multipart/form-data")
            blobs = [await self._read_body(request)]
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

    async def _form_files(self, request: Request, body: bytes) -> list[bytes]:
        """The file parts of a multipart body already received (within the upload limits)."""
        limit = self.cfg.max_batch_images

        async def replay():
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=limit, max_fields=16)
        except Exception as e:  # noqa: BLE001 - starlette raises its own types for malformed multipart
            why = str(getattr(e, "detail", e))
            if why.startswith("Too many files"):  # one cause, one answer, however many files
                raise HTTPError(413, "too_many_images", f"over {limit} images; limit {limit}") from None
            raise HTTPError(400, "bad_multipart", f"could not parse the multipart body: {why}") from None
        files = [v for _, v in form.multi_items() if hasattr(v, "read")]
        blobs = [await f.read() for f in files]
        await form.close()
        return blobs
