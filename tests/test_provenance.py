"""Provenance: real C2PA files signed here by a throwaway certificate chain and read back (valid
but untrusted, trusted with the test root as anchor, invalid once tampered), generators' PNG
chunks, XMP and EXIF marks, files with none, and hostile metadata, which must come back as
Invalid with a reason, bounded by construction."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading

import pytest
from itemrt.bench import provenance_inputs as pi
from itemrt.provenance import content_credentials
from itemrt.provenance.evidence import DIGITAL_SOURCE_TYPES, ProvenanceLimits, Signal
from itemrt.provenance.metadata import read_metadata
from itemrt.provenance import (
    INSTALL_HINT,
    Provenance,
    ProvenanceReader,
    decide,
    load_trust_anchors,
    read_provenance,
)

KEYS = {"declared_ai", "basis", "conflicting", "c2pa", "signals", "invalid", "format", "read", "summary"}
C2PA_KEYS = {"present", "state", "reason", "claim_generator", "signer", "issuer", "signed_at", "actions",
             "digital_source_types", "failures", "remote_url"}


def needs_c2pa():
    pytest.importorskip("c2pa", reason="c2pa-python (itemrt[provenance]) is not installed")
    pytest.importorskip("cryptography")


@pytest.fixture(scope="module")
def creds():
    needs_c2pa()
    return pi.make_credentials("es256")


FORMATS = {"jpeg": ("JPEG", "JPEG"), "png": ("PNG", "PNG"), "webp": ("WEBP", "WEBP"), "tiff": ("TIFF", "TIFF"),
           "gif": ("GIF", None), "avif": ("AVIF", "BMFF")}  # kind -> (Pillow's format, the container walked)


@pytest.fixture(scope="module")
def signed(creds) -> dict[str, bytes]:
    from PIL import features

    kinds = [k for k in FORMATS if k != "avif" or features.check("avif")]
    return {k: pi.sign(pi.image(FORMATS[k][0]), f"image/{k}", creds) for k in kinds}


def _json_round_trip(p: Provenance) -> dict:
    d = json.loads(json.dumps(p.to_dict()))
    assert set(d) == KEYS and set(d["c2pa"]) == C2PA_KEYS
    return d


# --- C2PA ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(FORMATS))
def test_a_signed_file_is_valid_but_untrusted_without_anchors(signed, kind):
    if kind not in signed:
        pytest.skip(f"this Pillow does not write {kind}")
    p = read_provenance(signed[kind])
    assert p.format == FORMATS[kind][1]
    assert read_metadata(signed[kind], ProvenanceLimits()).c2pa_bytes > 1000  # the store's size, for the cap
    c = p.c2pa
    assert (c.present, c.state) == (True, "untrusted")
    assert "(none given)" in c.reason and "signingCredential.untrusted" in c.failures
    assert c.claim_generator.startswith("itemrt-tests 1.0")
    assert (c.signer, c.issuer) == ("ITEM-RT test signer", "ITEM-RT tests")
    assert [(a.action, a.digital_source_type, a.software_agent) for a in c.actions] == [
        ("c2pa.created", "trainedAlgorithmicMedia", "ITEM-RT test generator")]
    assert c.digital_source_types == ("trainedAlgorithmicMedia",)
    assert p.declared_ai is True and not p.conflicting and p.invalid == ()
    assert (p.basis.source, p.basis.signed, p.basis.value) == ("c2pa", "untrusted", "trainedAlgorithmicMedia")
    assert "issuer not trusted" in p.summary and "ITEM-RT test signer" in p.summary
    assert _json_round_trip(p)["c2pa"]["actions"][0]["digital_source_type"] == "trainedAlgorithmicMedia"


def test_the_test_root_as_trust_anchor_makes_it_trusted(signed, creds, tmp_path):
    bundle = tmp_path / "anchors.pem"
    bundle.write_bytes(pi.make_credentials().root_pem + creds.root_pem)  # an unrelated root first
    for anchors in (creds.root_pem, creds.root_pem.decode(), bundle, str(bundle)):
        p = read_provenance(signed["jpeg"], trust_anchors=anchors)
        assert p.c2pa.state == "trusted" and p.c2pa.reason is None, anchors
        assert (p.basis.signed, p.declared_ai) == ("trusted", True)
    other = pi.make_credentials().root_pem  # a root that did not issue the signer
    assert read_provenance(signed["jpeg"], trust_anchors=other).c2pa.state == "untrusted"


def test_ps256_signatures_verify_too(creds):
    rsa = pi.make_credentials("ps256")
    data = pi.sign(pi.image("JPEG"), "image/jpeg", rsa)
    assert read_provenance(data).c2pa.state == "untrusted"
    assert read_provenance(data, trust_anchors=rsa.root_pem).c2pa.state == "trusted"


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_tampered_pixels_make_it_invalid_with_the_reason(signed, creds, kind):
    data = bytearray(signed[kind])
    at = data.find(b"IDAT") + 20 if kind == "png" else len(data) - 50  # inside the image data
    data[at] ^= 0x55
    p = read_provenance(bytes(data), trust_anchors=creds.root_pem)
    assert p.c2pa.state == "invalid" and "assertion.dataHash.mismatch" in p.c2pa.failures
    assert "dataHash.mismatch" in p.c2pa.reason
    assert [i.source for i in p.invalid] == ["c2pa"]
    # what it declared is kept, at the strength of unsigned metadata
    assert (p.basis.signed, p.declared_ai) == ("invalid", True)
    assert "failing validation" in p.summary


def test_a_valid_signature_beats_metadata_and_disagreement_is_flagged(creds):
    """Signed says captured, unsigned PNG text says AUTOMATIC1111: the signature wins (False), and
    the conflict is reported. Signed says generated, XMP says captured: True, conflicting."""
    captured = pi.manifest("http://cv.iptc.org/newscodes/digitalsourcetype/digitalCapture")
    p = read_provenance(pi.sign(pi.generator_pngs()["AUTOMATIC1111"], "image/png", creds, captured))
    assert (p.declared_ai, p.basis.source, p.basis.signed, p.conflicting) == (False, "c2pa", "untrusted", True)
    assert any(s.generator == "AUTOMATIC1111" and s.signed == "no" for s in p.signals)
    xmp = pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": pi.TRAINED.replace("trainedAlgorithmicMedia", "digitalCapture")})
    p = read_provenance(pi.sign(pi.jpeg_with_xmp(xmp), "image/jpeg", creds))
    assert (p.declared_ai, p.basis.source, p.conflicting) == (True, "c2pa", True)


def test_no_network_for_a_remote_manifest(creds):
    """A file can point at a remote manifest; c2pa-python's default would fetch it (a request
    to wherever the uploader says). Neither the reader nor the verifier connects: checked on a
    listening socket's backlog right after the synchronous call, not by waiting."""
    needs_c2pa()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/manifest.c2pa"
        data = pi.jpeg_with_xmp(pi.xmp_packet({"dcterms:provenance": url}, attributes=True))
        p = read_provenance(data)
        assert (p.c2pa.present, p.c2pa.state, p.c2pa.remote_url) == (False, "not_checked", url)
        assert p.declared_ai is None and "remote manifest" in p.c2pa.reason
        c, _ = content_credentials.C2paVerifier().verify(data, "JPEG", None, ProvenanceLimits())  # past the pre-scan
        assert c.state == "invalid"
        srv.setblocking(False)
        with pytest.raises(BlockingIOError):
            srv.accept()


