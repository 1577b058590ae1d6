"""`item watch`: each file once, across restarts; unreadable files quarantined with the reason."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from itemrt.errors import PathError
from itemrt.gateways.watch import Watcher


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_each_file_once_across_restarts(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    for p in samples[:2]:
        shutil.copy(p, cam / p.name)
    (cam / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (cam / "still-writing.jpg.part").write_bytes(b"partial")

    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert w.run(once=True) == 3
    recs = _lines(out)
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in recs) == sorted([samples[0].name, samples[1].name, "broken.jpg"])
    bad = next(r for r in recs if r["path"].endswith("broken.jpg"))
    assert bad["error"] in ("unsupported_image", "corrupt_image")
    assert (cam / "quarantine" / "broken.jpg").is_file() and not (cam / "broken.jpg").exists()
    assert bad["error"] in (cam / "quarantine" / "broken.jpg.reason").read_text()
    good = [r for r in recs if "error" not in r]
    assert all(0 <= r["p_fake"] <= 1 and r["caption"] for r in good)
    assert len(w._seen) == 0  # nothing is pending, so nothing is remembered: months of files cost no memory

    # restart: nothing again; a new file: only it
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 0
    shutil.copy(samples[2], cam / samples[2].name)
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 1
    assert len(_lines(out)) == 4

    # a crash mid-write leaves a torn line: it is cut off and that file done again, once
    data = out.read_bytes()
    last = data[: -1].rfind(b"\n") + 1
    out.write_bytes(data[: last + 25])
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 1
    recs = _lines(out)
    assert len(recs) == 4 and len({r["key"] for r in recs}) == 4

    # lines someone else appended (other JSON, a key that is not a name, bytes that are not
    # text) name no file: kept, skipped, and nothing is answered twice
    with open(out, "ab") as f:
        f.write(b'{"key": ["a list"]}\n{"key": null}\n[1, 2]\n\xff\xfe not text\n')
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 0


def test_watch_command(tiny_bundle, samples, tmp_path):
    from itemrt.bench.provenance_inputs import generator_pngs

    cam, out = tmp_path / "cam", tmp_path / "r.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    (cam / "b.png").write_bytes(generator_pngs()["ComfyUI"])
    cmd = [sys.executable, "-m", "itemrt.cli", "watch", str(cam), "--bundle", str(tiny_bundle), "--out", str(out),
           "--once", "--interval", "0.05", "--settle", "0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "a.jpg:" in r.stdout and "b.png:" in r.stdout
    records = {Path(x["path"]).name: x for x in _lines(out)}
    assert records.keys() == {"a.jpg", "b.png"}
    # each record carries what its file declares: the generator's PNG chunks, or nothing
    assert records["b.png"]["provenance"]["declared_ai"] is True
    assert records["b.png"]["provenance"]["basis"]["generator"] == "ComfyUI"
    assert records["a.jpg"]["provenance"]["declared_ai"] is None


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
    w = Watcher(CameraRemovesFirst(), cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    (cam / "gone.jpg").write_bytes(b"x")
    assert w.scan() == 0 and w.scan() == 0  # the second look finds it ready; it goes away
    assert any("gone before it was read" in m for m in said)
    assert out.read_text() == "" and not (cam / "quarantine").exists()  # nothing recorded
    assert w.process(cam / "never-there.jpg") is None  # removed between the look and the read

    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
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
    w = Watcher(_FailsOn(runtime, {"poison.jpg"}), cam, out, interval_s=0.01, settle_s=0, progress=said.append)
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
    w = Watcher(_FailsOn(runtime, set(names)), cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
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
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert w.run(once=True) == 3 and len(w.done) == 3
    (cam / "a.jpg").unlink()
    (cam / "b.jpg").write_bytes(samples[3].read_bytes())  # the same name, a new picture
    assert w.run(once=True) == 1
    assert len(w.done) == 2  # b's new key and c's; a's and b's old ones are forgotten
    assert [r["path"].rsplit("/", 1)[-1] for r in _lines(out)].count("b.jpg") == 2

    again = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert len(again.done) == 2 and again.run(once=True) == 0
    assert len(_lines(out)) == 4  # the ledger keeps every record


def test_a_torn_line_longer_than_a_read_is_cut_at_its_start(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 1
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"key": "x' + b"y" * 200_000)  # a crash in the middle of a long line
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
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
    w = Watcher(runtime, cam, out, quarantine=tmp_path / "blocker", interval_s=0.01, settle_s=0, progress=lambda m: None)
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

    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 1  # not recursive
    assert [r["key"].split("|")[0] for r in _lines(out)] == ["top.jpg"]

    said = []
    w = Watcher(runtime, cam, out, recursive=True, interval_s=0.01, settle_s=0, progress=said.append)
    assert w.run(once=True) == 3  # top.jpg was done, and the same key recursive or not
    assert any(m.startswith("2026-11-23/bad.jpg: ") for m in said)  # named by its path under the folder
    recs = {r["key"].rsplit("|", 2)[0]: r for r in _lines(out)}
    assert set(recs) == {"2026-11-22/snap.jpg", "2026-11-23/snap.jpg", "2026-11-23/bad.jpg", "top.jpg"}
    assert recs["2026-11-23/bad.jpg"]["error"] and (cam / "quarantine" / "2026-11-23" / "bad.jpg").is_file()
    again = Watcher(runtime, cam, out, recursive=True, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert again.run(once=True) == 0 and len(_lines(out)) == 4  # a restart repeats nothing, quarantine unwatched


def test_a_second_watcher_on_the_same_results_file_is_refused(runtime, samples, tmp_path):
    import fcntl

    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    shutil.copy(samples[0], cam / "a.jpg")
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    with open(out, "ab") as running:  # what a watcher running elsewhere holds
        fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(PathError, match="another item watch is writing to"):
            w.run(once=True)
    assert out.read_text() == "" and w.run(once=True) == 1  # released: it runs


def _write_slowly(path, data: bytes, chunks: int, pause_s: float) -> threading.Thread:
    """A camera writing `data` into `path` in `chunks` pieces with a pause before each piece but
    the first, which is on disk when this returns; the rest is written by a thread."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    step = -(-len(data) // chunks)
    os.write(fd, data[:step])

    def rest():
        try:
            for start in range(step, len(data), step):
                time.sleep(pause_s)
                os.write(fd, data[start : start + step])
        finally:
            os.close(fd)

    t = threading.Thread(target=rest)
    t.start()
    return t


