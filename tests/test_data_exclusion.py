"""--exclude-images: by file name or bare id, with the count of what was left out."""

from pathlib import Path

import pytest

from fastvlp.data.exclusion import filter_excluded, read_excluded_images
from fastvlp.data.records import ImageRecord, Nlvr2Record


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
