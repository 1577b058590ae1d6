"""A bad bundle fails closed, naming what to re-export."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from itemrt import (
    BundleIntegrityError,
    BundleNotFoundError,
    BundleVersionError,
    Runtime,
)
from itemrt.bundle import Bundle


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _edit_manifest(root, fn):
    path = root / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_good_bundle_opens(copy):
    b = Bundle.open(copy)
    assert b.name == "tiny" and b.trained is False


def test_missing_manifest(tmp_path):
    with pytest.raises(BundleNotFoundError, match="item export"):
        Runtime(tmp_path)


def test_missing_file(copy):
    (copy / "clip_image.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match="clip_image.onnx is missing.*re-export it with: item export"):
        Runtime(copy)


def test_wrong_hash(copy):
    path = copy / "bank.npz"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match="bank.npz does not match its sha256"):
        Runtime(copy)
    Bundle.open(copy, verify=False)  # a user may skip hashing, knowingly


def test_hash_cache_skips_unchanged_files_and_never_a_changed_one(copy, tmp_path, monkeypatch):
    import os

    import itemrt.bundle as bundle_mod

    monkeypatch.setenv("ITEMRT_CACHE", str(tmp_path / "cache"))
    reads = []
    real = bundle_mod.sha256_file
    monkeypatch.setattr(bundle_mod, "sha256_file", lambda p, *a: reads.append(p.name) or real(p, *a))
    n_files = len(Bundle.open(copy).manifest["files"])
    assert len(reads) == n_files  # first open: every file read
    Bundle.open(copy)
    assert len(reads) == n_files  # unchanged: nothing re-read
    Bundle.open(copy, verify="full")
    assert len(reads) == 2 * n_files  # "full" ignores the cache (item info uses it)

    # Same size, same mtime, one byte flipped: the ctime moved, so it is hashed and refused.
    path = copy / "bank.npz"
    st = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    reads.clear()
    with pytest.raises(BundleIntegrityError, match="bank.npz does not match its sha256"):
        Bundle.open(copy)
    assert reads == ["bank.npz"]


def test_unwritable_hash_cache_still_verifies(copy, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    monkeypatch.setenv("ITEMRT_CACHE", str(blocker / "cache"))  # cannot be created
    assert Bundle.open(copy).name == "tiny"
    (copy / "bank.npz").write_bytes(b"changed")
    with pytest.raises(BundleIntegrityError, match="bank.npz"):
        Bundle.open(copy)


def test_other_format_version(copy):
    _edit_manifest(copy, lambda m: m.update(format_version=99, itemrt_version="9.0"))
    with pytest.raises(BundleVersionError, match="format 99 .*re-export"):
        Runtime(copy)


def test_not_a_bundle(copy):
    _edit_manifest(copy, lambda m: m.update(format="something-else"))
    with pytest.raises(BundleVersionError):
        Runtime(copy)


def test_corrupt_manifest(copy):
    (copy / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleIntegrityError, match="not valid JSON"):
        Runtime(copy)


def test_missing_component(copy):
    _edit_manifest(copy, lambda m: m["components"].pop("detector_head"))
    with pytest.raises(BundleVersionError, match="detector_head"):
        Runtime(copy)


def test_unknown_recipe(copy):
    _edit_manifest(copy, lambda m: m["head"].update(recipe="item-v99"))
    with pytest.raises(BundleVersionError, match="item-v99"):
        Runtime(copy)


def test_unknown_decoding_strategy(copy):
    _edit_manifest(copy, lambda m: m["captioner"]["decoding"].update(strategy="beam"))
    with pytest.raises(BundleVersionError, match="'beam' is not supported"):
        Runtime(copy)


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        node = m
        for key in parents:
            node = node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("head.threshold", "0.5", "head.threshold must be a number from 0 to 1, got '0.5'"),
        ("head.threshold", 1.5, "head.threshold must be a number from 0 to 1"),
        ("detector.threshold", _DELETE, "detector.threshold is missing"),
        ("words.max_objects", -1, "words.max_objects must be a whole number >= 0"),
        ("words.max_objects", True, "words.max_objects must be a whole number >= 0"),
        ("captioner.decoding.layers", None, "captioner.decoding.layers must be a whole number >= 0, got None"),
        ("captioner.decoding.beams", 4, r"captioner.decoding has unknown fields \['beams'\]"),
        ("clip.preprocess.std", [0.5, 0.5], "clip.preprocess.std must be a list of 3 numbers"),
        ("clip.preprocess", [], "clip.preprocess must be an object"),
        ("clip.tokenizer.file", "", "clip.tokenizer.file must be a non-empty string"),
        ("components.head.file", {"x": 1}, "components.head must be an object with its graph's file"),
        ("components.clip_image.variants.int8", 7, "components.clip_image.variants.int8 must be an object with `used`"),
        ("precisions", "int8", "precisions.mixed.used must map components to precisions"),
        ("files", [], "files must map each file to its sha256"),
    ],
)
def test_a_malformed_manifest_fails_closed_naming_the_field(copy, path, value, message):
    """The manifest is not hashed (it holds the hashes), so its fields are checked at open:
    found by mutating manifests, each of these was a KeyError, TypeError or AttributeError
    somewhere in loading or in detect()."""
    _edit_manifest(copy, _set(path, value))
    with pytest.raises(BundleIntegrityError, match=f"manifest.json: {message}.*re-export it with: item export"):
        Runtime(copy)


def test_a_manifest_that_is_not_an_object(copy):
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleVersionError, match="not an itemrt bundle.*item export --out"):
        Runtime(copy)


def test_numbers_that_disagree_with_the_graphs_give_a_typed_error(copy, samples):
    """Well-typed but wrong (a preprocess size the graph does not take): the engine's failure
    is an InferenceError naming the graph, not ONNX Runtime's own exception type."""
    from itemrt import InferenceError

    _edit_manifest(copy, _set("captioner.preprocess.height", 48))
    with Runtime(copy) as rt, pytest.raises(InferenceError, match="captioner_vision failed in ONNX Runtime"):
        rt.detect(samples[0])


