"""Image perturbations for robustness sweeps: JPEG re-compression, Gaussian blur, downscaling.

A spec is `kind=value`: `jpeg=75` (quality), `blur=2` (sigma, pixels), `scale=0.5` (factor,
then back up to the original size so every model sees the same geometry as before).
"""

from __future__ import annotations

import argparse
import io

from PIL import Image, ImageFilter

KINDS = ("jpeg", "blur", "scale")


def parse(spec: str) -> tuple[str, float]:
    kind, _, value = spec.partition("=")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    ok = (kind == "jpeg" and 1 <= v <= 100) or (kind == "blur" and v >= 0) or (kind == "scale" and 0 < v <= 1)
    if kind not in KINDS or not ok:
        raise ValueError(f"perturbation {spec!r}: use jpeg=1..100, blur=SIGMA>=0 or scale=0<F<=1")
    return kind, v


def apply(img: Image.Image, spec: str) -> Image.Image:
    kind, v = parse(spec)
    if kind == "jpeg":
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=int(v))
        buf.seek(0)
        out = Image.open(buf)
        out.load()
        return out.convert("RGB")
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(v)) if v > 0 else img
    w, h = img.size
    small = img.resize((max(1, round(w * v)), max(1, round(h * v))), Image.Resampling.BICUBIC)
    return small.resize((w, h), Image.Resampling.BICUBIC)


def argument(spec: str) -> str:
    """argparse type for a spec: a bad one is a usage error that carries `parse`'s message."""
    try:
        parse(spec)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return spec
