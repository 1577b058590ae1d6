"""Runtime preprocessing against the reference (PIL-backend) processors."""

from __future__ import annotations

import numpy as np
import pytest
from itemrt.export.models import image_spec
from itemrt.preprocess import preprocess
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
