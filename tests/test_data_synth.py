"""The synthetic data set: layout, formats, determinism, balance, and text that follows from the pixels."""

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastvlp.data.synth import main as synth_main
from fastvlp.data.synth import write_synthetic_dataset
from fastvlp.data.synth.palette import BACKGROUNDS, COLOURS, SHAPES, NUMBER_WORDS
from fastvlp.data.synth.scene import is_left_of, sample_scene
from fastvlp.data.synth.questions import question_kind
from fastvlp.data.synth.splits import held_out_size
from fastvlp.data.synth.statements import make_statement

NUM_IMAGES = 24


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(out, num_images=NUM_IMAGES, seed=int(np.random.randint(0, 10_000)))
    return out


def _json(path: Path):
    return json.loads(path.read_text())


def _nearest_colour(pixel) -> str:
    return min(COLOURS, key=lambda name: sum((float(a) - b) ** 2 for a, b in zip(pixel, COLOURS[name])))


def _colour_at_box(image: np.ndarray, box_xyxy) -> str:
    cx, cy = int((box_xyxy[0] + box_xyxy[2]) / 2), int((box_xyxy[1] + box_xyxy[3]) / 2)
    patch = image[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3)
    return _nearest_colour(np.median(patch, axis=0))


def test_layout_files_exist_and_parse(synth_dir):
    expected_json = [
        "coco/annotations/captions_train.json",
        "coco/annotations/captions_val.json",
        "coco/annotations/instances_train.json",
        "coco/annotations/instances_val.json",
        "coco/dataset_coco.json",
        "vg/image_data.json",
        "vg/objects.json",
        "vg/attributes.json",
        "vg/region_descriptions.json",
        "vqa/v2_OpenEnded_mscoco_train_questions.json",
        "vqa/v2_OpenEnded_mscoco_val_questions.json",
        "vqa/v2_mscoco_train_annotations.json",
        "vqa/v2_mscoco_val_annotations.json",
        "flickr30k/dataset_flickr30k.json",
    ]
    for name in expected_json:
        assert isinstance(_json(synth_dir / name), (dict, list)), name
    for name in ("objects_vocab.txt", "attributes_vocab.txt"):
        lines = (synth_dir / "vg" / name).read_text().splitlines()
        assert lines and all(line.strip() for line in lines)
    for split in ("train", "dev", "test1"):
        rows = [json.loads(line) for line in (synth_dir / "nlvr2" / f"{split}.json").read_text().splitlines()]
        assert rows
        for row in rows:
            assert {"identifier", "sentence", "label", "left_url", "right_url"} <= set(row)
            assert row["label"] in ("True", "False")
            stem = row["identifier"].rsplit("-", 1)[0]
            for side in ("img0", "img1"):
                with Image.open(synth_dir / "nlvr2" / "images" / split / f"{stem}-{side}.png") as image:
                    assert image.format == "PNG"

    coco_images = sorted((synth_dir / "coco" / "images").rglob("*"))
    coco_images = [p for p in coco_images if p.is_file()]
    assert len(coco_images) == NUM_IMAGES
    for folder in ("coco/images", "vg/images", "flickr30k/images"):
        files = [p for p in (synth_dir / folder).rglob("*") if p.is_file()]
        assert len(files) == NUM_IMAGES
        sizes = set()
        for path in files:
            with Image.open(path) as image:
                assert image.format == "JPEG"
                image.load()
                sizes.add(image.size)
                assert 160 <= max(image.size) <= 256
        assert len(sizes) > 1  # varying sizes and aspect ratios, so batches need padding


