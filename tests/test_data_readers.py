"""Readers: the synthetic data read back, the published file and folder names, and bad records counted."""

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlp.data.image_index import ImageIndex, image_id_from_name
from fastvlp.data.images import UnreadableImageError, load_rgb_image
from fastvlp.data.pretraining import read_pretraining_images
from fastvlp.data.readers import (
    read_coco_captions,
    read_coco_instances,
    read_coco_karpathy,
    read_flickr30k,
    read_nlvr2,
    read_visual_genome,
    read_vqa,
)
from fastvlp.data.skips import (
    INVALID_BOX,
    MALFORMED_ANNOTATION,
    MISSING_IMAGE,
    NO_ANNOTATIONS,
    UNKNOWN_CATEGORY,
    UNKNOWN_IMAGE,
    UNREADABLE_IMAGE,
    SkipCounter,
)
from fastvlp.data.synth import main as synth_main
from fastvlp.data.synth import write_synthetic_dataset

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, num_images=NUM_IMAGES, seed=int(np.random.randint(0, 10_000)))
    return out


def _json(path):
    return json.loads(Path(path).read_text())


def _write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _jpeg(path, size=(40, 30), colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


# Reading the synthetic data back ---------------------------------------------------------------------------
def test_coco_read_back(synth_dir):
    total_images = 0
    for split in ("train", "val"):
        raw_captions = _json(synth_dir / f"coco/annotations/captions_{split}.json")
        raw_instances = _json(synth_dir / f"coco/annotations/instances_{split}.json")
        captions = read_coco_captions(synth_dir / "coco", split)
        instances = read_coco_instances(synth_dir / "coco", split)
        assert captions.skips.total == 0 and instances.skips.total == 0
        assert len(captions) == len(instances) == len(raw_captions["images"])
        total_images += len(captions)
        by_image = {}
        for a in raw_captions["annotations"]:
            by_image.setdefault(a["image_id"], []).append(a["caption"])
        for record in captions:
            assert record.image_path.is_file() and record.split == split
            assert list(record.captions) == by_image[record.image_id]
        names = {c["id"]: c["name"] for c in raw_instances["categories"]}
        assert {c.id: c.name for c in instances.categories} == names
        expected = {}
        for a in raw_instances["annotations"]:
            x, y, w, h = (np.float64(v) for v in a["bbox"])
            expected.setdefault(a["image_id"], []).append((a["category_id"], (x, y, x + w, y + h)))
        for record in instances:
            got = [(o.category_id, o.box) for o in record.objects]
            want = expected.get(record.image_id, [])
            assert [g[0] for g in got] == [w[0] for w in want]
            np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=0, atol=1e-9)
            assert all(o.name == names[o.category_id] for o in record.objects)
    assert total_images == NUM_IMAGES


def test_visual_genome_read_back(synth_dir):
    result = read_visual_genome(synth_dir / "vg")
    assert result.skips.total == 0 and len(result) == NUM_IMAGES
    raw_objects = {e["image_id"]: e["objects"] for e in _json(synth_dir / "vg/objects.json")}
    raw_attributes = {
        o["object_id"]: o.get("attributes", [])
        for e in _json(synth_dir / "vg/attributes.json")
        for o in e["attributes"]
    }
    raw_regions = {
        e["id"]: [r["phrase"] for r in e["regions"]] for e in _json(synth_dir / "vg/region_descriptions.json")
    }
    for record in result:
        assert record.image_path.is_file()
        objects = raw_objects[record.image_id]
        assert [o.object_id for o in record.objects] == [o["object_id"] for o in objects]
        for obj, raw in zip(record.objects, objects):
            assert obj.name == raw["names"][0]
            assert obj.box == (raw["x"], raw["y"], raw["x"] + raw["w"], raw["y"] + raw["h"])
            assert list(obj.attributes) == raw_attributes[raw["object_id"]]
        assert list(record.captions) == raw_regions[record.image_id]
    assert sum(bool(o.attributes) for r in result for o in r.objects) > 0
    assert any(not o.attributes for r in result for o in r.objects)


