"""ITEM-RT: universal fake-image detection by image-text misalignment, fast.

The lean runtime (this package) needs numpy, Pillow, tokenizers and ONNX Runtime only.
"""

from .errors import (
    BundleError,
    BundleIntegrityError,
    BundleNotFoundError,
    BundleVersionError,
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooLargeError,
    ItemError,
    UnsupportedImageError,
    UnsupportedModelError,
    WeightsNotFoundError,
)
from .results import DetectionResult, ObjectResult
from .runtime import Runtime

__version__ = "0.2.0"  # 0.2: bundle format 2 (per-layer cross K/V in the decoder)

__all__ = [
    "BundleError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "BundleVersionError",
    "CorruptImageError",
    "DetectionResult",
    "ImageError",
    "ImageNotFoundError",
    "ImageTooLargeError",
    "ItemError",
    "ObjectResult",
    "Runtime",
    "UnsupportedImageError",
    "UnsupportedModelError",
    "WeightsNotFoundError",
]
