"""`item watch DIR`: for cameras that drop snapshots into a folder.

Each new file is processed once and one JSON line is appended to the results file. The
results file is the ledger: on start it is read back, so a restart neither skips nor
repeats a file (a file is known by name, size and modification time). A line is written
with one `write` on an O_APPEND descriptor and fsynced; a torn last line from a crash is
cut off on start, and that file is processed again. Unreadable files move to a
quarantine folder with a `.reason` file beside them (a reused name gets -2, -3, ...), and the
ledger records them. A file that goes away before it is read is skipped, not recorded.
An error that is not the image's (the backend, memory) is retried at the next look; a file
that fails `MAX_TRIES` times is quarantined as `internal_error`, so one poison file cannot
stall the folder, and `MAX_TRIES` different files failing in a row stop the watcher with that
error: the runtime itself is broken, and its supervisor should restart it.
With `recursive`, subfolders are watched too (cameras that file snapshots by date or hour):
a file is then known by its path under the folder, quarantine keeps the subfolders, and the
quarantine folder itself, hidden folders and linked folders are never entered.
Files still being written (size or mtime changed since the last look), hidden files and
`*.part` / `*.tmp` files wait.

A folder that is not one, a results file that cannot be written (checked at start) or a
quarantine folder that takes no file raise `PathError`: every file would fail alike. So does
a second watcher on a results file that one is running on (`run` holds a lock on it).

Memory follows the folder, not its history: the watcher remembers only the keys of files that
are in the folder as they were answered, so a camera that rotates or overwrites its snapshots
can run for months. The ledger is read line by line on start, and keeps every record.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageError, PathError
from .interrupts import signals_held
from .paths import writable_folder

SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
MAX_TRIES = 3


def free_name(folder: Path, stem: str, suffix: str, taken) -> Path:
    """folder/STEM SUFFIX, or STEM-2 SUFFIX, STEM-3 SUFFIX, ...: the first that `taken(path)`
    says is free. For names that repeat (cameras reuse them; two folders hold one file name)."""
    target, n = folder / f"{stem}{suffix}", 2
    while taken(target):
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    return target


def file_key(name: str, st: os.stat_result) -> str:
    return f"{name}|{st.st_size}|{st.st_mtime_ns}"


@dataclass
class Ledger:
    path: Path

    def load(self, keep=lambda key: True) -> set[str]:
        """Keys already answered that `keep` accepts, read line by line; a torn last line (crash
        mid-write) is cut off first."""
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
                    key = json.loads(line)["key"]
                except (ValueError, KeyError, TypeError):
                    continue  # a foreign line: keep it, it names no file
                if isinstance(key, str) and keep(key):  # a foreign line may hold any JSON there
                    keys.add(key)
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
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
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


class Watcher:
    def __init__(self, runtime, folder: str | Path, out: str | Path, *, quarantine: str | Path | None = None,
                 recursive: bool = False, interval_s: float = 1.0, progress=print):
        self.rt, self.folder = runtime, Path(folder)
        if not self.folder.is_dir():
            raise PathError(f"{self.folder} is not a folder")
        self.ledger = Ledger(Path(out))
        self.ledger.check()
        self.quarantine = Path(quarantine) if quarantine else self.folder / "quarantine"
        self._quarantine_real = os.path.realpath(self.quarantine)  # never watched, even when inside
        self.recursive, self.interval_s, self.progress = recursive, interval_s, progress
        present = {file_key(name, st) for name, st in self._files()}
        self.done = self.ledger.load(keep=present.__contains__)
        # A file's name is its path under the folder, "/"-separated: just the file name unless recursive.
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at the last look
        self._tries: dict[str, int] = {}  # key -> unexpected errors so far
        self._failing: set[str] = set()  # keys that failed unexpectedly since the last success

    def _files(self) -> list[tuple[str, os.stat_result]]:
        """(name, stat) of every file in the folder (and, when recursive, in its subfolders) that
        may be an image: one stat each, and plain strings, because this runs at every look.
        Hidden entries, the quarantine folder and linked folders (loops) are not entered."""
        out, folders = [], [""]
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
                        elif not e.name.lower().endswith(SKIP_SUFFIXES) and e.is_file():  # follows file links
                            out.append((name, e.stat()))
                    except FileNotFoundError:
                        continue
        return out

    def _ready(self) -> list[Path]:
        """New files that did not change since the last look, oldest first."""
        out, seen, keyed = [], {}, [(name, st, file_key(name, st)) for name, st in self._files()]
        present = {k for _, _, k in keyed}
        # Remember only files still here as they are (see the docstring): a file moved away,
        # deleted or overwritten in place is forgotten.
        self.done &= present
        self._tries = {k: n for k, n in self._tries.items() if k in present}
        for name, st, key in keyed:
            if key in self.done:
                continue
            sig = seen[name] = (st.st_size, st.st_mtime_ns)
            if self._seen.get(name) == sig:
                out.append((st.st_mtime_ns, name))
        self._seen = seen  # only files still pending
        return [self.folder / name for _, name in sorted(out)]

    def process(self, path: Path) -> dict | None:
        """The file's ledger record; None when there is none yet: it went away before it was
        read (the camera removed or renamed it), or it is to be tried again."""
        t, key, name = time.time(), None, self._name(path)
        try:
            key = file_key(name, path.stat())
            r = self.rt.detect(path)
            record = {"key": key, "path": str(path), "time": t, **r.to_dict()}
        except FileNotFoundError:  # ImageNotFoundError is one too
            self._seen.pop(name, None)
            self.progress(f"{name}: gone before it was read; skipped")
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
                self.progress(f"{name}: {what}; trying again ({tries} of {MAX_TRIES})")
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
        """Quarantined and recorded together: a Ctrl-C or SIGTERM waits for both, so no file
        sits in quarantine without its reason and its ledger line."""
        with signals_held():
            record = self._quarantine(path, key, t, code, message)
            if record is not None:
                self._commit(key, record)
        return record

    def _quarantine(self, path: Path, key: str, t: float, code: str, message: str) -> dict | None:
        """Move the file aside under a name no earlier one has (cameras reuse names), with a
        `.reason` file; its ledger record, or None when the file went away first."""
        try:
            folder = self.quarantine / path.parent.relative_to(self.folder)  # the camera's subfolders kept
            folder.mkdir(parents=True, exist_ok=True)
            target = free_name(folder, path.stem, path.suffix, Path.exists)
            shutil.move(str(path), target)
        except OSError as e:
            if not path.exists():  # the camera took it away first
                self.progress(f"{self._name(path)}: gone before it was read; skipped")
                return None
            # the quarantine folder, not the file: every bad file would fail the same way
            raise PathError(f"cannot move {self._name(path)} into {self.quarantine}: {e.strerror or e}") from None
        target.with_name(target.name + ".reason").write_text(f"{code}: {message}\n")
        return {"key": key, "path": str(path), "time": t, "error": code, "message": message, "quarantined": str(target)}

    def scan(self) -> int:
        """One look at the folder; files must look the same twice, so call it at an interval."""
        n = 0
        for p in self._ready():
            rec = self.process(p)
            if rec is None:
                continue
            n += 1
            state = rec.get("error") or f"{rec['label']} p(fake)={rec['p_fake']:.4f}"
            self.progress(f"{self._name(p)}: {state}")
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
        return any(file_key(name, st) not in self.done for name, st in self._files())