def test_without_c2pa_python_the_rest_still_works(monkeypatch):
    """c2pa-python missing (or its native library not loading): C2PA is "not checked" with the
    install hint, and the metadata signals are all there."""
    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa -> ImportError
    reader = ProvenanceReader()
    assert reader.c2pa_status == INSTALL_HINT
    store = pi.hostile()["garbage JUMBF (caBX)"][0]  # carries a manifest store's marker
    data = pi.png_with([pi.text_chunk("parameters", pi.A1111)], base=store)
    p = reader.read(data)
    assert (p.c2pa.present, p.c2pa.state, p.c2pa.reason) == (True, "not_checked", INSTALL_HINT)
    assert (p.declared_ai, p.basis.generator) == (True, "AUTOMATIC1111")
    assert "not checked (install itemrt[provenance])" in p.summary


def test_c2pa_python_whose_library_does_not_load():
    """The aarch64 wheel's manylinux_2_28 tag lets it install where glibc is older than the 2.34
    its library needs (JetPack 5): loading it fails (c2pa-python raises RuntimeError around
    ctypes' OSError), which is reported, not raised. In a child process, ctypes made to fail."""
    needs_c2pa()
    code = """
import ctypes
def refuse(name, *a, **k):
    if "c2pa" in str(name):
        raise OSError(f"{name}: version `GLIBC_2.34' not found")
    return real(name, *a, **k)
real, ctypes.CDLL = ctypes.CDLL, refuse
from itemrt.bench import provenance_inputs as pi
from itemrt.provenance import ProvenanceReader
reader = ProvenanceReader()
p = reader.read(pi.png_with([pi.text_chunk("parameters", pi.A1111)], base=pi.hostile()["garbage JUMBF (caBX)"][0]))
print(reader.c2pa_status)
print(p.c2pa.state, p.basis.generator)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    status, outcome = run.stdout.splitlines()
    assert status.startswith("not checked (c2pa-python did not load: ") and "GLIBC_2.34" in status
    assert outcome == "not_checked AUTOMATIC1111"


def test_c2pa_limits(signed):
    p = read_provenance(signed["png"], limits=ProvenanceLimits(max_c2pa_bytes=1000))
    assert p.c2pa.state == "invalid" and "over the limit of 1000" in p.c2pa.reason
    p = read_provenance(signed["png"], limits=ProvenanceLimits(c2pa=False))
    assert (p.c2pa.state, p.declared_ai) == ("not_checked", None)


def test_trust_anchors_must_hold_a_certificate(tmp_path):
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_trust_anchors(b"not a certificate")
    with pytest.raises(OSError):
        load_trust_anchors(tmp_path / "missing.pem")
    needs_c2pa()
    with pytest.raises(ValueError, match="does not parse"):
        ProvenanceReader(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_readers_are_shared_between_threads(signed, creds):
    reader = ProvenanceReader(creds.root_pem)
    expected = {k: reader.read(v).to_dict() for k, v in signed.items()}
    results, errors = [], []

    def work():
        try:
            for k in ("jpeg", "png", "webp") * 5:
                results.append(reader.read(signed[k]).to_dict() == expected[k])
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == [True] * 60


# --- generators' marks, XMP, EXIF -------------------------------------------------------------

@pytest.mark.parametrize(("name", "generator"), [
    ("AUTOMATIC1111", "AUTOMATIC1111"), ("AUTOMATIC1111 (iTXt)", "AUTOMATIC1111"), ("ComfyUI", "ComfyUI"),
    ("ComfyUI (zTXt)", "ComfyUI"), ("NovelAI", "NovelAI"), ("InvokeAI", "InvokeAI"), ("SwarmUI", "SwarmUI"),
    ("Fooocus", "Fooocus")])
def test_generator_png_chunks(name, generator):
    data = pi.generator_pngs()[name]
    p = read_provenance(data)
    assert (p.declared_ai, p.basis.generator, p.basis.signed, p.basis.source) == (True, generator, "no", "png")
    assert p.basis.prompt_present and p.basis.prompt is None
    assert len([s for s in p.signals if s.generator == generator]) == 1  # a tool's chunks, one signal
    text = json.dumps(p.to_dict())
    for prompt in ("astronaut riding", "castle on a hill", "1girl", "red fox", "a cat", "a dog"):
        assert prompt not in text  # never echoed by default
    echoed = read_provenance(data, include_prompts=True).basis.prompt
    assert echoed and echoed in (pi.A1111 + pi.COMFY_PROMPT + pi.NOVELAI_COMMENT + "a red fox a cat a dog")


def test_a1111_details_and_prompt_cut():
    p = read_provenance(pi.generator_pngs()["AUTOMATIC1111"], include_prompts=True,
                        limits=ProvenanceLimits(max_prompt_chars=12))
    assert "model sd_xl_base_1.0" in p.basis.value and p.basis.prompt == "a photo of a"
    no_prompt = pi.png_with([pi.text_chunk("parameters", "Steps: 20, Sampler: Euler a, Seed: 1")])
    assert read_provenance(no_prompt).basis.prompt_present is False


@pytest.mark.parametrize(("code", "declares"), [
    ("trainedAlgorithmicMedia", True), ("compositeWithTrainedAlgorithmicMedia", True), ("algorithmicMedia", True),
    ("digitalCapture", False), ("humanEdits", None), ("somethingNew", None)])
@pytest.mark.parametrize("form", ["element", "attribute"])
def test_xmp_digital_source_type_in_jpeg(code, declares, form):
    uri = f"http://cv.iptc.org/newscodes/digitalsourcetype/{code}"
    data = pi.jpeg_with_xmp(pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": uri}, attributes=form == "attribute"))
    p = read_provenance(data)
    s = [s for s in p.signals if s.field == "Iptc4xmpExt:DigitalSourceType"]
    assert [(x.value, x.declares_ai, x.signed) for x in s] == [(code, declares, "no")]
    assert p.declared_ai is declares and (p.basis is None) == (declares is None)
    assert p.c2pa.state == "absent" and p.format == "JPEG"


def test_xmp_forms_and_ai_fields():
    by_resource = (pi.xmp_packet({}, extra='<rdf:Description xmlns:Iptc4xmpExt="' + pi.IPTC_EXT + '">'
                              '<Iptc4xmpExt:DigitalSourceType rdf:resource="' + pi.TRAINED + '"/></rdf:Description>'))
    assert read_provenance(pi.jpeg_with_xmp(by_resource)).basis.value == "trainedAlgorithmicMedia"
    ai = pi.xmp_packet({"Iptc4xmpExt:AISystemUsed": "Midjourney", "Iptc4xmpExt:AIPromptInformation": "a secret prompt",
                        "xmp:CreatorTool": "Adobe Firefly"})
    p = read_provenance(pi.jpeg_with_xmp(ai))
    gens = {s.field: (s.generator, s.declares_ai, s.prompt_present) for s in p.signals}
    assert gens["Iptc4xmpExt:AISystemUsed"] == ("Midjourney", True, False)
    assert gens["xmp:CreatorTool"] == ("Adobe Firefly", True, False)
    assert gens["Iptc4xmpExt:AIPromptInformation"][2] is True and "secret" not in json.dumps(p.to_dict())


@pytest.mark.parametrize(("software", "declares", "generator"), [
    ("NovelAI", True, "NovelAI"), ("Adobe Photoshop 25.0 (Windows)", None, None), ("GIMP 2.10.36", None, None)])
def test_exif_software(software, declares, generator):
    data = pi.image("JPEG", exif=pi.exif_block({0x0131: software}))
    p = read_provenance(data)
    assert [(s.source, s.field, s.value, s.declares_ai, s.generator) for s in p.signals] == [
        ("exif", "Software", software, declares, generator)]
    assert p.declared_ai is declares


def test_a1111_in_jpeg_exif_user_comment_and_comfyui_in_webp_exif():
    comment = b"UNICODE\x00" + pi.A1111.encode("utf-16-be")  # how AUTOMATIC1111 saves JPEG / WebP
    p = read_provenance(pi.image("JPEG", exif=pi.exif_block({}, user_comment=comment)))
    assert (p.basis.generator, p.basis.source, p.basis.field, p.basis.prompt_present) == (
        "AUTOMATIC1111", "exif", "UserComment", True)
    webp = pi.image("WEBP", exif=pi.exif_block({0x010F: "workflow:" + pi.COMFY_WORKFLOW, 0x0110: "prompt:" + pi.COMFY_PROMPT}))
    p = read_provenance(webp)
    assert (p.format, p.basis.generator, p.basis.prompt_present) == ("WEBP", "ComfyUI", True)


def test_other_containers():
    png = pi.png_with([pi.png_chunk(b"eXIf", pi.exif_block({0x0131: "NovelAI"}))])
    assert read_provenance(png).basis.generator == "NovelAI"
    packet = pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": pi.TRAINED}).decode()
    png = pi.png_with([pi.text_chunk("XML:com.adobe.xmp", packet, "iTXt")])
    assert read_provenance(png).basis.value == "trainedAlgorithmicMedia"
    tiff = pi.image("TIFF", tiffinfo={0x0131: "Midjourney", 700: pi.xmp_packet({"xmp:CreatorTool": "ComfyUI"})})
    p = read_provenance(tiff)
    assert p.format == "TIFF" and {s.generator for s in p.signals} == {"Midjourney", "ComfyUI"}
    webp = pi.image("WEBP", xmp=pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": pi.TRAINED}))
    assert read_provenance(webp).declared_ai is True
    gif = pi.gif_with_xmp(pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": pi.TRAINED}))  # found by scanning
    p = read_provenance(gif)
    assert (p.format, p.declared_ai) == (None, True)


def test_files_with_nothing_declare_nothing(samples):
    for data in [path.read_bytes() for path in samples] + [pi.image("PNG"), pi.image("WEBP"), pi.image("GIF"), b"", b"junk"]:
        p = read_provenance(data)
        assert (p.declared_ai, p.basis, p.conflicting, p.signals, p.invalid) == (None, None, False, (), ())
        assert (p.c2pa.present, p.c2pa.state) == (False, "absent")
        assert p.summary == "declares nothing about its origin"
        _json_round_trip(p)


def test_unavailable_and_oversized_inputs():
    p = Provenance.unavailable("the input was decoded pixels, not a file")
    assert (p.read, p.declared_ai, p.c2pa.state) == (False, None, "not_checked")
    assert _json_round_trip(p)["summary"].startswith("provenance not read")
    p = read_provenance(pi.generator_pngs()["AUTOMATIC1111"], limits=ProvenanceLimits(max_bytes=100))
    assert p.declared_ai is None and p.invalid[0].source == "file" and "over the limit of 100" in p.invalid[0].reason
    data = pi.generator_pngs()["ComfyUI"]
    assert read_provenance(bytearray(data)) == read_provenance(memoryview(data)) == read_provenance(data)


def test_decide_rule():
    def s(signed: str, declares: bool | None) -> Signal:
        return Signal("x", "f", "v", declares, signed)

    assert decide([]) == (None, None, False)
    assert decide([s("no", None)]) == (None, None, False)
    assert decide([s("no", True), s("untrusted", False)]) == (False, s("untrusted", False), True)
    assert decide([s("untrusted", False), s("trusted", True)])[:2] == (True, s("trusted", True))
    assert decide([s("no", False), s("no", True)]) == (True, s("no", True), True)  # equals: AI wins
    assert decide([s("invalid", True), s("no", False)])[0] is True  # an invalid manifest proves nothing
    assert set(DIGITAL_SOURCE_TYPES.values()) == {True, False, None}


# --- hostile metadata -------------------------------------------------------------------------

def _hostile_cases() -> dict[str, tuple[bytes, str]]:
    try:
        creds = pi.make_credentials()
        return pi.hostile(pi.sign(pi.image("JPEG"), "image/jpeg", creds), pi.sign(pi.image("PNG"), "image/png", creds))
    except ImportError:
        return pi.hostile()


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_metadata_is_invalid_with_a_reason(name):
    data, source = HOSTILE[name]
    p = read_provenance(data)
    if source == "c2pa" and p.c2pa.state == "not_checked":
        pytest.skip("c2pa-python is not installed")
    reasons = [i.reason for i in p.invalid if i.source == source]
    assert reasons and all(reasons), p.invalid
    assert not any("internal error" in i.reason for i in p.invalid)
    assert p.declared_ai is None or source == "c2pa"  # nothing from a refused packet is believed
    assert "&l" not in json.dumps(p.to_dict()) and "passwd" not in json.dumps(p.to_dict())
    _json_round_trip(p)


def test_hostile_text_is_read_only_up_to_the_limits():
    """By construction: what is kept of a zTXt bomb or a huge chunk is at most the limits."""
    limits = ProvenanceLimits(max_text_bytes=4096, max_metadata_bytes=10_000)
    md = read_metadata(HOSTILE["zTXt bomb (64 MB of zeros)"][0], limits)
    assert [(f.key, len(f.text), f.truncated) for f in md.fields] == [("Comment", 4096, True)]
    many = pi.png_with([pi.text_chunk("parameters", "x" * 3000) for _ in range(8)])
    md = read_metadata(many, limits)
    assert sum(len(f.text) for f in md.fields) == 10_000
    assert any("more than 10000 bytes of metadata" in i.reason for i in md.invalid)
    md = read_metadata(pi.png_with([pi.png_chunk(b"tEXt", b"k\x00v")] * 50), ProvenanceLimits(max_blocks=20))
    assert len(md.fields) < 20 and any("more than 20 chunks" in i.reason for i in md.invalid)


def test_hostile_c2pa_stores_in_a_memory_capped_process():
    """The C2PA cases under an address-space cap of 1 GiB over what the process had mapped: a
    JUMBF box that claims 4 GB or 2^62 bytes must not be allocated (Rust aborts when an
    allocation fails, so the child would die)."""
    needs_c2pa()
    code = """