def test_coco_formats(synth_dir):
    for split in ("train", "val"):
        captions = _json(synth_dir / f"coco/annotations/captions_{split}.json")
        instances = _json(synth_dir / f"coco/annotations/instances_{split}.json")
        ids = {image["id"] for image in captions["images"]}
        assert ids == {image["id"] for image in instances["images"]}
        per_image = Counter(a["image_id"] for a in captions["annotations"])
        assert set(per_image) == ids and set(per_image.values()) == {5}
        category_ids = {c["id"] for c in instances["categories"]}
        assert {c["name"] for c in instances["categories"]} == set(SHAPES)
        for a in instances["annotations"]:
            assert a["category_id"] in category_ids and a["image_id"] in ids and a["iscrowd"] == 0
            x, y, w, h = a["bbox"]
            assert w > 0 and h > 0 and 0 < a["area"] <= (w + 0.02) * (h + 0.02)  # the box is rounded to 0.01
            image = next(i for i in instances["images"] if i["id"] == a["image_id"])
            assert x >= 0 and y >= 0 and x + w <= image["width"] and y + h <= image["height"]
            assert (synth_dir / "coco/images" / split / image["file_name"]).is_file()
    karpathy = _json(synth_dir / "coco/dataset_coco.json")
    splits = Counter(entry["split"] for entry in karpathy["images"])
    assert splits["test"] == splits["val"] == held_out_size(NUM_IMAGES) and splits["restval"] >= 1
    for entry in karpathy["images"]:
        assert (synth_dir / "coco/images" / entry["filepath"] / entry["filename"]).is_file()
        assert (entry["filepath"] == "train") == (entry["split"] == "train")
        assert len(entry["sentences"]) == 5 and entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for sentence in entry["sentences"]:
            assert sentence["tokens"] == re.findall(r"[a-z0-9]+", sentence["raw"].lower())


def test_split_sizes():
    assert held_out_size(1000) == 100 and held_out_size(500) == 100
    assert held_out_size(499) == 99 and held_out_size(24) == 4 and held_out_size(2) == 0


