"""What `item serve` needs before it starts: its settings, its bearer token, the `serve` extra.

Nothing here imports the extra, so the command can say what is missing instead of failing on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import PathError
from ..stages.images import DEFAULT_LIMITS


@dataclass(frozen=True)
class ServeConfig:
    bundle: str
    precision: str | None = None
    backend: str = "onnxruntime"
    threads: int = 0
    max_batch: int = 4  # images per detect_batch call; 1 turns micro-batching off
    max_wait_ms: float = 10.0  # how long the first request of a batch waits for company
    max_in_flight: int = 32  # images admitted at once (decoding, queued, running); beyond: 429
    timeout_s: float = 60.0  # per request, from admission to answer; beyond: 504
    max_upload_bytes: int = 20 << 20  # per request body; beyond: 413
    max_uploads: int = 32  # request bodies being received at once; beyond: 429 (bounds their memory)
    upload_timeout_s: float = 30.0  # to receive one body; beyond: 408 (a trickling client holds no slot)
    header_timeout_s: float = 20.0  # to receive a request's line and headers; beyond: 408, connection closed
    max_batch_images: int = 16  # files in one /v1/detect/batch request
    # Pixels being decoded at once, all requests together: a 265 KB PNG can claim 64 MP. Counted
    # in pixels of images.DECODE_BYTES_REF bytes, each format weighed by its decoding peak.
    # Default: two of the largest images accepted.
    decode_budget_pixels: int = 2 * DEFAULT_LIMITS.max_pixels
    token: str | None = None  # bearer token for everything but /healthz and /readyz
    retry_after_s: int = 1
    provenance: bool = True  # read what each upload declares about its origin (C2PA, XMP, ...)
    trust_anchors: str | None = None  # PEM file of C2PA signers' roots to trust (none: "untrusted")

    def runtime_options(self) -> dict:
        """Runtime's keyword arguments, the same for every host (item serve, a Ray replica)."""
        return {"precision": self.precision, "backend": self.backend, "threads": self.threads,
                "max_batch": self.max_batch, "provenance": self.provenance, "trust_anchors": self.trust_anchors}


def read_token(token_file: str | None, env: str = "ITEM_SERVE_TOKEN") -> str | None:
    """The bearer token from a file (first line) or the environment; None: no auth."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise PathError(f"cannot read the token file {token_file}: {getattr(e, 'strerror', None) or e}") from None
        if not token:
            raise PathError(f"token file {token_file} is empty")
        return token
    return os.environ.get(env) or None


def require() -> None:
    """ImportError naming what the `serve` extra would have installed."""
    import importlib.util

    missing = [m for m in ("starlette", "uvicorn", "multipart", "prometheus_client") if not importlib.util.find_spec(m)]
    if missing:
        raise ImportError(f"missing {', '.join(missing)}")
