import pytest
import torch

from fastvlp.data.synth.palette import BACKGROUNDS, COLOURS, SHAPES
from fastvlp.eval.itm_ceiling import (MAX_COUNT, MatchingProbe, object_colours, phrase_token_ids, scene_features,
                                      text_features)

COLOUR_NAMES = list(COLOURS)


def _paint(image, colour, x0, y0, x1, y1):
    image[:, y0:y1, x0:x1] = torch.tensor(COLOURS[colour], dtype=torch.float32)[:, None, None] / 255


def _box(x0, y0, x1, y1, width, height):
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def _scene(height=40, width=60):
    """A pink image with a red object and two blue ones, and one box over bare background."""
    pink = torch.tensor(BACKGROUNDS["pink"]) / 255
    image = pink[:, None, None] + 0.02 * torch.rand(3, height, width) - 0.01
    _paint(image, "red", 2, 2, 12, 12)
    _paint(image, "blue", 20, 5, 30, 15)
    _paint(image, "blue", 40, 20, 52, 34)
    boxes = torch.tensor([_box(2, 2, 12, 12, width, height), _box(20, 5, 30, 15, width, height),
                          _box(40, 20, 52, 34, width, height), _box(5, 25, 15, 35, width, height)])
    return image, boxes


def test_object_colours_reads_each_box_and_marks_bare_background():
    image, boxes = _scene()
    colours = object_colours(image, boxes)
    assert colours.tolist() == [COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue"), COLOUR_NAMES.index("blue"), -1]


def test_scene_features_counts_pairs_and_reads_boxes_in_the_unpadded_extent():
    image, boxes = _scene()
    # Pad the image to the bottom and right, as a batch does: boxes stay normalised to the image's own size.
    padded = torch.zeros(1, 3, 50, 80)
    padded[0, :, :40, :60] = image
    mask = torch.ones(1, 50, 80, dtype=torch.bool)
    mask[0, :40, :60] = False
    names = ["square", "circle", "star"]  # the label space's names, not in SHAPES order
    target = {"labels": torch.tensor([0, 1, 1, 2]), "boxes": boxes}
    features = scene_features([target, None], padded.expand(2, -1, -1, -1), mask.expand(2, -1, -1), names)
    num_colours, num_shapes = len(COLOURS), len(SHAPES)
    num_tints = len(BACKGROUNDS)
    assert features.shape == (2, num_colours + num_shapes * (MAX_COUNT + 1) + num_colours * num_shapes + num_tints)
    colours = features[0, :num_colours]
    counts = features[0, num_colours:num_colours + num_shapes * (MAX_COUNT + 1)].view(num_shapes, MAX_COUNT + 1)
    pairs = features[0, -num_colours * num_shapes - num_tints:-num_tints].view(num_colours, num_shapes)
    # Both images' background: pink, read from the ring of outermost pixels of each image's own extent.
    assert torch.equal(features[:, -num_tints:], torch.eye(num_tints)[[list(BACKGROUNDS).index("pink")] * 2])
    red, blue = COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    assert colours.nonzero().flatten().tolist() == sorted([red, blue])
    assert counts.argmax(1).tolist() == [
        {"square": 1, "circle": 2, "star": 1}.get(shape, 0) for shape in SHAPES
    ]
    assert torch.equal(counts.sum(1), torch.ones(num_shapes))
    # The star's box covers bare background: it counts as a star but names no colour.
    assert sorted(map(tuple, pairs.nonzero().tolist())) == sorted(
        [(red, SHAPES.index("square")), (blue, SHAPES.index("circle"))]
    )
    # An image without annotations: no colours or pairs, every count zero.
    assert features[1, :num_colours].sum() == 0 and features[1, -num_colours * num_shapes - num_tints:-num_tints].sum() == 0


def test_scene_features_rejects_mismatched_arguments():
    image, boxes = _scene()
    with pytest.raises(ValueError, match="targets"):
        scene_features([], image[None], torch.zeros(1, 40, 60, dtype=torch.bool), ["square"])
    with pytest.raises(ValueError, match="pixel_mask"):
        scene_features([None], image[None], torch.zeros(1, 40, 61, dtype=torch.bool), ["square"])


def test_text_features_find_singular_and_plural_phrases_and_ignore_padding():
    vocabulary = {word: i + 1 for i, word in enumerate(["a", "two", "and", "##s", *COLOURS, *SHAPES])}

    def encode(text):  # plurals as the shape's token followed by "##s"
        ids = []
        for word in text.split():
            if word.endswith("s") and word[:-1] in SHAPES:
                ids += [vocabulary[word[:-1]], vocabulary["##s"]]
            else:
                ids.append(vocabulary[word])
        return ids

    phrases = phrase_token_ids(encode)
    assert len(phrases) == 2 * len(COLOURS) * len(SHAPES)
    rows = [encode("a red circle and two blue squares"), encode("two green stars")]
    length = max(map(len, rows)) + 2
    ids = torch.zeros(2, length, dtype=torch.int64)
    mask = torch.zeros(2, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, :len(row)] = True
    ids[1, len(rows[1]):] = vocabulary["black"]  # padding that holds a real token's id must not count
    vocab_size = len(vocabulary) + 1
    features = text_features(ids, mask, vocab_size, phrases)
    bag, pairs = features[:, :vocab_size], features[:, vocab_size:].view(2, len(COLOURS), len(SHAPES))
    assert bag[0].nonzero().flatten().tolist() == sorted(set(rows[0]))
    assert bag[1, vocabulary["black"]] == 0
    named = [sorted((COLOUR_NAMES[c], SHAPES[s]) for c, s in pairs[b].nonzero().tolist()) for b in range(2)]
    assert named == [[("blue", "square"), ("red", "circle")], [("green", "star")]]
    with pytest.raises(ValueError, match="attention_mask"):
        text_features(ids, mask[:, :-1], vocab_size, phrases)


def test_matching_probe_gives_two_logits_per_pair_and_fits_a_separable_set():
    torch.manual_seed(0)
    text, scene = torch.rand(16, 5), torch.rand(16, 3)
    labels = (text[:, 0] > scene[:, 0]).long()
    probe = MatchingProbe(5, 3, hidden=32)
    assert probe(text, scene).shape == (16, 2)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    first = torch.nn.functional.cross_entropy(probe(text, scene), labels).item()
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(probe(text, scene), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