def test_vqa_nlvr2_karpathy_read_back(synth_dir):
    per_image = Counter()
    for split in ("train", "val"):
        result = read_vqa(synth_dir / "vqa", synth_dir / "coco", split)
        raw = _json(synth_dir / f"vqa/v2_mscoco_{split}_annotations.json")["annotations"]
        assert result.skips.total == 0 and len(result) == len(raw)
        raw_by_id = {a["question_id"]: a for a in raw}
        for record in result:
            assert record.answers == tuple(x["answer"] for x in raw_by_id[record.question_id]["answers"])
            assert record.image_path.name == f"{record.image_id:012d}.jpg"
        per_image.update(record.image_id for record in result)
    # Every image is asked five questions, a few of them a sixth (the yes/no deck's spare cards).
    assert len(per_image) == NUM_IMAGES and set(per_image.values()) <= {5, 6}

    rows = 0
    for split in ("train", "dev", "test1"):
        result = read_nlvr2(synth_dir / "nlvr2", split)
        lines = (synth_dir / "nlvr2" / f"{split}.json").read_text().splitlines()
        assert result.skips.total == 0 and len(result) == len(lines)
        for record, line in zip(result, lines):
            row = json.loads(line)
            assert record.label == (row["label"] == "True") and record.sentence == row["sentence"]
            assert record.left_image_path.name.endswith("-img0.png") and record.right_image_path.is_file()
        rows += len(result)
    assert rows == 2 * NUM_IMAGES

    coco = read_coco_karpathy(synth_dir / "coco")
    flickr = read_flickr30k(synth_dir / "flickr30k")
    assert len(coco) == len(flickr) == NUM_IMAGES and coco.skips.total == flickr.skips.total == 0
    for result in (coco, flickr):
        splits = Counter(r.split for r in result)
        assert splits["test"] == splits["val"] == 4
        assert all(len(r.captions) == 5 for r in result)
    test_only = read_coco_karpathy(synth_dir / "coco", splits=["test"])
    assert {r.image_id for r in test_only} == {r.image_id for r in coco if r.split == "test"}


def test_pretraining_join(synth_dir):
    result = read_pretraining_images(synth_dir, coco_splits=("train", "val"))
    assert len(result) == 2 * NUM_IMAGES and result.skips.total == 0
    coco = [r for r in result if r.source == "coco"]
    instances = (
        read_coco_instances(synth_dir / "coco", "train").records
        + read_coco_instances(synth_dir / "coco", "val").records
    )
    objects = {r.image_id: r.objects for r in instances}
    assert all(r.captions and r.objects == objects[r.image_id] for r in coco)
    assert {c.name for c in result.categories} == {"circle", "square", "triangle", "diamond", "pentagon", "star"}


