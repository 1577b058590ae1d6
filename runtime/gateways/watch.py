"""`item watch DIR`: for cameras that drop snapshots into a folder.

Each new file is processed once and one JSON line is appended to the results file. The
results file is the ledger: on start it is read back, so a restart neither skips nor
repeats a file (a file is known by its key: name, size and modification time). A line is written
with one `write` on an O_APPEND descriptor and fsynced; a torn last line from a crash is
cut off on start, and that file is processed again. Unreadable files move to a
quarantine folder with a `.reason` file beside them (a reused name gets -2, -3, ...), and the
ledger records them. The move is journalled: `<results>.pending` holds the one move in flight
(fsynced before it, removed after the ledger line), so a kill between the move and the line
is finished at the next start (the record and `.reason` written once; a move that never
happened leaves the file to be processed again). A quarantined file that changes afterwards
(its writer went on writing into it: size or mtime no longer those of its key) goes back into
the watched folder, same subfolder, a free name, once it is stable, and is answered under its
new key; after a restart too, from the ledger's quarantine records whose file is still there.
A file that goes away before it is read is skipped, not recorded.
An error that is not the image's (the backend, memory) is retried at the next look; a file
that fails `MAX_TRIES` times is quarantined as `internal_error`, so one poison file cannot
stall the folder, and `MAX_TRIES` different files failing in a row stop the watcher with that
error: the runtime itself is broken, and its supervisor should restart it.
With `recursive`, subfolders are watched too (cameras that file snapshots by date or hour):
a file is then known by its path under the folder, quarantine keeps the subfolders, and the
quarantine folder itself, hidden folders and linked folders are never entered.

A file is taken only once it is complete: its size and mtime unchanged for `settle_s` seconds
(a writer pausing longer than that between chunks cannot be told from one that finished). A
file whose mtime is already `settle_s` older than the clock (files there at start, after a
restart) is taken at the second look that finds it unchanged. Writers that can should write
under a temporary name and rename when done: hidden files (`.name`) and `*.part`, `*.tmp`,
`*.partial`, `*.crdownload` files are never read.

Links: a link to a file is followed only when it resolves to a regular file inside the watched
folder (not the quarantine); a link that leads out of it is skipped and reported once, unless
`follow_links`. The check is made at each look and again just before the read.

Names are file system bytes (a name need not be UTF-8): in the ledger they are JSON strings in
which bytes that are not UTF-8 are \\udcXX escapes (os.fsencode gives the bytes back); progress
messages show them as \\xXX.

A folder that is not one, a results file that cannot be written (checked at start) or a
quarantine folder that takes no file raise `PathError`: every file would fail alike. So does
a second watcher on a results file that one is running on (a lock on it, held at start and by `run`).

Memory follows the folder, not its history: the watcher remembers only the keys of files that
are in the folder as they were answered, and the quarantine records whose file is still in
quarantine, so a camera that rotates or overwrites its snapshots can run for months. The
ledger is read line by line on start, and keeps every record. Each look costs one stat per
file in the folder and per quarantined file the ledger records.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, PathError
from ..interrupts import signals_held
from ..paths import writable_folder

SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
MAX_TRIES = 3
SETTLE_S = 5.0  # twice the longest pause between chunks seen from a camera (2.5 s)


def free_name(folder: Path, stem: str, suffix: str, taken) -> Path:
    """folder/STEM SUFFIX, or STEM-2 SUFFIX, STEM-3 SUFFIX, ...: the first that `taken(path)`
    says is free. For names that repeat (cameras reuse them; two folders hold one file name)."""
    target, n = folder / f"{stem}{suffix}", 2
    while taken(target):
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    return target


def file_key(name: str, st: os.stat_result) -> str:
    return f"{name}|{st.st_size}|{st.st_mtime_ns}"


def key_parts(key: str) -> tuple[str, int, int]:
    """(name, size, mtime_ns) of a key; ValueError for a string that is not one."""
    name, size, mtime = key.rsplit("|", 2)
    return name, int(size), int(mtime)


def printable(text: str) -> str:
    """`text` with the bytes of a name that are not UTF-8 (surrogate escapes) as \\xXX, so that
    no stream, however strict, fails on it."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _inside(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass
class Ledger:
    path: Path

    def load(self, keep: Callable[[str], bool] = lambda key: True,
             quarantined: dict[str, str] | None = None) -> set[str]:
        """Keys already answered that `keep` accepts, read line by line; a torn last line (crash
        mid-write) is cut off first. `quarantined`, when given, gets the quarantine records whose
        file is still there: its path -> the key it was moved with (the last record per path)."""
        if not self.path.exists():
            return set()
        with open(self.path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end and _byte_at(f, end - 1) != b"\n":
                f.truncate(_line_start(f, end))
            f.seek(0)
            keys = set()
            for line in f:
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                except (ValueError, KeyError, TypeError):
                    continue  # a foreign line: keep it, it names no file
                if not isinstance(key, str):  # a foreign line may hold any JSON there
                    continue
                if keep(key):
                    keys.add(key)
                target = rec.get("quarantined")
                if quarantined is not None and isinstance(target, str) and os.path.isfile(target):
                    quarantined[target] = key
        return keys

    def check(self) -> None:
        """Fail at start, not at the first image: the results file must be appendable."""
        writable_folder(self.path.parent)
        try:
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
        except OSError as e:
            raise PathError(f"cannot write the results file {self.path}: {e.strerror or e}") from None

    @contextmanager
    def exclusive(self):
        """One watcher per results file while it runs: a second would answer every file again.
        An advisory lock on the file, gone with the process however it ends."""
        try:
            import fcntl
        except ImportError:  # no fcntl (Windows): one watcher is on the caller
            yield
            return
        with open(self.path, "ab") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise PathError(f"another item watch is writing to {self.path}") from None
            yield

    def append(self, record: dict) -> None:
        # ensure_ascii: a name's undecodable bytes stay \udcXX escapes, never bytes that are not UTF-8
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


INTENT_FIELDS = {"key": str, "path": str, "target": str, "code": str, "message": str, "time": (int, float)}


@dataclass
class Journal:
    """`<results>.pending`: the quarantine move in flight, written before the move and removed
    after its ledger line, so that a kill between the two is finished at the next start."""

    path: Path

    def write(self, intent: dict) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, json.dumps(intent).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_folder(self.path.parent)  # the journal's name is on disk before the move is

    def read(self) -> dict | None:
        """The intent left by a crash; None when there is none, or it is torn (the crash came
        while it was written, before the move)."""
        try:
            intent = json.loads(self.path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        ok = isinstance(intent, dict) and all(isinstance(intent.get(k), t) for k, t in INTENT_FIELDS.items())
        return intent if ok else None

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # no directory descriptors here (Windows): the file's own fsync is what there is
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _byte_at(f, pos: int) -> bytes:
    f.seek(pos)
    return f.read(1)


def _line_start(f, end: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last newline before `end` (0 when there is none)."""
    pos = end
    while pos > 0:
        step = min(chunk, pos)
        f.seek(pos - step)
        nl = f.read(step).rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


def _record(intent: dict) -> dict:
    """The ledger record of a quarantined file."""
    return {"key": intent["key"], "path": intent["path"], "time": intent["time"], "error": intent["code"],
            "message": intent["message"], "quarantined": intent["target"]}


def _write_reason(target: Path, code: str, message: str) -> None:
    # the message may name the file, whose bytes need not be UTF-8
    target.with_name(target.name + ".reason").write_text(f"{code}: {message}\n", encoding="utf-8",
                                                         errors="backslashreplace")


Signature = tuple[int, int]  # (size, mtime_ns)


class Settling:
    """Files waiting to be complete: each one's (size, mtime) at the last look and since when it
    has looked so. One is complete once unchanged for `settle_s` by the monotonic clock, or, seen
    unchanged at two looks, when its mtime is already that old (files there at start need not
    wait again; an mtime ahead of the clock never counts). Only the files of the last look are
    remembered."""

    def __init__(self, settle_s: float):
        self.settle_s = max(0.0, settle_s)
        self._since: dict[str, tuple[Signature, float]] = {}

    def look(self, files: list[tuple[str, os.stat_result]]) -> list[str]:
        """The names among `files` that are complete now; the others in `files` are remembered."""
        now, wall, since, out = time.monotonic(), time.time(), {}, []
        for name, st in files:
            sig, last = (st.st_size, st.st_mtime_ns), self._since.get(name)
            same = last is not None and last[0] == sig
            since[name] = (sig, last[1] if same else now)
            if same and (now - last[1] >= self.settle_s or wall - st.st_mtime_ns / 1e9 >= self.settle_s):
                out.append(name)
        self._since = since
        return out

    def forget(self, name: str) -> None:
        self._since.pop(name, None)

    def __iter__(self):
        return iter(self._since)

    def __len__(self) -> int:
        return len(self._since)


class Watcher:
    def __init__(self, runtime, folder: str | Path, out: str | Path, *, quarantine: str | Path | None = None,
                 recursive: bool = False, interval_s: float = 1.0, settle_s: float = SETTLE_S,
                 follow_links: bool = False, progress: Callable[[str], None] = print):
        self.rt, self.folder = runtime, Path(folder)
        if not self.folder.is_dir():
            raise PathError(f"{self.folder} is not a folder")
        self.ledger = Ledger(Path(out))
        self.ledger.check()
        self.journal = Journal(self.ledger.path.with_name(self.ledger.path.name + ".pending"))
        self.quarantine = Path(quarantine) if quarantine else self.folder / "quarantine"
        self._quarantine_real = os.path.realpath(self.quarantine)  # never watched, even when inside
        self._folder_real = os.path.realpath(self.folder)
        self.recursive, self.interval_s, self.progress = recursive, interval_s, progress
        self.follow_links = follow_links
        self._refused: set[str] = set()  # links out of the folder already reported, still there
        # A file's name is its path under the folder, "/"-separated: just the file name unless recursive.
        self._seen = Settling(settle_s)  # files not answered yet, by name
        self._tries: dict[str, int] = {}  # key -> unexpected errors so far
        self._failing: set[str] = set()  # keys that failed unexpectedly since the last success
        self._quarantined: dict[str, str] = {}  # quarantined file still there -> the key it was moved with
        self._q_seen = Settling(settle_s)  # those changed since their move, by path
        present = {file_key(name, st) for name, st in self._files()}
        with self.ledger.exclusive():  # no other watcher is moving files or writing lines meanwhile
            intent = self.journal.read()
            pending = intent["key"] if intent else None
            found = self.ledger.load(keep=lambda k: k in present or k == pending, quarantined=self._quarantined)
            self._quarantined = {t: k for t, k in self._quarantined.items() if self._ours(t, k)}
            if intent:
                self._finish_move(intent, recorded=pending in found)
            self.journal.clear()  # also a torn one: it was being written, nothing was moved
        self.done = found & present

    def _say(self, message: str) -> None:
        self.progress(printable(message))

    def _files(self) -> list[tuple[str, os.stat_result]]:
        """(name, stat) of every file in the folder (and, when recursive, in its subfolders) that
        may be an image: one stat each, and plain strings, because this runs at every look.
        Hidden entries, the quarantine folder and linked folders (loops) are not entered."""
        out, folders, refused = [], [""], set()
        while folders:
            rel = folders.pop()
            try:
                it = os.scandir(os.path.join(self.folder, rel))
            except (FileNotFoundError, NotADirectoryError):  # a subfolder removed since it was listed
                continue
            with it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    name = f"{rel}/{e.name}" if rel else e.name
                    try:
                        if e.is_dir(follow_symlinks=False):
                            if self.recursive and os.path.realpath(e.path) != self._quarantine_real:
                                folders.append(name)
                        elif e.name.lower().endswith(SKIP_SUFFIXES):
                            continue
                        elif e.is_symlink() and not self._link_ok(e.path, name, refused):
                            continue
                        elif e.is_file():  # follows an allowed link
                            out.append((name, e.stat()))
                    except FileNotFoundError:
                        continue
        self._refused = refused  # forget links that are gone: memory follows the folder
        return out

    def _link_ok(self, path: str, name: str, refused: set[str] | None = None) -> bool:
        """Whether the link at `path` may be read: it leads to a file inside the folder (not the
        quarantine), or `follow_links`. One leading out is reported the first time it is seen."""
        if self.follow_links:
            return True
        real = os.path.realpath(path)
        quarantined = real == self._quarantine_real or _inside(real, self._quarantine_real)
        if _inside(real, self._folder_real) and not quarantined:
            return True
        if os.path.isfile(real):  # a dangling link or one to a folder is no image: nothing to say
            if name not in self._refused:
                self._say(f"{name}: a link out of the watched folder ({real}); skipped (--follow-links follows it)")
            if refused is not None:
                refused.add(name)
            self._refused.add(name)
        return False

    def _ready(self) -> list[Path]:
        """New files that are complete (see the docstring: the settle time), oldest first."""
        keyed = [(name, st, file_key(name, st)) for name, st in self._files()]
        present = {k for _, _, k in keyed}
        # Remember only files still here as they are (see the docstring): a file moved away,
        # deleted or overwritten in place is forgotten.
        self.done &= present
        self._tries = {k: n for k, n in self._tries.items() if k in present}
        pending = [(name, st) for name, st, key in keyed if key not in self.done]
        mtime = {name: st.st_mtime_ns for name, st in pending}
        return [self.folder / name for name in sorted(self._seen.look(pending), key=lambda n: (mtime[n], n))]

    def process(self, path: Path) -> dict | None:
        """The file's ledger record; None when there is none yet: it went away before it was
        read (the camera removed or renamed it), or it is to be tried again."""
        t, key, name = time.time(), None, self._name(path)
        try:
            key = file_key(name, path.stat())
            if path.is_symlink() and not self._link_ok(str(path), name):  # changed since the look
                self._seen.forget(name)
                return None
            r = self.rt.detect(path)
            record = {"key": key, "path": str(path), "time": t, **r.to_dict()}
        except FileNotFoundError:  # ImageNotFoundError is one too
            self._seen.forget(name)
            self._say(f"{name}: gone before it was read; skipped")
            return None
        except ImageError as e:
            return self._set_aside(path, key, t, e.code, str(e))
        except Exception as e:  # not the image's fault: see the module's docstring
            self._failing.add(key)
            if len(self._failing) >= MAX_TRIES:
                raise
            tries = self._tries[key] = self._tries.get(key, 0) + 1
            what = f"{type(e).__name__}: {e}"
            if tries < MAX_TRIES:
                self._say(f"{name}: {what}; trying again ({tries} of {MAX_TRIES})")
                return None
            return self._set_aside(path, key, t, "internal_error", what)
        self._failing.clear()
        self._commit(key, record)
        return record

    def _name(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()

    def _commit(self, key: str, record: dict) -> None:
        self.ledger.append(record)
        self.done.add(key)
        self._tries.pop(key, None)

    def _set_aside(self, path: Path, key: str, t: float, code: str, message: str) -> dict | None:
        """Move the file aside under a name no earlier one has (cameras reuse names), with a
        `.reason` file, and record it; its ledger record, or None when the file went away first.
        A Ctrl-C or SIGTERM waits for all of it; a kill is finished at the next start (the journal)."""
        with signals_held():
            try:
                folder = self.quarantine / path.parent.relative_to(self.folder)  # the camera's subfolders kept
                folder.mkdir(parents=True, exist_ok=True)
                target = free_name(folder, path.stem, path.suffix, os.path.lexists)
            except OSError as e:
                raise self._cannot_move(path, e) from None
            intent = {"key": key, "path": str(path), "target": str(target), "code": code, "message": message,
                      "time": t}
            try:
                self.journal.write(intent)
            except OSError as e:
                raise PathError(f"cannot write {self.journal.path}: {e.strerror or e}") from None
            try:
                shutil.move(str(path), target)
            except OSError as e:
                self.journal.clear()
                if not path.exists():  # the camera took it away first
                    self._say(f"{self._name(path)}: gone before it was read; skipped")
                    return None
                raise self._cannot_move(path, e) from None
            _write_reason(target, code, message)
            record = _record(intent)
            self._commit(key, record)
            self.journal.clear()
            self._quarantined[str(target)] = key
        return record

    def _cannot_move(self, path: Path, e: OSError) -> PathError:
        # the quarantine folder, not the file: every bad file would fail the same way
        return PathError(f"cannot move {printable(self._name(path))} into {self.quarantine}: {e.strerror or e}")

    def _finish_move(self, intent: dict, recorded: bool) -> None:
        """At start, the quarantine move a kill interrupted: see the module's docstring."""
        target, key = Path(intent["target"]), intent["key"]
        if recorded or not os.path.lexists(target):
            return  # finished, or never begun: the file is still in the folder and is read again
        try:
            name = key_parts(key)[0]
            original = (self.folder / name).stat()
        except (ValueError, OSError):
            name, original = key, None
        if original is not None and file_key(name, original) == key:
            target.unlink()  # a copy across file systems cut short: the original is still whole
            return
        if not target.with_name(target.name + ".reason").exists():
            _write_reason(target, intent["code"], intent["message"])
        self.ledger.append(_record(intent))
        if self._ours(str(target), key):
            self._quarantined[str(target)] = key
        self._say(f"{name}: {intent['code']} (its quarantine, cut short by a crash, finished)")

    def _ours(self, target: str, key: str) -> bool:
        """A quarantine record this watcher may act on: its file inside the quarantine folder and
        its key a name under the watched folder (a line someone else wrote may hold any path)."""
        try:
            name = key_parts(key)[0]
        except ValueError:
            return False
        parts = name.split("/")
        return (_inside(os.path.realpath(target), self._quarantine_real)
                and not name.startswith("/") and ".." not in parts and "" not in parts)

    def _retry_quarantined(self) -> None:
        """Quarantined files that changed since their move (the writer was not done) go back into
        the folder once stable, to be answered under their new key."""
        changed = []
        for target, key in list(self._quarantined.items()):
            try:
                st = os.stat(target)
            except OSError:  # removed or moved by hand: nothing to watch
                del self._quarantined[target]
                continue
            if (st.st_size, st.st_mtime_ns) != key_parts(key)[1:]:
                changed.append((target, st))
        for target in self._q_seen.look(changed):
            self._q_seen.forget(target)
            self._put_back(Path(target), key_parts(self._quarantined.pop(target))[0])

    def _put_back(self, target: Path, name: str) -> None:
        original = self.folder / name
        try:
            original.parent.mkdir(parents=True, exist_ok=True)
            back = free_name(original.parent, original.stem, original.suffix, os.path.lexists)
            shutil.move(str(target), back)
        except OSError as e:  # left in quarantine, with its record, as before it changed
            self._say(f"{name}: changed in quarantine but cannot go back into the folder: {e.strerror or e}")
            return
        target.with_name(target.name + ".reason").unlink(missing_ok=True)  # its record keeps the reason
        self._say(f"{name}: written on after it was quarantined; back as {self._name(back)}, to be read again")

    def scan(self) -> int:
        """One look at the folder; a file is taken once it stayed the same for the settle time,
        so call it at an interval."""
        self._retry_quarantined()
        n = 0
        for p in self._ready():
            rec = self.process(p)
            if rec is None:
                continue
            n += 1
            state = rec.get("error") or f"{rec['label']} p(fake)={rec['p_fake']:.4f}"
            self._say(f"{self._name(p)}: {state}")
        return n

    def run(self, once: bool = False) -> int:
        """Watch until interrupted; `once`: until nothing new is left (two quiet looks)."""
        total = quiet = 0
        with self.ledger.exclusive():
            while True:
                n = self.scan()
                total += n
                quiet = quiet + 1 if n == 0 else 0
                if once and quiet >= 2 and not self._pending():
                    return total
                time.sleep(self.interval_s)

    def _pending(self) -> bool:
        """Files not answered yet, or quarantined ones that changed and are settling."""
        return bool(self._q_seen) or any(file_key(name, st) not in self.done for name, st in self._files())
