"""`item watch`: each file once, across restarts; unreadable files quarantined with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from itemrt.watch import Watcher


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_each_file_once_across_restarts(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    for p in samples[:2]:
        shutil.copy(p, cam / p.name)
    (cam / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (cam / "still-writing.jpg.part").write_bytes(b"partial")

    w = Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None)
    assert w.run(once=True) == 3
    recs = _lines(out)
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in recs) == sorted([samples[0].name, samples[1].name, "broken.jpg"])
    bad = next(r for r in recs if r["path"].endswith("broken.jpg"))
    assert bad["error"] in ("unsupported_image", "corrupt_image")
    assert (cam / "quarantine" / "broken.jpg").is_file() and not (cam / "broken.jpg").exists()
    assert bad["error"] in (cam / "quarantine" / "broken.jpg.reason").read_text()
    good = [r for r in recs if "error" not in r]
    assert all(0 <= r["p_fake"] <= 1 and r["caption"] for r in good)

    # restart: nothing again; a new file: only it
    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 0
    shutil.copy(samples[2], cam / samples[2].name)
    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 1
    assert len(_lines(out)) == 4

    # a crash mid-write leaves a torn line: it is cut off and that file done again, once
    data = out.read_bytes()
    last = data[: -1].rfind(b"\n") + 1
    out.write_bytes(data[: last + 25])
    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 1
    recs = _lines(out)
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4


def test_watch_command(tiny_bundle, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "r.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    cmd = [sys.executable, "-m", "itemrt.cli", "watch", str(cam), "--bundle", str(tiny_bundle), "--out", str(out),
           "--once", "--interval", "0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a.jpg:" in r.stdout and len(_lines(out)) == 1