import resource, sys
from itemrt.bench import provenance_inputs as pi
from itemrt.provenance import read_provenance
creds = pi.make_credentials()
png, jpeg = (pi.sign(pi.image(f), m, creds) for f, m in (("PNG", "image/png"), ("JPEG", "image/jpeg")))
cases = {k: v[0] for k, v in pi.hostile(jpeg, png).items()}
cases["4 GB box"] = pi.claims_4gb(png)
read_provenance(png)  # every library loaded before the cap
vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize"))) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
for name, data in cases.items():
    p = read_provenance(data)
    assert not any("internal error" in i.reason for i in p.invalid), (name, p.invalid)
    print(name, p.c2pa.state)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    states = dict(line.rsplit(" ", 1) for line in run.stdout.splitlines())
    assert states["4 GB box"] == "untrusted"  # read past the bogus length, still verifies
    assert all(states[k] == "invalid" for k in states if "JUMBF" in k)


def test_mutated_metadata_never_breaks_the_reader():
    """A seeded fuzz over the metadata bytes of every kind of file above: flipped, cut, spliced,
    lengths set to extremes. Each input gives a Provenance (never an exception), no internal
    error, and a JSON-able dict."""
    import random

    rng = random.Random(25)
    seeds = [*pi.generator_pngs().values(),
             pi.jpeg_with_xmp(pi.xmp_packet({"Iptc4xmpExt:DigitalSourceType": pi.TRAINED, "xmp:CreatorTool": "ComfyUI"})),
             pi.image("JPEG", exif=pi.exif_block({0x0131: "NovelAI"}, b"UNICODE\x00" + pi.A1111.encode("utf-16-be"))),
             pi.image("WEBP", exif=pi.exif_block({0x0110: "prompt:" + pi.COMFY_PROMPT}),
                      xmp=pi.xmp_packet({"xmp:CreatorTool": "x"})),
             pi.image("TIFF", tiffinfo={0x0131: "Midjourney", 700: pi.xmp_packet({"xmp:CreatorTool": "ComfyUI"})})]
    seeds += [data for name, (data, _) in HOSTILE.items() if "JUMBF" in name]  # verified where c2pa-python is
    reader = ProvenanceReader()
    declared = 0
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        span = min(len(data), 4096)  # the metadata sits near the start of these files
        cut = rng.randrange(1, span)
        match rng.randrange(4):
            case 0:
                for _ in range(rng.randint(1, 8)):
                    data[rng.randrange(span)] = rng.randrange(256)
            case 1:
                data = data[:cut]
            case 2:
                data[cut : cut + rng.randint(1, 16)] = rng.randbytes(rng.randint(0, 16))
            case 3:
                at = rng.randrange(span - 4)
                data[at : at + 4] = rng.choice([b"\xff" * 4, b"\0" * 4, b"\x7f\xff\xff\xff", b"\x80\0\0\0"])
        p = reader.read(bytes(data))
        assert isinstance(p, Provenance)
        assert not any("internal error" in i.reason for i in p.invalid), p.invalid
        json.dumps(p.to_dict())
        declared += p.declared_ai is True
    assert declared > 100  # most mutants still carry a readable mark: the fuzz reaches the parsers


