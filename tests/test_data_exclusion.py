"""--exclude-images: by file name, bare id or the id in a published COCO name, with the count of what was left out."""

import json
from pathlib import Path

import pytest
from PIL import Image

from fastvlp.data.exclusion import filter_excluded, read_excluded_images
from fastvlp.data.records import ImageRecord, Nlvr2Record
from fastvlp.train.pretrain_data import read_corpus


def _record(image_id, name, coco_id=None, source="coco"):
    return ImageRecord(source, image_id, Path("/data") / name, coco_id=coco_id)


def test_exclusion_by_name_and_id(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text(
        "# Karpathy test images\nCOCO_val2014_000000000042.jpg\n\n  1234 \nval2014/000000000777.jpg\nimg7\n"
    )
    excluded = read_excluded_images(path)
    assert excluded.ids == {1234}
    records = [
        _record(42, "val2014/COCO_val2014_000000000042.jpg"),
        _record(1234, "000000001234.jpg"),
        _record(777, "images/val/000000000777.jpg"),
        _record(5, "000000000005.jpg"),
        _record(6, "img7.png"),
    ]
    kept, left_out = filter_excluded(records, excluded)
    assert [r.image_id for r in kept] == [5] and left_out == 4

    vg = [_record(1234, "1234.jpg", coco_id=9, source="vg"), _record(2, "2.jpg", coco_id=1234, source="vg")]
    kept, left_out = filter_excluded(vg, excluded, id_attribute="coco_id")
    assert [r.image_id for r in kept] == [1234] and left_out == 1
    kept, left_out = filter_excluded(vg, excluded, id_attribute=None)
    assert len(kept) == 2 and left_out == 0



def test_the_entries_that_left_out_a_record_are_collected(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("COCO_val2014_000000000042.jpg\n1234\nimg7\nmissing.jpg\n2417\n1234\n")
    excluded = read_excluded_images(path)
    assert excluded.entries == ("COCO_val2014_000000000042.jpg", "1234", "img7", "missing.jpg", "2417")
    matched = set()
    coco = [_record(1234, "000000001234.jpg"), _record(5, "img7.jpg")]
    kept, left_out = filter_excluded(coco, excluded, matched=matched)
    assert kept == [] and left_out == 2 and matched == {"1234", "img7"}
    # a VG image is matched by the COCO id of its copy, never by its own id: "2417" stays unmatched
    vg = [_record(2417, "2417.png", coco_id=42, source="vg"), _record(8, "8.jpg", coco_id=None, source="vg")]
    kept, left_out = filter_excluded(vg, excluded, id_attribute="coco_id", matched=matched)
    assert [r.image_id for r in kept] == [8] and left_out == 1
    assert matched == {"1234", "img7", "COCO_val2014_000000000042.jpg"}
    assert [e for e in excluded.entries if e not in matched] == ["missing.jpg", "2417"]
    with pytest.raises(TypeError, match="matched: expected a set or None, got list"):
        filter_excluded(coco, excluded, matched=[])


def test_published_coco_names_exclude_every_copy_of_the_image(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("COCO_val2014_000000391895.jpg\nval2014/COCO_val2014_000000000009\n")
    excluded = read_excluded_images(path)
    assert excluded.coco_ids == {391895, 9} and excluded.ids == set()
    coco = [
        _record(391895, "images/val/000000391895.jpg"),
        _record(9, "000000000009.jpg"),
        _record(10, "000000000010.jpg"),
    ]
    kept, left_out = filter_excluded(coco, excluded)
    assert [r.image_id for r in kept] == [10] and left_out == 2

    vg = [
        _record(1, "1.jpg", coco_id=391895, source="vg"),
        _record(9, "9.jpg", coco_id=None, source="vg"),  # VG's own numbering is not COCO's
        _record(3, "3.jpg", coco_id=9, source="vg"),
    ]
    kept, left_out = filter_excluded(vg, excluded, id_attribute="coco_id")
    assert [r.image_id for r in kept] == [9] and left_out == 2
    flickr = [_record(391895, "391895.jpg", source="flickr30k")]
    assert filter_excluded(flickr, excluded) == (flickr, 0)


def _jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), (30, 160, 90)).save(path, "JPEG")


def test_pretraining_corpus_leaves_out_a_published_coco_name_everywhere(tmp_path):
    coco, vg = tmp_path / "coco", tmp_path / "vg"
    for image_id in (391895, 7):
        _jpeg(coco / "images" / "train" / f"{image_id:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24} for i in (391895, 7)]
    captions = [{"id": k, "image_id": i, "caption": f"picture {i}"} for k, i in enumerate((391895, 7))]
    (coco / "annotations").mkdir()
    (coco / "annotations/captions_train.json").write_text(json.dumps({"images": images, "annotations": captions}))
    for image_id in (1, 2):
        _jpeg(vg / "VG_100K" / f"{image_id}.jpg")
    vg_images = [{"image_id": 1, "coco_id": 391895, "url": "x/1.jpg"}, {"image_id": 2, "coco_id": None}]
    (vg / "image_data.json").write_text(json.dumps(vg_images))
    (vg / "objects.json").write_text(json.dumps([{"image_id": i, "objects": []} for i in (1, 2)]))
    regions = [{"id": i, "regions": [{"phrase": f"region of {i}"}]} for i in (1, 2)]
    (vg / "region_descriptions.json").write_text(json.dumps(regions))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("COCO_val2014_000000391895.jpg\n")

    def read(excluded):
        corpus = read_corpus(tmp_path, excluded)
        return sorted((r.source, r.image_id) for r in corpus.records), corpus.excluded

    assert read(None) == ([("coco", 7), ("coco", 391895), ("vg", 1), ("vg", 2)], 0)
    assert read(exclude) == ([("coco", 7), ("vg", 2)], 2)
    # COCO 2017's name of the same image also leaves out Visual Genome's copy, and so does the bare id.
    for entry in ("000000391895.jpg", "391895"):
        exclude.write_text(entry + "\n")
        assert read(exclude) == ([("coco", 7), ("vg", 2)], 2), entry

def test_exclusion_of_image_pairs(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("dev-3-1-img1.png\n")
    pairs = [
        Nlvr2Record("dev-3-1-0", "s", True, Path("dev-3-1-img0.png"), Path("dev-3-1-img1.png"), "dev"),
        Nlvr2Record("dev-3-2-0", "s", False, Path("dev-3-2-img0.png"), Path("dev-3-2-img1.png"), "dev"),
    ]
    kept, left_out = filter_excluded(pairs, read_excluded_images(path), id_attribute=None)
    assert [r.identifier for r in kept] == ["dev-3-2-0"] and left_out == 1


def test_invalid_arguments(tmp_path):
    path = tmp_path / "exclude.txt"
    path.write_text("1\n")
    with pytest.raises(ValueError, match="id_attribute"):
        filter_excluded([_record(1, "1.jpg")], read_excluded_images(path), id_attribute="cocoid")
    with pytest.raises(TypeError, match="excluded"):
        filter_excluded([], {"1"})
    with pytest.raises(TypeError, match="path"):
        read_excluded_images(5)
