"""Decode any supported input once into an RGB PIL image, safely.

Hostile input gets a typed error (see errors.py) before it can cost memory: byte size is
checked before reading, pixel count from the header before decoding.
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooComplexError,
    ImageTooLargeError,
    ImageUnreadableError,
    UnsupportedImageError,
)

Hold = Callable[[int], AbstractContextManager]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 64_000_000  # ~8000 x 8000
    max_side: int = 20_000
    # What cameras, phones, browsers and machine-vision cameras write. Pillow would also try some
    # thirty rarer decoders (EPS hands the file to Ghostscript), each more attack surface for an
    # upload gateway; any other format is an UnsupportedImageError. AVIF where Pillow has it.
    formats: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "PPM")
    # A progressive JPEG is decoded in one pass over the whole image per scan, and a scan can
    # be a few bytes: one repeated 2,000 times made a 44 KB file take 10 s. Encoders write about
    # ten. Refused before decoding: more scans than this, or more scans x pixels than that.
    max_jpeg_scans: int = 256
    max_scan_pixels: int = 32 * 64_000_000


DEFAULT_LIMITS = ImageLimits()

_HIGH_DEPTH_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I", "F"}

# Peak bytes a pixel while decoding to RGB, by format: the most over the modes each format
# has, measured with `python -m itemrt.bench.hostile --modes` (docs/reliability.md).
# item serve's decode budget counts pixels of DECODE_BYTES_REF bytes each, so a WebP weighs
# more than a JPEG of the same size.
DECODE_BYTES = {"JPEG": 9, "PNG": 10, "TIFF": 11, "BMP": 5, "PPM": 5, "GIF": 6, "WEBP": 17, "AVIF": 10}
DECODE_BYTES_REF = 12


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and the file bytes it came from (None for a PIL image or an array):
    what a caller that decodes ahead (for a picture, or a decode budget) hands the runtime, so
    that the file's own metadata can still be read."""

    image: Image.Image
    data: bytes | None


ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Image.Image | np.ndarray | LoadedImage


def load_image(source: ImageInput, limits: ImageLimits = DEFAULT_LIMITS, hold: Hold | None = None) -> Image.Image:
    """Path, bytes, binary file object, PIL image or HxWx3 uint8 array -> upright RGB PIL image
    (first frame). `hold(pixels)`, a context manager, is entered with the pixel count the header
    claims, before anything is decoded, and left once the RGB image is made (item serve's
    budget of pixels decoded at once)."""
    return read_image(source, limits, hold).image


def read_image(source: ImageInput, limits: ImageLimits = DEFAULT_LIMITS,
               hold: Hold | None = None) -> LoadedImage:
    """`load_image`, keeping the bytes that were read (within the limits, read once)."""
    if isinstance(source, LoadedImage):
        return source
    if isinstance(source, np.ndarray):
        return LoadedImage(_from_array(source, limits), None)
    if isinstance(source, Image.Image):
        _check_size(source.size, limits)
        # Image.open is lazy: a caller's image may not be decoded yet, and may be truncated
        return LoadedImage(_typed_errors(lambda: _to_rgb(_upright(_loaded(_first_frame(source))))), None)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        if isinstance(source, str) and _URL.match(source) and not os.path.exists(source):
            raise UnsupportedImageError(f"{source} is a URL; images are not fetched: give its path or bytes")
        data = _read_file(Path(source), limits)
    elif callable(getattr(source, "read", None)):  # an open file, an upload, io.BytesIO
        data = _read_stream(source, limits)
    else:
        raise UnsupportedImageError(
            f"unsupported input type {type(source).__name__}: "
            "give a path, bytes, a binary file object, a PIL image or an HxWx3 uint8 array"
        )
    return LoadedImage(decode_bytes(data, limits, hold), data)