# The published file and folder names ---------------------------------------------------------------------
def _published_layout(synth_dir, out, rewrite_names):
    """Copy the synthetic data under the published names; `rewrite_names` also updates the annotations."""
    for split in ("train", "val"):
        for kind in ("captions", "instances"):
            content = _json(synth_dir / f"coco/annotations/{kind}_{split}.json")
            for image in content["images"]:
                source = synth_dir / "coco/images" / split / image["file_name"]
                published = f"COCO_{split}2014_{image['id']:012d}.jpg"
                (out / "coco" / f"{split}2014").mkdir(parents=True, exist_ok=True)
                shutil.copy(source, out / "coco" / f"{split}2014" / published)
                if rewrite_names:
                    image["file_name"] = published
            _write_json(out / f"coco/annotations/{kind}_{split}2014.json", content)
        (out / "vqa").mkdir(parents=True, exist_ok=True)
        for name in (f"v2_OpenEnded_mscoco_{split}_questions.json", f"v2_mscoco_{split}_annotations.json"):
            shutil.copy(synth_dir / "vqa" / name, out / "vqa" / name.replace(f"_{split}_", f"_{split}2014_"))
    karpathy = _json(synth_dir / "coco/dataset_coco.json")
    for entry in karpathy["images"]:
        entry["filepath"] = f"{entry['filepath']}2014"
        entry["filename"] = f"COCO_{entry['filepath']}_{entry['cocoid']:012d}.jpg"
    _write_json(out / "coco/karpathy/dataset_coco.json", karpathy)

    image_data = _json(synth_dir / "vg/image_data.json")
    for i, entry in enumerate(image_data):
        folder = "VG_100K" if i % 2 else "VG_100K_2"
        (out / "vg" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth_dir / "vg/images" / Path(entry["url"]).name, out / "vg" / folder)
        entry["url"] = f"https://cs.stanford.edu/people/rak248/{folder}/{entry['image_id']}.jpg"
    _write_json(out / "vg/image_data.json", image_data)
    for name in ("objects.json", "attributes.json", "region_descriptions.json"):
        shutil.copy(synth_dir / "vg" / name, out / "vg" / name)

    for split in ("train", "dev", "test1"):
        rows = [json.loads(line) for line in (synth_dir / "nlvr2" / f"{split}.json").read_text().splitlines()]
        for row in rows:
            stem = row["identifier"].rsplit("-", 1)[0]
            if split == "train":  # NLVR2's train images sit in numbered sub-folders
                row["directory"] = int(stem.split("-")[1]) % 3
                target = out / "nlvr2/images/train" / str(row["directory"])
            else:
                target = out / "nlvr2" / split
            target.mkdir(parents=True, exist_ok=True)
            for side in ("img0", "img1"):
                shutil.copy(synth_dir / "nlvr2/images" / split / f"{stem}-{side}.png", target)
        (out / "nlvr2/data").mkdir(parents=True, exist_ok=True)
        (out / "nlvr2/data" / f"{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    shutil.copytree(synth_dir / "flickr30k/images", out / "flickr30k/flickr30k-images")
    (out / "flickr30k/karpathy").mkdir(parents=True)
    shutil.copy(synth_dir / "flickr30k/dataset_flickr30k.json", out / "flickr30k/karpathy")


@pytest.mark.parametrize("rewrite_names", [True, False], ids=["by-file-name", "by-id"])
def test_published_names(synth_dir, tmp_path, rewrite_names):
    _published_layout(synth_dir, tmp_path, rewrite_names)

    def same(original, published, key):
        assert published.skips.total == 0
        assert len(published) == len(original)
        for a, b in zip(original, published):
            assert key(a) == key(b)
            assert b.image_path != a.image_path and b.image_path.read_bytes() == a.image_path.read_bytes()

    for split in ("train", "val"):
        for reader in (read_coco_captions, read_coco_instances):
            original, published = reader(synth_dir / "coco", split), reader(tmp_path / "coco", split + "2014")
            same(original, published, lambda r: (r.image_id, r.captions, r.objects))
            assert all(r.image_path.parent.name == f"{split}2014" for r in published)
        original = read_vqa(synth_dir / "vqa", synth_dir / "coco", split)
        published = read_vqa(tmp_path / "vqa", tmp_path / "coco", split)
        same(original, published, lambda r: (r.question_id, r.answers))
    same(
        read_coco_karpathy(synth_dir / "coco"),
        read_coco_karpathy(tmp_path / "coco"),
        lambda r: (r.image_id, r.split, r.captions),
    )
    same(
        read_flickr30k(synth_dir / "flickr30k"),
        read_flickr30k(tmp_path / "flickr30k"),
        lambda r: (r.image_id, r.captions),
    )
    vg = read_visual_genome(tmp_path / "vg")
    same(read_visual_genome(synth_dir / "vg"), vg, lambda r: (r.image_id, r.objects, r.captions))
    assert {r.image_path.parent.name for r in vg} == {"VG_100K", "VG_100K_2"}
    for split in ("train", "dev", "test1"):
        original, published = read_nlvr2(synth_dir / "nlvr2", split), read_nlvr2(tmp_path / "nlvr2", split)
        assert published.skips.total == 0 and len(published) == len(original)
        for a, b in zip(original, published):
            assert (a.identifier, a.label) == (b.identifier, b.label)
            assert a.left_image_path.read_bytes() == b.left_image_path.read_bytes()
            assert a.right_image_path.read_bytes() == b.right_image_path.read_bytes()


# Bad data: skipped and counted -----------------------------------------------------------------------------
def _small_coco(root):
    """Five listed images: two good, one truncated, one missing, one without captions."""
    folder = root / "images" / "train"
    for image_id in (1, 2, 3, 5):
        _jpeg(folder / f"{image_id:012d}.jpg", colour=(10 * image_id, 80, 200))
    data = (folder / "000000000003.jpg").read_bytes()
    (folder / "000000000003.jpg").write_bytes(data[: len(data) // 2])
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (1, 2, 3, 4, 5)]
    captions = [
        {"id": 1, "image_id": 1, "caption": "a good one"},
        {"id": 2, "image_id": 2, "caption": "another"},
        {"id": 3, "image_id": 3, "caption": "truncated"},
        {"id": 4, "image_id": 4, "caption": "missing file"},
        {"id": 5, "image_id": 2},  # no caption
        {"id": 6, "image_id": 99, "caption": "an image nobody lists"},
    ]
    categories = [{"id": 1, "name": "circle"}, {"id": 3, "name": "square"}]
    objects = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, -4, 6]},  # negative width
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [50, 40, 5, 5]},  # entirely outside the 40x30 image
        {"id": 4, "image_id": 2, "category_id": 1},  # no bbox
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [1, 1, 3, 3]},
        {"id": 6, "image_id": 2, "category_id": 1, "bbox": [30, 20, 20, 20]},  # clipped to the image
    ]
    _write_json(root / "annotations/captions_train.json", {"images": images, "annotations": captions})
    _write_json(
        root / "annotations/instances_train.json", {"images": images, "annotations": objects, "categories": categories}
    )


