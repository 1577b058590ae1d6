"""Runtime preprocessing against the reference (PIL-backend) processors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from itemrt.export.models import image_spec
from itemrt.stages.preprocess import preprocess
from PIL import Image
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.owlvit.image_processing_pil_owlvit import (
    OwlViTImageProcessorPil,
)

PROCESSORS = {
    "blip-base": BlipImageProcessorPil(),  # 384 exact, bicubic
    "owlvit-b32": OwlViTImageProcessorPil(),  # 768 exact, bicubic
    "clip-l14": CLIPImageProcessorPil(),  # shortest edge 224, center crop 224
    "clip-small": CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
}


@pytest.mark.parametrize("name", sorted(PROCESSORS))
@pytest.mark.parametrize("hw", [(480, 640), (640, 480), (7, 5), (224, 224), (333, 1001)])
def test_matches_processor(name, hw):
    ip = PROCESSORS[name]
    rng = np.random.default_rng(sum(hw))
    img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    ref = ip(img, return_tensors="np")["pixel_values"]
    (got,) = preprocess([([img], image_spec(ip))])
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "hw"), [("clip-l14", (6, 380)), ("clip-l14", (380, 6)), ("clip-l14", (1, 64)),
                                          ("clip-small", (3, 190)), ("clip-small", (190, 3)), ("clip-small", (1, 1))])
def test_thin_images_within_the_exact_bound_match_the_processor(name, hw):
    """Up to EXACT_RESIZE_CROPS crops' worth of pixels the whole resize is done, as the reference
    does: bit for bit, on noise (where any difference in rounding shows)."""
    ip = PROCESSORS[name]
    img = Image.fromarray(np.random.default_rng(sum(hw)).integers(0, 256, (*hw, 3), dtype=np.uint8))
    ref = ip(img, return_tensors="np")["pixel_values"]
    (got,) = preprocess([([img], image_spec(ip))])
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_thinner_images_resample_only_the_crop_and_stay_close_to_the_processor(samples):
    """Past the bound only the kept region is resampled (issue 21: 1 x 20000 px took 95 s and
    9.6 GB). Pillow may order its two passes differently for a region and rounds its box to
    float32: on photo strips of aspect 65:1 to 3000:1, within 3 grey levels anywhere and 0.1 of
    a level on average (ad hoc on 60 strips: 2 and 0.005)."""
    from itemrt.stages.preprocess import EXACT_RESIZE_CROPS

    ip, spec = PROCESSORS["clip-l14"], image_spec(PROCESSORS["clip-l14"])
    level = 1 / 255 / min(ip.image_std)  # one grey level, normalized
    rng = np.random.default_rng(21)
    photos = [Image.open(p).convert("RGB") for p in samples]
    worst, means = 0.0, []
    for i in range(24):
        photo = photos[i % len(photos)]
        photo = photo.resize((photo.width * 4, photo.height * 4), Image.Resampling.BICUBIC)
        t = int(rng.integers(1, 9))
        n = int(rng.integers(EXACT_RESIZE_CROPS * t + t, 3000))
        box = (100, 0, 100 + t, photo.height) if i % 2 else (0, 100, photo.width, 100 + t)
        img = photo.resize((t, n) if i % 2 else (n, t), Image.Resampling.BICUBIC, box=box)
        ref = ip(img, return_tensors="np")["pixel_values"]
        (got,) = preprocess([([img], spec)])
        d = np.abs(got - ref) / level
        worst, means = max(worst, float(d.max())), [*means, float(d.mean())]
    assert worst <= 3 and np.mean(means) <= 0.1


def test_a_thin_image_costs_what_a_square_one_does(tmp_path):
    """Peak RSS of preprocessing 1 x 20000 and 20000 x 1 px for CLIP 224, in a fresh process:
    megabytes, not the 9.6 GB of resizing to 224 x 4,480,000 px first."""
    script = (
        "import resource, sys\n"
        "from PIL import Image\n"
        "from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil\n"
        "from itemrt.export.models import image_spec\n"
        "from itemrt.stages.preprocess import preprocess\n"
        "spec = image_spec(CLIPImageProcessorPil())\n"
        "preprocess([([Image.new('RGB', (8, 8))], spec)])\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for size in [(1, 20000), (20000, 1), (3, 20000)]:\n"
        "    (x,) = preprocess([([Image.new('RGB', size, (40, 90, 160))], spec)])\n"
        "    assert x.shape == (1, 3, 224, 224)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    assert int(out.stdout.strip()) < 100  # MB over the warm process


def test_seeded_sizes_from_one_pixel_to_thin_strips():
    """Seeded and bounded, over both paths and a crop larger than the resize (zero padding):
    the processor's pixels wherever the whole resize is within the exact bound, and the right
    shape and value range everywhere."""
    from itemrt.stages.preprocess import EXACT_RESIZE_CROPS

    padded = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 32, "width": 24})
    rng = np.random.default_rng(2111)
    for i in range(80):
        ip = (PROCESSORS["clip-small"], padded)[i % 2]
        spec = image_spec(ip)
        short, long = int(rng.integers(1, 12)), int(rng.integers(1, 2500))
        hw = (short, long) if i % 4 < 2 else (long, short)
        img = Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
        (got,) = preprocess([([img], spec)])
        assert got.shape == (1, 3, *spec.out_size) and np.isfinite(got).all()
        s = spec.shortest_edge
        resized = s * s * max(hw) // min(hw)
        if resized <= EXACT_RESIZE_CROPS * spec.crop_height * spec.crop_width:
            np.testing.assert_allclose(got, ip(img, return_tensors="np")["pixel_values"], atol=1e-5, rtol=0)