def test_a_slow_writer_is_read_once_its_file_is_whole(runtime, samples, tmp_path):
    """Issue 21: a camera pausing between chunks for longer than the interval had its file read
    at a quarter of its size and quarantined as corrupt. The file now waits for the settle time."""
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    data = samples[0].read_bytes()
    writer = _write_slowly(cam / "snap.jpg", data, chunks=4, pause_s=0.15)  # pauses of 7 looks each
    w = Watcher(runtime, cam, out, interval_s=0.02, settle_s=1.0, progress=lambda m: None)
    try:
        assert w.run(once=True) == 1
    finally:
        writer.join()
    (rec,) = _lines(out)
    assert "error" not in rec and rec["key"] == f"snap.jpg|{len(data)}|{(cam / 'snap.jpg').stat().st_mtime_ns}"
    assert not (cam / "quarantine").exists()


def test_the_settle_time_is_skipped_only_for_files_already_old(runtime, samples, tmp_path):
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    for name, p in zip(("old.jpg", "new.jpg", "ahead.jpg"), samples):
        shutil.copy(p, cam / name)
    hour = 3600
    os.utime(cam / "old.jpg", (time.time() - 2 * hour,) * 2)  # there before the watcher started
    os.utime(cam / "ahead.jpg", (time.time() + 2 * hour,) * 2)  # a writer's clock ahead of ours
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=hour, progress=lambda m: None)
    assert w.scan() == 0  # a first look takes nothing
    assert w.scan() == 1 and [r["key"].split("|")[0] for r in _lines(out)] == ["old.jpg"]
    assert w.scan() == 0 and w.scan() == 0  # the others wait out the hour
    assert set(w._seen) == {"new.jpg", "ahead.jpg"}