def test_malformed_coco_is_skipped_and_counted(tmp_path):
    _small_coco(tmp_path)
    result = read_coco_captions(tmp_path, "train", verify_images=True)
    assert [r.image_id for r in result] == [1, 2]
    assert result.skips.counts == {
        MALFORMED_ANNOTATION: 1,
        UNKNOWN_IMAGE: 1,
        UNREADABLE_IMAGE: 1,
        MISSING_IMAGE: 1,
        NO_ANNOTATIONS: 1,
    }
    assert result.skips.examples(MISSING_IMAGE) == ["000000000004.jpg"]

    lazy = read_coco_captions(tmp_path, "train")  # images are not decoded: the truncated one is kept ...
    assert [r.image_id for r in lazy] == [1, 2, 3] and lazy.skips[UNREADABLE_IMAGE] == 0
    with pytest.raises(UnreadableImageError) as error:  # ... and fails when the dataset decodes it
        load_rgb_image(lazy.records[2].image_path)
    assert error.value.reason == UNREADABLE_IMAGE
    assert load_rgb_image(lazy.records[0].image_path).size == (40, 30)

    instances = read_coco_instances(tmp_path, "train")
    assert instances.skips.counts == {INVALID_BOX: 2, MALFORMED_ANNOTATION: 1, UNKNOWN_CATEGORY: 1, MISSING_IMAGE: 1}
    by_id = {r.image_id: r for r in instances}
    assert [o.box for o in by_id[1].objects] == [(2.0, 3.0, 12.0, 15.0)]
    assert [o.box for o in by_id[2].objects] == [(30.0, 20.0, 40.0, 30.0)]
    assert by_id[5].objects == ()


