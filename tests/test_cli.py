"""The `item` command as a user runs it (a real subprocess), and the range checks on its numbers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from itemrt.bench.cli import build_parser as bench_parser
from itemrt.cli import build_parser as item_parser
from PIL import Image


def _item(*args, **kw):
    return subprocess.run([sys.executable, "-m", "itemrt.cli", *map(str, args)], capture_output=True, check=False,
                          **{"text": True, **kw})


def test_detect_json_and_explain(tiny_bundle, samples, tmp_path):
    out = tmp_path / "explain"
    r = _item("detect", "--bundle", tiny_bundle, "--json", "--explain", out, *samples[:2])
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["path"] for x in lines] == [str(p) for p in samples[:2]]
    for x in lines:
        assert {"p_fake", "label", "threshold", "caption", "objects", "global_distance", "timings_ms"} <= x.keys()
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2
    with Image.open(pngs[0]) as im:
        assert im.height > 100 and im.width > 100


def test_detect_text_and_single_explain(tiny_bundle, samples, tmp_path):
    target = tmp_path / "one.png"
    r = _item("detect", "-b", tiny_bundle, samples[0], "--explain", target)
    assert r.returncode == 0, r.stderr
    assert "p(fake)=" in r.stdout and "untrained" in r.stdout and target.is_file()


def test_bad_image_reported_and_others_still_run(tiny_bundle, samples, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = _item("detect", "--bundle", tiny_bundle, "--json", bad, samples[0])
    assert r.returncode == 1
    first, second = (json.loads(x) for x in r.stdout.splitlines())
    assert first["error"] == "unsupported_image"
    assert "p_fake" in second
    # batched: the same answers in the same order, the bad one in its place
    paths = [samples[0], bad, *samples[1:3]]
    one, three = (_item("detect", "--bundle", tiny_bundle, "--json", "--batch-size", n, *paths) for n in ("1", "3"))
    assert one.returncode == three.returncode == 1
    one, three = ([json.loads(x) for x in r.stdout.splitlines()] for r in (one, three))
    assert [x["path"] for x in three] == [str(p) for p in paths] and three[1]["error"] == "unsupported_image"
    for a, b in zip(one, three):
        assert a.get("caption_tokens") == b.get("caption_tokens") and a.get("label") == b.get("label")
        assert abs(a.get("p_fake", 0) - b.get("p_fake", 0)) < 1e-4


def test_detect_reads_an_image_from_stdin(tiny_bundle, samples):
    r = _item("detect", "-", "--bundle", tiny_bundle, "--json", input=samples[0].read_bytes(), text=False)
    assert r.returncode == 0, r.stderr[-2000:]
    piped = json.loads(r.stdout)
    direct = json.loads(_item("detect", samples[0], "--bundle", tiny_bundle, "--json").stdout)
    assert piped["path"] == "-" and piped["caption_tokens"] == direct["caption_tokens"]
    assert abs(piped["p_fake"] - direct["p_fake"]) < 1e-6
    r = _item("detect", "-", "--bundle", tiny_bundle, input="not an image")
    assert r.returncode == 1 and "-: error (unsupported_image)" in r.stderr


def test_an_unwritable_explain_path_fails_before_any_image(tiny_bundle, samples, tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    r = _item("detect", samples[0], samples[1], "--bundle", tiny_bundle, "--explain", tmp_path / "a-file")
    assert r.returncode == 2 and "PathError: --explain: cannot make the folder" in r.stderr
    assert r.stdout == ""  # no image ran


def test_info(tiny_bundle):
    r = _item("info", tiny_bundle)
    assert r.returncode == 0, r.stderr
    import torch

    # the versions it was exported with: this machine's torch (2.13.0 here, 2.11 on a lent GPU box)
    for text in ("RANDOM-INIT", "UNTRAINED", "captioner_decoder", "tokens equal True", f"torch {torch.__version__}"):
        assert text in r.stdout
    m = json.loads(_item("info", "--json", tiny_bundle).stdout)
    assert m["format"] == "itemrt-bundle"
    layers = sum(i["name"].startswith("cross_k.") for i in m["components"]["captioner_decoder"]["inputs"])
    assert layers > 1 and f"cross_k.0-{layers - 1}[" in r.stdout  # per-layer inputs shown as one run


def test_info_on_a_broken_export_record_is_a_clear_error(tiny_bundle, tmp_path):
    """Open checks what the runtime reads; item info also shows the export's parity records,
    and one broken by hand is a one-line error pointing at --json, not a traceback."""
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["components"]["clip_image"]["parity"] = []
    (copy / "manifest.json").write_text(json.dumps(m))
    r = _item("info", copy)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "BundleIntegrityError" in r.stderr and f"item info --json {copy}" in r.stderr
    assert json.loads(_item("info", "--json", copy).stdout)["components"]["clip_image"]["parity"] == []


def test_missing_bundle_is_a_clear_error(tmp_path, samples):
    r = _item("detect", "--bundle", tmp_path / "nope", samples[0])
    assert r.returncode == 2 and "BundleNotFoundError" in r.stderr and "item export" in r.stderr


def test_a_reader_that_leaves_early_is_not_an_error(tiny_bundle):
    """`item info B | head -1`: the pipe closes under the writer; no traceback, exit 0."""
    p = subprocess.Popen([sys.executable, "-m", "itemrt.cli", "info", str(tiny_bundle)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and not err, err


def test_detect_on_folders(tiny_bundle, samples, tmp_path):
    photos, empty = tmp_path / "photos", tmp_path / "empty"
    photos.mkdir(), empty.mkdir()
    for p in samples[:2]:
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "notes.txt").write_text("not an image: left out of the folder's images")
    r = _item("detect", "--bundle", tiny_bundle, "--json", photos, empty)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["path"] for x in lines] == [str(photos / p.name) for p in sorted(samples[:2])] + [str(empty)]
    assert all("p_fake" in x for x in lines[:2])
    assert lines[2]["error"] == "unsupported_image" and "no images" in lines[2]["message"]
    assert r.returncode == 1  # one path failed
    # the same stem in two folders: two pictures, neither overwritten
    other = tmp_path / "other"
    other.mkdir()
    (other / samples[0].name).write_bytes(samples[0].read_bytes())
    out = tmp_path / "explain"
    r = _item("detect", "--bundle", tiny_bundle, "--explain", out, photos / samples[0].name, other)
    assert r.returncode == 0, r.stderr
    stem = samples[0].stem
    assert sorted(p.name for p in out.iterdir()) == [f"{stem}-2.explain.png", f"{stem}.explain.png"]


def test_sigterm_during_export_leaves_no_half_bundle(tmp_path, cache_dir):
    """`docker stop` / systemd on a long export: it stops, says so, and removes its temporary
    folder (a full-size one holds gigabytes); no bundle appears."""
    import os
    import signal
    import time

    out = tmp_path / "engines" / "b"
    proc = subprocess.Popen([sys.executable, "-m", "itemrt.cli", "export", "--random-init", "tiny", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "ITEMRT_CACHE": str(cache_dir)})
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".b-*")):  # the export is writing its temporary bundle
        assert proc.poll() is None and time.monotonic() < deadline, "export ended before it could be stopped"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "item export: interrupted" in err, err[-2000:]
    assert list(out.parent.iterdir()) == []


def test_demo_replaces_a_bundle_an_older_itemrt_wrote_then_reuses_its_own(tiny_bundle, samples, tmp_path, cache_dir):
    """The README's main command on a machine that still has the demo bundle of an older format."""
    import shutil

    demo, pics = tmp_path / "demo", tmp_path / "pics"
    shutil.copytree(tiny_bundle, demo)
    m = json.loads((demo / "manifest.json").read_text())
    (demo / "manifest.json").write_text(json.dumps({**m, "format_version": m["format_version"] - 1}))
    r = _item("demo", "--bundle", demo, "--explain-dir", pics)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "exporting the demo bundle again" in r.stderr and "format" in r.stderr
    created = json.loads((demo / "manifest.json").read_text())["created"]
    assert created != m["created"] and len(list(pics.glob("*.png"))) == len(samples)
    assert len(re.findall(r": (REAL|FAKE)  p\(fake\) \d", r.stdout)) == len(samples) and "untrained" in r.stdout
    r = _item("demo", "--bundle", demo, "--explain-dir", pics)  # now current: no export
    assert r.returncode == 0 and "exporting" not in r.stderr
    assert json.loads((demo / "manifest.json").read_text())["created"] == created


