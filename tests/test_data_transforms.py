"""Transforms: sizes follow the scale rule, boxes stay on the pixels they mark, normalisation is ImageNet's."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from fastvlp.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PAPER_SHORT_SIDES,
    ImageTransform,
    ScaleConfig,
    check_scale,
    default_scale,
    eval_transform,
    resized_size,
    scale_from_record,
    scale_record,
    swap_left_right,
    train_transform,
    xyxy_to_normalised_cxcywh,
)

BACKGROUND, RECTANGLE = (230, 230, 230), (200, 20, 40)


def _image_with_rectangles(rng, width, height, count=3):
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    boxes = []
    for _ in range(count):
        w, h = rng.integers(12, width // 2), rng.integers(12, height // 2)
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        draw.rectangle([x0, y0, x0 + w - 1, y0 + h - 1], fill=RECTANGLE)
        boxes.append((x0, y0, x0 + w, y0 + h))
    return image, torch.tensor(boxes, dtype=torch.float32)


def _denormalised(image):
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    return (image.double() * std + mean) * 255


def test_resized_size_rule():
    assert resized_size(480, 640, 800, 1333) == (800, 1067)
    assert resized_size(300, 1200, 800, 1333) == (333, 1333)  # the long side caps the scale
    assert resized_size(1000, 1000, 512, None) == (512, 512)
    rng = np.random.default_rng()
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(50, 3000, size=2))
        short = int(rng.choice(PAPER_SHORT_SIDES))
        nh, nw = resized_size(h, w, short, 1333)
        assert max(nh, nw) <= 1333
        assert min(nh, nw) == short or max(nh, nw) == 1333
        assert abs(nh / nw - h / w) <= 1.0 / min(nh, nw) * (h / w + 1)


@pytest.mark.parametrize("flip", [False, True])
def test_boxes_stay_on_their_rectangles(flip):
    rng = np.random.default_rng()
    torch.manual_seed(int(rng.integers(1 << 30)))
    transform = ImageTransform((128, 160, 192), max_size=256, horizontal_flip=flip)
    flipped_seen = set()
    for _ in range(6):
        width, height = (int(v) for v in rng.integers(90, 300, size=2))
        image, boxes = _image_with_rectangles(rng, width, height)
        out = transform(image, boxes)
        flipped_seen.add(out.flipped)
        new_h, new_w = out.size
        assert out.image.shape == (3, new_h, new_w) and out.original_size == (height, width)
        assert min(new_h, new_w) in (128, 160, 192) or max(new_h, new_w) == 256
        pixels = _denormalised(out.image)
        scale = torch.tensor([new_w, new_h, new_w, new_h], dtype=torch.float64)
        for cx, cy, w, h in (out.boxes.double() * scale).tolist():
            x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
            inside = pixels[:, int(np.ceil(y0)) + 1 : int(y1) - 1, int(np.ceil(x0)) + 1 : int(x1) - 1]
            assert inside.numel() > 0
            torch.testing.assert_close(
                inside.mean(dim=(1, 2)), torch.tensor(RECTANGLE, dtype=torch.float64), atol=3, rtol=0
            )
        # Expected boxes, computed in float64 from the input boxes and the output size.
        sx, sy = new_w / width, new_h / height
        expected = boxes.double() * torch.tensor([sx, sy, sx, sy], dtype=torch.float64)
        if out.flipped:
            expected = torch.stack([new_w - expected[:, 2], expected[:, 1], new_w - expected[:, 0], expected[:, 3]], 1)
        cxcywh = (
            torch.stack(
                [
                    (expected[:, 0] + expected[:, 2]) / 2,
                    (expected[:, 1] + expected[:, 3]) / 2,
                    expected[:, 2] - expected[:, 0],
                    expected[:, 3] - expected[:, 1],
                ],
                1,
            )
            / scale
        )
        torch.testing.assert_close(out.boxes.double(), cxcywh, atol=1e-6, rtol=0)
    if not flip:
        assert flipped_seen == {False}


def test_flip_happens_and_is_reported():
    transform = ImageTransform((64,), max_size=None, horizontal_flip=True)
    image, boxes = _image_with_rectangles(np.random.default_rng(), 80, 64, count=1)
    results = [transform(image, boxes, generator=torch.Generator().manual_seed(seed)).flipped for seed in range(20)]
    assert any(results) and not all(results)


def test_normalisation_matches_imagenet_statistics():
    rng = np.random.default_rng()
    array = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    out = eval_transform(ScaleConfig(short_sides=(40,), max_size=100, eval_short_side=40))(Image.fromarray(array))
    expected = (
        torch.from_numpy(array).permute(2, 0, 1).double() / 255
        - torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(3, 1, 1)
    ) / torch.tensor(IMAGENET_STD, dtype=torch.float64).view(3, 1, 1)
    assert out.size == (40, 50) and out.boxes.shape == (0, 4)
    torch.testing.assert_close(out.image.double(), expected, atol=1e-5, rtol=0)


def test_presets_and_eval():
    tiny = train_transform("tiny")
    assert tiny.short_sides == (96, 112, 128) and tiny.max_size == 160 and not tiny.horizontal_flip
    paper = train_transform()
    assert paper.short_sides == tuple(range(480, 801, 32)) and paper.max_size == 1333
    evaluation = eval_transform("tiny")
    sizes = {evaluation(Image.new("RGB", (300, 200))).size for _ in range(5)}
    assert sizes == {(107, 160)}  # short side 112 would make the long side 168 > 160
    with pytest.raises(ValueError, match="config"):
        train_transform("huge")
    with pytest.raises(ValueError, match="max_size"):
        ScaleConfig(short_sides=(800,), max_size=700)


def test_boxes_outside_are_clipped_and_inputs_validated():
    transform = ImageTransform((100,), max_size=None)
    out = transform(Image.new("RGB", (100, 100)), torch.tensor([[-10.0, 50.0, 40.0, 130.0]]))
    torch.testing.assert_close(out.boxes, torch.tensor([[0.2, 0.75, 0.4, 0.5]]))
    with pytest.raises(ValueError, match="boxes"):
        transform(Image.new("RGB", (10, 10)), torch.zeros(3))
    with pytest.raises(TypeError, match="image"):
        transform(np.zeros((10, 10, 3)))
    with pytest.raises(ValueError, match="short_sides"):
        ImageTransform((), 100)
    # An inverted or NaN box would otherwise reach the matcher as a negative-width target.
    for bad in ([[5.0, 5.0, 2.0, 8.0]], [[1.0, float("nan"), 4.0, 4.0]]):
        with pytest.raises(ValueError, match="boxes: expected finite"):
            transform(Image.new("RGB", (10, 10)), torch.tensor(bad))
    meta = xyxy_to_normalised_cxcywh(torch.ones(2, 4, device="meta"), 10, 20)
    assert meta.device.type == "meta"  # the divisor follows the boxes' device


def test_swap_left_right():
    assert swap_left_right("Left of the right one, leftover.") == "Right of the left one, leftover."
    assert swap_left_right("no sides") == "no sides"
    # Sides: after a determiner, possessive, preposition or verb of direction, before a part, in pairs.
    sides = {
        "A brown triangle to the left of a yellow triangle.": "A brown triangle to the right of a yellow triangle.",
        "Is the star right of the circle?": "Is the star left of the circle?",
        "turn left at the corner": "turn right at the corner",
        "on his left hand": "on his right hand",
        "The dog is on the RIGHT.": "The dog is on the LEFT.",
        "left and right": "right and left",
        "to the right behind the car": "to the left behind the car",
        "the leftmost shape": "the rightmost shape",
    }
    # Not sides: the verb, the remainder, intensifiers, "all right", angles; a flip changes nothing there.
    unchanged = ["A pizza with one slice left.", "The man left the room.", "A cat sitting right next to a dog.",
                 "A clock right side up", "a right angle", "All right then", "There is nothing left.",
                 "right behind the car"]
    assert {text: swap_left_right(text) for text in sides} == sides
    assert [swap_left_right(text) for text in unchanged] == unchanged
    assert swap_left_right("the leftmost cup, moving Rightwards, a lefthand glove") == \
        "the rightmost cup, moving Leftwards, a righthand glove"
    assert swap_left_right("LEFT and Left-hand, bright, copyright, rightly") == \
        "RIGHT and Right-hand, bright, copyright, rightly"


def test_a_scale_record_survives_json_and_a_bad_one_names_its_file():
    custom = ScaleConfig(short_sides=(64, 72), max_size=96, eval_short_side=64)
    for scale in ("paper", "tiny", custom):
        record = scale_record(scale)
        assert json.loads(json.dumps(record)) == record
        assert scale_from_record(json.loads(json.dumps(record)), "preset.json") == scale
    with pytest.raises(ValueError, match=r"^preset.json: 'scale' must be one of \['paper', 'tiny'\]"):
        scale_from_record({"short_sides": [64]}, "preset.json")
    with pytest.raises(ValueError, match=r"^task.json: 'scale' holds an invalid ScaleConfig \(short_sides: "):
        scale_from_record({"short_sides": "64", "max_size": 96, "eval_short_side": 64}, "task.json")
    with pytest.raises(ValueError, match=r"^--scale: expected a ScaleConfig or one of \['paper', 'tiny'\], got 7"):
        check_scale(7, "--scale")
    assert default_scale("tiny") == "tiny" and default_scale("e2e-vlp-6-r50") == default_scale(None) == "paper"