def test_a_file_written_on_after_its_quarantine_is_read_again(runtime, samples, tmp_path):
    """A writer that kept its file open and went on writing after the watcher had read half of it
    and quarantined it: the file goes back, whole, and is answered; after a restart too."""
    cam, out, said = tmp_path / "cam", tmp_path / "results.jsonl", []
    cam.mkdir()
    data = samples[1].read_bytes()
    half = len(data) // 2
    fds = {}
    for name in ("a.jpg", "b.jpg"):
        fds[name] = os.open(cam / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fds[name], data[:half])
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    assert w.run(once=True) == 2  # both read at half their size: corrupt, quarantined
    assert all(r["error"] == "corrupt_image" for r in _lines(out))
    assert sorted(p.name for p in (cam / "quarantine").iterdir()) == ["a.jpg", "a.jpg.reason", "b.jpg", "b.jpg.reason"]

    os.write(fds["a.jpg"], data[half:])  # the writer finishes, into the quarantine
    os.close(fds["a.jpg"])
    assert w.run(once=True) == 1
    rec = _lines(out)[-1]
    assert rec["key"].startswith(f"a.jpg|{len(data)}|") and "p_fake" in rec
    assert (cam / "a.jpg").read_bytes() == data and not (cam / "quarantine" / "a.jpg").exists()
    assert not (cam / "quarantine" / "a.jpg.reason").exists()  # its record in the ledger keeps the reason
    assert any("a.jpg: written on after it was quarantined; back as a.jpg" in m for m in said)
    assert list(w._quarantined) == [str(cam / "quarantine" / "b.jpg")]  # only files still in quarantine

    # a restart finds b's record in the ledger; b changes while no watcher runs
    os.write(fds["b.jpg"], data[half:])
    os.close(fds["b.jpg"])
    (cam / "b.jpg").write_bytes(b"the camera reused the name meanwhile")
    again = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    assert again.run(once=True) == 2  # the new b.jpg (bad) and the old b.jpg, back as b-2.jpg
    recs = {r["key"].split("|")[0]: r for r in _lines(out)[3:]}
    assert "p_fake" in recs["b-2.jpg"] and recs["b.jpg"]["error"] == "unsupported_image"
    assert (cam / "b-2.jpg").read_bytes() == data
    # the new bad b.jpg took the free name in quarantine; it is unchanged and stays there
    assert (cam / "quarantine" / "b.jpg").read_bytes() == b"the camera reused the name meanwhile"
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 0
    assert len(_lines(out)) == 5


