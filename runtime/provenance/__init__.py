"""Provenance beside the pixel verdict: what an image file declares about its own origin (C2PA
Content Credentials, IPTC digital source types, generators' marks), read from the bytes already
in memory, bounded in time and memory. It never changes p(fake) or the label: it is evidence beside
the verdict, and everything except a valid C2PA signature is trivially forged or stripped
(docs/provenance.md).

    from itemrt.provenance import read_provenance
    p = read_provenance(data)                  # bytes of a JPEG, PNG, WebP, TIFF, GIF, AVIF ...
    p.declared_ai, p.basis, p.summary          # True, Signal(source="c2pa", ...), "declares AI ..."
    p.to_dict()                                # for JSON
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .content_credentials import INSTALL_HINT, C2paVerifier
from .evidence import (
    DEFAULT_PROVENANCE_LIMITS,
    STRENGTH,
    C2paAction,
    ContentCredentials,
    Invalid,
    ProvenanceLimits,
    Signal,
    clip,
)
from .generators import metadata_signals
from .metadata import read_metadata

__all__ = [
    "DEFAULT_PROVENANCE_LIMITS", "INSTALL_HINT", "C2paAction", "ContentCredentials", "Invalid", "Provenance",
    "ProvenanceLimits", "ProvenanceReader", "Signal", "load_trust_anchors", "read_provenance",
]

TrustAnchors = bytes | str | os.PathLike
_MAX_ANCHOR_BYTES = 16 * 1024 * 1024
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"
_C2PA_WORDS = {
    "trusted": "C2PA, signed{by}, issuer trusted",
    "untrusted": "C2PA, valid signature{by}, issuer not trusted",
    "invalid": "C2PA manifest failing validation",
}
_SOURCE_WORDS = {"xmp": "XMP", "exif": "EXIF", "png": "PNG text"}


@dataclass(frozen=True)
class Provenance:
    """What the file declares about its origin. `declared_ai` is None (unknown) unless a signal
    declares either way; it comes from the strongest signals (`basis` is the one named): a valid
    C2PA signature beats unsigned metadata, and within equals a declaration of generated media
    beats one of capture (a forger writes the latter)."""

    declared_ai: bool | None
    basis: Signal | None
    conflicting: bool  # some signal declares the opposite of declared_ai
    c2pa: ContentCredentials
    signals: tuple[Signal, ...] = ()
    invalid: tuple[Invalid, ...] = ()
    format: str | None = None  # the container whose metadata was walked (JPEG, PNG, WEBP, TIFF)
    read: bool = True  # False: there were no file bytes to read (see `unavailable`)

    @classmethod
    def unavailable(cls, reason: str) -> Provenance:
        """For inputs without file bytes (a PIL image, an array): nothing was read."""
        return cls(None, None, False, ContentCredentials(False, "not_checked", reason), read=False)

    @property
    def summary(self) -> str:
        """One line for people: the declaration, its basis, and what else matters."""
        if not self.read:
            return f"provenance not read: {self.c2pa.reason}"
        if self.basis is None:
            head = "declares nothing about its origin"
        else:
            b = self.basis
            what = "declares AI-generated" if b.declares_ai else "declares not AI-generated"
            if b.source == "c2pa":
                c = self.c2pa
                by = f" by {c.signer!r}" + (f" ({c.issuer})" if c.issuer else "") if c.signer else ""
                where = _C2PA_WORDS[b.signed].format(by=by)
            else:
                where = f"unsigned {_SOURCE_WORDS.get(b.source, b.source)} {b.field}"
            tool = f" via {b.generator}" if b.generator and b.generator not in b.value else ""
            head = f"{what}: {where}: {b.value}{tool}"
        notes = []
        if self.conflicting:
            notes.append("other signals disagree")
        reason = clip(self.c2pa.reason or "", 120)
        if self.c2pa.state == "invalid":
            notes.append(f"C2PA invalid: {reason}")
        elif self.c2pa.state == "not_checked":
            notes.append(f"C2PA {reason}" if reason.startswith("not checked") else f"C2PA not checked: {reason}")
        unreadable = [i for i in self.invalid if i.source != "c2pa"]  # C2PA's is said above
        if unreadable:
            notes.append(f"unreadable metadata: {clip(unreadable[0].reason, 100)}"
                         + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""))
        return "; ".join([head, *notes])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary
        return d


@dataclass(frozen=True)
class ProvenanceReader:
    """Reads provenance with one trust configuration; make it once, call `read` per image
    (thread-safe). `trust_anchors`: PEM bytes, or a path to a PEM bundle; None trusts no issuer,
    so a valid manifest is reported "untrusted"."""

    trust_anchors: TrustAnchors | None = None
    limits: ProvenanceLimits = DEFAULT_PROVENANCE_LIMITS
    include_prompts: bool = False  # echo prompts (cut to limits.max_prompt_chars); off: only "present"
    _verifier: C2paVerifier = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        anchors = load_trust_anchors(self.trust_anchors) if self.trust_anchors is not None else None
        object.__setattr__(self, "_verifier", C2paVerifier(anchors))

    @property
    def c2pa_status(self) -> str:
        """"c2pa-python X.Y.Z" or why C2PA is not checked (for `item info`, logs)."""
        v = self._verifier
        return f"c2pa-python {v.version}" if v.c2pa is not None else v.unavailable

    def read(self, data: bytes | bytearray | memoryview) -> Provenance:
        """Never raises on any input: what cannot be read is reported in `invalid` / `c2pa`."""
        data = data if isinstance(data, bytes) else bytes(data)
        limits = self.limits
        if len(data) > limits.max_bytes:
            why = f"the file is {len(data)} bytes, over the limit of {limits.max_bytes}: not read"
            return Provenance(None, None, False, ContentCredentials(False, "not_checked", why), invalid=(Invalid("file", why),))
        try:
            return self._read(data)
        except Exception as e:  # noqa: BLE001 - a slip here must not cost the verdict beside it
            why = f"internal error while reading provenance: {type(e).__name__}: {e}"
            return Provenance(None, None, False, ContentCredentials(False, "not_checked", why), invalid=(Invalid("file", why),))

    def _read(self, data: bytes) -> Provenance:
        md = read_metadata(data, self.limits)
        signals = metadata_signals(md.fields, self.limits, self.include_prompts)
        remote = next((f.text for f in md.fields if f.key == "dcterms:provenance"), None)
        if md.c2pa_store:
            c2pa, c2pa_signals = self._verifier.verify(data, md.format, md.c2pa_bytes, self.limits)
        elif remote:
            c2pa, c2pa_signals = ContentCredentials(False, "not_checked", "the file points at a remote manifest, "
                                                    "and remote manifests are not fetched"), []
        else:
            c2pa, c2pa_signals = ContentCredentials(False, "absent"), []
        if remote:
            c2pa = replace(c2pa, remote_url=clip(remote, 300))
        invalid = list(md.invalid)
        if c2pa.state == "invalid":
            invalid.append(Invalid("c2pa", c2pa.reason or "validation failed"))
        all_signals = (*c2pa_signals, *signals)  # C2PA first: on equal footing, it is named
        declared, basis, conflicting = decide(all_signals)
        return Provenance(declared, basis, conflicting, c2pa, all_signals, tuple(invalid), md.format)


def decide(signals: tuple[Signal, ...] | list[Signal]) -> tuple[bool | None, Signal | None, bool]:
    """(declared_ai, the signal it rests on, whether another declares the opposite)."""
    declaring = [s for s in signals if s.declares_ai is not None]
    if not declaring:
        return None, None, False
    top = max(STRENGTH[s.signed] for s in declaring)
    tier = [s for s in declaring if STRENGTH[s.signed] == top]
    basis = next((s for s in tier if s.declares_ai), tier[0])
    return basis.declares_ai, basis, any(s.declares_ai != basis.declares_ai for s in declaring)


def load_trust_anchors(anchors: TrustAnchors) -> bytes:
    """PEM bytes (or text), or a path to a PEM bundle -> the bundle's bytes. Raises ValueError for
    a bundle without a certificate, OSError for an unreadable path."""
    if isinstance(anchors, (bytes, bytearray)):
        pem = bytes(anchors)
    elif isinstance(anchors, str) and anchors.lstrip().startswith("-----BEGIN"):
        pem = anchors.encode()
    else:
        path = Path(anchors)
        with open(path, "rb") as f:
            pem = f.read(_MAX_ANCHOR_BYTES + 1)
        if len(pem) > _MAX_ANCHOR_BYTES:
            raise ValueError(f"trust anchor bundle {path} is over {_MAX_ANCHOR_BYTES} bytes")
    if _PEM_CERT not in pem:
        raise ValueError("the trust anchors hold no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:  # cryptography comes with c2pa-python; c2pa-python itself lets a broken certificate through
        from cryptography import x509
    except ImportError:
        return pem
    try:
        x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ValueError(f"the trust anchors hold a certificate that does not parse: {e}") from None
    return pem


@functools.lru_cache(maxsize=8)
def _reader(anchors: bytes | None, limits: ProvenanceLimits, include_prompts: bool) -> ProvenanceReader:
    return ProvenanceReader(anchors, limits, include_prompts)


def read_provenance(data: bytes | bytearray | memoryview, *, trust_anchors: TrustAnchors | None = None,
                    limits: ProvenanceLimits = DEFAULT_PROVENANCE_LIMITS, include_prompts: bool = False) -> Provenance:
    """The provenance of one file's bytes. Readers are cached per configuration; a long-lived
    caller (the runtime, the gateway) holds its own ProvenanceReader instead."""
    anchors = load_trust_anchors(trust_anchors) if trust_anchors is not None else None
    return _reader(anchors, limits, include_prompts).read(data)
