"""`item serve` on Ray Serve: the same Gateway (gateway.py) in an ingress deployment, the runtimes
in the replicas of a detector deployment, images batched across callers by `@serve.batch`.

    serve run itemrt.gateways.ray_serve:app bundle=/srv/engines/item-base replicas=4
    item serve /srv/engines/item-base --engine ray --replicas 4          (the same, one command)
    item serve /srv/engines/item-base --engine ray --write-config serve.yaml   (serve deploy, KubeRay)

    HTTP -> Ray's proxy -> Ingress: a Gateway (auth, uploads, limits, decode, typed errors, /metrics)
                        -> Detector replica: one Runtime; each image is one call, and concurrent calls
                           from every ingress coalesce into one detect_batch pass

Only the engine differs from `item serve` (gateway.Engine): `remote_engine` answers the gateway
with a RemoteBatcher that sends each decoded image to a Detector replica, and sends it again to
another replica, at most `retries` times, when its replica dies mid-request (detection is
idempotent). The connection-level parts of `item serve` (http.py: header deadline, lingering
close) belong to the HTTP server, which here is Ray's proxy.

Needs the `ray` extra. Only this module and datasets/ray_features.py import ray when imported;
the lean runtime never does.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import typing
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import ray
from PIL import Image
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Histogram
from starlette.applications import Starlette

from ..errors import HTTPError
from ..ray_cluster import Cluster
from ..runtime import Runtime
from ..samples import images as sample_images
from ..stages.images import LoadedImage
from .batcher import Admission, Places
from .config import ServeConfig, read_token
from .gateway import Gateway
from .metrics import STAGE_BUCKETS, Metrics

log = logging.getLogger(__name__)

APP_NAME = "itemrt"
IMPORT_PATH = "itemrt.gateways.ray_serve:app"


@dataclass(frozen=True)
class RayOptions:
    """Where the replicas run and how many: what Ray places and scales."""

    replicas: int = 1  # Detector replicas, each one Runtime
    min_replicas: int | None = None  # both bounds given: autoscaling between them instead
    max_replicas: int | None = None
    num_cpus: float = 1.0  # per Detector replica (Ray's logical CPUs)
    num_gpus: float = 0.0  # per Detector replica; a fraction shares a GPU
    ingress_replicas: int = 1
    ingress_num_cpus: float = 0.25  # it parses, decodes and waits; the chain runs on the replicas
    retries: int = 2  # sends of an image to another replica after its replica died
    token_file: str | None = None  # read on the ingress's node; else $ITEM_SERVE_TOKEN there

    def __post_init__(self):
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.replicas < 1 or self.ingress_replicas < 1 or self.retries < 0:
            raise ValueError("replicas and ingress_replicas must be at least 1, retries at least 0")
        if self.num_cpus < 0 or self.num_gpus < 0 or self.ingress_num_cpus < 0:
            raise ValueError("num_cpus, num_gpus and ingress_num_cpus must not be negative")

    @property
    def threads(self) -> int:
        """ONNX Runtime threads for a replica left at threads=0: its CPUs, not the whole node's."""
        return max(1, round(self.num_cpus))


# --- the application's arguments (serve run / a Serve config file / item serve --engine ray) ----


def _coerce(name: str, value, hint):
    """A value as the field's type: `serve run ... key=value` passes every value as text."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
        if type(None) in typing.get_args(hint):
            return None
        raise ValueError(f"{name} needs a value")
    kind = next((t for t in (typing.get_args(hint) or (hint,)) if t is not type(None)), str)
    if kind is bool:
        if isinstance(value, str):
            return value.lower() in ("1", "true", "yes", "on")
        return bool(value)
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be {kind.__name__}, got {value!r}") from None


def _take(cls, args: dict) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: _coerce(f.name, args[f.name], hints[f.name]) for f in fields(cls) if f.name in args}


def parse_args(args: dict) -> tuple[ServeConfig, RayOptions]:
    """The application's arguments: ServeConfig's fields (the gateway, as item serve's flags) and
    RayOptions' fields (the cluster). The token itself is refused: a config file is no place for it."""
    args = dict(args)
    if "token" in args:
        raise ValueError("give token_file (read on the ingress's node) or set $ITEM_SERVE_TOKEN there, not token")
    unknown = set(args) - {f.name for f in fields(ServeConfig)} - {f.name for f in fields(RayOptions)}
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)}")
    if "bundle" not in args:
        raise ValueError("bundle is required: the bundle folder, at the same path on every node")
    cfg, opts = ServeConfig(**_take(ServeConfig, args)), RayOptions(**_take(RayOptions, args))
    if Path(cfg.bundle).exists():  # replicas do not run in this folder: give them the absolute path
        cfg = replace(cfg, bundle=str(Path(cfg.bundle).resolve()))
    if cfg.trust_anchors and Path(cfg.trust_anchors).exists():
        cfg = replace(cfg, trust_anchors=str(Path(cfg.trust_anchors).resolve()))
    if opts.token_file and Path(opts.token_file).exists():
        opts = replace(opts, token_file=str(Path(opts.token_file).resolve()))
    return cfg, opts