def _demo_blocks(stdout: str) -> dict[str, dict[str, list[str]]]:
    """The demo's table per image: {file name: {row label: its lines, continuations included}}."""
    blocks = {}
    for block in stdout.split("\n\n"):
        head, *rows = block.splitlines() or [""]
        if ": " not in head or not rows or not rows[0].startswith("  caption"):
            continue  # item info's lines, the heading
        table: dict[str, list[str]] = {"verdict": [head]}
        label = ""
        for line in rows:
            label = line[2:14].strip() or label  # a continuation line belongs to the row above
            table.setdefault(label, []).append(line[14:])
        blocks[head.split(": ")[0]] = table
    return blocks


def test_demo_shows_what_each_result_holds(tiny_bundle, samples, tmp_path):
    """Each sample's table holds its result: verdict and p(fake), the caption (whole, or its
    start cut with ' ...' after two lines), every object word with found or not, distance and
    box, and the picture's file; none of its lines is wider than 100 columns."""
    import os

    pics = tmp_path / "pics"
    r = _item("demo", "--bundle", tiny_bundle, "--explain-dir", pics, env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr[-2000:]
    detected = _item("detect", "--bundle", tiny_bundle, "--json", *samples).stdout.splitlines()
    results = {Path(x["path"]).name: x for x in map(json.loads, detected)}
    blocks = _demo_blocks(r.stdout)
    assert sorted(blocks) == sorted(results) == sorted(p.name for p in samples)
    for name, x in results.items():
        t = blocks[name]
        assert t["verdict"][0].startswith(f"{name}: {x['label'].upper()}  p(fake) {x['p_fake']:.4f}  "
                                          f"threshold {x['threshold']:.2f}  [untrained head")
        shown = " ".join(t["caption"])
        assert shown == x["caption"] or (len(t["caption"]) == 2 and shown.endswith(" ...")
                                         and x["caption"].startswith(shown[: -len(" ...")])), (shown, x["caption"])
        assert t["distance"][0].startswith(f"{x['global_distance']:.4f} image to caption")
        header, *rows = t["objects"]
        assert header.split() == ["word", "found", "distance", "box", "(x0,", "y0,", "x1,", "y1)"]
        expected = [f"{o['word']} found {o['distance']:.4f} " + ", ".join(f"{v:.0f}" for v in o["box"])
                    if o["found"] else f"{o['word']} not found - -" for o in x["objects"]]
        assert [" ".join(row.split()) for row in rows] == expected
        assert t["explain"] == [str(pics / f"{Path(name).stem}.explain.png")] and Path(t["explain"][0]).is_file()
    tables = r.stdout.split("sample images in ", 1)[1].splitlines()[1:]
    assert max(len(line) for line in tables if not line.startswith("  explain")) <= 100  # a path is not cut


def test_demo_table_cuts_a_long_caption_and_says_when_no_object_was_named(monkeypatch):
    from itemrt.cli import _demo_table
    from itemrt.results import DetectionResult

    monkeypatch.setenv("COLUMNS", "80")
    caption = " ".join(f"word{i}" for i in range(60))
    r = DetectionResult(p_fake=0.9, label="fake", threshold=0.5, trained=True, caption=caption, caption_tokens=[],
                        global_distance=0.8, objects=[], image_size=(64, 64), bundle="b")
    lines = _demo_table("x.jpg", r, Path("pics/x.explain.png"))
    assert lines[0] == "x.jpg: FAKE  p(fake) 0.9000  threshold 0.50"
    assert lines[1].startswith("  caption     word0 word1") and lines[2].endswith(" ...")
    assert caption.startswith((lines[1][14:] + " " + lines[2][14:])[: -len(" ...")])
    assert lines[4] == "  objects     none: no object word in the caption"
    assert max(map(len, lines)) <= 80


ITEM_BAD_NUMBERS = [
    (["detect", "a.jpg", "--batch-size", "0"], "--batch-size"),
    (["detect", "a.jpg", "--threads", "-1"], "--threads"),
    (["serve", "b", "--port", "70000"], "--port"),
    (["serve", "b", "--max-batch", "0"], "--max-batch"),
    (["serve", "b", "--timeout-s", "-1"], "--timeout-s"),
    (["serve", "b", "--max-upload-mb", "inf"], "--max-upload-mb"),
    (["watch", "d", "--out", "r.jsonl", "--interval", "0"], "--interval"),
    (["watch", "d", "--out", "r.jsonl", "--settle", "-1"], "--settle"),
    (["features", "d", "--out", "f", "--split-ratios", "0.5", "0.5", "-1"], "--split-ratios"),
    (["build", "b", "--opt-batch", "x"], "--opt-batch"),
    (["export", "--out", "b", "--det-threshold", "2"], "--det-threshold"),
    (["export", "--out", "b", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["train", "f", "--bundle", "b", "--lr", "nan"], "--lr"),
    (["train", "f", "--bundle", "b", "--hidden", "64", "0"], "--hidden"),
    (["train", "f", "--bundle", "b", "--dropout", "1"], "--dropout"),
    (["calibrate", "f", "--bundle", "b", "--target-fpr", "1"], "--target-fpr"),
]


@pytest.mark.parametrize("argv,flag", ITEM_BAD_NUMBERS, ids=[" ".join(a[:1] + a[-2:]) for a, _ in ITEM_BAD_NUMBERS])
def test_out_of_range_numbers_are_usage_errors_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        item_parser().parse_args(argv)
    assert e.value.code == 2
    assert f"argument {flag}: must be " in capsys.readouterr().err


def test_item_bench_numbers_are_checked_too(capsys):
    with pytest.raises(SystemExit) as e:
        bench_parser().parse_args(["b", "--runs", "0"])
    assert e.value.code == 2 and "argument --runs: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_the_ends_of_each_range_are_accepted():
    a = item_parser().parse_args(["serve", "b", "--port", "0", "--threads", "0", "--max-wait-ms", "0"])
    assert (a.port, a.threads, a.max_wait_ms) == (0, 0, 0.0)
    a = item_parser().parse_args(["features", "d", "--out", "f", "--split-ratios", "1", "0", "0"])
    assert a.split_ratios == [1.0, 0.0, 0.0]
    assert item_parser().parse_args(["calibrate", "f", "--bundle", "b", "--target-fpr", "0"]).target_fpr == 0.0
    b = bench_parser().parse_args(["b", "--objects", "0", "--warmup", "0", "--batch-sizes", "1", "8"])
    assert (b.objects, b.warmup, b.batch_sizes) == (0, 0, [1, 8])


def test_detect_names_that_are_not_utf8_on_a_strict_utf8_stdout(tiny_bundle, samples, tmp_path):
    """Issue 21: a file name with the byte 0xff made item detect fail with UnicodeEncodeError
    (exit 1) where stdout is strict UTF-8. Printed as \\xff; --json gives the exact bytes back."""
    import os

    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    folder = os.fsencode(tmp_path)
    good, bad = folder + b"/caf\xff.jpg", folder + b"/bad\xfe.jpg"
    with open(good, "wb") as f:
        f.write(samples[0].read_bytes())
    with open(bad, "wb") as f:
        f.write(b"not an image")
    r = _item("detect", "--bundle", tiny_bundle, tmp_path, text=False, env=env)  # the folder: names from listing it
    assert r.returncode == 1, r.stderr.decode(errors="replace")[-2000:]  # 1: the bad one
    assert b"caf\\xff.jpg: REAL" in r.stdout or b"caf\\xff.jpg: FAKE" in r.stdout
    assert b"bad\\xfe.jpg: error (unsupported_image)" in r.stderr and b"Traceback" not in r.stderr
    r = _item("detect", "--bundle", tiny_bundle, "--json", tmp_path, text=False, env=env)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert [os.fsencode(x["path"]) for x in lines] == [bad, good]
    assert "error" in lines[0] and "p_fake" in lines[1]