def test_malformed_karpathy_entries_are_skipped_and_counted(tmp_path):
    flickr = tmp_path / "flickr30k"
    for image_id in (1, 2, 3, 4, 5, 6):
        _jpeg(flickr / "images" / f"{image_id}.jpg")
    truncated = flickr / "images" / "6.jpg"
    truncated.write_bytes(truncated.read_bytes()[:150])
    entries = [
        {"filename": "1.jpg", "split": "test", "imgid": 0, "sentences": [{"raw": " A red circle. "}]},
        # tokens stand in for a missing raw sentence
        {"filename": "2.jpg", "split": "test", "imgid": 1, "sentences": [{"tokens": ["a", "blue", "star"]}]},
        {"filename": "3.jpg", "split": "test", "imgid": 2, "sentences": [{"sentid": 7}]},  # neither
        {"split": "test", "imgid": 3, "sentences": [{"raw": "no file name"}]},
        {"filename": "4.jpg", "imgid": 4, "sentences": [{"raw": "no split"}]},
        "not an object",
        {"filename": "5.jpg", "split": "test", "imgid": 5, "sentences": []},  # nothing to caption
        {"filename": "9.jpg", "split": "test", "imgid": 9, "sentences": [{"raw": "not on disk"}]},
        {"filename": "6.jpg", "split": "test", "imgid": 6, "sentences": [{"raw": "a truncated image"}]},
        {"filename": "4.jpg", "split": "train", "imgid": 4, "sentences": [{"raw": "another split"}]},
    ]
    _write_json(flickr / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})

    result = read_flickr30k(flickr, splits=["test"], verify_images=True)
    assert [(r.image_id, r.captions) for r in result] == [(1, ("A red circle.",)), (2, ("a blue star",))]
    assert result.skips.counts == {MALFORMED_ANNOTATION: 4, NO_ANNOTATIONS: 1, MISSING_IMAGE: 1,
                                   UNREADABLE_IMAGE: 1}
    assert result.skips.examples(MISSING_IMAGE) == ["9.jpg"]
    # The entry of another split is neither read nor counted as a skip.
    everything = read_flickr30k(flickr, verify_images=True)
    assert sorted(r.image_id for r in everything) == [1, 2, 4]
    assert everything.skips.counts == result.skips.counts


