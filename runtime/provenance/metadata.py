"""What an image file says about itself in XMP, EXIF and PNG text, read from its bytes by walking
the file's own structure (JPEG segments, PNG and WebP chunks, TIFF directories), never by
decoding pixels. Every loop, copy and decompression is bounded by ProvenanceLimits; hostile
pieces are reported as Invalid and skipped."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from xml.etree.ElementTree import ParseError

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import DefusedXMLParser

from .evidence import Invalid, ProvenanceLimits

# The C2PA manifest store's JUMBF description box: "jumd", then the store's UUID ("c2pa" +
# 0011-0010-8000-00AA00389B71). Every embedding (JPEG APP11, PNG caBX, WebP, BMFF, TIFF, GIF)
# carries these bytes verbatim.
C2PA_STORE = b"jumd" + b"c2pa" + bytes.fromhex("00110010800000aa00389b71")

# ISO BMFF (AVIF, HEIF) keeps the store in a top-level uuid box of this UUID
C2PA_BMFF_UUID = bytes.fromhex("d8fec3d61b0e483c92975828877ec481")
_TAG_C2PA = 0xCD41  # TIFF keeps it in this tag

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"
_PNG_XMP_KEYWORD = "XML:com.adobe.xmp"
_MAX_FIELDS = 256  # fields kept from one file: far more than any writer puts there

_IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"
_XMP_NS = "http://ns.adobe.com/xap/1.0/"
_DCTERMS = "http://purl.org/dc/terms/"
_RDF_RESOURCE = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}resource"
XMP_FIELDS = {  # the XMP properties read, in ElementTree's {namespace}name form
    "{" + _IPTC_EXT + "}DigitalSourceType": "Iptc4xmpExt:DigitalSourceType",
    "{" + _IPTC_EXT + "}AISystemUsed": "Iptc4xmpExt:AISystemUsed",
    "{" + _IPTC_EXT + "}AISystemVersionUsed": "Iptc4xmpExt:AISystemVersionUsed",
    "{" + _IPTC_EXT + "}AIPromptInformation": "Iptc4xmpExt:AIPromptInformation",
    "{" + _XMP_NS + "}CreatorTool": "xmp:CreatorTool",
    "{" + _DCTERMS + "}provenance": "dcterms:provenance",
}

# TIFF / EXIF tags read: IFD0's strings (ComfyUI puts its graph in Make / Model), the XMP of a
# TIFF file, and the Exif IFD's UserComment (AUTOMATIC1111's parameters in JPEG and WebP).
_IFD0_TEXT = {0x010E: "ImageDescription", 0x010F: "Make", 0x0110: "Model", 0x0131: "Software", 0x013B: "Artist"}
_TAG_XMP, _TAG_EXIF_IFD, _TAG_USER_COMMENT = 0x02BC, 0x8769, 0x9286
_MAX_IFD_ENTRIES = 4096  # a real IFD has tens


@dataclass(frozen=True)
class Field:
    source: str  # "xmp", "exif" or "png"
    key: str  # e.g. "Iptc4xmpExt:DigitalSourceType", "Software", "parameters"
    text: str
    truncated: bool = False  # only the start was read (max_text_bytes)


@dataclass
class Metadata:
    format: str | None = None  # the container walked: JPEG, PNG, WEBP, TIFF, BMFF; None: XMP scanned for
    fields: list[Field] = field(default_factory=list)
    invalid: list[Invalid] = field(default_factory=list)
    c2pa_store: bool = False  # an embedded C2PA manifest store's marker is in the file
    c2pa_bytes: int | None = None  # its size: as the container says, else as the store's own box claims


class _Budget:
    """Bytes of metadata still to be looked at, all sources together."""

    def __init__(self, total: int):
        self.left = total
        self.spent_out = False

    def take(self, n: int) -> int:
        got = max(0, min(n, self.left))
        self.left -= got
        self.spent_out |= got < n
        return got


class _Reading:
    def __init__(self, data: bytes, limits: ProvenanceLimits):
        self.data, self.limits = data, limits
        self.view = memoryview(data)  # slices without copies
        self.store_at = data.find(C2PA_STORE)
        self.md = Metadata(c2pa_store=self.store_at >= 0)
        self.budget = _Budget(limits.max_metadata_bytes)

    def invalid(self, source: str, reason: str) -> None:
        if len(self.md.invalid) < _MAX_FIELDS:
            self.md.invalid.append(Invalid(source, reason))

    def add(self, source: str, key: str, text: str, truncated: bool = False) -> None:
        if len(self.md.fields) < _MAX_FIELDS:
            self.md.fields.append(Field(source, key, text, truncated))

    def add_c2pa_bytes(self, n: int) -> None:
        self.md.c2pa_bytes = (self.md.c2pa_bytes or 0) + n


def read_metadata(data: bytes, limits: ProvenanceLimits) -> Metadata:
    r = _Reading(data, limits)
    try:
        if data.startswith(b"\xff\xd8"):
            r.md.format = "JPEG"
            _jpeg(r)
        elif data.startswith(PNG_SIGNATURE):
            r.md.format = "PNG"
            _png(r)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            r.md.format = "WEBP"
            _webp(r)
        elif data[:4] in (b"II*\x00", b"MM\x00*"):
            r.md.format = "TIFF"
            _exif(r, data, "tiff")
        elif data[4:8] == b"ftyp":
            r.md.format = "BMFF"
            _bmff(r)
            _scan_xmp(r)
        else:  # GIF, AVIF / HEIF, BMP ...: XMP packets are built to be found by scanning
            _scan_xmp(r)
    except Exception as e:  # noqa: BLE001 - a walker's slip on hostile bytes is a finding, not a crash
        r.invalid("file", f"internal error while reading metadata: {type(e).__name__}: {e}")
    if r.md.c2pa_store and r.md.c2pa_bytes is None:
        r.md.c2pa_bytes = _claimed_store_size(data, r.store_at)
    if r.budget.spent_out:
        r.invalid("file", f"more than {limits.max_metadata_bytes} bytes of metadata: the rest was not read")
    return r.md


def _claimed_store_size(data: bytes, at: int) -> int | None:
    """The manifest store's superbox length, where no container says (GIF): [LBox "jumb"] precede
    its description box. A lie here only misjudges the cap; the file's byte limit still holds."""
    if at >= 12 and data[at - 8 : at - 4] == b"jumb":
        return int.from_bytes(data[at - 12 : at - 8], "big")
    return None