STRICT_UTF8 = {"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}  # an en_US.UTF-8 host's strict stdout


def test_names_that_are_not_utf8_are_printed_and_recorded_byte_exact(tiny_bundle, samples, tmp_path):
    """Issue 21: a file name with the byte 0xff crashed item watch (UnicodeEncodeError, exit 1)
    on a strict UTF-8 stdout. Now it is shown as \\xff and the ledger gives the exact bytes back."""
    cam, out = tmp_path / "cam", tmp_path / "r.jsonl"
    cam.mkdir()
    good, bad = os.fsencode(cam) + b"/\xff.jpg", os.fsencode(cam) + b"/bad\xfe.jpg"
    shutil.copy(samples[0], good)
    with open(bad, "wb") as f:
        f.write(b"not an image")
    cmd = [sys.executable, "-m", "itemrt.cli", "watch", str(cam), "--bundle", str(tiny_bundle), "--out", str(out),
           "--once", "--interval", "0.05", "--settle", "0"]
    r = subprocess.run(cmd, capture_output=True, timeout=300, check=False, env={**os.environ, **STRICT_UTF8})
    assert r.returncode == 0, r.stderr.decode(errors="replace")[-2000:]
    assert b"\\xff.jpg: " in r.stdout and b"bad\\xfe.jpg: unsupported_image" in r.stdout
    recs = {os.fsencode(x["path"]): x for x in _lines(out)}
    assert set(recs) == {good, bad} and "p_fake" in recs[good]
    moved = os.fsencode(recs[bad]["quarantined"])
    assert moved == os.fsencode(cam) + b"/quarantine/bad\xfe.jpg" and os.path.isfile(moved)
    assert os.path.isfile(moved + b".reason")
    r = subprocess.run(cmd, capture_output=True, timeout=300, check=False, env={**os.environ, **STRICT_UTF8})
    assert r.returncode == 0 and len(_lines(out)) == 2  # the keys come back from the ledger: nothing again


def test_links_out_of_the_folder_are_skipped_unless_followed(runtime, samples, tmp_path):
    """Issue 21: the watcher read any file a link in the folder pointed at (another camera's, a
    secret). By default only links to files inside the folder are followed."""
    cam, outside, out, said = tmp_path / "cam", tmp_path / "outside", tmp_path / "results.jsonl", []
    cam.mkdir(), outside.mkdir()
    shutil.copy(samples[0], cam / "in.jpg")
    shutil.copy(samples[1], outside / "secret.jpg")
    (cam / "link-in.jpg").symlink_to(cam / "in.jpg")
    (cam / "link-out.jpg").symlink_to(outside / "secret.jpg")
    (cam / "relative-out.jpg").symlink_to(Path("..") / "outside" / "secret.jpg")
    (cam / "dangling.jpg").symlink_to(tmp_path / "nothing-here.jpg")
    (cam / "quarantine").mkdir()
    shutil.copy(samples[2], cam / "quarantine" / "old.jpg")
    (cam / "into-quarantine.jpg").symlink_to(cam / "quarantine" / "old.jpg")

    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    assert w.run(once=True) == 2 and w.scan() == 0 and w.scan() == 0
    assert sorted(r["key"].split("|")[0] for r in _lines(out)) == ["in.jpg", "link-in.jpg"]
    for name in ("link-out.jpg", "relative-out.jpg", "into-quarantine.jpg"):
        assert sum(m.startswith(f"{name}: a link out of the watched folder") for m in said) == 1  # once, not per look
    assert not any(m.startswith("dangling.jpg") for m in said)

    # a link swapped to lead out between the look and the read is not read
    (cam / "swap.jpg").symlink_to(cam / "in.jpg")
    (cam / "swap.jpg").unlink()
    (cam / "swap.jpg").symlink_to(outside / "secret.jpg")
    assert w.process(cam / "swap.jpg") is None and len(_lines(out)) == 2

    followed = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, follow_links=True, progress=lambda m: None)
    assert followed.run(once=True) == 4
    assert {r["key"].split("|")[0] for r in _lines(out)[2:]} == {"link-out.jpg", "relative-out.jpg", "swap.jpg",
                                                                 "into-quarantine.jpg"}


def test_a_kill_between_the_quarantine_move_and_its_ledger_line_is_finished_at_start(runtime, tmp_path):
    """Issue 21: a kill -9 after the move left a quarantined file with no record. The move is
    journalled; the next start writes the record (and the .reason) once."""
    cam, out, said = tmp_path / "cam", tmp_path / "results.jsonl", []
    cam.mkdir()
    (cam / "bad.jpg").write_bytes(b"not an image")
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    # The ledger line cannot be written (a folder took the results file's place): the watcher
    # stops right after the move, where a kill -9 would have stopped it.
    out.rename(tmp_path / "kept.jsonl")
    out.mkdir()
    with pytest.raises(IsADirectoryError):
        w.process(cam / "bad.jpg")
    journal = tmp_path / "results.jsonl.pending"
    assert journal.is_file() and (cam / "quarantine" / "bad.jpg").is_file() and not (cam / "bad.jpg").exists()
    out.rmdir()
    (tmp_path / "kept.jsonl").rename(out)
    (cam / "quarantine" / "bad.jpg.reason").unlink()  # as if killed before the .reason too

    again = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append)
    (rec,) = _lines(out)
    assert rec["key"].startswith("bad.jpg|12|") and rec["error"] == "unsupported_image"
    assert rec["quarantined"] == str(cam / "quarantine" / "bad.jpg") and rec["path"] == str(cam / "bad.jpg")
    assert (cam / "quarantine" / "bad.jpg.reason").read_text().startswith("unsupported_image: ")
    assert not journal.exists() and any("cut short by a crash, finished" in m for m in said)
    assert again.run(once=True) == 0
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=said.append).run(once=True) == 0
    assert len(_lines(out)) == 1  # exactly once

    # killed after the ledger line, before the journal went: nothing twice
    journal.write_text(json.dumps({"key": rec["key"], "path": rec["path"], "target": rec["quarantined"],
                                   "code": rec["error"], "message": rec["message"], "time": rec["time"]}))
    Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert len(_lines(out)) == 1 and not journal.exists()

    # killed before the move (or while the journal was written): the file is read again, once
    (cam / "worse.jpg").write_bytes(b"also not an image")
    key = f"worse.jpg|17|{(cam / 'worse.jpg').stat().st_mtime_ns}"
    journal.write_text(json.dumps({"key": key, "path": str(cam / "worse.jpg"),
                                   "target": str(cam / "quarantine" / "worse.jpg"), "code": "unsupported_image",
                                   "message": "m", "time": 0.0}))
    w = Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert not journal.exists() and len(_lines(out)) == 1
    assert w.run(once=True) == 1 and len(_lines(out)) == 2 and (cam / "quarantine" / "worse.jpg").is_file()
    journal.write_bytes(b'{"key": "torn')
    Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None)
    assert not journal.exists() and len(_lines(out)) == 2


