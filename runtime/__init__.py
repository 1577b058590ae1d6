"""ITEM-RT: universal fake-image detection by image-text misalignment, fast.

The lean runtime (this package) needs numpy, Pillow, tokenizers and ONNX Runtime only.
"""

from .errors import (
    BackendUnavailableError,
    BundleError,
    BundleIntegrityError,
    BundleNotFoundError,
    BundleVersionError,
    CorruptImageError,
    ImageError,
    ImageNotFoundError,
    ImageTooComplexError,
    ImageTooLargeError,
    ImageUnreadableError,
    InferenceError,
    ItemError,
    RuntimeClosedError,
    UnsupportedImageError,
    UnsupportedModelError,
    WeightsNotFoundError,
)
from .results import DetectionResult, ObjectResult
from .runtime import Runtime
from .stages.images import ImageLimits

__version__ = "0.2.0"  # 0.2: bundle format 2 (per-layer cross K/V in the decoder)

__all__ = [
    "BackendUnavailableError",
    "BundleError",
    "BundleIntegrityError",
    "BundleNotFoundError",
    "BundleVersionError",
    "CorruptImageError",
    "DetectionResult",
    "ImageError",
    "ImageLimits",
    "ImageNotFoundError",
    "ImageTooComplexError",
    "ImageTooLargeError",
    "ImageUnreadableError",
    "InferenceError",
    "ItemError",
    "ObjectResult",
    "Runtime",
    "RuntimeClosedError",
    "UnsupportedImageError",
    "UnsupportedModelError",
    "WeightsNotFoundError",
]