def _bmff(r: _Reading) -> None:
    """Top-level boxes of an AVIF / HEIF: the C2PA uuid box's size."""
    data, pos, end, blocks = r.data, 0, len(r.data), 0
    while pos + 8 <= end:
        blocks += 1
        if blocks > r.limits.max_blocks:
            r.invalid("bmff", f"more than {r.limits.max_blocks} top-level boxes: the rest was not read")
            break
        size, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        if size == 1 and pos + 16 <= end:
            size = int.from_bytes(data[pos + 8 : pos + 16], "big")
        elif size == 0:
            size = end - pos
        if size < 8:
            break
        if kind == b"uuid" and data[pos + 8 : pos + 24] == C2PA_BMFF_UUID:
            r.add_c2pa_bytes(size)
        pos += size


def _jpeg(r: _Reading) -> None:
    data, pos, end, blocks = r.data, 2, len(r.data), 0
    exif = xmp = None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            break  # not a marker: the segment chain is broken, and decoding will say so
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # no payload
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # image data or its end: metadata comes before
            break
        blocks += 1
        if blocks > r.limits.max_blocks:
            r.invalid("jpeg", f"more than {r.limits.max_blocks} segments before the image data: the rest was not read")
            break
        stop = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        start = pos + 4
        if stop < start:
            break
        if stop > end:
            if marker in (0xE1, 0xEB):
                r.invalid("jpeg", f"an APP{marker - 0xE0} segment runs past the end of the file")
            break
        if marker == 0xE1 and exif is None and data.startswith(b"Exif\x00\x00", start):
            exif = (start + 6, stop)
        elif marker == 0xE1 and xmp is None and data.startswith(_XMP_APP1, start):
            xmp = (start + len(_XMP_APP1), stop)
        elif marker == 0xEB and data.startswith(b"JP", start):  # JUMBF: C2PA
            r.add_c2pa_bytes(stop - start)
        pos = stop
    if exif:
        _exif(r, _take(r, *exif), "exif")
    if xmp:
        _xmp(r, data, *xmp)


