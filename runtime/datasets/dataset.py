"""Labelled image datasets: a folder tree or a CSV / JSONL manifest -> a list of samples.

Folder tree: every image under a folder named for its label (`real`, `0_real`, `nature` /
`fake`, `1_fake`, `ai`); a folder named `train`, `val` or `test` anywhere above sets the
split; the first other folder on the path names the generator. So `fake/sd14/x.png`,
`test/progan/1_fake/x.png` (UniversalFakeDetect) and `sdv4/train/ai/x.png` (GenImage) all
read as expected. Manifest: columns `path` and `label` (real/fake or 0/1), optional
`generator` and `split`; paths relative to the manifest's folder.

Samples without a split get one from a hash of their path: stable across runs and resumes.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from ..errors import DatasetError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
LABEL_DIRS = {"real": 0, "0_real": 0, "nature": 0, "fake": 1, "1_fake": 1, "ai": 1}
LABEL_VALUES = {"real": 0, "0": 0, "fake": 1, "1": 1}
SPLITS = ("train", "val", "test")
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
DEFAULT_RATIOS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Sample:
    key: str  # path relative to the dataset root: the sample's identity in a feature store
    path: Path
    label: int  # 0 real, 1 fake
    generator: str  # "" when unknown
    split: str  # train | val | test


def load_dataset(source: str | Path, ratios: tuple[float, float, float] = DEFAULT_RATIOS) -> list[Sample]:
    """Every labelled image of a folder tree or manifest file, sorted by key."""
    source = Path(source).resolve()
    if not source.exists():
        raise DatasetError(f"no dataset at {source}")
    if abs(sum(ratios) - 1.0) > 1e-6 or min(ratios) < 0:
        raise DatasetError(f"split ratios must be three non-negative numbers summing to 1, got {ratios}")
    try:
        if source.is_dir():
            rows = _scan_tree(source)
        elif source.suffix.lower() == ".csv":
            rows = _read_manifest(source, _csv_rows(source))
        elif source.suffix.lower() in (".jsonl", ".json"):
            rows = _read_manifest(source, _jsonl_rows(source))
        else:
            raise DatasetError(f"{source}: a dataset is a folder, a .csv or a .jsonl manifest")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{source}: a manifest must be UTF-8 text ({e})") from None
    except csv.Error as e:
        raise DatasetError(f"{source}: not a readable CSV manifest ({e})") from None
    except OSError as e:
        raise DatasetError(f"cannot read {e.filename or source}: {e.strerror or e}") from None
    if not rows:
        raise DatasetError(f"{source} holds no labelled images (see `item features --help` for the layouts)")
    samples = [Sample(key, path, label, gen, split or _hash_split(key, ratios)) for key, path, label, gen, split in rows]
    samples.sort(key=lambda s: s.key)
    dup = next((a.key for a, b in pairwise(samples) if a.key == b.key), None)
    if dup:
        raise DatasetError(f"{source} lists {dup} more than once")
    return samples


def _hash_split(key: str, ratios: tuple[float, float, float]) -> str:
    u = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "train" if u < ratios[0] else "val" if u < ratios[0] + ratios[1] else "test"


def _scan_tree(root: Path) -> list[tuple]:
    rows = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        parts = path.relative_to(root).parts[:-1]
        labels = [LABEL_DIRS[p.lower()] for p in parts if p.lower() in LABEL_DIRS]
        if len(labels) != 1:
            continue  # not under exactly one label folder: not part of the dataset
        splits = [SPLIT_NAMES[p.lower()] for p in parts if p.lower() in SPLIT_NAMES]
        others = [p for p in parts if p.lower() not in LABEL_DIRS and p.lower() not in SPLIT_NAMES]
        key = path.relative_to(root).as_posix()
        rows.append((key, path, labels[0], others[0] if others else "", splits[0] if splits else ""))
    return rows


def _csv_rows(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets write a BOM
        yield from enumerate(csv.DictReader(f), start=2)


def _jsonl_rows(path: Path):
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{path}:{n}: not JSON ({e})") from None


def _read_manifest(manifest: Path, rows) -> list[tuple]:
    out = []
    for n, row in rows:
        where = f"{manifest}:{n}"
        if not isinstance(row, dict) or not row.get("path") or row.get("label") in (None, ""):
            raise DatasetError(f"{where}: every row needs `path` and `label`")
        label = LABEL_VALUES.get(str(row["label"]).strip().lower())
        if label is None:
            raise DatasetError(f"{where}: label {row['label']!r} is not real/fake/0/1")
        split = str(row.get("split") or "").strip().lower()
        if split and split not in SPLIT_NAMES:
            raise DatasetError(f"{where}: split {split!r} is not one of {SPLITS}")
        rel = Path(str(row["path"]))
        path = rel if rel.is_absolute() else manifest.parent / rel
        key = rel.as_posix()
        out.append((key, path, label, str(row.get("generator") or "").strip(), SPLIT_NAMES.get(split, "")))
    return out
