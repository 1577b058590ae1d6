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
Files still being written (size or mtime changed since the last look), hidden files and
`*.part` / `*.tmp` files wait.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ImageError

SKIP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
MAX_TRIES = 3


def free_name(folder: Path, stem: str, suffix: str, taken) -> Path:
    """folder/STEM SUFFIX, or STEM-2 SUFFIX, STEM-3 SUFFIX, ...: the first that `taken(path)`
    says is free. For names that repeat (cameras reuse them; two folders hold one file name)."""
    target, n = folder / f"{stem}{suffix}", 2
    while taken(target):
        target, n = folder / f"{stem}-{n}{suffix}", n + 1
    return target


def file_key(path: Path, st: os.stat_result | None = None) -> str:
    st = st or path.stat()
    return f"{path.name}|{st.st_size}|{st.st_mtime_ns}"


@dataclass
class Ledger:
    path: Path

    def load(self) -> set[str]:
        """Keys already answered; a torn last line (crash mid-write) is cut off."""
        if not self.path.exists():
            return set()
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as f:
                f.truncate(cut)
            data = data[:cut]
        keys = set()
        for line in data.splitlines():
            try:
                keys.add(json.loads(line)["key"])
            except (ValueError, KeyError, TypeError):
                continue  # a foreign line: keep it, it names no file
        return keys

    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


class Watcher:
    def __init__(self, runtime, folder: str | Path, out: str | Path, *, quarantine: str | Path | None = None,
                 interval_s: float = 1.0, progress=print):
        self.rt, self.folder = runtime, Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder} is not a folder")
        self.ledger = Ledger(Path(out))
        self.quarantine = Path(quarantine) if quarantine else self.folder / "quarantine"
        self.interval_s, self.progress = interval_s, progress
        self.done = self.ledger.load()
        self._seen: dict[str, tuple[int, int]] = {}  # name -> (size, mtime) at the last look
        self._tries: dict[str, int] = {}  # key -> unexpected errors so far
        self._failing: set[str] = set()  # keys that failed unexpectedly since the last success

    def _new(self):
        """(path, stat) of every file in the folder not yet in the ledger."""
        for p in self.folder.iterdir():
            if not p.is_file() or p.name.startswith(".") or p.suffix.lower() in SKIP_SUFFIXES:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            if file_key(p, st) not in self.done:
                yield p, st

    def _ready(self) -> list[Path]:
        """New files that did not change since the last look, oldest first."""
        out, seen = [], {}
        for p, st in self._new():
            sig = seen[p.name] = (st.st_size, st.st_mtime_ns)
            if self._seen.get(p.name) == sig:
                out.append((st.st_mtime_ns, p))
        self._seen = seen  # only files still pending: a camera running for months adds no memory here
        return [p for _, p in sorted(out)]

    def process(self, path: Path) -> dict | None:
        """The file's ledger record; None when there is none yet: it went away before it was
        read (the camera removed or renamed it), or it is to be tried again."""
        t, key = time.time(), None
        try:
            key = file_key(path)
            r = self.rt.detect(path)
            record = {"key": key, "path": str(path), "time": t, **r.to_dict()}
        except FileNotFoundError:  # ImageNotFoundError is one too
            self._seen.pop(path.name, None)
            self.progress(f"{path.name}: gone before it was read; skipped")
            return None
        except ImageError as e:
            record = self._quarantine(path, key, t, e.code, str(e))
        except Exception as e:  # not the image's fault: see the module's docstring
            self._failing.add(key)
            if len(self._failing) >= MAX_TRIES:
                raise
            tries = self._tries[key] = self._tries.get(key, 0) + 1
            what = f"{type(e).__name__}: {e}"
            if tries < MAX_TRIES:
                self.progress(f"{path.name}: {what}; trying again ({tries} of {MAX_TRIES})")
                return None
            record = self._quarantine(path, key, t, "internal_error", what)
        else:
            self._failing.clear()
        if record is None:
            return None
        self.ledger.append(record)
        self.done.add(key)
        self._tries.pop(key, None)
        return record

    def _quarantine(self, path: Path, key: str, t: float, code: str, message: str) -> dict | None:
        """Move the file aside under a name no earlier one has (cameras reuse names), with a
        `.reason` file; its ledger record, or None when the file went away first."""
        self.quarantine.mkdir(parents=True, exist_ok=True)
        target = free_name(self.quarantine, path.stem, path.suffix, Path.exists)
        try:
            shutil.move(str(path), target)
        except FileNotFoundError:
            self.progress(f"{path.name}: gone before it was read; skipped")
            return None
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
            self.progress(f"{p.name}: {state}")
        return n

    def run(self, once: bool = False) -> int:
        """Watch until interrupted; `once`: until nothing new is left (two quiet looks)."""
        total = quiet = 0
        while True:
            n = self.scan()
            total += n
            quiet = quiet + 1 if n == 0 else 0
            if once and quiet >= 2 and not self._pending():
                return total
            time.sleep(self.interval_s)

    def _pending(self) -> bool:
        return any(True for _ in self._new())