def _png(r: _Reading) -> None:
    data, pos, end, blocks = r.data, 8, len(r.data), 0
    while pos + 12 <= end:
        blocks += 1
        if blocks > r.limits.max_blocks:
            r.invalid("png", f"more than {r.limits.max_blocks} chunks: the rest was not read")
            break
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        start, stop = pos + 8, pos + 8 + length
        if stop + 4 > end:
            if kind in (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"caBX"):
                r.invalid("png", f"a {kind.decode('latin-1')} chunk runs past the end of the file")
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            _png_text(r, kind, start, stop)
        elif kind == b"eXIf":  # the raw TIFF structure; some writers keep JPEG's "Exif\0\0" before it
            _exif(r, _take(r, start + 6 if data.startswith(b"Exif\x00\x00", start) else start, stop), "exif")
        elif kind == b"caBX":
            r.add_c2pa_bytes(length)
        elif kind == b"IEND":
            break
        pos = stop + 4


def _png_text(r: _Reading, kind: bytes, start: int, stop: int) -> None:
    data = r.data
    nul = data.find(b"\x00", start, min(stop, start + 80))  # keywords are 1-79 bytes
    if nul <= start:
        r.invalid("png", f"a {kind.decode('latin-1')} chunk without a keyword")
        return
    key = data[start:nul].decode("latin-1")
    at, compressed, encoding = nul + 1, kind == b"zTXt", "latin-1"
    if kind == b"zTXt":
        at += 1  # compression method
    elif kind == b"iTXt":
        if at + 2 > stop:
            r.invalid("png", f"iTXt chunk {key!r} is cut short")
            return
        compressed, encoding = data[at] == 1, "utf-8"
        at += 2
        for _ in range(2):  # language tag, translated keyword
            nul = data.find(b"\x00", at, stop)
            if nul < 0:
                r.invalid("png", f"iTXt chunk {key!r} is cut short")
                return
            at = nul + 1
    is_xmp = kind == b"iTXt" and key == _PNG_XMP_KEYWORD
    cap = r.limits.max_xmp_bytes + 1 if is_xmp else r.limits.max_text_bytes
    if compressed:
        raw, truncated = _inflate(r, key, r.view[at:stop], cap)
        if raw is None:
            return
    else:
        raw = _take(r, at, min(stop, at + cap))
        truncated = stop - at > len(raw)
    if is_xmp:
        if len(raw) > r.limits.max_xmp_bytes:
            r.invalid("xmp", f"an XMP packet over the limit of {r.limits.max_xmp_bytes} bytes: not parsed")
        elif not truncated:  # else the budget ran out, which read_metadata reports
            _xmp(r, raw, 0, len(raw), charge=False)
        return
    if truncated and len(raw) >= r.limits.max_text_bytes:
        r.invalid("png", f"text chunk {key!r} is over {r.limits.max_text_bytes} bytes: only its start was read")
    r.add("png", key, raw.decode(encoding, "replace"), truncated)


def _inflate(r: _Reading, key: str, compressed: memoryview, cap: int) -> tuple[bytes | None, bool]:
    """At most `cap` bytes out (and no more than the budget): a zTXt bomb stops there."""
    limit = min(cap, r.budget.left)
    if limit <= 0:
        r.budget.take(1)  # marks the budget spent
        return None, False
    d = zlib.decompressobj()
    try:
        out = d.decompress(compressed, limit)
    except zlib.error as e:
        r.invalid("png", f"compressed text {key!r} is corrupt: {e}")
        return None, False
    r.budget.take(len(out))
    return out, bool(d.unconsumed_tail) or (not d.eof and len(out) >= limit)


