"""Files to read provenance from, made on the spot: images signed with C2PA by a throwaway
certificate chain, generators' PNG text chunks, XMP and EXIF marks, and hostile metadata.
Shared by tests/test_provenance.py and `python -m itemrt.bench.provenance`. Signing needs
c2pa-python and cryptography (the test extra)."""

from __future__ import annotations

import datetime as dt
import io
import json
import struct
import zlib
from dataclasses import dataclass

from itemrt.provenance.metadata import PNG_SIGNATURE
from PIL import Image

TRAINED = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
IPTC_EXT = "http://iptc.org/std/Iptc4xmpExt/2008-02-29/"


@dataclass(frozen=True)
class Credentials:
    root_pem: bytes  # the trust anchor
    chain_pem: bytes  # signer certificate, then the root
    key_pem: bytes  # the signer's private key
    alg: str  # "es256" or "ps256"


def make_credentials(alg: str = "es256", days: int = 30) -> Credentials:
    """A root CA and a signer certificate with what C2PA asks of one: digitalSignature key
    usage, an emailProtection extended key usage, not a CA, key identifiers."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def key():
        return ec.generate_private_key(ec.SECP256R1()) if alg == "es256" else rsa.generate_private_key(65537, 2048)

    def name(cn: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ITEM-RT tests")])

    now = dt.datetime.now(dt.timezone.utc)
    root_key, signer_key = key(), key()

    def cert(subject, issuer, public, ca: bool):
        b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False))
        if ca:
            b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        else:
            b = (b.add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False))
        return b.sign(root_key, hashes.SHA256())

    root = cert(name("ITEM-RT test root"), name("ITEM-RT test root"), root_key.public_key(), True)
    signer = cert(name("ITEM-RT test signer"), root.subject, signer_key.public_key(), False)
    pem = serialization.Encoding.PEM
    key_pem = signer_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return Credentials(root.public_bytes(pem), signer.public_bytes(pem) + root.public_bytes(pem), key_pem, alg)


def manifest(source_type: str | None = TRAINED, agent: str = "ITEM-RT test generator") -> dict:
    action = {"action": "c2pa.created", "softwareAgent": {"name": agent}}
    if source_type:
        action["digitalSourceType"] = source_type
    return {"claim_generator_info": [{"name": "itemrt-tests", "version": "1.0"}], "title": "test image",
            "assertions": [{"label": "c2pa.actions", "data": {"actions": [action]}}]}


def sign(image: bytes, mime: str, creds: Credentials, definition: dict | None = None) -> bytes:
    """`image` with an embedded C2PA manifest store, signed by `creds` (c2pa-python's Builder)."""
    import c2pa

    info = c2pa.C2paSignerInfo(creds.alg.encode(), creds.chain_pem, creds.key_pem, None)
    signer = c2pa.Signer.from_info(info)
    out = io.BytesIO()
    try:
        with c2pa.Builder(definition or manifest()) as builder:
            builder.sign(signer, mime, io.BytesIO(image), out)
    finally:
        signer.close()
    return out.getvalue()


def image(fmt: str = "JPEG", size: tuple[int, int] = (96, 64), **save) -> bytes:
    """A small picture with some structure (so a tampered pixel changes the coded bytes)."""
    w, h = size
    img = Image.new("RGB", size)
    img.putdata([((x * 255) // w, (y * 255) // h, ((x ^ y) * 7) & 255) for y in range(h) for x in range(w)])
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def large_jpeg(size: tuple[int, int] = (4000, 3000), quality: int = 90) -> bytes:
    """A 12 MP camera-sized JPEG: smooth gradients with noise, an EXIF Software tag and XMP."""
    import numpy as np

    w, h = size
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1).astype(np.int16)
    pixels = np.clip(base + rng.integers(-12, 13, size=(h, w, 3)), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0131] = "Camera Firmware 1.0"
    buf = io.BytesIO()
    xmp = xmp_packet({"xmp:CreatorTool": "Camera Firmware 1.0"})
    Image.fromarray(pixels, "RGB").save(buf, "JPEG", quality=quality, exif=exif, xmp=xmp)
    return buf.getvalue()


def xmp_packet(props: dict[str, str], attributes: bool = False, extra: str = "") -> bytes:
    """An XMP packet with Iptc4xmpExt:* / xmp:* / dcterms:* properties, as elements or attributes."""
    ns = ('xmlns:Iptc4xmpExt="' + IPTC_EXT + '" xmlns:xmp="http://ns.adobe.com/xap/1.0/" '
          'xmlns:dcterms="http://purl.org/dc/terms/"')
    if attributes:
        body = f'<rdf:Description rdf:about="" {ns} ' + " ".join(f'{k}="{v}"' for k, v in props.items()) + "/>"
    else:
        elements = "".join(f"<{k}>{v}</{k}>" for k, v in props.items())
        body = f'<rdf:Description rdf:about="" {ns}>{elements}</rdf:Description>'
    return ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            + body + extra + '</rdf:RDF></x:xmpmeta><?xpacket end="w"?>').encode()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_with(chunks: list[bytes], base: bytes | None = None) -> bytes:
    """A PNG with `chunks` (made by png_chunk / text_chunk) right after its IHDR."""
    base = base or image("PNG")
    at = len(PNG_SIGNATURE) + 25  # IHDR: length, type, 13 bytes, CRC
    return base[:at] + b"".join(chunks) + base[at:]


def text_chunk(key: str, text: str, kind: str = "tEXt") -> bytes:
    if kind == "tEXt":
        return png_chunk(b"tEXt", key.encode("latin-1") + b"\x00" + text.encode("latin-1", "replace"))
    if kind == "zTXt":
        return png_chunk(b"zTXt", key.encode("latin-1") + b"\x00\x00" + zlib.compress(text.encode("latin-1", "replace")))
    compressed = kind == "iTXt-z"
    body = zlib.compress(text.encode()) if compressed else text.encode()
    return png_chunk(b"iTXt", key.encode("latin-1") + b"\x00" + bytes([compressed, 0]) + b"\x00\x00" + body)


def jpeg_with_segment(marker: int, payload: bytes, base: bytes | None = None) -> bytes:
    """A JPEG with one more APPn segment after SOI (payload at most 65533 bytes)."""
    base = base or image("JPEG")
    return base[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload + base[2:]


def jpeg_with_xmp(packet: bytes, base: bytes | None = None) -> bytes:
    return jpeg_with_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00" + packet, base)


def gif_with_xmp(packet: bytes) -> bytes:
    """A GIF with XMP as Adobe embeds it: an application extension "XMP DataXMP", the packet raw,
    then the 258-byte "magic trailer" that lets GIF readers skip it as sub-blocks."""
    base = image("GIF")
    trailer = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
    return base[:-1] + b"\x21\xff\x0bXMP DataXMP" + packet + trailer + base[-1:]


def exif_block(ifd0: dict[int, str], user_comment: bytes | None = None) -> bytes:
    exif = Image.Exif()
    for tag, value in ifd0.items():
        exif[tag] = value
    if user_comment is not None:
        exif.get_ifd(0x8769)[0x9286] = user_comment
    return exif.tobytes()


A1111 = ("a photo of an astronaut riding a horse, highly detailed\nNegative prompt: blurry, lowres\n"
         "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
         "Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Version: v1.9.4")
COMFY_PROMPT = json.dumps({
    "3": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20, "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle on a hill at sunset", "clip": ["4", 1]}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
})
COMFY_WORKFLOW = json.dumps({"nodes": [{"id": 3, "type": "KSampler"}], "links": [], "version": 0.4})
NOVELAI_COMMENT = json.dumps({"prompt": "1girl, masterpiece", "steps": 28, "sampler": "k_euler", "uc": "lowres"})


def generator_pngs() -> dict[str, bytes]:
    """PNGs as generators' front ends write them (the chunk names their public readers parse)."""
    return {
        "AUTOMATIC1111": png_with([text_chunk("parameters", A1111)]),
        "AUTOMATIC1111 (iTXt)": png_with([text_chunk("parameters", A1111, "iTXt")]),
        "ComfyUI": png_with([text_chunk("prompt", COMFY_PROMPT), text_chunk("workflow", COMFY_WORKFLOW)]),
        "ComfyUI (zTXt)": png_with([text_chunk("prompt", COMFY_PROMPT, "zTXt")]),
        "NovelAI": png_with([text_chunk("Title", "AI generated image"), text_chunk("Description", "1girl, masterpiece"),
                             text_chunk("Software", "NovelAI"), text_chunk("Source", "NovelAI Diffusion V4 4F49EC75"),
                             text_chunk("Comment", NOVELAI_COMMENT)]),
        "InvokeAI": png_with([text_chunk("invokeai_metadata", json.dumps({"positive_prompt": "a red fox", "seed": 1}))]),
        "SwarmUI": png_with([text_chunk("parameters", json.dumps({"sui_image_params": {"prompt": "a cat", "seed": 1}}))]),
        "Fooocus": png_with([text_chunk("parameters", json.dumps({"Prompt": "a dog", "Steps": 30})),
                             text_chunk("fooocus_scheme", "fooocus")]),
    }


def _billion_laughs() -> bytes:
    ents = "".join(f'<!ENTITY l{i} "' + f"&l{i - 1};" * 10 + '">' for i in range(1, 10))
    return (f'<?xml version="1.0"?><!DOCTYPE x:xmpmeta [<!ENTITY l0 "ha">{ents}]>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            f'<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/"><xmp:CreatorTool>&l9;</xmp:CreatorTool>'
            "</rdf:Description></rdf:RDF></x:xmpmeta>").encode()


def _external_entity(url: str) -> bytes:
    return (f'<?xml version="1.0"?><!DOCTYPE x:xmpmeta [<!ENTITY e SYSTEM "{url}">]>'
            '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            '<rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/"><xmp:CreatorTool>&e;</xmp:CreatorTool>'
            "</rdf:Description></rdf:RDF></x:xmpmeta>").encode()


def _nested(depth: int) -> bytes:
    return xmp_packet({}, extra="<a>" * depth + "</a>" * depth)


def hostile(signed_jpeg: bytes | None = None, signed_png: bytes | None = None) -> dict[str, tuple[bytes, str]]:
    """name -> (file, the source its Invalid must name). The signed files add broken C2PA stores."""
    big_xmp = xmp_packet({"xmp:CreatorTool": "x" * (2 * 1024 * 1024)})
    cases = {
        "huge XMP (PNG iTXt, 2 MB)": (png_with([text_chunk("XML:com.adobe.xmp", big_xmp.decode(), "iTXt")]), "xmp"),
        "XMP bomb (iTXt deflated, 2 MB out)": (png_with([text_chunk("XML:com.adobe.xmp", big_xmp.decode(), "iTXt-z")]), "xmp"),
        "deeply nested XMP (100,000)": (png_with([text_chunk("XML:com.adobe.xmp", _nested(100_000).decode(), "iTXt")]), "xmp"),
        "nested XMP in JPEG (5,000)": (jpeg_with_xmp(_nested(5_000)), "xmp"),
        "billion laughs": (jpeg_with_xmp(_billion_laughs()), "xmp"),
        "external entity": (jpeg_with_xmp(_external_entity("file:///etc/passwd")), "xmp"),
        "not XML": (jpeg_with_xmp(b"<x:xmpmeta><unclosed>"), "xmp"),
        "EXIF pointing past the end": (jpeg_with_segment(0xE1, b"Exif\x00\x00II*\x00\xff\xff\x00\x00"), "exif"),
        "PNG text chunk past the end": (png_with([])[:-12] + struct.pack(">I", 1 << 30) + b"tEXtComment\x00" + b"x" * 16, "png"),
        "zTXt bomb (64 MB of zeros)": (png_with([png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(bytes(64 << 20), 9))]),
                                       "png"),
        "garbage JUMBF (caBX)": (png_with([png_chunk(b"caBX", b"\x00\x00\x00\x10jumb" + b"\x00\x00\x00\x08jumd" + b"\xff" * 64
                                                       + b"jumdc2pa" + bytes.fromhex("00110010800000aa00389b71"))]), "c2pa"),
    }
    for name, store in crafted_stores().items():
        cases[f"crafted store: {name}"] = (png_with([png_chunk(b"caBX", store)]), "c2pa")
    if signed_jpeg is not None:
        cases["JUMBF cut before the signature (JPEG)"] = (_cut_app11(signed_jpeg, signed_jpeg.find(b"c2pa.signature")), "c2pa")
    if signed_png is not None:
        store = _cabx(signed_png)
        cases["JUMBF cut in half (PNG)"] = (_with_cabx(signed_png, store[: len(store) // 2]), "c2pa")
        huge = b"\x00\x00\x00\x01" + store[4:8] + struct.pack(">Q", 1 << 62) + store[8:]
        cases["JUMBF box claiming 2^62 bytes (PNG)"] = (_with_cabx(signed_png, huge), "c2pa")
    return cases


_UUID_TAIL = bytes.fromhex("00110010800000aa00389b71")  # every C2PA box UUID ends so


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", 8 + len(payload)) + kind + payload


def _jumd(four: bytes, label: bytes) -> bytes:
    return _box(b"jumd", four + _UUID_TAIL + b"\x03" + label + b"\x00")


def _store(*boxes: bytes) -> bytes:
    return _box(b"jumb", _jumd(b"c2pa", b"c2pa") + b"".join(boxes))


def _manifest(claim_cbor: bytes, signature_cbor: bytes = b"\x80") -> bytes:
    return _box(b"jumb", _jumd(b"c2ma", b"urn:c2pa:12345678-1234-1234-1234-123456789012")
                + _box(b"jumb", _jumd(b"c2as", b"c2pa.assertions")
                       + _box(b"jumb", _jumd(b"cbor", b"c2pa.actions.v2") + _box(b"cbor", claim_cbor)))
                + _box(b"jumb", _jumd(b"c2cl", b"c2pa.claim.v2") + _box(b"cbor", claim_cbor))
                + _box(b"jumb", _jumd(b"c2cs", b"c2pa.signature") + _box(b"cbor", signature_cbor)))


def crafted_stores() -> dict[str, bytes]:
    """Manifest stores made by hand to stress c2pa-rs's parser: nesting, claimed lengths, counts."""
    level = _jumd(b"c2ma", b"x")
    depth = 100_000  # superboxes inside superboxes, each length exact
    nested = b"".join(struct.pack(">I", (depth - k) * (len(level) + 8)) + b"jumb" + level for k in range(depth))
    return {
        "JUMBF nested 100,000 deep": _store(nested),
        "claim CBOR nested 1,000,000 deep": _store(_manifest(b"\x81" * 1_000_000 + b"\x00")),
        "claim CBOR array of 2^60 items": _store(_manifest(b"\x9b" + struct.pack(">Q", 1 << 60))),
        "claim CBOR byte string of 2^60": _store(_manifest(b"\x5b" + struct.pack(">Q", 1 << 60))),
        "1,000,000 empty boxes (8 MB, under the cap)": _store(_box(b"jumb", _jumd(b"c2ma", b"m")
                                                                   + _box(b"free", b"") * 1_000_000)),
        "a 20 MB label": _store(_box(b"jumb", _box(b"jumd", b"c2ma" + _UUID_TAIL + b"\x03" + b"A" * 20_000_000))),
    }


def claims_4gb(signed_png: bytes) -> bytes:
    """The store's outer box claims 4 GB. c2pa-rs reads the boxes inside the chunk regardless,
    and the manifest still verifies: no allocation of the claimed size, and no error either."""
    store = _cabx(signed_png)
    return _with_cabx(signed_png, b"\xff\xff\xff\xf0" + store[4:])


def _cabx(png: bytes) -> bytes:
    at = png.find(b"caBX")
    return png[at + 4 : at + 4 + int.from_bytes(png[at - 4 : at], "big")]


def _with_cabx(png: bytes, store: bytes) -> bytes:
    at = png.find(b"caBX")
    n = int.from_bytes(png[at - 4 : at], "big")
    return png[: at - 4] + png_chunk(b"caBX", store) + png[at + 8 + n :]


def _cut_app11(jpeg: bytes, at: int) -> bytes:
    """The JPEG with the APP11 segment holding byte `at` cut short there (its length fixed up)."""
    pos = 2
    while pos < len(jpeg):
        length = int.from_bytes(jpeg[pos + 2 : pos + 4], "big")
        if pos + 2 + length > at:
            body = jpeg[pos + 4 : at]
            return jpeg[:pos] + jpeg[pos : pos + 2] + struct.pack(">H", len(body) + 2) + body + jpeg[pos + 2 + length :]
        pos += 2 + length
    raise ValueError("offset not inside a segment")