def test_malformed_visual_genome_vqa_nlvr2(tmp_path):
    vg = tmp_path / "vg"
    for image_id in (1, 2):
        _jpeg(vg / "VG_100K" / f"{image_id}.jpg")
    _write_json(
        vg / "image_data.json",
        [{"image_id": i, "width": 40, "height": 30, "url": f"x/{i}.jpg"} for i in (1, 2, 3)] + [{"url": "no id"}],
    )
    _write_json(
        vg / "objects.json",
        [
            {
                "image_id": 1,
                "objects": [
                    {"object_id": 10, "x": 1, "y": 1, "w": 5, "h": 5, "names": ["Red  Ball "]},
                    {"object_id": 11, "x": 1, "y": 1, "w": -5, "h": 5, "names": ["ball"]},
                    {"object_id": 12, "x": 1, "y": 1, "w": 5, "h": 5},
                ],
            },
            {"image_id": 2, "objects": [{"object_id": 20, "x": 0, "y": 0, "w": 4, "h": 4, "names": ["cup"]}]},
            {"image_id": 42, "objects": []},
        ],
    )
    _write_json(
        vg / "attributes.json", [{"image_id": 1, "attributes": [{"object_id": 10, "attributes": ["Shiny", "red"]}]}]
    )
    result = read_visual_genome(vg)
    assert [r.image_id for r in result] == [1, 2]
    assert result.skips.counts == {MALFORMED_ANNOTATION: 2, INVALID_BOX: 1, UNKNOWN_IMAGE: 1, MISSING_IMAGE: 1}
    (ball,) = result.records[0].objects
    assert ball.name == "red ball" and ball.attributes == ("shiny", "red") and ball.box == (1.0, 1.0, 6.0, 6.0)

    coco, vqa = tmp_path / "coco", tmp_path / "vqa"
    _jpeg(coco / "train2014" / "COCO_train2014_000000000007.jpg")
    _write_json(
        vqa / "v2_OpenEnded_mscoco_train2014_questions.json",
        {
            "questions": [
                {"image_id": 7, "question": "Why?", "question_id": 70},
                {"image_id": 7, "question_id": 71},
                {"image_id": 8, "question": "Where?", "question_id": 80},
                {"image_id": 7, "question": "Who?", "question_id": 72},
            ]
        },
    )
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
    _write_json(
        vqa / "v2_mscoco_train2014_annotations.json",
        {
            "annotations": [
                {"question_id": 70, "image_id": 7, "multiple_choice_answer": "yes", "answers": answers},
                {"question_id": 80, "image_id": 8, "multiple_choice_answer": "no", "answers": answers},
                {"question_id": 72, "image_id": 7, "answers": answers},
            ]
        },
    )
    result = read_vqa(vqa, coco, "train")
    # 72's annotation lacks multiple_choice_answer: it is derived from the answers, not a reason to skip.
    assert [(r.question_id, r.multiple_choice_answer) for r in result] == [(70, "yes"), (72, "yes")]
    assert result.skips.counts == {MALFORMED_ANNOTATION: 1, MISSING_IMAGE: 1}

    nlvr2 = tmp_path / "nlvr2"
    for stem in ("dev-1-0", "dev-1-1"):
        for side in ("img0", "img1"):
            (nlvr2 / "dev").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (20, 20), (0, 0, 255)).save(nlvr2 / "dev" / f"{stem}-{side}.png")
    (nlvr2 / "dev" / "dev-1-1-img1.png").unlink()
    lines = [
        {"identifier": "dev-1-0-0", "sentence": "Fine.", "label": "True"},
        {"identifier": "dev-1-0-1", "label": "False"},
        {"identifier": "dev-1-0-2", "sentence": "Odd label.", "label": "maybe"},
        {"identifier": "dev-1-1-0", "sentence": "Right image missing.", "label": "False"},
        {"identifier": "dev-1-0-3", "sentence": "Hidden label."},
    ]
    (nlvr2 / "dev.json").write_text("".join(json.dumps(x) + "\n" for x in lines) + "{not json\n\n")
    result = read_nlvr2(nlvr2, "dev")
    assert [(r.identifier, r.label) for r in result] == [("dev-1-0-0", True), ("dev-1-0-3", None)]
    assert result.skips.counts == {MALFORMED_ANNOTATION: 3, MISSING_IMAGE: 1}



def _small_visual_genome(vg):
    """Two images, each with a cup (image 1's is red) and a region phrase."""
    for image_id in (1, 2):
        _jpeg(vg / "VG_100K" / f"{image_id}.jpg")
    _write_json(
        vg / "image_data.json", [{"image_id": i, "width": 40, "height": 30, "url": f"x/{i}.jpg"} for i in (1, 2)]
    )
    _write_json(
        vg / "objects.json",
        [
            {"image_id": i, "objects": [{"object_id": 10 * i, "x": 1, "y": 2, "w": 5, "h": 6, "names": ["cup"]}]}
            for i in (1, 2)
        ],
    )
    _write_json(vg / "attributes.json", [{"image_id": 1, "attributes": [{"object_id": 10, "attributes": ["red"]}]}])
    _write_json(vg / "region_descriptions.json", [{"id": i, "regions": [{"phrase": f"phrase {i}"}]} for i in (1, 2)])


@pytest.mark.parametrize(
    "file_name, corrupt",
    [
        ("image_data.json", lambda entries: entries.append(None)),
        ("image_data.json", lambda entries: entries.insert(0, "x/1.jpg")),
        ("objects.json", lambda entries: entries.append(None)),
        ("objects.json", lambda entries: entries[0]["objects"].append(None)),
        ("objects.json", lambda entries: entries[1]["objects"].insert(0, "cup")),
        ("attributes.json", lambda entries: entries[0]["attributes"].insert(0, None)),
        ("region_descriptions.json", lambda entries: entries.insert(0, None)),
    ],
    ids=["image-null", "image-str", "objects-null", "object-null", "object-str", "attributes-null", "regions-null"],
)
def test_visual_genome_records_that_are_not_json_objects(tmp_path, file_name, corrupt):
    vg = tmp_path / "vg"
    _small_visual_genome(vg)
    entries = _json(vg / file_name)
    corrupt(entries)
    _write_json(vg / file_name, entries)
    result = read_visual_genome(vg)
    assert result.skips.counts == {MALFORMED_ANNOTATION: 1}
    assert "expected a JSON object" in result.skips.examples(MALFORMED_ANNOTATION)[0]
    read = [(r.image_id, [(o.name, o.attributes, o.box) for o in r.objects], r.captions) for r in result]
    assert read == [
        (1, [("cup", ("red",), (1.0, 2.0, 6.0, 8.0))], ("phrase 1",)),
        (2, [("cup", (), (1.0, 2.0, 6.0, 8.0))], ("phrase 2",)),
    ]


