"""Per-model image preprocessing, written to match the reference (PIL-backend) processors.

The spec comes from the bundle manifest, which copied it from the model's own processor
config at export, so the runtime never guesses sizes, filters or statistics.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
RESAMPLE_NAMES = {int(v): k for k, v in _RESAMPLE.items()}


@dataclass(frozen=True)
class ImageSpec:
    """resize: "exact" to (height, width) or "shortest_edge" to `shortest_edge` (aspect kept)."""

    resize: str
    height: int
    width: int
    shortest_edge: int
    crop_height: int  # 0: no center crop
    crop_width: int
    resample: str
    rescale: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict) -> ImageSpec:
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def out_size(self) -> tuple[int, int]:
        if self.crop_height:
            return self.crop_height, self.crop_width
        return self.height, self.width


def _resize_size(spec: ImageSpec, w: int, h: int) -> tuple[int, int]:
    if spec.resize == "exact":
        return spec.width, spec.height
    # shortest edge to `shortest_edge`, long edge truncated, as the reference does
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


# A resize of up to this many crops' worth of pixels is done whole, as the reference does, and
# then cropped: the same pixels, bit for bit. Beyond it (aspect ratios past 64:1 for a square
# crop) only the region the crop keeps is resampled (see _resized).
EXACT_RESIZE_CROPS = 64


def _resized(img: Image.Image, spec: ImageSpec) -> np.ndarray:
    """The resized (and center-cropped) image as uint8 HWC.

    A shortest-edge resize of a thin image is huge (1 x 20000 px becomes 224 x 4,480,000 px, of
    which 224 x 224 are kept; docs/reliability.md). Past EXACT_RESIZE_CROPS, PIL's `box` resamples
    only the kept region, with the scale of the whole resize; Pillow may then order its two
    passes differently and rounds the box to float32, so pixels can differ from the reference
    by a few levels (tests/test_preprocess.py bounds it; docs/reliability.md)."""
    w, h = _resize_size(spec, *img.size)
    resample = _RESAMPLE[spec.resample]
    if not spec.crop_height:
        return np.asarray(img if (w, h) == img.size else img.resize((w, h), resample=resample))
    ch, cw = spec.crop_height, spec.crop_width
    top, left = (h - ch) // 2, (w - cw) // 2
    y0, y1, x0, x1 = max(0, top), min(h, top + ch), max(0, left), min(w, left + cw)
    if w * h <= EXACT_RESIZE_CROPS * ch * cw:
        whole = img if (w, h) == img.size else img.resize((w, h), resample=resample)
        kept = np.asarray(whole)[y0:y1, x0:x1]
    else:
        sx, sy = img.size[0] / w, img.size[1] / h
        kept = np.asarray(img.resize((x1 - x0, y1 - y0), resample=resample,
                                     box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy)))
    if kept.shape[:2] == (ch, cw):
        return kept
    out = np.zeros((ch, cw, 3), np.uint8)  # smaller than the crop: zeros around, like the reference
    out[y0 - top : y1 - top, x0 - left : x1 - left] = kept
    return out


def _preprocess_into(img: Image.Image, spec: ImageSpec, out: np.ndarray) -> None:
    """RGB PIL image -> float32 CHW, written into `out`."""
    a = _resized(img, spec)  # uint8 HWC: cropped before widening, a quarter of the bytes
    mean = (np.asarray(spec.mean, np.float32) / np.float32(spec.rescale))[:, None, None]
    scale = (np.float32(spec.rescale) / np.asarray(spec.std, np.float32))[:, None, None]
    # Planar, in place: the same float32 arithmetic as (x - mean) * scale, 4x faster than
    # normalizing HWC floats and then copying them through a transpose.
    np.subtract(a.transpose(2, 0, 1), mean, out=out, dtype=np.float32)
    np.multiply(out, scale, out=out)


def preprocess(
    batches: list[tuple[list[Image.Image], ImageSpec]], pool: Executor | None = None
) -> list[np.ndarray]:
    """One float32 (N, 3, H, W) batch per (images, spec). With a pool, every image's resize is
    its own task: Pillow lets go of the GIL while resampling (docs/performance.md, "Large photos")."""
    out = [np.empty((len(images), 3, *spec.out_size), np.float32) for images, spec in batches]
    tasks = [(img, spec, x[i]) for (images, spec), x in zip(batches, out) for i, img in enumerate(images)]
    if pool is None or len(tasks) < 2:
        for task in tasks:
            _preprocess_into(*task)
    else:
        for f in [pool.submit(_preprocess_into, *task) for task in tasks]:
            f.result()
    return out
