"""fastvlp.eval.matching_sanity (solid-colour image-text matching) and fastvlp.eval.colour_oracle."""
import math

import pytest
import torch
from train_helpers import SMALL_MODEL

from fastvlp.data.synth.palette import BACKGROUNDS, COLOURS
from fastvlp.data.tokenizer import WordPieceTokenizer
from fastvlp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fastvlp.eval.colour_oracle import ColourOracle, use_colour_oracle
from fastvlp.eval.matching_sanity import (COLOUR_NAMES, first_window_below, match_variance, matching_text,
                                          solid_colour_batch, train_matching, variance_components, window_means)
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset

PALETTE = torch.tensor([COLOURS[name] for name in COLOUR_NAMES], dtype=torch.float32) / 255


def _pixels(images):
    return images * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]


def _normalise(pixels):
    return (pixels - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_solid_colour_batch_pairs_each_image_with_its_colour_or_another():
    batch = solid_colour_batch(4000, torch.Generator().manual_seed(5), image_size=(8, 12))
    assert batch.images.shape == (4000, 3, 8, 12) and not batch.pixel_mask.any()
    deviation = (_pixels(batch.images) - PALETTE[batch.colours][:, :, None, None]).abs()
    assert 0 < float(deviation.max()) < 0.15  # the colour, with a little noise
    assert torch.equal(batch.labels, (batch.named == batch.colours).long())
    assert 0.45 < float(batch.labels.float().mean()) < 0.55
    assert set(batch.colours.tolist()) == set(range(len(COLOUR_NAMES)))
    assert set((batch.named[batch.labels == 0]).tolist()) == set(range(len(COLOUR_NAMES)))
    assert batch.texts == [f"a {COLOUR_NAMES[i]} shape" for i in batch.named.tolist()]
    again = solid_colour_batch(4000, torch.Generator().manual_seed(5), image_size=(8, 12))
    assert torch.equal(again.images, batch.images) and again.texts == batch.texts


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_solid_colour_batch_rejects_a_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        solid_colour_batch(bad, torch.Generator())


def test_colour_oracle_marks_the_colours_present_in_each_cell():
    red, blue = COLOUR_NAMES.index("red"), COLOUR_NAMES.index("blue")
    pixels = torch.full((1, 3, 40, 70), 0.97)  # near white: no palette colour
    pixels[0, :, :, :32] = PALETTE[red][:, None, None]
    pixels[0, :, 20:, 40:45] = PALETTE[blue][:, None, None]  # a thin strip in the second and third columns
    oracle = ColourOracle(32, "out")
    cells = oracle(_normalise(pixels))["out"]
    assert cells.shape == (1, len(COLOUR_NAMES) + len(BACKGROUNDS), 2, 3)  # ceil(40/32) x ceil(70/32)
    expected = torch.zeros_like(cells)
    expected[0, len(COLOUR_NAMES) + list(BACKGROUNDS).index("white"), :, 1:] = 1  # the near-white rest
    expected[0, red, :, 0] = 1
    expected[0, blue, 0, 1] = 1  # rows 20..31 of columns 40..44: 60 of the cell's 1024 pixels
    expected[0, blue, 1, 1] = 1  # rows 32..39: 40 of the 256 pixels of a cell cut short by the image's edge
    assert torch.equal(cells, expected)
    assert torch.equal(ColourOracle(32, "out", tints=False)(_normalise(pixels))["out"], expected[:, :len(COLOUR_NAMES)])
    with pytest.raises(ValueError, match="stride"):
        ColourOracle(0, "out")


def test_colour_oracle_reads_each_background_tint_through_its_texture():
    tints = torch.tensor(list(BACKGROUNDS.values()), dtype=torch.float32) / 255
    pixels = torch.empty(1, 3, 32, 32 * len(BACKGROUNDS))
    for index, tint in enumerate(tints):
        cell = pixels[0, :, :, 32 * index: 32 * (index + 1)]
        cell[:] = tint[:, None, None]
        cell[:, ::4] = (tint - 18 / 255)[:, None, None]  # stripes as drawing.py draws them: 18 levels darker
    cells = ColourOracle(32, "out")(_normalise(pixels))["out"]
    expected = torch.zeros_like(cells)
    for index in range(len(BACKGROUNDS)):
        expected[0, len(COLOURS) + index, 0, index] = 1
    assert torch.equal(cells, expected)


@pytest.fixture(scope="module")
def tokenizer():
    return WordPieceTokenizer.train_on_texts([matching_text(c) for c in COLOUR_NAMES])


def _model(tokenizer, oracle):
    config = get_preset("tiny", vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                        max_text_len=tokenizer.max_length, num_classes=1, num_attributes=0, **SMALL_MODEL)
    torch.manual_seed(0)
    model = E2EVLP(config)
    if oracle:
        use_colour_oracle(model, 32)
    return model


@pytest.mark.parametrize("oracle", [False, True])
def test_train_matching_steps_the_itm_objective_deterministically(tokenizer, oracle):
    model = _model(tokenizer, oracle)
    if oracle:
        assert isinstance(model.backbone.body, ColourOracle)
        assert model.backbone.input_proj.in_channels == len(COLOUR_NAMES) + len(BACKGROUNDS)
    before = model.itm_head.classifier.weight.detach().clone()
    losses = train_matching(model, tokenizer, steps=3, batch_size=4, data_seed=1)
    assert len(losses) == 3 and all(math.isfinite(x) and 0.2 < x < 2.0 for x in losses)
    assert not torch.equal(model.itm_head.classifier.weight, before)
    assert train_matching(_model(tokenizer, oracle), tokenizer, steps=3, batch_size=4, data_seed=1) == losses
    with pytest.raises(ValueError, match="steps"):
        train_matching(model, tokenizer, steps=0)


def test_windows_and_the_first_window_below_a_threshold():
    losses = [0.7] * 50 + [0.6] * 50 + [0.3] * 50 + [0.1] * 10
    assert window_means(losses, 50) == pytest.approx([0.7, 0.6, 0.3])  # the partial last window is left out
    assert first_window_below(losses, 0.5, 50) == 150
    assert first_window_below(losses, 0.05, 50) is None
    assert first_window_below([0.9, 0.2, 0.2, 0.9], 0.5, 2) is None  # both windows' means are 0.55
    assert first_window_below([0.9, 0.2, 0.2, 0.9], 0.6, 2) == 2
    with pytest.raises(ValueError, match="window"):
        window_means(losses, 0)


def test_variance_components_split_hand_built_states():
    # States along five orthogonal directions: a constant, an image effect, a text effect, a match effect and
    # an interaction that is not about matching (zero row, column and diagonal sums).
    n = 3
    image_effect, text_effect = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([2.0, 0.0, -2.0])
    other = torch.tensor([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    states = torch.zeros(n, n, 5)
    states[..., 0] = 10.0
    states[..., 1] = image_effect[:, None]
    states[..., 2] = text_effect[None, :]
    states[..., 3] = 3.0 * torch.eye(n)
    states[..., 4] = other
    parts = variance_components(states)
    # Mean squared sizes: norm 100 + 2/3 + 8/3 + 3 + 2/3 = 107; image 2/3; text 8/3; the match part
    # 3^2 (n - 1) / n^2 = 2 and the other interaction 6/9 = 2/3.
    expected = {"image": 2 / 3, "text": 8 / 3, "interaction": 2 + 2 / 3, "match": 2.0, "total": 6.0}
    assert parts == pytest.approx({name: value / 107 for name, value in expected.items()}, rel=1e-12)
    shuffled = variance_components(states[:, torch.tensor([1, 0, 2])])  # the match part is no longer on the diagonal
    assert shuffled["interaction"] == pytest.approx(parts["interaction"], rel=1e-12)
    assert shuffled["match"] < parts["match"] / 2


@pytest.mark.parametrize("bad", [torch.zeros(3, 3, 2), torch.ones(3, 4, 2), torch.ones(1, 1, 2), torch.ones(3, 3)])
def test_variance_components_reject_bad_states(bad):
    with pytest.raises(ValueError, match="states"):
        variance_components(bad)


def test_match_variance_of_a_fresh_model(tokenizer):
    model = _model(tokenizer, oracle=False)
    model.train()
    result = match_variance(model, tokenizer, image_size=(32, 48))
    assert model.training
    assert set(result) == {"cls", "colour_word"}
    for parts in result.values():
        assert parts["total"] == pytest.approx(parts["image"] + parts["text"] + parts["interaction"], rel=1e-9)
        assert 0 < parts["match"] <= parts["interaction"] < parts["total"] < 1
    # The colour word's own vector depends on the word far more than [CLS] does.
    assert result["colour_word"]["text"] > result["cls"]["text"]
    split = WordPieceTokenizer.train_on_texts(["a shape"])  # colour names break into several pieces
    with pytest.raises(ValueError, match="tokenizer"):
        match_variance(model, split, image_size=(32, 48))