def _webp(r: _Reading) -> None:
    data, pos, blocks = r.data, 12, 0
    end = min(len(data), 8 + int.from_bytes(data[4:8], "little"))
    exif = xmp = None
    while pos + 8 <= end:
        blocks += 1
        if blocks > r.limits.max_blocks:
            r.invalid("webp", f"more than {r.limits.max_blocks} chunks: the rest was not read")
            break
        kind = data[pos : pos + 4]
        start = pos + 8
        stop = start + int.from_bytes(data[pos + 4 : pos + 8], "little")
        if stop > end:
            if kind in (b"EXIF", b"XMP ", b"C2PA"):
                r.invalid("webp", f"a {kind.decode('latin-1').strip()} chunk runs past the end of the file")
            break
        if kind == b"EXIF" and exif is None:
            exif = (start + 6, stop) if data.startswith(b"Exif\x00\x00", start) else (start, stop)
        elif kind == b"XMP " and xmp is None:
            xmp = (start, stop)
        elif kind == b"C2PA":
            r.add_c2pa_bytes(stop - start)
        pos = stop + (stop & 1)  # chunks are padded to even sizes
    if exif:
        _exif(r, _take(r, *exif), "exif")
    if xmp:
        _xmp(r, data, *xmp)


def _take(r: _Reading, start: int, stop: int) -> bytes:
    """data[start:stop], or as much of its start as the budget allows."""
    return r.data[start : start + r.budget.take(stop - start)]


def _exif(r: _Reading, blob: bytes, source: str) -> None:
    """A TIFF structure (an EXIF block, or a TIFF file): IFD0's strings, a TIFF's XMP, and the
    Exif IFD's UserComment. One hop to the Exif IFD, no other pointers followed: no loops."""
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(blob[:4])
    if order is None or len(blob) < 8:
        r.invalid(source, "not a TIFF / EXIF structure")
        return
    entries = _ifd(r, blob, order, struct.unpack(order + "I", blob[4:8])[0], source)
    if entries is None:
        return
    for tag, name in _IFD0_TEXT.items():
        if tag in entries:
            raw = _value(r, blob, order, entries[tag], source, name)
            if raw:
                r.add("exif", name, raw.rstrip(b"\x00").decode("utf-8", "replace"))
    if _TAG_XMP in entries and source == "tiff":
        count = entries[_TAG_XMP][1]
        if count > r.limits.max_xmp_bytes:
            r.invalid("xmp", f"an XMP packet of {count} bytes, over the limit of {r.limits.max_xmp_bytes}: not parsed")
        else:
            raw = _value(r, blob, order, entries[_TAG_XMP], source, "XMP")
            if raw:
                _xmp(r, raw, 0, len(raw), charge=False)
    if _TAG_C2PA in entries and source == "tiff":
        r.add_c2pa_bytes(entries[_TAG_C2PA][1])
    if _TAG_EXIF_IFD in entries:
        typ, count, at = entries[_TAG_EXIF_IFD]
        sub = _ifd(r, blob, order, struct.unpack(order + "I", at)[0], source) if typ in (4, 13) else None
        if sub and _TAG_USER_COMMENT in sub:
            raw = _value(r, blob, order, sub[_TAG_USER_COMMENT], source, "UserComment")
            if raw:
                r.add("exif", "UserComment", _user_comment(raw))


def _ifd(r: _Reading, blob: bytes, order: str, offset: int, source: str) -> dict[int, tuple[int, int, bytes]] | None:
    """tag -> (type, count, the 4 value-or-offset bytes) of the directory at `offset`."""
    if offset < 8 or offset + 2 > len(blob):
        r.invalid(source, "an image file directory points past the end of the data")
        return None
    count = struct.unpack(order + "H", blob[offset : offset + 2])[0]
    if count > _MAX_IFD_ENTRIES:
        r.invalid(source, f"a directory of {count} entries, over the limit of {_MAX_IFD_ENTRIES}")
        return None
    if offset + 2 + 12 * count > len(blob):
        r.invalid(source, "an image file directory runs past the end of the data")
        return None
    out = {}
    for i in range(count):
        e = offset + 2 + 12 * i
        tag, typ, n = struct.unpack(order + "HHI", blob[e : e + 8])
        out.setdefault(tag, (typ, n, blob[e + 8 : e + 12]))
    return out


