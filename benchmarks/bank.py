"""What the object-word bank costs: building it at export, its size, and loading it when a
Runtime starts, for the bundle's own vocabulary and for another one (e.g. the version-1 list).

    python -m itemrt.bench.bank engines/full-fp32 --compare benchmarks/data/vocabulary-v1.json

Builds each bank with the bundle's own exported text graphs (export.bank.build_bank, as
`item export` does) in a scratch copy of the manifest's settings; the bundle is not changed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from itemrt.bundle import Bundle
from itemrt.export.bank import build_bank
from itemrt.runtime import WordBank
from itemrt.stages.words import Vocabulary


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(bundle: Path, vocabulary: Path, repeats: int) -> dict:
    b = Bundle.open(bundle, verify=False)
    spec = b.spec
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("clip_text.onnx", "detector_text.onnx", spec.clip.tokenizer.file, spec.detector.tokenizer.file):
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).symlink_to((b.root / name).resolve())
        for data in b.root.glob("*.onnx.data"):  # external weights beside the graphs
            (scratch / data.name).symlink_to(data.resolve())
        shutil.copy(vocabulary, scratch / spec.words.vocabulary)
        objects = len(Vocabulary.load(scratch / spec.words.vocabulary).objects)
        t0 = time.perf_counter()
        build_bank(scratch, spec.words, spec.detector, spec.clip, progress=lambda msg: None)
        build_s = time.perf_counter() - t0
        bank = scratch / spec.words.bank
        vocab_ms = _median_ms(lambda: Vocabulary.load(scratch / spec.words.vocabulary), repeats)
        v = Vocabulary.load(scratch / spec.words.vocabulary)
        bank_ms = _median_ms(lambda: WordBank(bank, v), repeats)
        return {"vocabulary": str(vocabulary), "objects": objects, "build_s": round(build_s, 2),
                "bank_bytes": bank.stat().st_size, "vocabulary_bytes": (scratch / spec.words.vocabulary).stat().st_size,
                "load_vocabulary_ms": round(vocab_ms, 2), "load_bank_ms": round(bank_ms, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.bank", description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--compare", type=Path, nargs="*", default=[], help="other vocabulary files to build banks for")
    p.add_argument("--repeats", type=int, default=20, help="loads timed per file (median)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    b = Bundle.open(args.bundle, verify=False)
    rows = [measure(args.bundle, v, args.repeats) for v in [b.root / b.spec.words.vocabulary, *args.compare]]
    print(f"{'vocabulary':<44} {'objects':>7} {'build s':>8} {'bank KB':>8} {'vocab KB':>8} {'load vocab ms':>13} {'load bank ms':>12}")
    for r in rows:
        print(f"{r['vocabulary'][-44:]:<44} {r['objects']:>7} {r['build_s']:>8} {r['bank_bytes'] / 1024:>8.0f} "
              f"{r['vocabulary_bytes'] / 1024:>8.0f} {r['load_vocabulary_ms']:>13} {r['load_bank_ms']:>12}")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
