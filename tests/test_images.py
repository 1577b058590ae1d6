"""Hostile and odd inputs: the right image or a typed error, and the runtime keeps working."""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import threading
import zlib

import numpy as np
import pytest
from itemrt import (
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ImageUnreadableError,
    UnsupportedImageError,
)
from itemrt.stages.images import ImageLimits, crop_box, load_image
from PIL import Image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _photo(w=64, h=48) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims another size: a decompression bomb's shape."""
    data = bytearray(_encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", CorruptImageError),
        (b"this is not an image at all", UnsupportedImageError),
        (b"%PDF-1.4 fake", UnsupportedImageError),
        (_encode(_photo(), "JPEG")[:300], CorruptImageError),  # truncated
        (_encode(_photo(), "PNG")[:-40], CorruptImageError),  # truncated
        (_png_claiming(100_000, 100_000), ImageTooLargeError),  # bomb: refused before decoding
        (_png_claiming(30_000, 10), ImageTooLargeError),  # one side too long
    ],
)
def test_bad_bytes_give_typed_errors(data, error):
    with pytest.raises(error):
        load_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_lazily_opened_truncated_pil_image_gives_a_typed_error(fmt):
    """Image.open reads only the header; the truncation shows when the pixels are decoded,
    which must happen inside load_image, not later in a resize."""
    data = _encode(_photo(), fmt)
    with pytest.raises(CorruptImageError, match="truncated"):
        load_image(Image.open(io.BytesIO(data[: len(data) // 2])))
    assert load_image(Image.open(io.BytesIO(data))).size == (64, 48)


def test_byte_limit():
    with pytest.raises(ImageTooLargeError):
        load_image(_encode(_photo(), "PNG"), ImageLimits(max_bytes=100))


def test_paths(tmp_path):
    with pytest.raises(ImageNotFoundError):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(UnsupportedImageError):
        load_image(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(CorruptImageError):
        load_image(empty)
    with pytest.raises(ImageUnreadableError, match="Not a directory"):  # an OSError that is not "missing"
        load_image(empty / "x.jpg")


def test_streams_are_read_up_to_the_byte_limit_only():
    """A pipe or a device says size 0: the limit holds while reading (`item detect <(curl ...)`)."""
    jpg = _encode(_photo(), "JPEG")
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, jpg), os.close(w)))
    writer.start()
    try:
        assert load_image(f"/dev/fd/{r}").size == _photo().size
    finally:
        writer.join()
        os.close(r)
    with pytest.raises(ImageTooLargeError):  # endless
        load_image("/dev/zero", ImageLimits(max_bytes=1 << 20))


@pytest.mark.parametrize(
    "arr",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32), np.zeros((0, 8, 3), np.uint8)],
)
def test_bad_arrays(arr):
    with pytest.raises(ImageError):
        load_image(arr)


def test_unsupported_type():
    with pytest.raises(UnsupportedImageError):
        load_image(12345)
    with pytest.raises(UnsupportedImageError, match="is a URL; images are not fetched"):
        load_image("https://example.com/photo.jpg")


def test_binary_file_objects(tmp_path):
    jpg = _encode(_photo(), "JPEG")
    assert np.array_equal(np.asarray(load_image(io.BytesIO(jpg))), np.asarray(load_image(jpg)))
    (tmp_path / "a.jpg").write_bytes(jpg)
    with open(tmp_path / "a.jpg", "rb") as f:
        assert load_image(f).size == _photo().size
    with pytest.raises(ImageTooLargeError, match="stream is over the limit"):
        load_image(io.BytesIO(jpg), ImageLimits(max_bytes=100))
    with open(tmp_path / "a.jpg", encoding="latin-1") as f, pytest.raises(UnsupportedImageError, match="binary mode"):
        load_image(f)
    with open(tmp_path / "a.jpg", "rb") as f:
        f.close()
        with pytest.raises(ImageUnreadableError, match="closed file"):
            load_image(f)


@pytest.mark.parametrize("mode", ["CMYK", "L", "LA", "RGBA", "P", "1"])
def test_modes_become_rgb(mode):
    img = _photo().convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "L") else "PNG"
    out = load_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (64, 48)