def test_determinism(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    write_synthetic_dataset(tmp_path / "a", num_images=5, seed=3)
    write_synthetic_dataset(tmp_path / "b", num_images=5, seed=3)
    write_synthetic_dataset(tmp_path / "c", num_images=5, seed=4)
    first, second, other = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert first.keys() == second.keys() and len(first) > 30
    assert all(first[name] == second[name] for name in first)
    assert first[Path("coco/dataset_coco.json")] != other[Path("coco/dataset_coco.json")]


def _instances_with_colours(synth_dir):
    """(image entry, [(category name, colour read from the pixels, box xyxy)]) for every COCO image."""
    out = []
    for split in ("train", "val"):
        data = _json(synth_dir / f"coco/annotations/instances_{split}.json")
        names = {c["id"]: c["name"] for c in data["categories"]}
        objects = defaultdict(list)
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            objects[a["image_id"]].append((names[a["category_id"]], (x, y, x + w, y + h)))
        for image in data["images"]:
            pixels = np.asarray(Image.open(synth_dir / "coco/images" / split / image["file_name"]).convert("RGB"))
            out.append((image, [(name, _colour_at_box(pixels, box), box) for name, box in objects[image["id"]]]))
    return out


def _background_tint(path: Path) -> str:
    """The named tint nearest to the median of all the image's pixels: the plain background is most of every
    image. (Not of its outermost ring: a striped background can put a stripe on the whole top and bottom rows,
    which are longer than the side columns, and the ring's median is then the stripe's colour.)"""
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    median = np.median(pixels.reshape(-1, 3), axis=0)
    return min(BACKGROUNDS, key=lambda name: float(((median - np.array(BACKGROUNDS[name])) ** 2).sum()))


def test_captions_follow_from_pixels(synth_dir):
    captions = defaultdict(list)
    for split in ("train", "val"):
        for a in _json(synth_dir / f"coco/annotations/captions_{split}.json")["annotations"]:
            captions[a["image_id"]].append(a["caption"].lower())
    forms = Counter()
    for image, objects in _instances_with_colours(synth_dir):
        colours = {colour for _, colour, _ in objects}
        shapes = Counter(name for name, _, _ in objects)
        path = next(synth_dir / "coco/images" / split / image["file_name"] for split in ("train", "val")
                    if (synth_dir / "coco/images" / split / image["file_name"]).is_file())
        tint = _background_tint(path)
        for caption in captions[image["id"]]:
            words = set(re.findall(r"[a-z]+", caption))
            assert words & set(COLOURS) <= colours, (caption, colours)
            # Every caption names the background, and names it right.
            assert words & set(BACKGROUNDS) == {tint}, (caption, tint)
            named_shapes = {s for s in SHAPES if s in words or s + "s" in words}
            assert named_shapes <= set(shapes), (caption, shapes)
            total = re.match(r"(\w+) shapes on (\w+):", caption)
            if total:
                forms["total"] += 1
                assert NUMBER_WORDS.index(total.group(1)) == len(objects) and total.group(2) == tint
            count = re.match(r"there (?:is|are) (\w+) (\w+?)s? on the (\w+) background", caption)
            if count:
                forms["count"] += 1
                expected = shapes[count.group(2)]
                assert count.group(1) in (NUMBER_WORDS[expected], "a", "an") and (expected == 1) == (
                    count.group(1) in ("a", "an")
                )
    # The checks above ran on both forms.
    assert forms["total"] and forms["count"], forms


def test_background_tints_are_far_from_every_shape_colour_and_from_each_other():
    tints = list(BACKGROUNDS.values())
    for tint in tints:
        assert min(sum((a - b) ** 2 for a, b in zip(tint, colour)) ** 0.5 for colour in COLOURS.values()) > 60
    assert min(sum((a - b) ** 2 for a, b in zip(s, t)) ** 0.5 for i, s in enumerate(tints) for t in tints[i + 1:]) > 30
    assert not set(BACKGROUNDS) & set(COLOURS)


def test_vqa_answers_follow_from_pixels(synth_dir):
    objects_by_image = {image["id"]: objects for image, objects in _instances_with_colours(synth_dir)}
    tints = {image["id"]: _background_tint(synth_dir / "coco/images" / split / image["file_name"])
             for split in ("train", "val")
             for image in _json(synth_dir / f"coco/annotations/instances_{split}.json")["images"]}
    for split in ("train", "val"):
        questions = {
            q["question_id"]: q
            for q in _json(synth_dir / f"vqa/v2_OpenEnded_mscoco_{split}_questions.json")["questions"]
        }
        annotations = _json(synth_dir / f"vqa/v2_mscoco_{split}_annotations.json")["annotations"]
        assert len(annotations) == len(questions)
        per_image = Counter(q["image_id"] for q in questions.values())
        assert set(per_image.values()) <= {5, 6}
        assert sum(per_image.values()) == 5 * len(per_image) + (-len(per_image)) % 4
        for a in annotations:
            q = questions[a["question_id"]]
            assert q["image_id"] == a["image_id"] and len(a["answers"]) == 10
            assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
            assert Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0] == a["multiple_choice_answer"]
            objects = objects_by_image[a["image_id"]]
            answer = a["multiple_choice_answer"]
            colour = re.match(r"What color is the (\w+)\?", q["question"])
            many = re.match(r"How many (\w+)s ", q["question"])
            exists = re.match(r"Is there an? (\w+) (\w+)\?", q["question"])
            kind = question_kind(q["question"])
            assert (kind == "background colour") == (colour is not None and colour.group(1) == "background")
            assert (kind == "count") == bool(many) and (kind == "existence") == bool(exists)
            if colour and colour.group(1) == "background":
                assert answer == tints[a["image_id"]] and a["answer_type"] == "other"
            elif colour:
                (match,) = [c for name, c, _ in objects if name == colour.group(1)]
                assert answer == match and a["answer_type"] == "other"
            elif many:
                assert int(answer) == sum(name == many.group(1) for name, _, _ in objects)
            elif exists:
                present = any((c, name) == exists.groups() for name, c, _ in objects)
                assert answer == ("yes" if present else "no")
            else:
                relation = re.match(r"Is the (\w+) (to the left of|above) the (\w+)\?", q["question"])
                (first,) = [box for name, _, box in objects if name == relation.group(1)]
                (second,) = [box for name, _, box in objects if name == relation.group(3)]
                holds = first[2] < second[0] if relation.group(2) == "to the left of" else first[3] < second[1]
                assert answer == ("yes" if holds else "no")