def test_unlisted_file_is_refused(copy):
    b = Bundle.open(copy)
    with pytest.raises(BundleIntegrityError):
        b.file("../../etc/passwd")


@pytest.mark.parametrize("rel", ["../outside.onnx", "/etc/hostname", "tokenizers/../../outside.onnx"])
def test_a_manifest_pointing_outside_the_bundle_is_refused(copy, rel):
    outside = copy.parent / "outside.onnx"
    shutil.copy(copy / "head.onnx", outside)
    target = outside if rel.endswith("outside.onnx") else Path(rel)

    def point_outside(m):  # even with the right digest
        m["files"][rel] = hashlib.sha256(target.read_bytes()).hexdigest()
        m["components"]["head"]["file"] = rel

    _edit_manifest(copy, point_outside)
    with pytest.raises(BundleIntegrityError, match="outside the bundle"):
        Bundle.open(copy)


def test_missing_int8_graph(copy):
    (copy / "int8" / "clip_image.onnx").unlink()
    with pytest.raises(BundleIntegrityError, match="int8/clip_image.onnx is missing"):
        Runtime(copy)


def test_int8_asked_of_a_bundle_without_it(copy):
    def drop(m):
        for c in m["components"].values():
            c.pop("variants", None)
        m["default_precision"] = "fp32"

    _edit_manifest(copy, drop)
    with pytest.raises(BundleVersionError, match="no int8 graphs.*item export"):
        Runtime(copy, precision="int8")
    assert set(Runtime(copy).precisions.values()) == {"fp32"}


def test_export_refuses_an_out_that_is_not_a_bundle_before_any_work(tmp_path):
    """The new bundle replaces only an earlier one: a file or someone's folder at --out is
    refused at once, and left as it was."""
    from itemrt.errors import PathError
    from itemrt.export.pipeline import export_bundle

    (tmp_path / "a-file").write_text("notes")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"precious")
    for out in (tmp_path / "a-file", tmp_path / "photos"):
        with pytest.raises(PathError, match="exists and is not a bundle"):
            export_bundle(out, random_init="tiny", progress=lambda m: None)
    assert (tmp_path / "a-file").read_text() == "notes"
    assert (tmp_path / "photos" / "keep.jpg").read_bytes() == b"precious"
