"""The bundle: one self-describing folder. Loading fails closed.

manifest.json lists every file with its sha256; components carry I/O names, dtypes,
dynamic axes, precision and parity numbers; preprocessing, tokenizers, decoding limits,
the feature recipe, threshold and provenance live beside them (DESIGN.md section 3).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleIntegrityError, BundleNotFoundError, BundleVersionError
from .schema import Manifest, check_manifest

FORMAT = "itemrt-bundle"
# 2: the captioner decoder takes its cross K/V one input per layer (cross_k.0 ..., cross_v.0 ...)
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
TRAINING_DIR = "training"  # the training report of a trained head

# Graphs every bundle must hold, by the name the runtime asks for.
REQUIRED_COMPONENTS = (
    "captioner_vision",
    "captioner_cross_kv",
    "captioner_decoder",
    "detector_image",
    "detector_text",
    "detector_head",
    "clip_image",
    "clip_text",
    "head",
)


# Numeric precisions a bundle can run in. FP32 is the exported graphs themselves; others are
# variants that passed their parity gate at export ("used" in the manifest). A bf16 variant
# is the FP32 graph itself, run in BF16 by OpenVINO (openvino.py). "mixed" names a gated
# per-graph choice among the int8 and bf16 variants (manifest precisions.mixed.used).
PRECISIONS = ("fp32", "int8", "fp16", "bf16", "mixed")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """itemrt's per-user cache ($ITEMRT_CACHE, else $XDG_CACHE_HOME/itemrt)."""
    base = os.environ.get("ITEMRT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itemrt"
    return Path(base)


class HashCache:
    """sha256 digests already checked, keyed by the file's identity and stat, so reopening an
    unchanged bundle does not re-read gigabytes. Any write to a file changes its ctime (which
    user space cannot set back), so a changed file is always hashed again. A cache that cannot
    be read or written is simply not used."""

    def __init__(self, path: Path | None = None):
        self.path = path or cache_dir() / "verified-hashes.json"
        try:
            self.entries: dict[str, list] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}
        self.dirty = False

    @staticmethod
    def _stamp(path: Path) -> list:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]

    def sha256(self, path: Path) -> str:
        key = str(path.resolve())
        stamp = self._stamp(path)
        hit = self.entries.get(key)
        if hit and hit[:-1] == stamp:
            return hit[-1]
        digest = sha256_file(path)
        if self._stamp(path) == stamp:  # not written to while it was read
            self.entries[key], self.dirty = [*stamp, digest], True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        live = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
            tmp.write_text(json.dumps(live))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only home: verification still happened, it just is not remembered


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]  # manifest.json as read, by key
    spec: Manifest = field(init=False, repr=False, compare=False)  # the same, typed: checked at open

    @classmethod
    def open(cls, root: str | Path, verify: bool | str = True) -> Bundle:
        """verify: True checks every file's sha256 (re-reading only files whose stat changed
        since they were last verified), "full" re-reads every file, False checks presence only."""
        root = Path(root)
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleNotFoundError(
                f"no bundle at {root} ({MANIFEST} missing); create one with `item export --out {root} ...`"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleIntegrityError(f"{mpath} is not valid JSON ({e}); {_redo(None, root)}") from None
        bundle = cls(root, manifest)
        bundle._check_version()
        bundle.spec = check_manifest(manifest, _redo(manifest, root))
        bundle._check_files(verify)
        return bundle

    # --- checks -------------------------------------------------------------------------

    def _check_version(self) -> None:
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise BundleVersionError(f"{self.root} is not an itemrt bundle; {_redo(m, self.root)}")
        if m.get("format_version") != FORMAT_VERSION:
            raise BundleVersionError(
                f"bundle format {m.get('format_version')!r} written by itemrt {m.get('itemrt_version')!r}; "
                f"this itemrt reads format {FORMAT_VERSION}. {_redo(m, self.root)}"
            )
        missing = [c for c in REQUIRED_COMPONENTS if c not in m.get("components", {})]
        if missing:
            raise BundleVersionError(f"manifest lacks components {missing}; {_redo(m, self.root)}")

    def _check_files(self, verify: bool | str) -> None:
        if verify not in (True, False, "full"):
            raise ValueError(f"verify must be True, False or 'full', got {verify!r}")
        cache = HashCache() if verify is True else None
        for rel, digest in self.spec.files.items():
            if Path(rel).is_absolute() or ".." in Path(rel).parts:  # a bundle reads only inside itself
                raise BundleIntegrityError(f"the manifest lists {rel!r}, outside the bundle; {_redo(self.manifest, self.root)}")
            path = self.root / rel
            if not path.is_file():
                raise BundleIntegrityError(f"bundle file {rel} is missing; {_redo(self.manifest, self.root)}")
            if verify and (cache.sha256(path) if cache else sha256_file(path)) != digest:
                raise BundleIntegrityError(
                    f"bundle file {rel} does not match its sha256 in the manifest (changed or corrupt); "
                    f"{_redo(self.manifest, self.root)}"
                )
        if cache:
            cache.save()
        for name, comp in self.spec.components.items():
            used = [v.file for v in comp.variants.values() if v.used]
            for f in [comp.file, *used]:
                if f not in self.spec.files:
                    raise BundleIntegrityError(f"component {name}'s file {f} is not hashed in the manifest")

    # --- access -------------------------------------------------------------------------

    def file(self, rel: str) -> Path:
        if rel not in self.spec.files:
            raise BundleIntegrityError(f"{rel} is not listed in the manifest of {self.root}")
        return self.root / rel

    def component(self, name: str) -> dict[str, Any]:
        """The component's manifest entry as read (typed: `spec.components[name]`)."""
        return self.manifest["components"][name]

    def component_path(self, name: str, precision: str = "fp32") -> tuple[Path, str]:
        """The graph to run for `precision`, and the precision it really has: a part whose
        reduced-precision variant failed its gate (or was never made) stays FP32."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "mixed":
            precision = self.mixed().get(name, "fp32")
        comp = self.spec.components[name]
        v = comp.variants.get(precision)
        if precision != "fp32" and v and v.used:
            return self.file(v.file), precision
        return self.file(comp.file), "fp32"

    def precisions(self) -> list[str]:
        """FP32 and every precision at least one component has a gated variant for."""
        have = {p for c in self.spec.components.values() for p, v in c.variants.items() if v.used}
        if self.mixed():
            have.add("mixed")
        return [p for p in PRECISIONS if p == "fp32" or p in have]

    def mixed(self) -> dict[str, str]:
        """Precision "mixed": component -> the precision its chain gate took it in."""
        mixed = self.spec.precisions.get("mixed")
        return (mixed.used or {}) if mixed else {}

    def head_files(self) -> set[str]:
        """Files that `item train` replaces: the head graph, its weights, the training report."""
        s = self.spec
        owned = {s.components["head"].file, s.head.weights}
        return owned | {f for f in s.files if f.startswith(TRAINING_DIR + "/")}

    @property
    def feature_fingerprint(self) -> str:
        """Identifies everything that shapes the head's input (all files but the head's own):
        features extracted with one bundle are stale for a bundle with another fingerprint."""
        h = hashlib.sha256()
        skip = self.head_files()
        for rel, digest in sorted(self.spec.files.items()):
            # TensorRT plans are built from these same graphs on the target: not a new chain;
            # parity/ records what the export measured, which no feature depends on.
            if rel not in skip and not rel.startswith(("tensorrt/", "parity/")):
                h.update(f"{rel}\0{digest}\n".encode())
        for key in ("captioner", "detector", "clip", "words"):  # as read: feature stores keep fingerprints of this JSON
            h.update(json.dumps(self.manifest[key], sort_keys=True).encode())
        return h.hexdigest()[:16]

    @property
    def default_precision(self) -> str:
        return self.spec.default_precision or "fp32"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def trained(self) -> bool:
        return self.spec.head.trained


def write_manifest(root: Path, manifest: dict) -> None:
    """Replace manifest.json atomically: a crash leaves the old bundle or the new, never half."""
    tmp = root / f".{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def seal(root: Path, manifest: Manifest) -> None:
    """Hash every file of the folder into the manifest and write it: how the export closes a
    bundle (item train and item build re-hash only the files they change)."""
    manifest.files = {
        str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST
    }
    write_manifest(root, manifest.to_dict())


def _redo(manifest: dict | None, root: Path) -> str:
    cmd = manifest.get("export_command") if isinstance(manifest, dict) else None
    if cmd:
        return f"re-export it with: {cmd}"
    return f"re-export it with `item export --out {root} ...`"