def app(args: dict) -> serve.Application:
    """The application builder Ray imports (`import_path: itemrt.gateways.ray_serve:app`)."""
    return build(*parse_args(args))


def app_args(cfg: ServeConfig, opts: RayOptions) -> dict:
    """`args` for app(): the settings that differ from the defaults, bundle always."""
    out = {"bundle": cfg.bundle}
    for obj, default in ((cfg, ServeConfig(cfg.bundle)), (opts, RayOptions())):
        out.update({k: v for k, v in asdict(obj).items() if k != "token" and v != getattr(default, k)})
    return out


# --- the replicas ------------------------------------------------------------------------------


@serve.deployment(name="Detector")
class Detector:
    """One Runtime. Each call is one decoded image; the calls waiting when a pass starts (up to
    max_batch, after at most max_wait_ms) run as one detect_batch."""

    def __init__(self, cfg: ServeConfig, opts: RayOptions):
        self.runtime = Runtime(cfg.bundle, **{**cfg.runtime_options(), "threads": cfg.threads or opts.threads})
        samples = sample_images()[:1]
        if samples:  # warm: first runs allocate and plan
            self.runtime.detect(samples[0])
        self.detect.set_max_batch_size(cfg.max_batch)
        self.detect.set_batch_wait_timeout_s(cfg.max_wait_ms / 1e3)
        # Ray's metrics (exported as ray_itemrt_*, tagged with deployment and replica), one
        # observation per pass, like item serve's histograms of the same names.
        self.batch_size = Histogram("itemrt_batch_size", "Images per detect_batch call",
                                    boundaries=[1, 2, 4, 8, 16, 32])
        self.stages = Histogram("itemrt_stage_seconds", "Runtime stage latency per batch",
                                boundaries=list(STAGE_BUCKETS), tag_keys=("stage",))

    def describe(self) -> dict:
        """What the gateway says about the bundle (/v1/info, the `bundle` of every answer)."""
        rt = self.runtime
        return {"name": rt.bundle.name, "manifest": rt.bundle.manifest, "trained": rt.bundle.trained,
                "precision": rt.precision, "backend": rt.backend, "precisions": rt.precisions,
                "threshold": rt.threshold}

    def whoami(self) -> str:
        """This replica's actor name (tests kill one with it)."""
        return ray.get_runtime_context().get_actor_name()

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)  # set from the config in __init__
    async def detect(self, images: list) -> list:
        # off the event loop: the replica keeps taking calls into the next batch meanwhile
        results = await asyncio.to_thread(self.runtime.detect_batch, images)
        self.batch_size.observe(len(images))
        for stage, ms in results[0].timings_ms.items():  # one timing per pass, shared by its results
            self.stages.observe(ms / 1e3, tags={"stage": stage})
        return results

    def __del__(self):
        self.runtime.close()


@dataclass(frozen=True)
class BundleView:
    name: str
    manifest: dict
    trained: bool


@dataclass
class RemoteRuntime:
    """What the gateway reads from its runtime, for a runtime that lives in the replicas."""

    bundle: BundleView
    precision: str
    backend: str
    precisions: dict[str, str]
    threshold: float

    @classmethod
    def from_description(cls, d: dict) -> RemoteRuntime:
        return cls(BundleView(d["name"], d["manifest"], d["trained"]), d["precision"], d["backend"],
                   d["precisions"], d["threshold"])

    def close(self) -> None:  # the replicas close their own
        pass


