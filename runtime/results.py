"""What `Runtime.detect` returns."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from .provenance import Provenance
from .stages.recipe import Pairs


@dataclass(frozen=True)
class ObjectResult:
    word: str
    found: bool
    score: float  # detector score
    box: tuple[float, float, float, float] | None  # xyxy pixels in the (EXIF-upright) image
    distance: float | None  # 1 - cos(crop, word) in CLIP space; None when not found


@dataclass(frozen=True)
class DetectionResult:
    p_fake: float
    label: str  # "fake" or "real"
    threshold: float
    trained: bool  # False: the head is a seeded random placeholder, p_fake means nothing
    caption: str
    caption_tokens: list[int]  # generated ids, end-of-sentence included when reached
    global_distance: float  # 1 - cos(image, caption) in CLIP space
    objects: list[ObjectResult]
    image_size: tuple[int, int]  # (width, height)
    bundle: str
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage, for the whole call
    # what the file declares about its origin: evidence beside p_fake, never an input to it
    provenance: Provenance | None = None

    def to_dict(self) -> dict:
        d = asdict(replace(self, provenance=None))  # converted once, with its summary, below
        d["provenance"] = self.provenance.to_dict() if self.provenance is not None else None
        return d


@dataclass(frozen=True)
class Analysis:
    """A result and the matched pairs in CLIP space it was computed from."""

    result: DetectionResult
    pairs: Pairs
