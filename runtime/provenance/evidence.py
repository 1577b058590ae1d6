"""The vocabulary of provenance: what a file says about where it came from, one signal at a time,
and the limits that bound reading it. Plain data; provenance.py puts it together."""

from __future__ import annotations

from dataclasses import dataclass

# How much a statement can be believed, strongest first. "trusted": a valid C2PA signature by a
# certificate that chains to a trust anchor the deployer gave. "untrusted": a valid signature by
# anyone at all (making a certificate costs nothing). "invalid": a C2PA manifest that does not hold
# for these bytes. "no": unsigned metadata, which anyone can write or strip.
SIGNED = ("trusted", "untrusted", "invalid", "no")
STRENGTH = {"trusted": 3, "untrusted": 2, "invalid": 1, "no": 1}

# IPTC's digital source types (cv.iptc.org/newscodes/digitalsourcetype), the vocabulary C2PA
# actions and XMP's Iptc4xmpExt:DigitalSourceType use: does the code say the media was generated?
# True: made or composited by an algorithm (trained or not); False: captured, or made by a person;
# None: says nothing about origin (edits, enhancements, "empty").
DIGITAL_SOURCE_TYPES: dict[str, bool | None] = {
    "trainedAlgorithmicMedia": True,
    "compositeWithTrainedAlgorithmicMedia": True,
    "algorithmicMedia": True,
    "compositeSynthetic": True,
    "digitalCapture": False,
    "computationalCapture": False,
    "negativeFilm": False,
    "positiveFilm": False,
    "print": False,
    "compositeCapture": False,
    "digitalCreation": False,
    "digitalArt": False,
    "screenCapture": None,
    "virtualRecording": None,
    "humanEdits": None,
    "minorHumanEdits": None,
    "algorithmicallyEnhanced": None,
    "composite": None,
    "dataDrivenMedia": None,
    "trainedAlgorithmicData": None,
    "empty": None,
}


def source_type_code(uri: str) -> str:
    """http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia -> trainedAlgorithmicMedia
    (C2PA's own http://c2pa.org/digitalsourcetype/... too)."""
    return uri.strip().rstrip("/").rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Signal:
    """One statement the file makes about its origin, and where it makes it."""

    source: str  # "c2pa", "xmp", "exif" or "png" (a PNG text chunk)
    field: str  # e.g. "c2pa.created digitalSourceType", "Iptc4xmpExt:DigitalSourceType", "Software", "parameters"
    value: str  # what it says, cut short; never a prompt
    declares_ai: bool | None  # True: says generated; False: says captured or human-made; None: neither
    signed: str  # one of SIGNED
    generator: str | None = None  # the tool it names, e.g. "AUTOMATIC1111", "ComfyUI", "NovelAI"
    prompt_present: bool = False  # a generation prompt is in the file (not echoed)
    prompt: str | None = None  # the prompt itself, only when asked for (include_prompts=True)


@dataclass(frozen=True)
class Invalid:
    """A piece of metadata that could not be read safely, and why."""

    source: str  # "c2pa", "xmp", "exif", "png", "jpeg", "webp", "tiff", "bmff", "file"
    reason: str


@dataclass(frozen=True)
class C2paAction:
    action: str  # e.g. "c2pa.created", "c2pa.edited"
    digital_source_type: str | None  # the IPTC code, e.g. "trainedAlgorithmicMedia"
    software_agent: str | None


@dataclass(frozen=True)
class ContentCredentials:
    """The file's C2PA manifest store, as c2pa-python validated it."""

    present: bool  # an embedded manifest store was found
    # "absent", "not_checked" (c2pa-python missing, or a remote manifest), "invalid",
    # "untrusted" (valid signature, issuer not a trust anchor) or "trusted"
    state: str
    reason: str | None = None
    claim_generator: str | None = None
    signer: str | None = None  # the signing certificate's common name
    issuer: str | None = None  # the organisation named in the signing certificate
    signed_at: str | None = None  # the time stamp's time, when the signature carries one
    actions: tuple[C2paAction, ...] = ()  # the active manifest's
    digital_source_types: tuple[str, ...] = ()  # every manifest's in the store, ingredients' included
    failures: tuple[str, ...] = ()  # validation failure codes, e.g. "assertion.dataHash.mismatch"
    remote_url: str | None = None  # XMP dcterms:provenance: a manifest kept elsewhere (never fetched)


@dataclass(frozen=True)
class ProvenanceLimits:
    """What reading provenance may cost. Past a limit, that piece is reported invalid (or, for
    text that only needs its start, read in part) and the rest still counts."""

    max_bytes: int = 64 * 1024 * 1024  # the whole file (ImageLimits' byte limit)
    max_metadata_bytes: int = 4 * 1024 * 1024  # XMP, EXIF and text bytes looked at, all together
    max_xmp_bytes: int = 1024 * 1024  # one XMP packet; larger is invalid, not parsed
    max_text_bytes: int = 1024 * 1024  # one text field: the start is read, the rest skipped
    max_xml_depth: int = 64  # XMP nests about 10 deep
    max_blocks: int = 65_536  # JPEG segments, PNG / WebP chunks, TIFF entries walked
    # a manifest store handed to c2pa-python: its parse is linear in the store (docs/provenance.md)
    max_c2pa_bytes: int = 8 * 1024 * 1024
    max_prompt_chars: int = 2000  # a prompt echoed with include_prompts=True
    c2pa: bool = True  # False: C2PA is not verified (reported "not_checked")


DEFAULT_PROVENANCE_LIMITS = ProvenanceLimits()


def clip(text: str, n: int = 200) -> str:
    """At most n characters, one line."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"
