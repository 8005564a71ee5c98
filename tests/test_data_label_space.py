"""LabelSpace: from a vocabulary file, built from annotations, COCO categories mapped by name."""

import random

import pytest

from fastvlp.data.label_space import LabelSpace, normalise_name
from fastvlp.data.records import Category


def test_from_vocab_file_with_alternatives(tmp_path):
    path = tmp_path / "objects_vocab.txt"
    path.write_text("man\nTree\n\nt-shirt,tshirt,tee shirt\ntraffic light\n")
    space = LabelSpace.from_vocab_file(path)
    assert space.names == ["man", "tree", "t-shirt", "traffic light"]
    assert space.num_classes == len(space) == 4 and space.no_object_index == 4
    assert space.index("TEE  shirt") == space.index("tshirt") == 2
    assert space.index("Trees") == 1  # a plain plural falls back to the singular
    assert space.get("dog") is None and "dog" not in space and "man" in space
    with pytest.raises(KeyError, match="dog"):
        space.index("dog")
    copy = tmp_path / "saved.txt"
    space.save(copy)
    assert LabelSpace.load(copy) == space


def test_repeated_names_keep_line_numbers(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("cat\ndog\ncat\n")
    space = LabelSpace.from_vocab_file(path)
    assert space.num_classes == 3 and space.index("cat") == 0 and space.name(2) == "cat"


def test_from_annotation_names():
    names = ["tree"] * 5 + ["Man"] * 3 + ["man "] * 2 + ["sky"] * 5 + ["rare"]
    random.shuffle(names)
    space = LabelSpace.from_names(names)
    assert space.names == ["man", "sky", "tree", "rare"]  # by frequency, ties alphabetical
    assert LabelSpace.from_names(names, min_count=2).names == ["man", "sky", "tree"]
    assert LabelSpace.from_names(names, max_classes=2).names == ["man", "sky"]
    with pytest.raises(ValueError, match="min_count"):
        LabelSpace.from_names(names, min_count=0)
    with pytest.raises(TypeError, match="names"):
        LabelSpace.from_names("tree")


def test_coco_categories_mapped_by_name():
    space = LabelSpace(["person", "dog", "tv", "bicycle"])
    categories = [
        Category(1, "Person"),
        Category(2, "bicycle"),
        Category(18, "dog"),
        Category(27, "backpack"),
        Category(90, "toothbrush"),
    ]
    extended, mapping = space.with_coco_categories(categories)
    assert extended.names == ["person", "dog", "tv", "bicycle", "backpack", "toothbrush"]
    assert mapping == {1: 0, 2: 3, 18: 1, 27: 4, 90: 5}
    assert extended.no_object_index == 6 and space.num_classes == 4  # the original is unchanged
    as_dicts = space.with_coco_categories([{"id": c.id, "name": c.name} for c in categories])
    assert as_dicts == (extended, mapping)
    with pytest.raises(ValueError, match="categories"):
        space.with_coco_categories([{"name": "x"}])


def test_validation():
    assert normalise_name("  Red \t Ball ") == "red ball"
    with pytest.raises(TypeError, match="classes"):
        LabelSpace("tree")
    with pytest.raises(ValueError, match=r"classes\[1\]"):
        LabelSpace(["tree", ""])
    with pytest.raises(IndexError, match="index"):
        LabelSpace(["tree"]).name(1)
