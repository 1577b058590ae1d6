from __future__ import annotations

import pytest
from itemrt.stages.words import Vocabulary


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


@pytest.mark.parametrize(
    "caption, words",
    [
        ("a man riding a bike on the road in front of a tree", ["man", "bicycle", "road", "tree"]),
        ("two dogs and a cat on a couch", ["dog", "cat", "couch"]),
        ("people waiting at a traffic light near a fire hydrant", ["person", "traffic light", "fire hydrant"]),
        ("a bus and two buses", ["bus"]),
        ("glasses of wine on a table", ["glasses", "wine", "table"]),
        ("three knives, some cherries and the boxes", ["knife", "cherry", "box"]),
        ("A HOT DOG with Ketchup", ["hot dog"]),
        ("nothing here but words", []),
        ("", []),
    ],
)
def test_extract(vocab, caption, words):
    assert vocab.extract(caption, 8) == words


def test_cap_keeps_caption_order(vocab):
    assert vocab.extract("a cat, a dog, a horse, a cow and a sheep", 3) == ["cat", "dog", "horse"]


def test_every_alias_points_into_the_vocabulary(vocab):
    with pytest.raises(ValueError):
        Vocabulary(["cat"], {"kitty": "lion"})