# --- in the chain: Runtime.detect carries it, and it never moves the verdict --------------------


def test_the_runtime_reports_provenance_beside_an_unchanged_verdict(runtime, tiny_bundle, signed, creds, tmp_path):
    from itemrt import Runtime
    from itemrt.stages.images import read_image

    path = tmp_path / "signed.jpg"
    path.write_bytes(signed["jpeg"])
    got = {"path": runtime.detect(path), "bytes": runtime.detect(signed["jpeg"]),
           "loaded": runtime.detect(read_image(path))}
    for how, r in got.items():
        p = r.provenance
        assert p.declared_ai is True and p.basis.source == "c2pa" and p.c2pa.state == "untrusted", how
        assert r.to_dict()["provenance"]["summary"] == p.summary
        assert "provenance" in r.timings_ms
    pixels = runtime.detect(read_image(path).image)  # decoded pixels carry no file
    assert pixels.provenance.read is False and pixels.provenance.declared_ai is None
    same = runtime.precision
    with Runtime(tiny_bundle, precision=same, provenance=False) as off, \
            Runtime(tiny_bundle, precision=same, trust_anchors=creds.root_pem) as trusting:
        plain, trusted = off.detect(path), trusting.detect(path)
    assert plain.provenance is None and plain.to_dict()["provenance"] is None and "provenance" not in plain.timings_ms
    assert trusted.provenance.c2pa.state == "trusted"
    for r in (*got.values(), pixels, trusted):  # evidence beside the verdict, never an input to it
        assert (r.p_fake, r.label, r.caption_tokens) == (plain.p_fake, plain.label, plain.caption_tokens)


def test_item_detect_prints_and_writes_the_section(tiny_bundle, signed, creds, tmp_path, capsys):
    import json

    from itemrt.cli import main as item

    path = tmp_path / "signed.jpg"
    path.write_bytes(signed["jpeg"])
    anchors = tmp_path / "root.pem"
    anchors.write_bytes(creds.root_pem)
    assert item(["detect", str(path), "--bundle", str(tiny_bundle), "--json"]) == 0
    section = json.loads(capsys.readouterr().out)["provenance"]
    assert section["declared_ai"] is True and section["c2pa"]["state"] == "untrusted"
    assert section["basis"]["value"] == "trainedAlgorithmicMedia"
    assert item(["detect", str(path), "--bundle", str(tiny_bundle), "--trust-anchors", str(anchors)]) == 0
    assert "  provenance: declares AI-generated: C2PA, signed by 'ITEM-RT test signer' (ITEM-RT tests), issuer trusted" \
        in capsys.readouterr().out
    assert item(["detect", str(path), "--bundle", str(tiny_bundle), "--json", "--no-provenance"]) == 0
    assert json.loads(capsys.readouterr().out)["provenance"] is None