class RemoteBatcher(Admission):
    """The part of batcher.Batcher that the gateway calls (admit, submit, close, in_flight,
    queued), for runtimes in Detector replicas. Admission is the same bound on images in flight
    at this ingress (decoding, sent, waiting); batching is Ray Serve's, in the replicas."""

    def __init__(self, handle: DeploymentHandle, *, max_in_flight: int, retries: int,
                 on_retry: Callable[[], None] = lambda: None):
        super().__init__(max_in_flight)  # queued: images sent to the replicas and not yet answered
        self.handle, self.retries, self.on_retry = handle, retries, on_retry

    def submit(self, images: list, places: Places | None = None) -> asyncio.Task:
        """On the event loop: an awaitable of the images' results, in order. The places come back
        when every image is answered, even if the caller stopped waiting."""
        n = 0
        if places is not None:
            n, places.handed_over = places.n, True
        return asyncio.ensure_future(self._detect(images, n))

    async def _detect(self, images: list, places: int) -> list:
        self.queued += len(images)
        try:
            # each image its own call: Ray routes it to a replica with room, where it joins a batch.
            # It goes as the gateway decoded it (pixels, and whatever the runtime reads beside them).
            out = await asyncio.gather(*(self._one(_portable(im)) for im in images), return_exceptions=True)
        finally:
            self.queued -= len(images)
            self._release(places)  # before any caller hears its answer, as in Batcher
        for r in out:
            if isinstance(r, BaseException):
                raise r
        return out

    async def _one(self, image):
        for attempt in range(self.retries + 1):
            try:
                return await self.handle.detect.remote(image)
            except RayTaskError as e:  # the replica raised: its own error, not Ray's wrapping
                cause = e.cause
                if not isinstance(cause, RayActorError):
                    raise (cause if isinstance(cause, Exception) else e) from None
                err = cause
            except RayActorError as e:  # the replica died or went away mid-request
                err = e
            if attempt < self.retries:
                self.on_retry()
                log.warning("a Detector replica was lost mid-request (%s); sending the image to another",
                            type(err).__name__)
        raise HTTPError(503, "replica_unavailable",
                        f"the image's replica was lost {self.retries + 1} times ({type(err).__name__})",
                        {"Retry-After": "1"})

    def close(self, timeout_s: float | None = None) -> None:
        """Refuse new requests; wait for every admitted one to be answered."""
        self._drain(timeout_s)


def _portable(image):
    """An image that unpickles on the replica: a PIL image of a file's class (PngImageFile...)
    does not, a plain one does; pixels that travel with their file's bytes keep the bytes."""
    if isinstance(image, Image.Image):
        return image if type(image) is Image.Image else image.copy()
    if isinstance(image, LoadedImage):
        return replace(image, image=_portable(image.image))
    return image


def remote_engine(detector: DeploymentHandle, retries: int):
    """gateway.Engine for an ingress: the runtimes are the Detector replicas behind `detector`."""

    async def engine(cfg: ServeConfig, metrics: Metrics) -> tuple[RemoteRuntime, RemoteBatcher]:
        runtime = RemoteRuntime.from_description(await detector.describe.remote())
        retried = Counter("itemrt_replica_retries", "Images sent again after their replica died",
                          registry=metrics.registry)
        return runtime, RemoteBatcher(detector, max_in_flight=cfg.max_in_flight, retries=retries,
                                      on_retry=retried.inc)

    return engine


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """A Gateway whose engine is the Detector deployment; Ray's proxy hands it the requests."""

    def __init__(self, cfg: ServeConfig, opts: RayOptions, detector: DeploymentHandle):
        cfg = replace(cfg, token=read_token(opts.token_file))
        self.gateway = Gateway(cfg, engine=remote_engine(detector, opts.retries))

    def __serve_build_asgi_app__(self) -> Starlette:
        gateway = self.gateway

        @asynccontextmanager
        async def lifespan(_):
            await gateway.start()
            try:
                yield
            finally:  # Serve has stopped routing here and waited for the requests it sent
                gateway.drain()
                answered = await gateway.stop()
                print(f"item serve (ray ingress): stopped; answered detect requests by status {answered}",
                      file=sys.stderr, flush=True)

        return Starlette(routes=gateway.routes(), lifespan=lifespan)


