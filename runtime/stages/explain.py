"""`--explain`: the image with each found word's box, score and distance, the verdict, and
what the file declares about its origin (a line of its own: evidence beside the verdict)."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from ..results import DetectionResult

_COLORS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def render(img: Image.Image, r: DetectionResult) -> Image.Image:
    w, h = img.size
    scale = max(1.0, 640 / max(w, h))  # small images are enlarged so the labels stay legible
    canvas = img.resize((round(w * scale), round(h * scale))) if scale > 1 else img.copy()
    fs = max(12, round(max(canvas.size) / 45))
    font, small = _font(fs), _font(max(10, fs * 3 // 4))
    lines = 4 if r.provenance is not None else 3
    banner = fs * lines + 4 * lines
    out = Image.new("RGB", (canvas.width, canvas.height + banner), (255, 255, 255))
    out.paste(canvas, (0, banner))
    d = ImageDraw.Draw(out)

    verdict = f"{r.label.upper()}  p(fake)={r.p_fake:.3f}  (threshold {r.threshold:.2f})"
    if not r.trained:
        verdict += "  UNTRAINED HEAD: meaningless"
    d.text((6, 4), verdict, fill=(200, 0, 0) if r.label == "fake" else (0, 120, 0), font=font)
    d.text((6, 8 + fs), f'"{r.caption}"   global distance {r.global_distance:.3f}', fill=(0, 0, 0), font=small)
    missing = [o.word for o in r.objects if not o.found]
    if missing:
        d.text((6, 12 + 2 * fs), "not found: " + ", ".join(missing), fill=(90, 90, 90), font=small)
    if r.provenance is not None:
        declared = {True: (160, 0, 160), False: (0, 90, 160)}.get(r.provenance.declared_ai, (90, 90, 90))
        d.text((6, 16 + 3 * fs), "provenance: " + r.provenance.summary, fill=declared, font=small)

    for i, o in enumerate(x for x in r.objects if x.found):
        color = _COLORS[i % len(_COLORS)]
        x0, y0, x1, y1 = (v * scale for v in o.box)
        y0, y1 = y0 + banner, y1 + banner
        d.rectangle((x0, y0, x1, y1), outline=color, width=max(2, fs // 6))
        label = f"{o.word}  d={o.distance:.3f}  s={o.score:.2f}"
        tb = d.textbbox((x0, y0), label, font=small)
        ty = max(banner, y0 - (tb[3] - tb[1]) - 4)
        d.rectangle((x0, ty, x0 + tb[2] - tb[0] + 6, ty + tb[3] - tb[1] + 4), fill=color)
        d.text((x0 + 3, ty + 1), label, fill=(255, 255, 255), font=small)
    return out