def test_question_kind_rejects_what_the_grammar_does_not_ask():
    with pytest.raises(ValueError, match="question"):
        question_kind("Why is the sky blue?")
    with pytest.raises(TypeError, match="question"):
        question_kind(None)


def test_vqa_answer_balance(tmp_path):
    write_synthetic_dataset(tmp_path, num_images=200, seed=int(np.random.randint(0, 10_000)), datasets=("coco", "vqa"))
    everything = []
    for split in ("train", "val"):
        annotations = _json(tmp_path / f"vqa/v2_mscoco_{split}_annotations.json")["annotations"]
        images = {a["image_id"] for a in annotations}
        # Five questions an image; the yes/no deck is dealt out whole, so a few images get a sixth.
        assert len(annotations) == 5 * len(images) + (-len(images)) % 4
        assert set(Counter(a["image_id"] for a in annotations).values()) <= {5, 6}
        # Every image's background is asked about once (the tints are the only answers no shape gives).
        tints = Counter(a["image_id"] for a in annotations if a["multiple_choice_answer"] in BACKGROUNDS)
        assert set(tints) == images and set(tints.values()) == {1}
        by_type = defaultdict(Counter)
        for a in annotations:
            by_type[a["question_type"]][a["multiple_choice_answer"]] += 1
        assert set(by_type) == {"what color is the", "how many", "is there a", "is the"}
        for question_type, counts in by_type.items():
            if question_type in ("is there a", "is the"):
                assert counts["yes"] == counts["no"] and set(counts) == {"yes", "no"}
            assert counts.most_common(1)[0][1] <= 0.5 * sum(counts.values()), (split, question_type, counts)
        everything += annotations
    answers = Counter(a["multiple_choice_answer"] for a in everything)
    assert answers.most_common(1)[0][1] <= 0.2 * len(everything)
    # A little annotator noise, but never enough to change the majority answer.
    disagreeing = sum(any(x["answer"] != a["multiple_choice_answer"] for x in a["answers"]) for a in everything)
    assert 0.2 * len(everything) < disagreeing < 0.9 * len(everything)


def test_plan_questions_balances_each_group_and_never_repeats_a_kind():
    from fastvlp.data.synth.questions import plan_questions

    rng = np.random.default_rng(int(np.random.randint(0, 10_000)))
    groups = [str(g) for g in rng.choice(["a", "b", "c"], size=97)]
    plans = plan_questions(rng, groups)
    assert len(plans) == len(groups)
    for group in set(groups):
        mine = [p for p, g in zip(plans, groups) if g == group]
        cards = Counter(card for p in mine for card in p.yes_no)
        assert len(set(cards.values())) == 1 and len(cards) == 4, cards
        counted = Counter(p.scene.counted for p in mine)
        assert max(counted.values()) - min(counted.values()) <= 1
        colours = Counter(c for p in mine for c in (p.scene.named_colour, p.scene.partner_colour))
        assert len(colours) == len(COLOURS) and max(colours.values()) - min(colours.values()) <= 1
    assert all(len({kind for kind, _ in p.yes_no}) == len(p.yes_no) for p in plans)
    with pytest.raises(TypeError, match="groups"):
        plan_questions(rng, "train")
    from fastvlp.data.synth.scene import ScenePlan

    with pytest.raises(ValueError, match="partner_colour"):
        ScenePlan(next(iter(COLOURS)), 1, partner_colour="mauve")
    scene = sample_scene(rng, ScenePlan(next(iter(COLOURS)), 2, partner_colour=list(COLOURS)[-1]))
    assert scene.only(scene.partner_shape).colour == list(COLOURS)[-1]


