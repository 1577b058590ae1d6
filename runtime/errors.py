"""Typed errors. Every failure a caller can act on has its own class and a stable `code`."""

from __future__ import annotations


class ItemError(Exception):
    """Base of every error ITEM-RT raises on purpose."""

    code = "item_error"


# --- images -------------------------------------------------------------------------------


class ImageError(ItemError, ValueError):
    """The input could not be turned into an RGB image."""

    code = "bad_image"


class ImageNotFoundError(ImageError, FileNotFoundError):
    code = "image_not_found"


class ImageUnreadableError(ImageError):
    """The file is there but cannot be read (permissions, an I/O error)."""

    code = "image_unreadable"


class UnsupportedImageError(ImageError):
    """Not an image at all, or an array/object of the wrong kind."""

    code = "unsupported_image"


class CorruptImageError(ImageError):
    """Empty, truncated or undecodable image data."""

    code = "corrupt_image"


class ImageTooLargeError(ImageError):
    """Over the byte or pixel limits (decompression bombs land here)."""

    code = "image_too_large"


class ImageTooComplexError(ImageTooLargeError):
    """Small enough, but too costly to decode: a JPEG with more progressive scans than the
    limits allow (the decoder passes over the whole image once per scan)."""

    code = "image_too_complex"


# --- bundles ------------------------------------------------------------------------------


class BundleError(ItemError):
    """A bundle cannot be used; the message says what to re-export."""

    code = "bad_bundle"


class BundleNotFoundError(BundleError, FileNotFoundError):
    code = "bundle_not_found"


class BundleIntegrityError(BundleError):
    """A listed file is missing or its sha256 differs from the manifest."""

    code = "bundle_integrity"


class BundleVersionError(BundleError):
    """The manifest was written by an incompatible version, or names something unknown."""

    code = "bundle_version"


class BackendUnavailableError(ItemError):
    """The asked-for backend (TensorRT, a CUDA execution provider) is not installed or has no GPU."""

    code = "backend_unavailable"


class DeviceError(ItemError, RuntimeError):
    """The GPU or its driver failed a call (CUDA, a TensorRT execution context)."""

    code = "device_error"


class GraphCaptureError(DeviceError):
    """Work queued on a stream could not be captured as a CUDA graph (the caller falls back to
    launching it directly)."""

    code = "graph_capture_failed"


class InferenceError(ItemError, RuntimeError):
    """A graph failed inside its engine with inputs of the right names and dtypes: most often a
    manifest whose numbers (sizes, layers, heads) disagree with the graphs, or no memory left."""

    code = "inference_failed"


class RuntimeClosedError(ItemError, RuntimeError):
    """`detect` on a Runtime after `close()`: its sessions and thread pools are gone."""

    code = "runtime_closed"


# --- export side --------------------------------------------------------------------------


class WeightsNotFoundError(ItemError, FileNotFoundError):
    """A model folder or Hugging Face cache entry is missing (nothing is ever downloaded)."""

    code = "weights_not_found"


class UnsupportedModelError(ItemError, ValueError):
    """A checkpoint whose architecture the export cannot reproduce faithfully."""

    code = "unsupported_model"


# --- export and build ----------------------------------------------------------------------


class ParityError(ItemError):
    """An exported graph (or the chain) differs from its PyTorch original beyond its tolerance."""

    code = "parity_failed"


class BuildError(ItemError):
    """`item build` could not make a TensorRT engine from a bundle's graph."""

    code = "build_failed"


# --- the gateway ---------------------------------------------------------------------------


class QueueFull(ItemError):
    """The batcher has no free in-flight place (`item serve` answers 429)."""

    code = "queue_full"


class HTTPError(ItemError):
    """An answer `item serve` gives instead of a result: an HTTP status, a typed code, a message."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}


# --- datasets, features, training ----------------------------------------------------------


class DatasetError(ItemError):
    """A dataset folder or manifest cannot be read as labelled images."""

    code = "bad_dataset"


class FeatureStoreError(ItemError):
    """A feature store is unreadable, or was made with another bundle (stale)."""

    code = "bad_features"


# --- paths given to commands ---------------------------------------------------------------


class PathError(ItemError):
    """A path given to a command cannot serve: a watched folder that is not one, or a results
    file, report folder or quarantine folder that cannot be written."""

    code = "bad_path"