def build(cfg: ServeConfig, opts: RayOptions) -> serve.Application:
    """The application: an Ingress bound to a Detector deployment."""
    if opts.min_replicas is not None:
        # one batch in progress per replica is its target; beyond that Ray adds replicas
        scale = {"autoscaling_config": {"min_replicas": opts.min_replicas, "max_replicas": opts.max_replicas,
                                        "target_ongoing_requests": cfg.max_batch}}
    else:
        scale = {"num_replicas": opts.replicas}
    detector = Detector.options(
        **scale, ray_actor_options={"num_cpus": opts.num_cpus, "num_gpus": opts.num_gpus},
        # Room for every image the ingresses admit: they wait in the replica's batch queue, where
        # the next pass takes them, not in a router that polls full replicas with backoff.
        max_ongoing_requests=max(2 * cfg.max_batch, cfg.max_in_flight * opts.ingress_replicas),
        graceful_shutdown_timeout_s=cfg.timeout_s + 5, max_constructor_retry_count=3,
    ).bind(cfg, opts)
    # The gateway's own limits answer first (429 with its JSON): Ray queues nothing in front of them.
    ongoing = cfg.max_uploads + cfg.max_in_flight + 16
    ingress = Ingress.options(
        num_replicas=opts.ingress_replicas, ray_actor_options={"num_cpus": opts.ingress_num_cpus},
        max_ongoing_requests=ongoing, graceful_shutdown_timeout_s=cfg.upload_timeout_s + cfg.timeout_s + 5,
    )
    return ingress.bind(cfg, opts, detector)


# --- item serve --engine ray, and the config file it writes -------------------------------------


def config_yaml(cfg: ServeConfig, opts: RayOptions, host: str, port: int, name: str = APP_NAME) -> str:
    """A Serve config file (`serve deploy FILE`, or a KubeRay RayService's serveConfigV2)."""
    import yaml

    doc = {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{"name": name, "route_prefix": "/", "import_path": IMPORT_PATH,
                          "args": app_args(cfg, opts)}],
    }
    head = ("# ITEM-RT on Ray Serve, written by `item serve --engine ray --write-config`.\n"
            "# The bundle must be at this path on every node that runs a Detector replica.\n")
    return head + yaml.safe_dump(doc, sort_keys=False)


def serve_command(cfg: ServeConfig, opts: RayOptions, *, cluster: Cluster, host: str, port: int,
                  name: str = APP_NAME, detach: bool = False, log_level: str = "info",
                  emit: Callable[[str], None] = print) -> int:
    """Deploy; unless detached, run until SIGTERM or Ctrl-C, then delete the app (Serve drains
    its replicas: every request it routed is answered) and stop a cluster this command started."""
    cluster = cluster.connect()
    # after connecting: ray.init sets its own SIGTERM handler (exit at once)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        serve.start(http_options={"host": host, "port": port})
        # as under uvicorn: a line per request at info and below, none above
        level = {"trace": "DEBUG"}.get(log_level.lower(), log_level.upper())
        logging = {"log_level": level, "enable_access_log": level in ("DEBUG", "INFO")}
        try:
            serve.run(build(cfg, opts), name=name, route_prefix="/", blocking=False, logging_config=logging)
        except RuntimeError as e:  # DEPLOY_FAILED: e.g. the bundle missing on a replica's node
            emit(f"item serve: the Ray app did not start: {e}")
            serve.delete(name)
            return 1
        scale = (f"{opts.min_replicas}..{opts.max_replicas} replicas" if opts.min_replicas
                 else f"{opts.replicas} replica{'s' * (opts.replicas > 1)}")
        emit(f"item serve: Ray Serve app {name!r} ready at http://{host}:{port}/ "
             f"({scale}, {opts.num_cpus:g} CPU and {opts.num_gpus:g} GPU each; max batch {cfg.max_batch})")
        if detach:
            return 0
        while not stop.wait(0.5):
            pass
        emit(f"item serve: draining {name!r}")
        serve.delete(name)
        emit("item serve: stopped")
        return 0
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if not detach:
            cluster.close()