def test_visual_genome_attributes_match_pixels(synth_dir):
    objects = {e["image_id"]: e["attributes"] for e in _json(synth_dir / "vg/attributes.json")}
    with_attributes = 0
    for entry in _json(synth_dir / "vg/image_data.json"):
        pixels = np.asarray(Image.open(synth_dir / "vg/images" / Path(entry["url"]).name).convert("RGB"))
        assert pixels.shape[:2] == (entry["height"], entry["width"])
        for obj in objects[entry["image_id"]]:
            assert obj["names"][0] in SHAPES
            colour = _colour_at_box(pixels, (obj["x"], obj["y"], obj["x"] + obj["w"], obj["y"] + obj["h"]))
            if "attributes" in obj:
                with_attributes += 1
                assert [a for a in obj["attributes"] if a in COLOURS] == [colour]
    assert with_attributes > 0


def test_nlvr2_labels_are_balanced(synth_dir):
    for split in ("train", "dev", "test1"):
        rows = [json.loads(line) for line in (synth_dir / "nlvr2" / f"{split}.json").read_text().splitlines()]
        labels = Counter(row["label"] for row in rows)
        assert abs(labels["True"] - labels["False"]) <= 1
        for row in rows:
            parts = row["identifier"].split("-")
            assert parts[0] == split and len(parts) == 4 and int(parts[2]) < 4 and int(parts[3]) < 2


def test_nlvr2_statements_are_true_to_their_label():
    rng = np.random.default_rng(int(np.random.randint(0, 10_000)))
    checked = 0
    for _ in range(60):
        left, right = sample_scene(rng), sample_scene(rng)
        label = bool(rng.random() < 0.5)
        sentence = make_statement(rng, left, right, label)
        exact = re.match(r"The (left|right) image contains exactly (\w+) (\w+?)s?\.$", sentence)
        both = re.match(r"Both images contain an? (\w+) (\w+)\.$", sentence)
        relation = re.match(
            r"In the (left|right) image, an? (\w+) (\w+) is to the left of an? (\w+) (\w+)\.$", sentence
        )
        if exact:
            scene = left if exact.group(1) == "left" else right
            truth = NUMBER_WORDS.index(exact.group(2)) == sum(o.shape == exact.group(3) for o in scene.objects)
        elif both:
            truth = all(any((o.colour, o.shape) == both.groups() for o in s.objects) for s in (left, right))
        elif relation:
            scene = left if relation.group(1) == "left" else right
            truth = any(
                is_left_of(a, b)
                for a in scene.objects
                for b in scene.objects
                if (a.colour, a.shape) == relation.group(2, 3) and (b.colour, b.shape) == relation.group(4, 5)
            )
        else:
            continue
        checked += 1
        assert truth == label, sentence
    assert checked >= 10


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        write_synthetic_dataset(tmp_path, num_images=0)
    with pytest.raises(ValueError, match="datasets"):
        write_synthetic_dataset(tmp_path, num_images=2, datasets=("vqa",))
    with pytest.raises(ValueError, match="datasets"):
        write_synthetic_dataset(tmp_path, num_images=2, datasets=("imagenet",))
    with pytest.raises(TypeError, match="out_dir"):
        write_synthetic_dataset(3, num_images=2)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--num-images", "0"),
        ("--num-images", "many"),
        ("--seed", "-1"),
        ("--datasets", "coco,foo"),
        ("--datasets", "vqa"),
    ],
)
def test_command_line_rejects_invalid_values_with_a_usage_error(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stop:
        synth_main(["--out", str(tmp_path / "out"), "--num-images", "2", option, value])
    assert stop.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_size_words_follow_the_drawn_extent():
    """Every size word is read off the shape's larger extent in the image, so the three words cover
    separate extent ranges whatever the shape (a pentagon or star spans less than its nominal side)."""
    from fastvlp.data.synth.scene import sample_scene

    rng = np.random.default_rng(11)
    extents = defaultdict(list)
    for _ in range(300):
        scene = sample_scene(rng)
        short = min(scene.width, scene.height)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.box
            extents[obj.size].append(max(x1 - x0, y1 - y0) / short)
    assert set(extents) == {"small", "medium", "large"}
    assert max(extents["small"]) < min(extents["medium"]) and max(extents["medium"]) < min(extents["large"])