def decode_bytes(data: bytes, limits: ImageLimits = DEFAULT_LIMITS, hold: Hold | None = None) -> Image.Image:
    if len(data) == 0:
        raise CorruptImageError("empty image data (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"image data is {len(data)} bytes, over the limit of {limits.max_bytes}")

    def decode() -> Image.Image:
        img = Image.open(io.BytesIO(data), formats=_decoders(limits.formats))
        _check_size(img.size, limits)  # header only: nothing decoded yet
        if img.format in ("JPEG", "MPO"):
            _check_scans(data, img.size, limits)
        with hold(decode_cost(img.format, img.size)) if hold else nullcontext():
            return _to_rgb(_upright(_loaded(_first_frame(img))))

    return _typed_errors(decode, limits.formats)


def decode_cost(fmt: str | None, size: tuple[int, int]) -> int:
    """What decoding an image of this format and size costs at its peak, in pixels of
    DECODE_BYTES_REF bytes (the unit of item serve's decode budget)."""
    per_pixel = DECODE_BYTES.get(fmt or "", DECODE_BYTES_REF)
    return math.ceil(size[0] * size[1] * per_pixel / DECODE_BYTES_REF)


_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")  # what ends a scan's entropy-coded data


def jpeg_scans(data: bytes) -> int:
    """Scans (SOS segments) of the JPEG's first image, by walking its segments: a segment's
    payload is skipped by its length, a scan's data up to the next marker. Linear in bytes."""
    if data[:2] != b"\xff\xd8":
        return 0
    pos, scans, end = 2, 0, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF or data[pos + 1] == 0xFF:  # stray bytes or fill: on to the next marker
            m = _MARKER.search(data, pos + 1)
            if m is None:
                break
            pos = m.start()
            continue
        marker = data[pos + 1]
        if marker == 0xD9:  # end of image
            break
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a payload
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            m = _MARKER.search(data, pos)
            if m is None:
                break
            pos = m.start()
    return scans


def _check_scans(data: bytes, size: tuple[int, int], limits: ImageLimits) -> None:
    scans = jpeg_scans(data)
    work = scans * size[0] * size[1]
    if scans > limits.max_jpeg_scans or work > limits.max_scan_pixels:
        raise ImageTooComplexError(
            f"JPEG of {size[0]}x{size[1]} with {scans} scans; limits are {limits.max_jpeg_scans} scans "
            f"and {limits.max_scan_pixels} scans x pixels (encoders write about 10 scans)"
        )


def _decoders(formats: tuple[str, ...]) -> list[str]:
    Image.init()  # registers every plugin (once), so AVIF is known where this Pillow has it
    return [f for f in formats if f in Image.OPEN]


def _loaded(img: Image.Image) -> Image.Image:
    img.load()
    return img


def _typed_errors(decode: Callable[[], Image.Image], formats: tuple[str, ...] = ()) -> Image.Image:
    """Run `decode`, turning what Pillow raises on hostile or broken data into ImageErrors.
    Pillow's plugins raise TypeError too (a TIFF frame without dimensions, found by fuzzing)."""
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            # Pillow's warnings about broken tags and EXIF would fill a gateway's log, one per
            # hostile upload; the image is judged by whether it decodes.
            warnings.simplefilter("ignore")
            # PIL only warns between 1x and 2x its own limit; treat that as a bomb too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return decode()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"decompression bomb refused: {e}") from None
    except UnidentifiedImageError:
        raise UnsupportedImageError(f"not an image in an accepted format ({', '.join(formats)})") from None
    except NotImplementedError as e:  # a variant of the format that Pillow does not decode
        raise UnsupportedImageError(f"unsupported image variant: {e}") from None
    except ImageError:  # ours, from the size checks: already typed
        raise
    except (OSError, SyntaxError, ValueError, TypeError, EOFError, IndexError, struct.error) as e:
        raise CorruptImageError(f"truncated or corrupt image: {e}") from None


def _read_file(path: Path, limits: ImageLimits) -> bytes:
    """At most `limits.max_bytes`, whatever the file claims: a pipe or a device reports size 0
    (`item detect <(curl ...)` is a pipe), and a file may grow while it is read."""
    if path.is_dir():
        raise UnsupportedImageError(f"{path} is a directory, not an image")
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, once read
    except FileNotFoundError:
        raise ImageNotFoundError(f"no such image file: {path}") from None
    except OSError as e:
        raise ImageUnreadableError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        return _read_stream(f, limits, str(path))


def _read_stream(f: BinaryIO, limits: ImageLimits, name: str = "") -> bytes:
    """From the stream's position, at most `limits.max_bytes` (a stream may not know its size)."""
    name = name or f"the {type(f).__name__} stream"
    try:
        data = f.read(limits.max_bytes + 1)
    except (OSError, ValueError) as e:  # ValueError: a closed file
        raise ImageUnreadableError(f"cannot read {name}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise UnsupportedImageError(f"{name} gave {type(data).__name__}, not bytes: open it in binary mode")
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(f"{name} is over the limit of {limits.max_bytes} bytes")
    return bytes(data)


def _check_size(size: tuple[int, int], limits: ImageLimits) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise CorruptImageError(f"image has no pixels ({w}x{h})")
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise ImageTooLargeError(
            f"image is {w}x{h}; limits are {limits.max_side} px per side and {limits.max_pixels} pixels"
        )


def _from_array(arr: np.ndarray, limits: ImageLimits) -> Image.Image:
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise UnsupportedImageError(
            f"arrays must be HxWx3 uint8 RGB; got shape {arr.shape} dtype {arr.dtype}"
        )
    _check_size((arr.shape[1], arr.shape[0]), limits)
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def _first_frame(img: Image.Image) -> Image.Image:
    # tell(), not n_frames: counting frames parses every one, and a broken later frame (a TIFF
    # page without dimensions, found by fuzzing) must not reject a good first one.
    if img.tell() != 0:
        img.seek(0)
    return img


def _upright(img: Image.Image) -> Image.Image:
    try:
        # in place: otherwise an image with nothing to turn is copied whole
        ImageOps.exif_transpose(img, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not reject an otherwise good image
        pass
    return img


_BAND_PIXELS = 1 << 20  # rows converted at a time: the full-size temporaries are one band


def _to_rgb(img: Image.Image) -> Image.Image:
    """Same rule as the reference processors (alpha composited on white), plus high bit depths,
    done in bands of rows so that no full-size temporary is made beyond the RGB result
    (docs/design.md §10)."""
    high = img.mode in _HIGH_DEPTH_MODES
    alpha = not high and ("A" in img.getbands() or img.info.get("transparency") is not None)  # the reference's test
    if img.mode == "RGB" and not alpha:
        return img
    if not alpha and not high:
        return img.convert("RGB")  # opaque: RGBA on white then RGB is this, pixel for pixel
    w, h = img.size
    out = Image.new("RGB", img.size)
    step = max(1, _BAND_PIXELS // w)
    scale = _high_scale(img, step) if high else 1.0
    for y in range(0, h, step):
        band = img.crop((0, y, w, min(h, y + step)))
        if high:
            band = Image.fromarray(_to_uint8(np.asarray(band), scale), "L")
        rgba = band if band.mode == "RGBA" else band.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        out.paste(white.convert("RGB"), (0, y))
    return out


def _high_scale(img: Image.Image, step: int) -> float:
    """Float images whose values are all at most 1 are scaled to 255: a whole-image rule, found
    band by band so that every band agrees."""
    if img.mode != "F":
        return 1.0
    w, h = img.size
    # fmax skips NaN (the rule's nan_to_num makes it 0, and 0 is the floor anyway); +inf is > 1
    top = max(float(np.fmax.reduce(np.asarray(img.crop((0, y, w, min(h, y + step)))), axis=None, initial=0.0))
              for y in range(0, h, step))
    return 255.0 if top <= 1.0 else 1.0


def _to_uint8(a: np.ndarray, scale: float = 1.0) -> np.ndarray:
    if a.dtype.kind == "f":
        return np.clip(np.nan_to_num(a.astype(np.float64)) * scale, 0, 255).astype(np.uint8)
    # 16-bit (and 32-bit holding 16-bit data): keep the top 8 bits of the 16-bit range
    return (np.clip(a.astype(np.int64), 0, 65535) // 257).astype(np.uint8)


def crop_box(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop an xyxy pixel box (floats, may reach past the border) to at least 1x1 pixel."""
    w, h = img.size
    x0 = min(max(0, math.floor(box[0])), w - 1)
    y0 = min(max(0, math.floor(box[1])), h - 1)
    x1 = max(min(w, math.ceil(box[2])), x0 + 1)
    y1 = max(min(h, math.ceil(box[3])), y0 + 1)
    return img.crop((x0, y0, x1, y1))
