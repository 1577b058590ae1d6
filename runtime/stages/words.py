"""Object words from a caption: deterministic, offline, torch-free.

A curated vocabulary (shipped in the bundle) maps caption words to canonical object
names: multi-word names match first (longest match), regular plurals are derived,
irregular forms and synonyms are explicit aliases. Words come out in caption order,
de-duplicated and capped.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

_TOKEN = re.compile(r"[a-z]+")

DEFAULT_VOCABULARY = Path(__file__).parents[1] / "data" / "vocabulary.json"

# Fixed vocabulary words, in this order, for fixed-work runs: parity checks (random-weight
# captions rarely name objects) and profiling (`item-bench --objects N`).
PROBE_WORDS = ("person", "car", "dog", "tree", "chair", "cup", "bicycle", "bird")


def plural_forms(word: str) -> list[str]:
    head, _, last = word.rpartition(" ")
    prefix = f"{head} " if head else ""
    if last.endswith(("s", "x", "z", "ch", "sh")):
        forms = [last + "es"]
    elif last.endswith("y") and last[-2:-1] not in "aeiou":
        forms = [last[:-1] + "ies"]
    elif last.endswith("f"):
        forms = [last + "s", last[:-1] + "ves"]
    elif last.endswith("fe"):
        forms = [last + "s", last[:-2] + "ves"]
    elif last.endswith("o"):
        forms = [last + "s", last + "es"]
    else:
        forms = [last + "s"]
    return [prefix + f for f in forms]


class Vocabulary:
    def __init__(self, objects: list[str], aliases: dict[str, str]):
        self.objects = list(objects)
        known = set(self.objects)
        unknown = sorted(v for v in aliases.values() if v not in known)
        if unknown:
            raise ValueError(f"aliases point at words not in the vocabulary: {unknown}")
        table: dict[tuple[str, ...], str] = {}
        for word in self.objects:
            for form in plural_forms(word):
                table.setdefault(tuple(form.split()), word)
        for word in self.objects:  # the canonical spelling always wins over a derived plural
            table[tuple(word.split())] = word
        for form, word in aliases.items():
            table[tuple(form.split())] = word
        self._table = table
        self._longest = max(len(k) for k in table)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_VOCABULARY) -> Vocabulary:
        doc = json.loads(Path(path).read_text())
        if doc.get("format") != "itemrt-vocabulary":
            raise ValueError(f"{path} is not an itemrt vocabulary file")
        return cls(doc["objects"], doc.get("aliases", {}))

    def extract(self, caption: str, max_objects: int) -> list[str]:
        tokens = _TOKEN.findall(caption.lower())
        found: list[str] = []
        i = 0
        while i < len(tokens) and len(found) < max_objects:
            for n in range(min(self._longest, len(tokens) - i), 0, -1):
                word = self._table.get(tuple(tokens[i : i + n]))
                if word is not None:
                    if word not in found:
                        found.append(word)
                    i += n
                    break
            else:
                i += 1
        return found