FUZZ_BYTES = [b"a", b"Z", b"0", b"\xff", b"\xfe", b"\x80", b"\xc3\xa9", b"\xe2\x82\xac", b" ", b"|", b"-", b"#",
              b"\n", b"\t", b"\\", b"%", b"'", b'"', b"{", b"\x01"]


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_fuzzed_names_and_write_schedules(runtime, samples, tmp_path, seed):
    """Seeded: names of odd bytes (not UTF-8, newlines, '|', quotes), contents good, garbage or
    cut short, written in 1-3 pieces with pauses, temporary names among them. Every visible file
    is answered exactly once, whole, under its exact bytes; progress stays printable on a strict
    UTF-8 stream; a restart repeats nothing."""
    rng = random.Random(seed)
    cam, out = tmp_path / "cam", tmp_path / "results.jsonl"
    cam.mkdir()
    base, files, writers = os.fsencode(cam), {}, []
    while len(files) < 12:
        name = b"".join(rng.choice(FUZZ_BYTES) for _ in range(rng.randint(1, 6)))
        name += rng.choice([b".jpg", b".JPG", b".png", b"", b".part", b".tmp"])
        if rng.random() < 0.1:
            name = b"." + name
        kind = rng.choice(["good", "good", "garbage", "cut"])
        data = rng.choice(samples).read_bytes()
        data = {"good": data, "garbage": rng.randbytes(rng.randint(0, 300)), "cut": data[: len(data) // 3]}[kind]
        if name in files or name in (b".", b".."):
            continue
        files[name] = (kind, data)
        writers.append(_write_slowly(base + b"/" + name, data, chunks=rng.randint(1, 3), pause_s=rng.uniform(0, 0.05)))
    said = []
    w = Watcher(runtime, cam, out, interval_s=0.02, settle_s=0.5,
                progress=lambda m: said.append(m.encode("utf-8")))  # strict: a raw surrogate would raise
    try:
        n = w.run(once=True)
    finally:
        for t in writers:
            t.join()
    visible = {k: v for k, v in files.items() if not k.startswith(b".") and not k.lower().endswith((b".part", b".tmp"))}
    recs = {os.fsencode(r["key"].rsplit("|", 2)[0]): r for r in _lines(out)}
    assert n == len(recs) == len(_lines(out)) == len(visible) and set(recs) == set(visible)
    for name, (kind, data) in visible.items():
        r = recs[name]
        assert os.fsencode(r["path"]) == base + b"/" + name and r["key"].split("|")[-2] == str(len(data))
        if kind == "good":
            assert "p_fake" in r, r
        else:
            assert r["error"] and open(os.fsencode(r["quarantined"]), "rb").read() == data
    assert Watcher(runtime, cam, out, interval_s=0.01, settle_s=0, progress=lambda m: None).run(once=True) == 0
