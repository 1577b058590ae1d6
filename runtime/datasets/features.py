"""`item features`: run the chain over a dataset and keep each image's recipe inputs.

The store is a folder:
  meta.json     the bundle (name, feature fingerprint), precision, perturbation, sizes
  part-NNNNN.npz  columnar shards, one row per image (written whole, then renamed)
  pending.log   finished images not yet in a shard: framed records, fsync'd one by one
  bad.jsonl     images that could not be read, with the reason (skipped, never fatal)

Every finished image is durable before the next starts, so a crash or Ctrl-C loses only
the image in flight, and a rerun skips everything already finished or listed as bad.
A torn last record (power loss mid-write) is cut on open and that image redone.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import FeatureStoreError, ImageError
from ..interrupts import signals_held
from ..progress import Progress
from ..results import Analysis
from ..stages.images import load_image
from ..stages.recipe import Pairs, recipe
from .dataset import Sample
from .perturb import apply as perturb

FORMAT, VERSION = "itemrt-features", 1
META, LOG, BAD = "meta.json", "pending.log", "bad.jsonl"
_MAGIC = b"ITF1"
_HEAD = struct.Struct("<4sQI")  # magic, payload length, crc32 of the payload
# Meta fields a resumed run must share with the store it appends to.
_IDENTITY = ("fingerprint", "backend", "precision", "perturbation", "max_objects", "dim")


def _record(s: Sample, a: Analysis, k: int, dim: int) -> dict[str, np.ndarray]:
    """One image as fixed-size arrays: per-word columns padded to the bundle's max objects."""
    r, p = a.result, a.pairs
    n = len(r.objects)
    found = np.zeros(k, bool)
    found[:n] = [o.found for o in r.objects]
    local_image = np.zeros((k, dim), np.float32)
    local_text = np.zeros((k, dim), np.float32)
    local_image[found], local_text[found] = p.local_image, p.local_text
    words = np.full(k, "", dtype=f"<U{max([1, *(len(o.word) for o in r.objects)])}")
    words[:n] = [o.word for o in r.objects]
    scores = np.zeros(k, np.float32)
    scores[:n] = p.scores
    boxes = np.full((k, 4), np.nan, np.float32)
    local_distance = np.full(k, np.nan, np.float32)
    for i, o in enumerate(r.objects):
        if o.found:
            boxes[i], local_distance[i] = o.box, o.distance
    return {
        "key": np.asarray(s.key), "path": np.asarray(str(s.path)), "label": np.asarray(s.label, np.int8),
        "generator": np.asarray(s.generator), "split": np.asarray(s.split), "caption": np.asarray(r.caption),
        "n_words": np.asarray(n, np.int32), "width": np.asarray(r.image_size[0], np.int32),
        "height": np.asarray(r.image_size[1], np.int32), "global_distance": np.asarray(r.global_distance, np.float32),
        "words": words, "found": found, "scores": scores, "boxes": boxes, "local_distance": local_distance,
        "global_image": p.global_image.astype(np.float32), "global_text": p.global_text.astype(np.float32),
        "local_image": local_image, "local_text": local_text,
    }


def _pack(rec: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **rec)
    payload = buf.getvalue()
    return _HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _read_log(path: Path) -> tuple[list[dict[str, np.ndarray]], int]:
    """Whole records and the byte offset where they end (a torn tail starts there)."""
    records, offset = [], 0
    if not path.is_file():
        return records, 0
    data = path.read_bytes()
    while offset + _HEAD.size <= len(data):
        magic, size, crc = _HEAD.unpack_from(data, offset)
        payload = data[offset + _HEAD.size : offset + _HEAD.size + size]
        if magic != _MAGIC or len(payload) != size or zlib.crc32(payload) != crc:
            break
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            records.append({k: z[k] for k in z.files})
        offset += _HEAD.size + size
    return records, offset


def _stack(records: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([r[k] for r in records]) for k in records[0]}


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if not parts:
        return {}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@dataclass
