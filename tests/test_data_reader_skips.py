"""Each record a reader cannot use is counted exactly once, under the reason that lost it."""

import json

from PIL import Image

from fastvlp.data.readers import read_coco_captions, read_coco_instances, read_flickr30k, read_visual_genome, read_vqa
from fastvlp.data.skips import MALFORMED_ANNOTATION, NO_ANNOTATIONS, UNKNOWN_IMAGE


def _write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _jpeg(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path, "JPEG")


def _answers(*words):
    return [{"answer": w, "answer_confidence": "yes", "answer_id": k} for k, w in enumerate(words, 1)]


def _vqa(tmp_path):
    coco, vqa = tmp_path / "coco", tmp_path / "vqa"
    _jpeg(coco / "train2014" / "COCO_train2014_000000000007.jpg")
    questions = [{"image_id": 7, "question": f"Question {q}?", "question_id": q} for q in (1, 2, 3, 4, 5, 6)]
    _write_json(vqa / "v2_OpenEnded_mscoco_train_questions.json", {"questions": questions})
    annotations = [
        # No multiple_choice_answer; "two" and "2" tie at four answers each and "two" is listed first.
        {"question_id": 1, "answers": _answers("two", "2", "2", "two", "three", "two", "2", "three", "2", "two")},
        {"question_id": 2, "multiple_choice_answer": "yes", "answers": [{"answer_id": 1}]},  # an answer without text
        {"question_id": 3, "multiple_choice_answer": 5, "answers": _answers("5")},  # not a str
        # question 4 has no annotation at all
        {"question_id": 5, "multiple_choice_answer": None, "answers": _answers("no", "yes", "yes")},
        {"multiple_choice_answer": "red", "answers": _answers("red")},  # cannot be tied to its question (6)
    ]
    _write_json(vqa / "v2_mscoco_train_annotations.json", {"annotations": annotations})
    return vqa, coco


def test_vqa_counts_a_question_lost_to_its_malformed_annotation_once(tmp_path):
    vqa, coco = _vqa(tmp_path)
    result = read_vqa(vqa, coco, "train")
    assert [(r.question_id, r.multiple_choice_answer) for r in result] == [(1, "two"), (5, "yes")]
    assert result.records[0].answers[:3] == ("two", "2", "2")
    # Questions 2 and 3 are counted as their malformed annotations only; 4 and 6 have no annotation to link.
    assert result.skips.counts == {MALFORMED_ANNOTATION: 3, NO_ANNOTATIONS: 2}
    assert result.skips.examples(NO_ANNOTATIONS) == ["question 4", "question 6"]

    # Without required answers the questions stay (unanswered); only the bad annotations are lost.
    lenient = read_vqa(vqa, coco, "train", require_answers=False)
    assert [(r.question_id, r.answers == ()) for r in lenient] == [(q, q not in (1, 5)) for q in (1, 2, 3, 4, 5, 6)]
    assert lenient.skips.counts == {MALFORMED_ANNOTATION: 3}


