"""Object words from a caption: deterministic, offline, torch-free.

A vocabulary (shipped in the bundle, `vocabulary.json`) maps caption words to canonical object
names. Multi-word names match first (longest match); regular plurals of names and aliases are
derived; irregular forms, synonyms and people by role are explicit aliases. Words come out in
caption order, de-duplicated and capped.

Two file versions are read (docs/words.md):

- version 1 (bundles exported before vocabulary v2): objects and aliases only, matched exactly
  as they always were, so an old bundle keeps extracting the words its bank was built for;
- version 2: adds the rules that keep a hit from being a false one, all data in the file:
  framing phrases ("picture of", "a couple of"), a noun that only modifies the next noun
  (colour "orange cat", material "glass plate", "baby elephant", "bathroom sink"), verb forms
  ("he watches tv"), a second sense before "of" ("glasses of wine" -> glass), and scene nouns,
  which are the first words to go when a caption names more words than the cap.

`explain` tells, for one caption, which tokens matched which entry and how, and which hits
were blocked by which rule (`item words "a caption"`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

_TOKEN = re.compile(r"[a-z]+")
# Version 2: words (letters and digits), a possessive 's, and single punctuation marks, which
# are boundaries: no multi-word name and no rule looks across a comma or a full stop.
_TOKEN2 = re.compile(r"[a-z0-9]+|'s\b|[^\sa-z0-9]")
_JOINERS = frozenset(("-",))  # "hot-dog" reads as "hot dog"; a possessive 's stays a boundary

DEFAULT_VOCABULARY = Path(__file__).parents[1] / "data" / "vocabulary.json"
FORMAT = "itemrt-vocabulary"
VERSIONS = (1, 2)

# Fixed vocabulary words, in this order, for fixed-work runs: parity checks (random-weight
# captions rarely name objects) and profiling (`item-bench --objects N`).
PROBE_WORDS = ("person", "car", "dog", "tree", "chair", "cup", "bicycle", "bird")

# How an entry was reached (kinds of table entries), as `explain` names them.
NAME, PLURAL, ALIAS, ALIAS_PLURAL, PHRASE = "name", "plural of name", "alias", "plural of alias", "phrase"


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


def _norm(form: str) -> tuple[str, ...]:
    """A vocabulary form as caption tokens: 'T-shirt' -> ('t', 'shirt')."""
    return tuple(re.findall(r"[a-z0-9]+", form.lower().replace("'s", "")))


@dataclass(frozen=True)
class Rules:
    """Version-2 guards; every list comes from the vocabulary file (docs/words.md)."""

    framing: frozenset = frozenset()  # X blocked when "of" follows: "picture of", "couple of"
    of_senses: dict = field(default_factory=dict)  # form -> object when "of" follows: glasses of -> glass
    colours: frozenset = frozenset()  # a colour word before a noun or colour is a colour
    colour_followers: frozenset = frozenset()  # "orange colored", "orange tabby": still a colour
    shades: frozenset = frozenset()  # "light blue": the shade of a colour, not a lamp
    materials: frozenset = frozenset()  # named only to say why a modifier was blocked
    young: frozenset = frozenset()  # "baby elephant": an animal's age, not a person
    verbs: frozenset = frozenset()  # forms that are also verbs: "watches", "skis", "stands"
    subjects: frozenset = frozenset()  # tokens after which a verb form is a verb: he, she, to, can ...
    no_modifier: frozenset = frozenset()  # objects never taken as a modifier of the next noun
    modifier_followers: frozenset = frozenset()  # "snow covered", "chocolate topped": a modifier
    phrases: frozenset = frozenset()  # phrases that name no object: "cross country", "close up"
    modifier_heads: frozenset = frozenset()  # "baseball game": a noun before these is no object
    framing_verbs: frozenset = frozenset()  # "taking a picture": the picture is the photo itself

    @classmethod
    def from_doc(cls, doc: dict) -> Rules:
        r = doc.get("rules", {})
        s = lambda k: frozenset(r.get(k, ()))  # noqa: E731
        return cls(framing=s("framing"), of_senses=dict(r.get("of_senses", {})), colours=s("colours"),
                   colour_followers=s("colour_followers"), shades=s("shades"), materials=s("materials"),
                   young=s("young"), verbs=s("verbs"), subjects=s("subjects"), no_modifier=s("no_modifier"),
                   modifier_followers=s("modifier_followers"), phrases=s("phrases"),
                   modifier_heads=s("modifier_heads"), framing_verbs=s("framing_verbs"))


@dataclass
class Hit:
    """One match of a vocabulary entry in a caption (`explain`)."""

    tokens: str  # the caption's tokens, as matched ("laptop computer")
    start: int  # character offsets in the caption
    end: int
    word: str  # the vocabulary object it stands for
    how: str  # name | plural of name | alias | plural of alias, + " (multi-word)" for several tokens
    entry: str  # the vocabulary form it reached ("doughnut" for "doughnuts")
    blocked: str | None = None  # the rule that blocked it, with the reason
    kept: bool = False  # among the words the caption yields (after de-duplication and the cap)
    note: str | None = None  # "duplicate", "over the cap (scene noun)", a sense change


@dataclass
class Explanation:
    caption: str
    version: int
    max_objects: int
    words: list[str]
    hits: list[Hit]
    unmatched: list[str]  # content tokens that no entry matched (dropped: not looked for)

    def to_dict(self) -> dict:
        return {"caption": self.caption, "words": self.words, "vocabulary_version": self.version,
                "max_objects": self.max_objects, "hits": [h.__dict__ for h in self.hits],
                "unmatched": self.unmatched}

    def lines(self) -> list[str]:
        out = [f"caption: {self.caption}", f"words: {', '.join(self.words) or '(none)'}"
               f"   (vocabulary version {self.version}, cap {self.max_objects})"]
        for h in self.hits:
            state = f"BLOCKED by {h.blocked}" if h.blocked else ("kept" if h.kept else h.note or "dropped")
            via = h.how if h.entry == h.tokens.lower() else f"{h.how} '{h.entry}'"
            extra = f"; {h.note}" if h.note and (h.kept or h.blocked) else ""
            out.append(f"  [{h.start}:{h.end}] '{h.tokens}' -> {h.word}  via {via}: {state}{extra}")
        if self.unmatched:
            out.append(f"  not in the vocabulary (not looked for): {', '.join(self.unmatched)}")
        return out


# After "covered", "topped" ...: these make the noun before them an object ("a plate topped with").
_LINKS = frozenset("with in by of on at from to and or for like as".split())

_DETERMINERS = frozenset("a an the his her their its my our your this that some".split())

# Function words that `explain` does not list as unmatched content.
_FUNCTION = frozenset("""a an the and or but of on in at to for from with without by near next into onto over
under above below behind beside besides between through across along around against up down out off away
is are was were be been being has have had do does did it its it's this that these those there here his her
their our my your he she they them him we you i who which what while as than then so very some any each
every all both two three four five six seven eight nine ten one several many few lots other another
""".split())


class Vocabulary:
    def __init__(self, objects: list[str], aliases: dict[str, str], *, version: int = 1,
                 scene: list[str] | tuple = (), rules: Rules | None = None):
        if version not in VERSIONS:
            raise ValueError(f"vocabulary version {version} is not one of {VERSIONS}")
        self.version = version
        self.objects = list(objects)
        self.aliases = dict(aliases)
        known = set(self.objects)
        unknown = sorted(v for v in aliases.values() if v not in known)
        if unknown:
            raise ValueError(f"aliases point at words not in the vocabulary: {unknown}")
        self.scene = frozenset(scene)
        if not self.scene <= known:
            raise ValueError(f"scene nouns not in the vocabulary: {sorted(self.scene - known)}")
        self.rules = rules or Rules()
        bad = sorted(w for w in self.rules.of_senses.values() if w not in known)
        if bad:
            raise ValueError(f"of_senses point at words not in the vocabulary: {bad}")
        if version == 1:
            self._build_v1(aliases)
        else:
            self._build_v2(aliases)

    # --- version 1: exactly the matcher that bundles before vocabulary v2 were exported with
    def _build_v1(self, aliases: dict[str, str]) -> None:
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

    def _extract_v1(self, caption: str, max_objects: int) -> list[str]:
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

    # --- version 2
    def _build_v2(self, aliases: dict[str, str]) -> None:
        # form -> (word, kind, entry). Precedence, lowest first: derived plurals of aliases,
        # derived plurals of names, aliases, names (a name is never re-pointed by an alias of
        # another word, nor by a plural that happens to spell it).
        table: dict[tuple[str, ...], tuple[str, str, str]] = {}
        for form, word in aliases.items():
            for p in plural_forms(form):
                table.setdefault(_norm(p), (word, ALIAS_PLURAL, form))
        for word in self.objects:
            for p in plural_forms(word):
                table[_norm(p)] = (word, PLURAL, word)
        for form, word in aliases.items():
            table[_norm(form)] = (word, ALIAS, form)
        for word in self.objects:
            table[_norm(word)] = (word, NAME, word)
        for phrase in self.rules.phrases:  # matched like an entry, so nothing inside it matches
            table[_norm(phrase)] = ("", PHRASE, phrase)
        table.pop((), None)
        self._table2 = table
        self._longest = max(len(k) for k in table)
        # first tokens of every entry: "does a noun start here?" for the modifier rule
        self._starts = frozenset(k[0] for k in table)

    @classmethod
    def load(cls, path: str | Path = DEFAULT_VOCABULARY) -> Vocabulary:
        return cls.load_doc(json.loads(Path(path).read_text()), str(path))

    @classmethod
    def load_doc(cls, doc: dict, name: str = "vocabulary") -> Vocabulary:
        if doc.get("format") != FORMAT:
            raise ValueError(f"{name} is not an itemrt vocabulary file")
        version = int(doc.get("version", 1))
        if version not in VERSIONS:
            raise ValueError(f"{name}: vocabulary version {version} is not one this itemrt reads {VERSIONS}")
        if version == 1:
            return cls(doc["objects"], doc.get("aliases", {}), version=1)
        return cls(doc["objects"], doc.get("aliases", {}), version=version, scene=doc.get("scene", ()),
                   rules=Rules.from_doc(doc))

    # --- matching
    @staticmethod
    def _tokens(text: str) -> list[str]:
        return [t for t in _TOKEN2.findall(text) if t not in _JOINERS]

    def _scan(self, toks: list[str]) -> list[list]:
        """Longest-match hits over caption tokens, then the guards.

        Each hit is [start token, end token, word, kind, entry, blocked-by or None, note]."""
        table, longest, r = self._table2, self._longest, self.rules
        hits: list[list] = []
        i, n_tok = 0, len(toks)
        while i < n_tok:
            for n in range(min(longest, n_tok - i), 0, -1):
                e = table.get(tuple(toks[i : i + n]))
                if e is not None:
                    hits.append([i, i + n, e[0], e[1], e[2], None, None])
                    i += n
                    break
            else:
                i += 1
        if not hits:
            return hits
        # 1. phrases that name no object; framing and senses before "of"
        for h in hits:
            if h[3] == PHRASE:
                h[5] = f"phrase: '{h[4]}' names no object"
            elif h[2] in r.framing and h[0] > 0 and (toks[h[0] - 1] in r.framing_verbs or (
                    h[0] > 1 and toks[h[0] - 2] in r.framing_verbs and toks[h[0] - 1] in _DETERMINERS)):
                h[5] = f"framing: '{' '.join(toks[max(0, h[0] - 2) : h[1]])}' is the photo being taken"
            elif h[1] < n_tok and toks[h[1]] == "of":
                last = toks[h[1] - 1]
                if last in r.framing or h[2] in r.framing:
                    h[5] = f"framing: '{last} of' frames what follows"
                elif last in r.of_senses:
                    h[6] = f"'{last} of' is {r.of_senses[last]}"
                    h[2] = r.of_senses[last]
        # 2. verb forms: after a subject pronoun, a modal or "to", or right after another hit
        ends = {h[1]: h for h in hits}
        for h in hits:
            if h[5] is None and h[1] - h[0] == 1 and toks[h[0]] in r.verbs and h[0] > 0:
                prev = toks[h[0] - 1]
                before = ends.get(h[0])
                if prev in r.subjects:
                    h[5] = f"verb: '{toks[h[0]]}' after '{prev}'"
                elif before is not None and before[5] is None:
                    h[5] = f"verb: '{toks[h[0]]}' after the noun '{prev}'"
        # 3. a noun that modifies the next noun (singular, not plural) is not an object of its own
        starts = {h[0]: h for h in hits}
        for h in hits:
            if h[5] is not None or h[3] in (PLURAL, ALIAS_PLURAL) or h[2] in r.no_modifier:
                continue
            last = toks[h[1] - 1]
            nxt = toks[h[1]] if h[1] < n_tok else ""
            after = starts.get(h[1])
            if last in r.shades and nxt in r.colours:
                h[5] = f"colour: '{last} {nxt}' is a shade"
            elif nxt in r.modifier_heads:
                h[5] = f"modifier: '{last} {nxt}' names no object"
            elif nxt in r.modifier_followers and h[1] + 1 < n_tok and toks[h[1] + 1].isalpha() and \
                    toks[h[1] + 1] not in _LINKS:  # "snow covered mountain", not "table covered with"
                h[5] = f"modifier: '{last} {nxt} {toks[h[1] + 1]}'"
            elif last in r.colours and (nxt in r.colours or nxt in r.colour_followers or (
                    nxt in ("and", "or") and h[1] + 1 < n_tok and toks[h[1] + 1] in r.colours)):
                h[5] = f"colour: '{last} {nxt}'"
            elif after is not None and after[5] is None:
                noun = " ".join(toks[after[0] : after[1]])
                if last in r.colours:
                    h[5] = f"colour: '{last}' describes '{noun}'"
                elif last in r.materials:
                    h[5] = f"material: '{last}' describes '{noun}'"
                elif last in r.young:
                    h[5] = f"young animal: '{last} {noun}'"
                else:
                    h[5] = f"modifier: '{last}' modifies '{noun}'"
        return hits

    def _select(self, hits: list[list], max_objects: int) -> list[str]:
        """Unique words in caption order; past the cap, scene nouns go first."""
        words: list[str] = []
        for h in hits:
            if h[5] is None and h[2] not in words:
                words.append(h[2])
        if len(words) <= max_objects:
            return words
        objects = [w for w in words if w not in self.scene]
        if len(objects) >= max_objects:
            return objects[:max_objects]
        keep = set(objects) | set([w for w in words if w in self.scene][: max_objects - len(objects)])
        return [w for w in words if w in keep]

    def extract(self, caption: str, max_objects: int) -> list[str]:
        if self.version == 1:
            return self._extract_v1(caption, max_objects)
        return self._select(self._scan(self._tokens(caption.lower().replace("\u2019", "'"))), max_objects)

    def spans(self, caption: str) -> list[tuple[int, int, str]]:
        """(start, end, word) in characters for every hit the rules keep, duplicates and all
        (no cap): what the coverage benchmark lines up with another extractor's nouns."""
        return [(h.start, h.end, h.word) for h in self.explain(caption, 10**6).hits if not h.blocked]

    def explain(self, caption: str, max_objects: int = 4) -> Explanation:
        """What `caption` yields and why: each hit with the tokens, the entry and the way it
        matched, the rule that blocked it, or why it was dropped (a duplicate, the cap)."""
        low = caption.lower().replace("\u2019", "'")  # same length: offsets hold
        if self.version == 1:  # v1 reads runs of letters, nothing else
            spans = [(m.group(), m.start(), m.end()) for m in _TOKEN.finditer(low)]
        else:
            spans = [(m.group(), m.start(), m.end()) for m in _TOKEN2.finditer(low) if m.group() not in _JOINERS]
        src = caption if len(low) == len(caption) else low  # a few non-ASCII letters lower into two
        toks = [s[0] for s in spans]
        raw = self._scan_v1(toks) if self.version == 1 else self._scan(toks)
        words = self.extract(caption, max_objects)
        hits, seen = [], set()
        for i, j, word, kind, entry, blocked, note in raw:
            kind = kind + (" (multi-word)" if j - i > 1 or len(_norm(entry)) > 1 else "")
            h = Hit(src[spans[i][1] : spans[j - 1][2]], spans[i][1], spans[j - 1][2], word, kind, entry,
                    blocked, note=note)
            if not blocked:
                if word in seen:
                    h.note = "duplicate"
                elif word in words:
                    h.kept = True
                else:
                    h.note = "over the cap" + (" (scene noun)" if word in self.scene else "")
                seen.add(word)
            hits.append(h)
        covered = {k for i, j, *_ in raw for k in range(i, j)}
        unmatched = [t for k, t in enumerate(toks) if k not in covered and t[0].isalpha() and len(t) > 1
                     and t not in _FUNCTION]
        return Explanation(caption, self.version, max_objects, words, hits, unmatched)

    def _scan_v1(self, toks: list[str]) -> list[list]:
        """Version 1's longest match in the `explain` shape (v1 has no guards)."""
        hits, i = [], 0
        while i < len(toks):
            for n in range(min(self._longest, len(toks) - i), 0, -1):
                word = self._table.get(tuple(toks[i : i + n]))
                if word is not None:
                    form = " ".join(toks[i : i + n])
                    kind = NAME if form == word else ALIAS if form in self.aliases else PLURAL
                    hits.append([i, i + n, word, kind, form if kind != PLURAL else word, None, None])
                    i += n
                    break
            else:
                i += 1
        return hits


def words_command(args) -> int:
    """`item words CAPTION ... [--bundle B] [--max-objects N] [--json]`: which object words each
    caption yields and why. The shipped vocabulary unless --bundle names a bundle, whose own
    vocabulary and cap are used; "-" reads captions from standard input, one a line."""
    import sys

    max_objects = 4
    if getattr(args, "bundle", None):
        from itemrt.bundle import Bundle

        b = Bundle.open(args.bundle)
        vocab = Vocabulary.load(b.file(b.manifest["words"]["vocabulary"]))
        max_objects = int(b.manifest["words"]["max_objects"])
    else:
        vocab = Vocabulary.load()
    if getattr(args, "max_objects", None):
        max_objects = args.max_objects
    captions: list[str] = []
    for c in args.captions:
        captions += [line for line in sys.stdin.read().splitlines() if line.strip()] if c == "-" else [c]
    for i, caption in enumerate(captions):
        ex = vocab.explain(caption, max_objects)
        if getattr(args, "json", False):
            print(json.dumps(ex.to_dict(), ensure_ascii=False))
        else:
            print(("\n" if i else "") + "\n".join(ex.lines()))
    return 0