def test_alpha_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert load_image(_encode(rgba, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_keeps_the_top_byte():
    arr = np.full((6, 6), 0xABCD, np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    out = load_image(_encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (0xABCD // 257,) * 3


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "PA", "1", "CMYK", "YCbCr", "RGB"])
def test_rgb_conversion_is_the_references_pixel_for_pixel(mode, monkeypatch):
    """Converted in bands of rows (no full-size temporaries), yet the reference's pixels,
    transparency included (an RGB, L or P image with a transparent colour is composited too)."""
    import itemrt.stages.images as images
    from transformers.image_transforms import convert_to_rgb

    monkeypatch.setattr(images, "_BAND_PIXELS", 997)  # many bands, the last one short
    rng = np.random.default_rng(7)
    base = Image.fromarray(rng.integers(0, 256, (123, 71, 4), dtype=np.uint8), "RGBA")
    img = base.convert("P").convert("PA") if mode == "PA" else base.convert(mode)
    variants = [img]
    if mode in ("RGB", "L", "P"):
        keyed = img.copy()
        keyed.info["transparency"] = tuple(img.getpixel((3, 3))) if mode == "RGB" else img.getpixel((3, 3))
        variants.append(keyed)
    for v in variants:
        np.testing.assert_array_equal(np.asarray(images._to_rgb(v)), convert_to_rgb(v, return_numpy=True))


def test_high_depth_in_bands_keeps_the_whole_image_rule(monkeypatch):
    """Float images scale to 255 only when every value is at most 1: decided for the whole image
    even though it is converted band by band (the largest value in the last band decides)."""
    import itemrt.stages.images as images

    monkeypatch.setattr(images, "_BAND_PIXELS", 500)
    a = np.full((40, 25), 0.5, np.float32)
    a[5, 5] = np.nan
    assert load_image(Image.fromarray(a, "F")).getpixel((0, 0)) == (127,) * 3
    assert load_image(Image.fromarray(a, "F")).getpixel((5, 5)) == (0,) * 3  # NaN: 0
    a[39, 24] = 3.0  # one value above 1, in the last band: no scaling anywhere
    assert load_image(Image.fromarray(a, "F")).getpixel((0, 0)) == (0,) * 3
    a[39, 24] = np.inf
    assert load_image(Image.fromarray(a, "F")).getpixel((0, 0)) == (0,) * 3
    i32 = Image.fromarray(np.full((40, 25), 0xABCD, np.int32))
    assert load_image(i32).getpixel((7, 30)) == (0xABCD // 257,) * 3


def test_jpeg_scans_are_counted_from_the_markers():
    """Segments are skipped by their length: a JPEG thumbnail inside EXIF, fill bytes and restart
    markers do not count; each repeated scan does."""
    from itemrt.bench.hostile import scan_bomb_jpeg
    from itemrt.stages.images import jpeg_scans

    photo = _photo(96, 64)
    assert jpeg_scans(_encode(photo, "JPEG")) == 1
    assert jpeg_scans(_encode(photo, "JPEG", progressive=True)) == 10  # libjpeg's progression for YCbCr
    assert jpeg_scans(_encode(photo, "JPEG", restart_marker_blocks=1)) == 1
    assert jpeg_scans(scan_bomb_jpeg(96, 64, 300)) == 300
    thumb = _encode(_photo(16, 16), "JPEG", progressive=True)  # 10 scans of its own, inside APP1
    exif = b"Exif\0\0" + thumb
    with_thumb = bytearray(_encode(photo, "JPEG"))
    with_thumb[2:2] = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    assert jpeg_scans(bytes(with_thumb)) == 1
    base = _encode(photo, "JPEG", progressive=True)
    sos = base.index(b"\xff\xda")
    assert jpeg_scans(base[:sos] + b"\xff\xff\xff" + base[sos:]) == 10  # fill bytes before a marker
    assert jpeg_scans(b"not a jpeg") == 0 and jpeg_scans(base[: sos + 3]) == 0  # cut inside a header


def test_a_jpeg_of_thousands_of_scans_is_refused_before_decoding():
    """A 2000 x 2000 progressive JPEG with one scan repeated 2,000 times took 10 s to decode
    (issue 21); it is refused from its markers, before anything is held or decoded."""
    from itemrt import ImageTooComplexError
    from itemrt.bench.hostile import scan_bomb_jpeg

    held = []

    @contextlib.contextmanager
    def hold(pixels):
        held.append(pixels)
        yield

    with pytest.raises(ImageTooComplexError, match="2000 scans") as e:
        load_image(scan_bomb_jpeg(2000, 2000, 2000), hold=hold)
    assert e.value.code == "image_too_complex" and isinstance(e.value, ImageTooLargeError) and held == []
    # both limits are the caller's: scans, and scans x pixels
    ten = _encode(_photo(96, 64), "JPEG", progressive=True)
    assert load_image(ten).size == (96, 64)
    with pytest.raises(ImageTooComplexError):
        load_image(ten, ImageLimits(max_jpeg_scans=9))
    with pytest.raises(ImageTooComplexError):
        load_image(ten, ImageLimits(max_scan_pixels=96 * 64 * 10 - 1))
    assert load_image(ten, ImageLimits(max_scan_pixels=96 * 64 * 10)).size == (96, 64)


def test_mutated_jpegs_never_break_the_scan_count():
    """Seeded and bounded: the marker walk ends, and decoding gives an image or a typed error."""
    from itemrt.stages.images import jpeg_scans

    rng = np.random.default_rng(21)
    seeds = [_encode(_photo(48, 32), "JPEG", progressive=p, quality=q) for p in (True, False) for q in (30, 95)]
    for i in range(1500):
        data = bytearray(seeds[i % len(seeds)])
        for _ in range(int(rng.integers(1, 6))):
            at = int(rng.integers(0, len(data)))
            choice = int(rng.integers(0, 3))
            if choice == 0:
                data[at] = int(rng.integers(0, 256))
            elif choice == 1:
                data[at:at] = rng.choice([b"\xff\xda", b"\xff\xd9", b"\xff", b"\xff\x00", b"\xff\xd0"])
            else:
                del data[at : at + int(rng.integers(1, 64))]
        assert 0 <= jpeg_scans(bytes(data)) <= len(data)
        try:
            load_image(bytes(data))
        except ImageError:
            pass


def test_exif_orientation_applied():
    img = _photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_image(_encode(img, "JPEG", exif=exif))
    assert out.size == (48, 64)


def test_animated_takes_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    r, _, b = out.getpixel((8, 8))
    assert r > 200 and b < 50


def test_a_broken_later_page_does_not_reject_the_first():
    """Found by fuzzing: counting a multi-page TIFF's frames parses every page, and a page
    without dimensions raised a bare TypeError. Only the first frame is decoded now."""
    page = Image.new("RGB", (8, 6), (200, 10, 10))
    data = bytearray(_encode(page, "TIFF", save_all=True, append_images=[page]))
    first = struct.unpack_from("<I", data, 4)[0]
    second = struct.unpack_from("<I", data, first + 2 + 12 * struct.unpack_from("<H", data, first)[0])[0]
    for i in range(struct.unpack_from("<H", data, second)[0]):
        entry = second + 2 + 12 * i
        if struct.unpack_from("<H", data, entry)[0] in (256, 257):  # width, height: now unknown tags
            struct.pack_into("<H", data, entry, 0xC000 + i)
    out = load_image(bytes(data))
    assert out.size == (8, 6) and out.getpixel((0, 0)) == (200, 10, 10)


@pytest.mark.parametrize("fmt", ImageLimits().formats)
def test_accepted_formats_decode(fmt):
    Image.init()
    if fmt not in Image.SAVE:
        pytest.skip(f"this Pillow cannot write {fmt}")
    img = _photo(32, 24)
    out = load_image(_encode(img, fmt, **({"quality": 100} if fmt in ("JPEG", "WEBP", "AVIF") else {})))
    assert out.mode == "RGB" and out.size == (32, 24)


@pytest.mark.parametrize("fmt", ["ICO", "DDS", "TGA", "PCX", "SGI", "JPEG2000", "QOI"])
def test_other_formats_are_refused(fmt):
    """Pillow decodes these too; a gateway takes only what cameras and browsers write."""
    data = _encode(_photo(32, 32).convert("RGBA" if fmt == "DDS" else "RGB"), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a valid file, which Pillow would decode
    with pytest.raises(UnsupportedImageError, match="accepted format.*JPEG"):
        load_image(data)
    assert load_image(data, ImageLimits(formats=(fmt,))).size == (32, 32)


def test_mutated_images_give_typed_errors_only():
    """A seeded fuzz: bytes flipped, cut, spliced or set to extreme integers in the accepted
    formats, in several modes. Each input either decodes to RGB or raises an ImageError."""
    import random

    rng = random.Random(7)
    seeds = [_encode(_photo(24, 16).convert(mode), fmt)
             for fmt, modes in {"JPEG": ("RGB", "L", "CMYK"), "PNG": ("RGBA", "P", "LA", "I;16"), "GIF": ("P",),
                                "WEBP": ("RGB",), "BMP": ("RGB",), "TIFF": ("RGB", "CMYK", "F"), "PPM": ("L",)}.items()
             for mode in modes]
    decoded = refused = 0
    for _ in range(3000):
        data = bytearray(rng.choice(seeds))
        cut = rng.randrange(1, len(data))
        match rng.randrange(4):
            case 0:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
            case 1:
                data = data[:cut]
            case 2:
                data[cut : cut + rng.randint(1, 16)] = rng.randbytes(rng.randint(0, 16))
            case 3:
                at = rng.randrange(min(len(data) - 4, 200))
                data[at : at + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, b"\x7f\xff\xff\xff", b"\x80\0\0\0"])
        try:
            assert load_image(bytes(data)).mode == "RGB"
            decoded += 1
        except ImageError:
            refused += 1
    assert decoded > 50 and refused > 50  # both outcomes exercised


def test_hold_is_entered_with_the_claimed_pixels_before_decoding():
    """item serve's pixel budget: load_image enters `hold` with what the header claims, weighed
    by what its format costs to decode, and nothing is decoded before it is entered or once the
    claim is over the limits."""
    from contextlib import contextmanager

    from itemrt.stages.images import DECODE_BYTES, decode_cost

    held = []

    @contextmanager
    def hold(pixels):
        held.append(pixels)
        yield

    assert load_image(_encode(_photo(64, 48), "JPEG"), hold=hold).size == (64, 48)
    assert held == [decode_cost("JPEG", (64, 48))] == [math.ceil(64 * 48 * DECODE_BYTES["JPEG"] / 12)]
    assert load_image(_encode(_photo(64, 48), "WEBP"), hold=hold).size == (64, 48)
    assert held[1] > held[0]  # WebP decodes through a second buffer: it weighs more
    held.clear()
    with pytest.raises(ImageTooLargeError):
        load_image(_png_claiming(30_000, 10), hold=hold)
    with pytest.raises(UnsupportedImageError):
        load_image(b"not an image", hold=hold)
    assert held == []  # refused from the header: nothing held, nothing decoded


def test_inputs_agree():
    img = _photo()
    a = np.asarray(load_image(np.asarray(img)))
    for src in (img, _encode(img, "PNG")):
        assert np.array_equal(np.asarray(load_image(src)), a)


def test_crop_box_clamps_to_image():
    img = _photo(64, 48)
    assert crop_box(img, (-10, -5, 20.2, 30.7)).size == (21, 31)
    assert crop_box(img, (100, 100, 200, 200)).size == (1, 1)  # off-image: still a pixel
    assert crop_box(img, (5, 5, 5, 5)).size == (1, 1)  # degenerate


def test_runtime_survives_bad_input(runtime, samples, tmp_path):
    trunc = tmp_path / "t.jpg"
    trunc.write_bytes(samples[0].read_bytes()[:500])
    for bad in (trunc, b"", b"garbage", _png_claiming(100_000, 100_000)):
        with pytest.raises(ImageError):
            runtime.detect(bad)
    with pytest.raises(ImageError, match="image 1"):
        runtime.detect_batch([samples[0], b"garbage"])
    # odd but valid inputs give results
    for mode in ("CMYK", "LA", "P", "RGBA"):
        assert runtime.detect(_encode(_photo().convert(mode), "PNG" if mode != "CMYK" else "JPEG")).caption_tokens
    assert runtime.detect(samples[1]).caption_tokens