def _value(r: _Reading, blob: bytes, order: str, entry: tuple[int, int, bytes], source: str, name: str) -> bytes:
    """The bytes of an ASCII / BYTE / UNDEFINED entry, at most max_text_bytes of them."""
    typ, count, at = entry
    if typ not in (1, 2, 7):
        return b""
    if count <= 4:
        return at[:count]
    offset = struct.unpack(order + "I", at)[0]
    if offset + count > len(blob):
        r.invalid(source, f"{name} points past the end of the data")
        return b""
    n = r.budget.take(min(count, r.limits.max_text_bytes))
    return blob[offset : offset + n]


def _user_comment(raw: bytes) -> str:
    """EXIF UserComment: an 8-byte character-code prefix, then the text."""
    code, body = raw[:8], raw[8:]
    if code == b"UNICODE\x00":  # UTF-16 of either byte order: piexif writes big-endian
        big = body[0:1] == b"\x00" if body else True
        text = body.decode("utf-16-be" if big else "utf-16-le", "replace")
    else:
        text = body.decode("utf-8", "replace")
    return text.rstrip("\x00")


def _scan_xmp(r: _Reading) -> None:
    data = r.data
    start = data.find(b"<x:xmpmeta")
    if start < 0:
        return
    close = b"</x:xmpmeta>"
    stop = data.find(close, start, start + r.limits.max_xmp_bytes + len(close))
    if stop < 0:
        r.invalid("xmp", f"an XMP packet not closed within {r.limits.max_xmp_bytes} bytes: not parsed")
        return
    _xmp(r, data, start, stop + len(close))


class _TooDeep(Exception):
    pass


class _XmpTarget:
    """Keeps the XMP_FIELDS properties (as attributes, element text or rdf:resource) and counts
    depth; builds no tree."""

    def __init__(self, max_depth: int):
        self.max_depth, self.depth = max_depth, 0
        self.found: list[tuple[str, str]] = []
        self.open: str | None = None
        self.open_depth = 0
        self.text: list[str] = []

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        self.depth += 1
        if self.depth > self.max_depth:
            raise _TooDeep
        for k, v in attrib.items():
            if k in XMP_FIELDS:
                self.found.append((XMP_FIELDS[k], v))
        if tag in XMP_FIELDS and self.open is None:
            if _RDF_RESOURCE in attrib:
                self.found.append((XMP_FIELDS[tag], attrib[_RDF_RESOURCE]))
            else:
                self.open, self.open_depth, self.text = XMP_FIELDS[tag], self.depth, []

    def data(self, text: str) -> None:
        if self.open is not None:
            self.text.append(text)

    def end(self, tag: str) -> None:
        if self.open is not None and self.depth == self.open_depth:
            value = " ".join("".join(self.text).split())
            if value:
                self.found.append((self.open, value))
            self.open = None
        self.depth -= 1

    def close(self) -> None:
        return None


def _xmp(r: _Reading, data: bytes, start: int, stop: int, charge: bool = True) -> None:
    """One XMP packet: refused past max_xmp_bytes, any DTD refused (entity expansion and external
    entities need one; XMP never has one), nesting bounded; no tree is built."""
    n = stop - start
    if n > r.limits.max_xmp_bytes:
        r.invalid("xmp", f"an XMP packet of {n} bytes, over the limit of {r.limits.max_xmp_bytes}: not parsed")
        return
    if charge and r.budget.take(n) < n:
        return
    packet = data[start:stop]
    end = packet.rfind(b"<?xpacket end=")
    if end >= 0:  # writers pad after the packet, some with NULs
        close = packet.find(b"?>", end)
        packet = packet[: close + 2] if close >= 0 else packet
    packet = packet.rstrip(b"\x00 \t\r\n")
    target = _XmpTarget(r.limits.max_xml_depth)
    parser = DefusedXMLParser(target=target, forbid_dtd=True)
    try:
        parser.feed(packet)
        parser.close()
    except DefusedXmlException:
        r.invalid("xmp", "a document type declaration (DTD) was refused: XMP has none, and entity "
                         "expansion (billion laughs) and external entities need one")
        return
    except _TooDeep:
        r.invalid("xmp", f"elements nested deeper than {r.limits.max_xml_depth}: not read")
        return
    except (ParseError, ValueError, UnicodeError) as e:
        r.invalid("xmp", f"not well-formed XML: {e}")
        return
    for key, value in target.found:
        r.add("xmp", key, value)
