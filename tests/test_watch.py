"""`item watch`: each file once, across restarts; unreadable files quarantined with the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from itemrt.errors import PathError
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
    assert w._seen == {}  # nothing is pending, so nothing is remembered: months of files cost no memory

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

    # lines someone else appended (other JSON, a key that is not a name, bytes that are not
    # text) name no file: kept, skipped, and nothing is answered twice
    with open(out, "ab") as f:
        f.write(b'{"key": ["a list"]}\n{"key": null}\n[1, 2]\n\xff\xfe not text\n')
    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 0


def test_watch_command(tiny_bundle, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "r.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    cmd = [sys.executable, "-m", "itemrt.cli", "watch", str(cam), "--bundle", str(tiny_bundle), "--out", str(out),
           "--once", "--interval", "0.05"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a.jpg:" in r.stdout and len(_lines(out)) == 1


def test_vanished_files_are_skipped_and_reused_names_kept_apart(runtime, tmp_path):
    """A camera that removes a file before it is read, or reuses a name for another bad
    file: the watcher neither dies nor overwrites the earlier quarantined one."""
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()

    class CameraRemovesFirst:
        """The real runtime, with the camera deleting the file just before it is read."""

        def detect(self, path):
            path.unlink()
            return runtime.detect(path)

    said = []
    w = Watcher(CameraRemovesFirst(), cam, out, interval_s=0.01, progress=said.append)
    (cam / "gone.jpg").write_bytes(b"x")
    assert w.scan() == 0 and w.scan() == 0  # the second look finds it ready; it goes away
    assert any("gone before it was read" in m for m in said)
    assert out.read_text() == "" and not (cam / "quarantine").exists()  # nothing recorded
    assert w.process(cam / "never-there.jpg") is None  # removed between the look and the read

    w = Watcher(runtime, cam, out, interval_s=0.01, progress=said.append)
    for content in (b"first bad", b"second bad"):
        (cam / "snap.jpg").write_bytes(content)
        assert w.process(cam / "snap.jpg")["error"]
    q = sorted(p.name for p in (cam / "quarantine").iterdir() if not p.name.endswith(".reason"))
    assert q == ["snap-2.jpg", "snap.jpg"]
    assert (cam / "quarantine" / "snap.jpg").read_bytes() == b"first bad"
    assert (cam / "quarantine" / "snap-2.jpg").read_bytes() == b"second bad"
    assert (cam / "quarantine" / "snap-2.jpg.reason").is_file()
    assert len(_lines(out)) == 2


class _FailsOn:
    """The real runtime, except that detect raises (not an ImageError) on the named files."""

    def __init__(self, runtime, names):
        self.runtime, self.names = runtime, names

    def detect(self, path):
        if path.name in self.names:
            raise RuntimeError("the backend fell over")
        return self.runtime.detect(path)


def test_a_poison_file_is_retried_then_quarantined_and_the_others_go_on(runtime, samples, tmp_path):
    cam, out, said = tmp_path / "cam", tmp_path / "results.jsonl", []
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    shutil.copy(samples[1], cam / "poison.jpg")
    shutil.copy(samples[2], cam / "z.jpg")
    w = Watcher(_FailsOn(runtime, {"poison.jpg"}), cam, out, interval_s=0.01, progress=said.append)
    assert w.run(once=True) == 3
    recs = {r["path"].rsplit("/", 1)[-1]: r for r in _lines(out)}
    assert set(recs) == {"a.jpg", "poison.jpg", "z.jpg"} and "p_fake" in recs["z.jpg"]
    assert recs["poison.jpg"]["error"] == "internal_error" and "fell over" in recs["poison.jpg"]["message"]
    assert (cam / "quarantine" / "poison.jpg").is_file()
    assert sum("trying again" in m for m in said) == 2  # tries 1 and 2; the third quarantines


def test_a_broken_runtime_stops_the_watcher_and_moves_nothing(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    names = [f"{c}.jpg" for c in "abcd"]
    for name, p in zip(names, samples):
        shutil.copy(p, cam / name)
    w = Watcher(_FailsOn(runtime, set(names)), cam, out, interval_s=0.01, progress=lambda m: None)
    with pytest.raises(RuntimeError, match="fell over"):
        w.run(once=True)
    assert out.read_text() == "" and sorted(p.name for p in cam.iterdir()) == names  # nothing recorded or moved


def test_memory_follows_the_folder_not_its_history(runtime, samples, tmp_path):
    """A camera that deletes or overwrites its snapshots: the watcher forgets those files (a
    long run costs no memory), answers an overwritten file again, and a restart repeats nothing."""
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    for name, p in zip("abc", samples):
        shutil.copy(p, cam / f"{name}.jpg")
    w = Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None)
    assert w.run(once=True) == 3 and len(w.done) == 3
    (cam / "a.jpg").unlink()
    (cam / "b.jpg").write_bytes(samples[3].read_bytes())  # the same name, a new picture
    assert w.run(once=True) == 1
    assert len(w.done) == 2  # b's new key and c's; a's and b's old ones are forgotten
    assert [r["path"].rsplit("/", 1)[-1] for r in _lines(out)].count("b.jpg") == 2

    again = Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None)
    assert len(again.done) == 2 and again.run(once=True) == 0
    assert len(_lines(out)) == 4  # the ledger keeps every record


def test_a_torn_line_longer_than_a_read_is_cut_at_its_start(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 1
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"key": "x' + b"y" * 200_000)  # a crash in the middle of a long line
    w = Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None)
    assert out.read_bytes() == whole and len(w.done) == 1 and w.run(once=True) == 0


def test_an_unusable_folder_results_file_or_quarantine_is_a_setup_error(runtime, tmp_path):
    cam = tmp_path / "cam"
    cam.mkdir()
    with pytest.raises(PathError, match="is not a folder"):
        Watcher(runtime, tmp_path / "no-such-camera", tmp_path / "r.jsonl")
    with pytest.raises(PathError, match="cannot write the results file"):  # at start, not at the first image
        Watcher(runtime, cam, tmp_path)
    out = tmp_path / "new" / "r.jsonl"  # a missing parent folder is made
    (tmp_path / "blocker").write_text("a file where the quarantine folder should be")
    w = Watcher(runtime, cam, out, quarantine=tmp_path / "blocker", interval_s=0.01, progress=lambda m: None)
    (cam / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(PathError, match="cannot move bad.jpg into"):
        w.run(once=True)
    assert (cam / "bad.jpg").read_bytes() == b"not an image" and out.read_text() == ""  # nothing lost or recorded


def test_recursive_watches_subfolders_but_not_the_quarantine(runtime, samples, tmp_path):
    """A camera that files snapshots by day: every subfolder is watched, the same name in two
    days is two files, a bad one is quarantined under its day and never looked at again there."""
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    for day, p in (("2026-11-22", samples[0]), ("2026-11-23", samples[1])):
        (cam / day).mkdir(parents=True)
        shutil.copy(p, cam / day / "snap.jpg")
    (cam / "2026-11-23" / "bad.jpg").write_bytes(b"not an image")
    (cam / ".thumbs").mkdir()
    shutil.copy(samples[2], cam / ".thumbs" / "hidden.jpg")
    (cam / "linked").symlink_to(cam, target_is_directory=True)  # a loop, if it were followed
    shutil.copy(samples[3], cam / "top.jpg")

    assert Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None).run(once=True) == 1  # not recursive
    assert [r["key"].split("|")[0] for r in _lines(out)] == ["top.jpg"]

    said = []
    w = Watcher(runtime, cam, out, recursive=True, interval_s=0.01, progress=said.append)
    assert w.run(once=True) == 3  # top.jpg was done, and the same key recursive or not
    assert any(m.startswith("2026-11-23/bad.jpg: ") for m in said)  # named by its path under the folder
    recs = {r["key"].rsplit("|", 2)[0]: r for r in _lines(out)}
    assert set(recs) == {"2026-11-22/snap.jpg", "2026-11-23/snap.jpg", "2026-11-23/bad.jpg", "top.jpg"}
    assert recs["2026-11-23/bad.jpg"]["error"] and (cam / "quarantine" / "2026-11-23" / "bad.jpg").is_file()
    again = Watcher(runtime, cam, out, recursive=True, interval_s=0.01, progress=lambda m: None)
    assert again.run(once=True) == 0 and len(_lines(out)) == 4  # a restart repeats nothing, quarantine unwatched


def test_a_second_watcher_on_the_same_results_file_is_refused(runtime, samples, tmp_path):
    import fcntl

    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    w = Watcher(runtime, cam, out, interval_s=0.01, progress=lambda m: None)
    with open(out, "ab") as running:  # what a watcher running elsewhere holds
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PathError, match="another item watch is writing to"):
            w.run(once=True)
    assert out.read_text() == "" and w.run(once=True) == 1  # released: it runs
