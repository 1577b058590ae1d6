"""`item features --engine ray`: the chain over a dataset on a Ray cluster, into the same store.

This process (the driver) reads the dataset, opens the feature store (its only writer, as in
`extract`) and gives Ray Data the samples not yet finished or listed bad, in the chunks `extract`
would run them in, one row per chunk. An actor pool of runtimes (`FeatureWorker`, one Runtime
each) runs every chunk with `features.extract_chunk`, the code `extract` runs, and answers each
image as its record packed the way the store writes it, or as the reason it is bad. The bytes
cross the cluster unconverted, and the driver appends them in the dataset's order, each one
durable before the next. A crash loses only the chunks in flight; the same command then does
the rest, and `item features` without Ray could as well.

Image paths are read by the actors: the dataset must be at the same path on every node.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray

from ..errors import ImageError, ItemError
from ..progress import Progress
from ..runtime import Runtime
from .dataset import Sample
from .features import ExtractSummary, FeatureStore, _pack, extract_chunk, store_meta


@dataclass(frozen=True)
class RayFeatureOptions:
    """The actor pool: how many runtimes and what each one reserves."""

    actors: int | None = None  # None: Ray Data's autoscaling pool, from 1 to what the cluster holds
    num_cpus: float = 1.0  # per actor (Ray's logical CPUs)
    num_gpus: float = 0.0  # per actor; a fraction shares a GPU

    @property
    def resources(self) -> dict[str, float]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}

    def threads(self, threads: int) -> int:
        """ONNX Runtime threads per actor: as asked, or its CPUs rather than the whole node's."""
        return threads or max(1, round(self.num_cpus))


@dataclass(frozen=True)
class ChainSettings:
    """What each runtime is opened with; the same for every actor."""

    bundle: str
    precision: str | None = None
    backend: str = "onnxruntime"
    threads: int = 0
    batch_size: int = 1
    perturbation: str = ""

    def open(self) -> Runtime:
        # a chunk is one pass, and no provenance is read, as in `item features` without Ray
        return Runtime(self.bundle, precision=self.precision, backend=self.backend, threads=self.threads,
                       max_batch=self.batch_size, provenance=False)


class ListedError(ImageError):
    """An image a worker could not read, as bad.jsonl lists it (its code and message)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class FeatureWorker:
    """One Runtime in a Ray Data actor. Each input row is a chunk of samples (JSON); each output
    row one image: its index in the driver's list and its packed record, or why it is bad."""

    def __init__(self, settings: ChainSettings):
        self.runtime = settings.open()
        self.perturbation = settings.perturbation

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        index, records, bad = [], [], []
        for first, chunk in zip(batch["first"], batch["samples"]):
            samples = [_sample(d) for d in json.loads(chunk)]
            for j, (_, row) in enumerate(extract_chunk(self.runtime, samples, self.perturbation)):
                index.append(int(first) + j)
                if isinstance(row, ImageError):
                    records.append(b"")
                    bad.append(json.dumps({"error": row.code, "message": str(row)}).encode())
                else:
                    records.append(_pack(row))
                    bad.append(b"")
        return {"index": np.asarray(index, np.int64), "record": _objects(records), "bad": _objects(bad)}


def _objects(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _sample(d: dict) -> Sample:
    return Sample(d["key"], Path(d["path"]), d["label"], d["generator"], d["split"])


def _row(s: Sample) -> dict:
    # JSON escapes the surrogates of file names that are not UTF-8; Arrow's strings would refuse them
    return {"key": s.key, "path": str(s.path), "label": s.label, "generator": s.generator, "split": s.split}


@ray.remote
def _describe(settings: ChainSettings, dataset: str) -> dict:
    """The store's meta as the actors' runtime settles it (precision, backend): where they run."""
    with settings.open() as rt:
        return store_meta(rt, settings.perturbation, dataset)


def extract_on_ray(
    settings: ChainSettings,
    samples: list[Sample],
    out: str | Path,
    *,
    options: RayFeatureOptions = RayFeatureOptions(),
    dataset: str = "",
    shard_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """`extract` on the connected Ray cluster: the same store, rows and bad list; resumable."""
    from ray.data import ActorPoolStrategy, DataContext

    settings = ChainSettings(**{**asdict(settings), "threads": options.threads(settings.threads)})
    meta = ray.get(_describe.options(**options.resources).remote(settings, dataset))
    bad = 0
    with FeatureStore(out, meta, shard_size=shard_size) as store:
        todo = store.todo(samples, progress)
        skipped = len(samples) - len(todo)
        bar = Progress("features", len(todo), progress)
        size = settings.batch_size
        rows = [{"first": i, "samples": json.dumps([_row(s) for s in todo[i : i + size]])}
                for i in range(0, len(todo), size)]
        if rows:
            ctx = DataContext.get_current()
            ctx.execution_options.preserve_order = True  # the store's rows in the dataset's order
            ctx.enable_progress_bars = False  # our progress lines, as without Ray
            pool = (ActorPoolStrategy(size=options.actors) if options.actors
                    else ActorPoolStrategy(min_size=1, max_size=None))
            # a few rows per block: small units of work, so the actors stay evenly busy
            blocks = min(len(rows), max(8 * (options.actors or 4), math.ceil(len(rows) / 16)))
            ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
                FeatureWorker, fn_constructor_kwargs={"settings": settings}, batch_size=1, compute=pool,
                **options.resources,
            )
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for i, record, why in zip(batch["index"], batch["record"], batch["bad"]):
                    s = todo[int(i)]
                    if why:
                        reason = json.loads(why)
                        store.add_bad(s, ListedError(reason["error"], reason["message"]))
                        bad += 1
                    else:
                        store.append_packed(s.key, bytes(record))
                    bar.update(1, f"{bad} bad" if bad else "")
    return ExtractSummary(len(samples), bar.done - bad, skipped, bad, Path(out))


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def features_command(settings: ChainSettings, samples: list[Sample], out: Path, *, cluster, options: RayFeatureOptions,
                     dataset: str, progress: Callable[[str], None]) -> ExtractSummary:
    """Connect, extract, disconnect (stopping a cluster this command started)."""
    cluster = cluster.connect()
    if threading.current_thread() is threading.main_thread():
        # ray.init made SIGTERM exit at once; the Ctrl-C path keeps the store whole and says so
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return extract_on_ray(settings, samples, out, options=options, dataset=dataset, progress=progress)
    except ray.exceptions.RayTaskError as e:  # a worker's own error, without Ray's wrapping
        cause = e.cause
        raise (cause if isinstance(cause, ItemError) else e) from None
    finally:
        cluster.close()