def test_visual_genome_objects_read_from_attributes_json_count_each_bad_record_once(tmp_path):
    """Without objects.json the objects come from attributes.json, which is also the attribute table."""
    vg = tmp_path / "vg"
    _small_visual_genome(vg)
    (vg / "objects.json").unlink()
    entry = lambda i, obj: {"image_id": i, "attributes": [obj]}  # noqa: E731
    cup = {"object_id": 10, "x": 1, "y": 2, "w": 5, "h": 6, "names": ["cup"], "attributes": ["red"]}
    _write_json(vg / "attributes.json", [
        entry(1, cup),
        {"image_id": 2, "attributes": [None, {**cup, "object_id": 20, "attributes": "blue"}]},  # bad object; bad words
        {"image_id": 2},  # an entry without its list
    ])
    result = read_visual_genome(vg)
    assert result.skips.counts == {MALFORMED_ANNOTATION: 3}
    read = [(r.image_id, [(o.name, o.attributes) for o in r.objects]) for r in result]
    assert read == [(1, [("cup", ("red",))]), (2, [("cup", ())])]


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = {}

    def emit(self, record):
        self.messages.setdefault(record.name, []).append(record.getMessage())


def test_each_reader_logs_only_its_own_skips(tmp_path):
    _small_coco(tmp_path / "coco")
    _small_visual_genome(tmp_path / "vg")
    regions = _json(tmp_path / "vg/region_descriptions.json")
    _write_json(tmp_path / "vg/region_descriptions.json", regions + [{"id": 42, "regions": []}])
    handler, readers = _Warnings(), logging.getLogger("fastvlp.data.readers")
    readers.addHandler(handler)
    try:
        result = read_pretraining_images(tmp_path)
    finally:
        readers.removeHandler(handler)
    (captions, instances) = handler.messages["fastvlp.data.readers.coco"]
    assert "COCO captions" in captions
    assert "4 skipped: malformed_annotation=1, missing_image=1, no_annotations=1, unknown_image=1" in captions
    assert "COCO instances" in instances and "caption" not in instances
    (vg,) = handler.messages["fastvlp.data.readers.visual_genome"]
    assert "1 skipped: unknown_image=1" in vg and "malformed" not in vg
    # The caller's counter still adds up every reader (the instances' missing images are the captions').
    assert result.skips.counts == {
        MALFORMED_ANNOTATION: 2,
        UNKNOWN_IMAGE: 2,
        MISSING_IMAGE: 1,
        NO_ANNOTATIONS: 1,
        INVALID_BOX: 2,
        UNKNOWN_CATEGORY: 1,
    }
    shared = SkipCounter()
    first = read_coco_captions(tmp_path / "coco", "train", skips=shared)
    second = read_visual_genome(tmp_path / "vg", skips=shared)
    assert first.skips is second.skips is shared and shared.total == 4 + 1
    with pytest.raises(TypeError, match="skips"):
        read_visual_genome(tmp_path / "vg", skips={})