def _coco(root):
    """Image 1 is good, 2's entry lacks its file name, 3's captions are all malformed, 4 has none."""
    for image_id in (1, 3, 4):
        _jpeg(root / "images" / "train" / f"{image_id:012d}.jpg")
    images = [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40, "height": 30} for i in (1, 3, 4)]
    images.insert(1, {"id": 2, "width": 40, "height": 30})
    captions = [{"image_id": 1, "caption": "a good one"}, {"image_id": 1, "caption": "another"}]
    captions += [{"image_id": 2, "caption": f"caption {k}"} for k in range(5)]
    captions += [{"image_id": 3, "caption": "  "}, {"image_id": 3}]
    captions += [{"image_id": 99, "caption": "an image nobody lists"}]
    objects = [{"id": k, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]} for k in range(3)]
    objects += [
        {"id": 10, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 11, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    _write_json(root / "annotations/captions_train.json", {"images": images, "annotations": captions})
    categories = [{"id": 1, "name": "circle"}]
    _write_json(root / "annotations/instances_train.json",
                {"images": images, "annotations": objects, "categories": categories})


def test_coco_counts_a_malformed_image_once_not_once_per_caption_or_object(tmp_path):
    _coco(tmp_path)
    captions = read_coco_captions(tmp_path, "train")
    assert [(r.image_id, r.captions) for r in captions] == [(1, ("a good one", "another"))]
    # Image 2: its entry (its five captions go with it). Image 3: its two captions. Image 4: no captions.
    assert captions.skips.counts == {MALFORMED_ANNOTATION: 3, UNKNOWN_IMAGE: 1, NO_ANNOTATIONS: 1}
    assert captions.skips.examples(NO_ANNOTATIONS) == ["000000000004.jpg"]
    assert captions.skips.examples(UNKNOWN_IMAGE) == ["99"]

    instances = read_coco_instances(tmp_path, "train")
    assert [(r.image_id, len(r.objects)) for r in instances] == [(1, 1), (3, 0), (4, 0)]
    assert instances.skips.counts == {MALFORMED_ANNOTATION: 1, UNKNOWN_IMAGE: 1}


def test_karpathy_counts_malformed_entries_of_the_wanted_splits_only(tmp_path):
    flickr = tmp_path / "flickr30k"
    for image_id in (1, 2):
        _jpeg(flickr / "images" / f"{image_id}.jpg")
    entries = [
        {"filename": "1.jpg", "split": "test", "imgid": 1, "sentences": [{"raw": "A red circle."}]},
        {"filename": "2.jpg", "split": "train", "imgid": 2, "sentences": [{"raw": "A blue star."}]},
        {"split": "train", "imgid": 3, "sentences": [{"raw": "no file name, another split"}]},
        {"filename": "4.jpg", "split": "train", "imgid": 4, "sentences": []},  # no sentences, another split
        {"split": "test", "imgid": 5, "sentences": [{"raw": "no file name"}]},
        {"filename": "6.jpg", "imgid": 6, "sentences": [{"raw": "no split"}]},
        {"filename": "7.jpg", "split": 3, "imgid": 7, "sentences": [{"raw": "a split that is not a str"}]},
        "not an object",
    ]
    _write_json(flickr / "dataset_flickr30k.json", {"images": entries, "dataset": "flickr30k"})

    test = read_flickr30k(flickr, splits=["test"])
    assert [r.image_id for r in test] == [1]
    # Entries 5-8: one asked for, three whose split cannot be read; the train entries are not looked at.
    assert test.skips.counts == {MALFORMED_ANNOTATION: 4}
    everything = read_flickr30k(flickr)
    assert [r.image_id for r in everything] == [1, 2]
    assert everything.skips.counts == {MALFORMED_ANNOTATION: 5, NO_ANNOTATIONS: 1}


def test_visual_genome_skips_a_bad_region_or_name_alone(tmp_path):
    vg = tmp_path / "vg"
    for image_id in (1, 2):
        _jpeg(vg / "VG_100K" / f"{image_id}.jpg")
    images = [{"image_id": i, "width": 40, "height": 30, "url": f"x/{i}.jpg"} for i in (1, 2)]
    _write_json(vg / "image_data.json", images)
    box = {"x": 1, "y": 2, "w": 5, "h": 6}
    _write_json(vg / "objects.json", [
        {"image_id": 1, "objects": [
            {"object_id": 10, **box, "names": ["", "Dog "]},  # the first non-blank name
            {"object_id": 11, **box, "names": [" ", None], "name": "Cat"},  # 1.0's single name
            {"object_id": 12, **box, "names": []},
            {"object_id": 13, **box, "names": ["", "  "], "name": ""},
        ]},
        {"image_id": 2, "objects": [{"object_id": 20, **box, "names": ["cup"]}]},
    ])
    _write_json(vg / "region_descriptions.json", [
        {"id": 1, "regions": [
            {"phrase": "a dog"}, {"phrase": None}, {"phrase": "  "}, "a bare string", {"phrase": " a cat "}
        ]},
        {"id": 2, "regions": [{"phrase": "a cup"}]},
        {"id": 42, "regions": [{"phrase": None}]},  # an unlisted image: counted once, as such
    ])
    result = read_visual_genome(vg)
    read = [(r.image_id, [(o.object_id, o.name) for o in r.objects], r.captions) for r in result]
    assert read == [(1, [(10, "dog"), (11, "cat")], ("a dog", "a cat")), (2, [(20, "cup")], ("a cup",))]
    # Objects 12 and 13, and image 1's three bad regions.
    assert result.skips.counts == {MALFORMED_ANNOTATION: 5, UNKNOWN_IMAGE: 1}
    assert sum("no non-blank name" in e for e in result.skips.examples(MALFORMED_ANNOTATION)) == 2