class Features:
    """A store read whole: columns (one row per image) and the meta it was made with."""

    meta: dict
    columns: dict[str, np.ndarray]
    bad: list[dict]

    def __len__(self) -> int:
        return len(self.columns.get("key", ()))

    def rows(self, mask: np.ndarray | None = None) -> np.ndarray:
        return np.arange(len(self)) if mask is None else np.flatnonzero(mask)

    def pairs(self, i: int) -> Pairs:
        c = self.columns
        found = c["found"][i]
        return Pairs(
            c["global_image"][i], c["global_text"][i], c["local_image"][i][found], c["local_text"][i][found],
            c["scores"][i][: c["n_words"][i]], int(self.meta["max_objects"]),
        )

    def matrix(self, recipe_name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """The recipe's feature vectors of `rows` (all by default): (n, F) float32."""
        features, dim = recipe(recipe_name)
        rows = self.rows() if rows is None else rows
        out = np.zeros((len(rows), dim(int(self.meta["dim"]))), np.float32)
        for j, i in enumerate(rows):
            out[j] = features(self.pairs(int(i)))
        return out

    def samples(self, rows: np.ndarray | None = None) -> list[Sample]:
        c = self.columns
        rows = self.rows() if rows is None else rows
        return [
            Sample(str(c["key"][i]), Path(str(c["path"][i])), int(c["label"][i]), str(c["generator"][i]),
                   str(c["split"][i]))
            for i in rows
        ]


class FeatureStore:
    """The writer. One at a time per folder (a lock), records durable one by one."""

    def __init__(self, root: str | Path, meta: dict, shard_size: int = 512):
        self.root = Path(root)
        self.shard_size = shard_size
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = open(self.root / ".lock", "w")  # noqa: SIM115 - held (and flocked) while the store is open
        except OSError as e:  # a file where the folder should be, no permission, no such parent
            raise FeatureStoreError(f"cannot make or open the feature store {self.root}: {e.strerror or e}") from None
        try:
            import fcntl

            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no fcntl (Windows): single writer is on the caller
            pass
        except OSError:
            self._lock.close()
            raise FeatureStoreError(f"another `item features` is writing to {self.root}") from None
        try:
            self.meta = self._check_meta(meta)
            records, end = _read_log(self.root / LOG)
            self.done = _shard_keys(self.root) | {str(r["key"]) for r in records}
            self.bad = {b["key"] for b in _read_bad(self.root)}
            self._log = open(self.root / LOG, "ab")  # noqa: SIM115 - appended to until close()
        except BaseException:
            self._lock.close()  # a store that fails to open stays unlocked, even while its error is kept
            raise
        if self._log.tell() != end:  # a torn last record: cut it, that image is redone
            self._log.truncate(end)
        self._pending = len(records)

    def _check_meta(self, meta: dict) -> dict:
        path = self.root / META
        if path.is_file():
            old = read_meta(self.root)
            diff = [k for k in _IDENTITY if old.get(k) != meta.get(k)]
            if diff:
                what = ", ".join(f"{k}: {old.get(k)!r} there, {meta.get(k)!r} now" for k in diff)
                raise FeatureStoreError(
                    f"{self.root} holds features made with other settings ({what}); "
                    f"give another --out, or delete it to start over"
                )
            return old
        meta = {"format": FORMAT, "version": VERSION, **meta}
        _write_atomic(path, json.dumps(meta, indent=1).encode())
        return meta

    def append(self, rec: dict[str, np.ndarray]) -> None:
        self.append_packed(str(rec["key"]), _pack(rec))

    def append_packed(self, key: str, packed: bytes) -> None:
        """A record `_pack` made, here or in a worker elsewhere (ray_features.py)."""
        with signals_held():
            self._log.write(packed)
            self._log.flush()
            os.fsync(self._log.fileno())
        self.done.add(key)
        self._pending += 1
        if self._pending >= self.shard_size:
            self.compact()

    def todo(self, samples: list[Sample], progress: Callable[[str], None] | None = None) -> list[Sample]:
        """The samples neither finished nor listed bad: what a (resumed) run still does."""
        todo = [s for s in samples if s.key not in self.done and s.key not in self.bad]
        if progress and len(todo) < len(samples):
            progress(f"features: {len(samples) - len(todo)} of {len(samples)} images already done or listed bad "
                     f"in {self.root}")
        return todo

    def add_bad(self, s: Sample, err: Exception) -> None:
        line = json.dumps({"key": s.key, "path": str(s.path), "error": getattr(err, "code", type(err).__name__),
                           "message": str(err)})
        with open(self.root / BAD, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.bad.add(s.key)

    def compact(self) -> None:
        """Pending records -> one new shard (renamed into place), then the log emptied. A crash
        between the two leaves records that are also in a shard; readers drop those."""
        with signals_held():
            self._compact()

    def _compact(self) -> None:
        records, _ = _read_log(self.root / LOG)
        have = _shard_keys(self.root)
        records = [r for r in records if str(r["key"]) not in have]
        if records:
            # After the last shard's number, never a count: a deleted shard must not make the
            # next one overwrite an existing shard.
            n = 1 + max((int(p.stem.split("-")[1]) for p in self.root.glob("part-*.npz")), default=-1)
            buf = io.BytesIO()
            np.savez(buf, **_stack(records))
            _write_atomic(self.root / f"part-{n:05d}.npz", buf.getvalue())
        self._log.truncate(0)
        self._log.seek(0)
        os.fsync(self._log.fileno())
        self._pending = 0

    def close(self) -> None:
        if not self._log.closed:
            self.compact()
            self._log.close()
            self._lock.close()

    def __enter__(self) -> FeatureStore:  # noqa: PYI034 - typing.Self needs 3.11; Jetson runs 3.10
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_meta(root: Path) -> dict:
    try:
        meta = json.loads((root / META).read_text())
    except (FileNotFoundError, NotADirectoryError):
        raise FeatureStoreError(f"no feature store at {root} ({META} missing); make one with `item features`") from None
    except OSError as e:
        raise FeatureStoreError(f"cannot read {root / META}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeatureStoreError(f"{root / META} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise FeatureStoreError(f"{root} is not an itemrt feature store of version {VERSION}; extract it again")
    if missing := [k for k in ("bundle", *_IDENTITY) if k not in meta]:
        raise FeatureStoreError(f"{root / META} lacks {missing}; extract the features again")
    return meta


def read_features(root: str | Path, fingerprint: str | None = None) -> Features:
    """The whole store. With `fingerprint`, refuse features made with another bundle."""
    root = Path(root)
    meta = read_meta(root)
    if fingerprint is not None and meta["fingerprint"] != fingerprint:
        raise FeatureStoreError(
            f"features in {root} were extracted with bundle {meta['bundle']!r} (fingerprint {meta['fingerprint']}), "
            f"not with this bundle (fingerprint {fingerprint}): they are stale; run `item features` with this bundle"
        )
    parts = [_load_shard(shard) for shard in sorted(root.glob("part-*.npz"))]
    have = {str(k) for p in parts for k in p["key"]}
    records = [r for r in _read_log(root / LOG)[0] if str(r["key"]) not in have]
    if records:
        parts.append(_stack(records))
    # String columns may differ in width between shards; numpy concatenates those fine.
    return Features(meta, _concat(parts), _read_bad(root))


def _load_shard(shard: Path, columns: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """A shard's columns (all, or those named). A damaged shard names itself: the zip's CRCs
    catch flipped bytes, and a cut file is no zip at all."""
    try:
        with np.load(shard, allow_pickle=False) as z:
            if "key" not in z.files:
                raise ValueError("no key column")
            return {k: z[k] for k in (columns or z.files)}
    except (OSError, ValueError, EOFError, KeyError, zlib.error, zipfile.BadZipFile) as e:
        raise FeatureStoreError(f"{shard} is unreadable ({e}); delete it and rerun `item features` to redo it") from None


def _shard_keys(root: Path) -> set[str]:
    return {str(k) for shard in sorted(root.glob("part-*.npz")) for k in _load_shard(shard, ("key",))["key"]}


def _read_bad(root: Path) -> list[dict]:
    path = root / BAD
    if not path.is_file():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # a torn last line (or bytes that are not text): that image is tried again
            continue
        if isinstance(entry, dict) and isinstance(entry.get("key"), str):
            out.append(entry)
    return out


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def store_meta(runtime, perturbation: str = "", dataset: str = "") -> dict:
    """The store's meta for features from this runtime: what a resumed run must match."""
    m = runtime.bundle.manifest
    return {
        "bundle": runtime.bundle.name, "fingerprint": runtime.bundle.feature_fingerprint,
        "backend": runtime.backend, "precision": runtime.precision, "perturbation": perturbation,
        "max_objects": runtime.max_objects, "dim": int(m["clip"]["dim"]), "dataset": dataset,
    }


def extract_chunk(runtime, chunk: list[Sample], perturbation: str = "") -> list[tuple[Sample, dict | ImageError]]:
    """One pass of the chain over a chunk of samples, in their order: each sample's row of the
    store, or the ImageError that lists it bad. The images that load run as one batch."""
    rows: list[dict | ImageError | None] = [None] * len(chunk)
    images, where = [], []
    for i, s in enumerate(chunk):
        try:
            img = load_image(s.path, runtime.image_limits)
            images.append(perturb(img, perturbation) if perturbation else img)
            where.append(i)
        except ImageError as e:
            rows[i] = e
    k, dim = runtime.max_objects, int(runtime.bundle.manifest["clip"]["dim"])
    for i, a in zip(where, runtime.analyze_batch(images) if images else []):
        rows[i] = _record(chunk[i], a, k, dim)
    return list(zip(chunk, rows))


@dataclass(frozen=True)
class ExtractSummary:
    total: int  # samples in the dataset
    extracted: int  # finished in this run
    skipped: int  # finished or listed bad before this run
    bad: int  # newly listed bad in this run
    root: Path


def extract(
    runtime,
    samples: list[Sample],
    out: str | Path,
    *,
    perturbation: str = "",
    batch_size: int = 1,
    dataset: str = "",
    shard_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> ExtractSummary:
    """Run the chain on every sample not yet in the store at `out`; resumable."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    meta = store_meta(runtime, perturbation, dataset)
    with FeatureStore(out, meta, shard_size=shard_size) as store:
        todo = store.todo(samples, progress)
        skipped = len(samples) - len(todo)
        bar = Progress("features", len(todo), progress)
        bad = 0
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for s, row in extract_chunk(runtime, chunk, perturbation):
                if isinstance(row, ImageError):
                    store.add_bad(s, row)
                    bad += 1
                else:
                    store.append(row)
            bar.update(len(chunk), f"{bad} bad" if bad else "")
    return ExtractSummary(len(samples), bar.done - bad, skipped, bad, Path(out))