def test_pretraining_leaves_crowd_annotations_out(tmp_path):
    coco = tmp_path / "coco"
    for image_id in (1, 2):
        _jpeg(coco / "images" / "train" / f"{image_id:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (1, 2)]
    captions = [{"id": i, "image_id": i, "caption": f"picture {i}"} for i in (1, 2)]
    objects = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 20], "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [4, 4, 8, 8]},
    ]
    _write_json(coco / "annotations/captions_train.json", {"images": images, "annotations": captions})
    _write_json(
        coco / "annotations/instances_train.json",
        {"images": images, "annotations": objects, "categories": [{"id": 1, "name": "person"}]},
    )
    instances = read_coco_instances(coco, "train")
    assert [o.iscrowd for o in instances.records[0].objects] == [False, True]  # the reader keeps what is there
    result = read_pretraining_images(tmp_path)
    assert result.skips.total == 0
    assert {r.image_id: [o.object_id for o in r.objects] for r in result} == {1: [1], 2: [3]}
    assert not any(o.iscrowd for r in result for o in r.objects)

def test_file_level_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_train2014.json"):
        read_coco_captions(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="coco_dir"):
        read_coco_captions(tmp_path / "absent", "train")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/captions_val.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        read_coco_captions(tmp_path, "val")
    _write_json(tmp_path / "annotations/captions_test.json", [1, 2])
    with pytest.raises(ValueError, match="not the expected format"):
        read_coco_captions(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        read_coco_captions(tmp_path, "")
    with pytest.raises(TypeError, match="coco_dir"):
        read_coco_captions(3, "train")


def test_skip_counter():
    counter = SkipCounter()
    for k in range(7):
        counter.add(MISSING_IMAGE, f"file{k}")
    counter.add(INVALID_BOX)
    assert counter[MISSING_IMAGE] == 7 and counter[INVALID_BOX] == 1 and counter["other"] == 0 and counter.total == 8
    assert counter.examples(MISSING_IMAGE) == [f"file{k}" for k in range(5)]
    other = SkipCounter()
    other.add(INVALID_BOX, "b")
    other.add(MISSING_IMAGE, "m")
    counter.merge(other, exclude=(MISSING_IMAGE,))
    assert counter.counts == {MISSING_IMAGE: 7, INVALID_BOX: 2}
    assert counter.summary() == "9 skipped: invalid_box=2, missing_image=7"
    with pytest.raises(ValueError, match="reason"):
        counter.add("")


def test_image_index_names_ids_hints_and_links(tmp_path):
    root = tmp_path / "coco"
    _jpeg(root / "train2014" / "COCO_train2014_000000000009.jpg")
    _jpeg(root / "images" / "val" / "000000000042.jpg")
    _jpeg(root / "val2017" / "000000000042.jpg")
    _jpeg(tmp_path / "elsewhere" / "vg" / "17.jpg")
    (root / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "vg" / "loop").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "notes.txt").write_text("not an image")
    index = ImageIndex([root])
    assert len(index) == 4  # the loop is walked once, the text file is not an image
    assert index.find("COCO_train2014_000000000009.jpg") == root / "train2014/COCO_train2014_000000000009.jpg"
    assert index.find("000000000009.jpg", image_id=9) == root / "train2014/COCO_train2014_000000000009.jpg"
    assert index.find(image_id=42, hint="val2017") == root / "val2017/000000000042.jpg"
    assert index.find("https://host/VG_100K/17.jpg") == root / "linked/vg/17.jpg"
    assert index.find("absent.jpg") is None and index.find(image_id=5) is None
    assert image_id_from_name("COCO_val2014_000000000042.jpg") == 42 and image_id_from_name("dev-1-0-img0.png") is None
    with pytest.raises(TypeError, match="directories"):
        ImageIndex(root)


def test_synth_command_line(tmp_path, capsys):
    assert synth_main(["--out", str(tmp_path), "--num-images", "3", "--seed", "1", "--datasets", "coco,vqa"]) == 0
    summary = json.loads(capsys.readouterr().out)
    # A folder of one or two images has spare yes/no cards enough for a sixth question on each image.
    assert summary["coco"] == {"train": 1, "val": 2} and summary["vqa"] == {"train": 6, "val": 12}
    assert len(read_coco_karpathy(tmp_path / "coco")) == 3
