"""`Runtime(bundle).detect(image)`: the ITEM chain on exported graphs, no torch.

image -> captioner -> caption -> object words -> detector boxes -> crops
      -> CLIP on [image, crops] and on [caption, words] -> features -> head -> p(fake)
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from .backends import backend_class
from .backends.base import Session
from .bundle import Bundle
from .errors import (
    BundleIntegrityError,
    ImageError,
    RuntimeClosedError,
)
from .provenance import Provenance, ProvenanceLimits, ProvenanceReader, TrustAnchors
from .results import Analysis, DetectionResult, ObjectResult
from .stages.captioner import Captioner, DecodingSpec
from .stages.clip import Clip
from .stages.detector import Detection, Detector
from .stages.images import DEFAULT_LIMITS, ImageInput, ImageLimits, LoadedImage, crop_box, read_image
from .stages.preprocess import preprocess
from .stages.recipe import Pairs, distances, recipe
from .stages.text import TextTokenizer, TextTower, TokenizerSpec
from .stages.words import Vocabulary


class Timings(dict):
    """Stage name -> milliseconds (summed when a stage runs more than once)."""

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + (time.perf_counter() - t0) * 1e3


class WordBank:
    """Object word -> CLIP text embedding and detector query, precomputed at export."""

    def __init__(self, path: Path, vocabulary: Vocabulary):
        with np.load(path, allow_pickle=False) as z:
            words = [str(w) for w in z["words"]]
            self.clip, self.detector = z["clip"], z["detector"]
        self.index = {w: i for i, w in enumerate(words)}
        missing = [w for w in vocabulary.objects if w not in self.index]
        if missing:
            raise BundleIntegrityError(f"word bank lacks {len(missing)} vocabulary words (e.g. {missing[:3]})")

    def rows(self, words: list[str]) -> list[int]:
        return [self.index[w] for w in words]


class Runtime:
    """Load a bundle once; detect on paths, bytes, binary file objects, PIL images or HxWx3
    uint8 arrays.

    `backend`: "onnxruntime" (CPU), "ort-cuda" / "ort-tensorrt" (ONNX Runtime's CUDA and
    TensorRT execution providers; the latter caches its engines in the bundle), or "tensorrt"
    (the plans `item build` made for this GPU and TensorRT version; the head stays on ORT).
    `precision`: "fp32" (the exported graphs, parity 1e-4), or "int8" / "fp16" / "bf16" (the
    variants that passed their gate at export; the rest stay FP32; FP16 on CPU is for checking,
    slow; bf16 runs its graphs on OpenVINO, for CPUs with AMX or AVX512-BF16), or "mixed"
    (per graph INT8, else BF16, else FP32, as gated together at export; the fastest CPU path
    on AMX machines).
    Default: the bundle's `default_precision` on CPU, fp16 (where gated) on the GPU backends.
    `self.precisions` says what each graph really runs in. `profile_prefix` makes ONNX Runtime
    write per-node profiles (item-bench counts FLOPs from them).

    `max_batch`: images per pass through the chain; `detect_batch` splits longer lists (memory
    grows with the batch: CLIP sees up to 1 + max objects crops per image). Default 8, or the
    batch the TensorRT plans were built for.

    Thread-safe: sessions are shared, caches are locked. `parallel` runs the captioner and
    the detector's image side side by side; off by default, because on small CPUs both stages
    are compute-bound and it measured slower (docs/performance.md).
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        precision: str | None = None,
        backend: str = "onnxruntime",
        threads: int = 0,
        parallel: bool = False,
        verify: bool | str = True,  # True: sha256 (stat-cached), "full": re-read all, False: presence
        image_limits: ImageLimits = DEFAULT_LIMITS,
        profile_prefix: str | None = None,
        max_batch: int | None = None,
        provenance: bool = True,
        trust_anchors: TrustAnchors | None = None,
    ):
        # Arguments first: a bad one fails before any graph is loaded.
        engine = backend_class(backend)
        if threads < 0:
            raise ValueError(f"threads must be 0 (all cores) or more, got {threads}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.bundle = b = Bundle.open(bundle, verify=verify)
        spec = b.spec  # the manifest, typed and checked at open (schema.py)
        self.backend = backend
        self.engine = engine(backend, b, precision, threads, profile_prefix)
        self.precision = self.engine.precision
        self.precisions: dict[str, str] = {}  # what each graph really runs in
        self.sessions: dict[str, Session] = {}

        def tokenizer(t: TokenizerSpec) -> TextTokenizer:
            return TextTokenizer(b.file(t.file), t)

        self.captioner = Captioner(
            self._open("captioner_vision"),
            self._open("captioner_cross_kv"),
            self._open("captioner_decoder"),
            tokenizer(spec.captioner.tokenizer),
            # from the dict: a strategy other than greedy is refused here, while `item info` still opens it
            DecodingSpec.from_dict(b.manifest["captioner"]["decoding"]),
        )
        self.detector = Detector(self._open("detector_image"), self._open("detector_head"))
        self.clip = Clip(self._open("clip_image"),
                         TextTower(self._open("clip_text"), tokenizer(spec.clip.tokenizer), "text_embeds"))
        self.head = self._open("head")
        self.specs = {"captioner": spec.captioner.preprocess, "detector": spec.detector.preprocess,
                      "clip": spec.clip.preprocess}
        self.vocabulary = Vocabulary.load(b.file(spec.words.vocabulary))
        self.bank = WordBank(b.file(spec.words.bank), self.vocabulary)
        self.max_objects = spec.words.max_objects
        self.det_threshold = float(spec.detector.threshold)
        self.features, _ = recipe(spec.head.recipe)
        self.threshold = float(spec.head.threshold)
        self.image_limits = image_limits
        # reads what each file declares (C2PA, XMP, generators' marks) from the bytes decoded
        self.provenance = ProvenanceReader(trust_anchors, ProvenanceLimits(max_bytes=image_limits.max_bytes)) \
            if provenance else None
        caps = [x for x in (max_batch, self.engine.max_batch) if x is not None]
        self.max_batch = min(caps) if caps else 8
        self._closed = False
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="itemrt") if parallel else None
        # image decoding and resizing (Pillow, GIL released), whatever `parallel` says
        self._image_pool = ThreadPoolExecutor(min(4, os.cpu_count() or 1), thread_name_prefix="itemrt-image")

    def _open(self, graph: str) -> Session:
        self.sessions[graph], self.precisions[graph] = self.engine.open(graph)
        return self.sessions[graph]

    # --- public API ---------------------------------------------------------------------

    def detect(
        self, image: ImageInput, *, max_new_tokens: int | None = None, words: list[str] | None = None
    ) -> DetectionResult:
        return self.detect_batch([image], max_new_tokens=max_new_tokens, words=words)[0]

    def detect_batch(
        self, images: list[ImageInput], *, max_new_tokens: int | None = None, words: list[str] | None = None
    ) -> list[DetectionResult]:
        """`words`: look for these vocabulary words instead of the caption's (fixed-work profiling)."""
        return [a.result for a in self.analyze_batch(images, max_new_tokens=max_new_tokens, words=words)]

    def analyze_batch(
        self, images: list[ImageInput], *, max_new_tokens: int | None = None, words: list[str] | None = None
    ) -> list[Analysis]:
        """`detect_batch` plus each image's matched pairs: what `item features` stores and
        `item train` learns from."""
        if self._closed:
            raise RuntimeClosedError("this Runtime was closed; open the bundle again")
        if words is not None:
            unknown = [w for w in words if w not in self.bank.index]
            if unknown:
                raise ValueError(f"words not in the bundle's vocabulary: {unknown}")
        out, total = [], len(images)
        for first in range(0, total, self.max_batch):
            out += self._analyze(images[first : first + self.max_batch], first, total, max_new_tokens, words)
        return out

    def _analyze(
        self, images: list[ImageInput], first: int, total: int, max_new_tokens: int | None, words: list[str] | None
    ) -> list[Analysis]:
        """One pass of the chain over images[first:first+n] of the caller's `total`; timings are the pass's."""
        t = Timings()
        with t.stage("total"):
            with t.stage("decode"):
                n = len(images)
                if n == 1:  # on this thread: a pool thread measured slower on one 12 MP JPEG in item-bench
                    loaded = [self._load(images[0], first, total)]
                else:  # Pillow decodes without the GIL: several images at once
                    loaded = list(self._image_pool.map(self._load, images, range(first, first + n), [total] * n))
            if self.provenance is not None:
                with t.stage("provenance"):  # bounded, and never an input to the verdict
                    data = [x.data for x in loaded]
                    found = list(self._image_pool.map(self._provenance, data)) if n > 1 else [self._provenance(data[0])]
            else:
                found = [None] * len(loaded)
            results = self._run([x.image for x in loaded], t, max_new_tokens, words)
        timings = {k: round(v, 3) for k, v in t.items()}
        return [Analysis(replace(a.result, timings_ms=dict(timings), provenance=p), a.pairs)
                for a, p in zip(results, found)]

    def close(self) -> None:
        """Free the sessions' device memory and stop the thread pools; detect() then raises."""
        if self._closed:
            return
        self._closed = True
        for s in self.sessions.values():
            s.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._image_pool.shutdown(wait=True)

    def __enter__(self) -> Runtime:  # noqa: PYI034 - typing.Self needs 3.11; Jetson runs 3.10
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the chain ----------------------------------------------------------------------

    def _load(self, x: ImageInput, i: int, n: int) -> LoadedImage:
        try:
            return read_image(x, self.image_limits)
        except ImageError as e:
            if n == 1:
                raise
            raise type(e)(f"image {i}: {e}") from None

    def _provenance(self, data: bytes | None) -> Provenance:
        if data is None:
            return Provenance.unavailable("given decoded pixels (a PIL image or an array), not a file")
        return self.provenance.read(data)

    def _run(
        self, images: list[Image.Image], t: Timings, max_new_tokens: int | None, forced: list[str] | None
    ) -> list[Analysis]:
        cap, det = self.captioner, self.detector
        with t.stage("preprocess"):  # CLIP's I0 too: like the other two, it needs only the image
            px_cap, px_det, px_i0 = preprocess(
                [(images, self.specs["captioner"]), (images, self.specs["detector"]), (images, self.specs["clip"])],
                self._image_pool,
            )

        def caption():
            with t.stage("captioner_vision"):
                emb = cap.encode_image(px_cap)
            with t.stage("captioner_cross_kv"):
                k, v = cap.cross_kv(emb)
            with t.stage("captioner_decoder"):
                return cap.generate(k, v, max_new_tokens)

        def detect_image():
            with t.stage("detector_image"):
                return det.encode_image(px_det)

        # Both depend only on the image: run side by side.
        if self._pool is not None:
            f_cap, f_det = self._pool.submit(caption), self._pool.submit(detect_image)
            captions, det_out = f_cap.result(), f_det.result()
        else:
            captions, det_out = caption(), detect_image()

        with t.stage("words"):
            if forced is None:
                words = [self.vocabulary.extract(c, self.max_objects) for c in captions.texts]
            else:
                words = [list(forced) for _ in images]
        with t.stage("detector_queries"):
            rows = [self.bank.rows(w) for w in words]
            q = max(1, max(map(len, rows)))
            queries = np.zeros((len(images), q, self.bank.detector.shape[1]), np.float32)
            for i, r in enumerate(rows):
                queries[i, : len(r)] = self.bank.detector[r]
        with t.stage("detector_head"):
            logits = det.logits(det_out, queries)
            dets = [
                det.decode(logits[i], det_out["pred_boxes"][i], words[i], img.size, self.det_threshold)
                for i, img in enumerate(images)
            ]
        with t.stage("crops"):
            found = [[d for d in ds if d.found] for ds in dets]
            crops = [crop_box(img, d.box) for img, fs in zip(images, found) for d in fs]
            (px_crops,) = preprocess([(crops, self.specs["clip"])], self._image_pool)
            rows, offset = [], 0
            for i, fs in enumerate(found):
                rows += [px_i0[i : i + 1], px_crops[offset : offset + len(fs)]]
                offset += len(fs)
            px_clip = np.concatenate(rows)
        with t.stage("clip_image"):
            img_emb = self.clip.encode_image(px_clip)  # [I0, crops] of every image in one call
        with t.stage("clip_text"):
            txt_emb = self.clip.encode_text(captions.texts)
        with t.stage("head"):
            pairs, feats, offset = [], [], 0
            for i, (ds, fs) in enumerate(zip(dets, found)):
                n = len(fs)
                p = Pairs(
                    img_emb[offset],
                    txt_emb[i],
                    img_emb[offset + 1 : offset + 1 + n],
                    self.bank.clip[self.bank.rows([d.word for d in fs])],
                    np.asarray([d.score for d in ds], np.float32),
                    self.max_objects,
                )
                offset += 1 + n
                pairs.append(p)
                feats.append(self.features(p))
            p_fake = self.head.run({"features": np.stack(feats)})["p_fake"].reshape(-1)
        return [
            Analysis(
                self._result(images[i], captions.texts[i], captions.tokens[i], dets[i], pairs[i], float(p_fake[i])),
                pairs[i],
            )
            for i in range(len(images))
        ]

    def _result(
        self, img: Image.Image, caption: str, tokens: list[int], dets: list[Detection], pairs: Pairs, p: float
    ) -> DetectionResult:
        g, local = distances(pairs)
        it = iter(local.tolist())
        objects = [ObjectResult(d.word, d.found, d.score, d.box, next(it) if d.found else None) for d in dets]
        return DetectionResult(
            p_fake=p,
            label="fake" if p >= self.threshold else "real",
            threshold=self.threshold,
            trained=self.bundle.trained,
            caption=caption,
            caption_tokens=tokens,
            global_distance=g,
            objects=objects,
            image_size=img.size,
            bundle=self.bundle.name,
        )
