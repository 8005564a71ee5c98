"""The image-text contrastive head and loss (fastvlp.models.contrastive) and E2EVLP's unimodal passes."""
import math

import pytest
import torch
from train_helpers import SMALL_MODEL

from fastvlp.models.contrastive import INITIAL_TEMPERATURE, MAX_LOGIT_SCALE, ContrastiveHead, contrastive_loss, masked_mean
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset
from fastvlp.models.pretraining_batch import PretrainingBatch

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_loss(image, text, scale, image_ids=None):
    """Written out in float64: for each image, -log of its own text's share of exp(scale * cos) over the
    texts that are not another row of the same image; the same for each text; the mean of the two means."""
    image, text = image.double(), text.double()
    size = image.shape[0]

    def one_direction(queries, keys):
        total = 0.0
        for i in range(size):
            terms = [math.exp(scale * float(queries[i] @ keys[j])) for j in range(size)
                     if j == i or image_ids is None or int(image_ids[i]) != int(image_ids[j])]
            total += -(scale * float(queries[i] @ keys[i])) + math.log(sum(terms))
        return total / size

    return (one_direction(image, text) + one_direction(text, image)) / 2


def unit_rows(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=generator), dim=-1)


@pytest.mark.parametrize("size", [1, 2, 5])
def test_loss_matches_a_float64_reference(size):
    image, text = unit_rows(size, 7, seed=size), unit_rows(size, 7, seed=size + 10)
    scale = torch.tensor(1 / INITIAL_TEMPERATURE)
    loss = contrastive_loss(image, text, scale)
    assert float(loss) == pytest.approx(reference_loss(image, text, float(scale)), rel=1e-5, abs=1e-6)
    if size == 1:
        assert float(loss) == pytest.approx(0.0, abs=1e-6)  # one pair has nothing to be told apart from


def test_rows_of_one_image_are_not_each_other_negatives():
    image, text = unit_rows(5, 6, seed=3), unit_rows(5, 6, seed=4)
    image_ids = torch.tensor([7, 2, 7, 9, 2])
    image[2] = image[0]  # a repeated image: same pixels, two captions
    scale = torch.tensor(5.0)
    loss = contrastive_loss(image, text, scale, image_ids)
    assert float(loss) == pytest.approx(reference_loss(image, text, 5.0, image_ids), rel=1e-5)
    assert float(loss) != pytest.approx(float(contrastive_loss(image, text, scale)), rel=1e-3)
    # with all ids distinct it is the plain loss
    assert torch.equal(contrastive_loss(image, text, scale, torch.arange(5)), contrastive_loss(image, text, scale))


def test_ties_give_log_of_the_batch_size_and_aligned_pairs_approach_zero():
    same = unit_rows(1, 4, seed=0).expand(6, 4)
    assert float(contrastive_loss(same, same, torch.tensor(10.0))) == pytest.approx(math.log(6), rel=1e-6)
    basis = torch.eye(4)
    assert float(contrastive_loss(basis, basis, torch.tensor(MAX_LOGIT_SCALE))) < 1e-30


def test_empty_batch_gives_zero_attached_to_the_graph():
    scale = torch.tensor(3.0, requires_grad=True)
    loss = contrastive_loss(torch.zeros(0, 4), torch.zeros(0, 4), scale)
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_bad_inputs_name_the_argument():
    rows = unit_rows(3, 4, seed=1)
    with pytest.raises(ValueError, match="text_embeddings"):
        contrastive_loss(rows, rows[:2], torch.tensor(1.0))
    with pytest.raises(ValueError, match="logit_scale"):
        contrastive_loss(rows, rows, torch.ones(2))
    with pytest.raises(ValueError, match="image_ids"):
        contrastive_loss(rows, rows, torch.tensor(1.0), torch.arange(2))
    with pytest.raises(ValueError, match="dim"):
        ContrastiveHead(8, 0)
    with pytest.raises(ValueError, match="image_pooled"):
        ContrastiveHead(8, 4)(torch.randn(2, 8), torch.randn(2, 5))


def test_masked_mean_ignores_padding_and_gives_zero_for_an_empty_row():
    tokens = torch.randn(3, 4, 5, dtype=torch.float64)
    padding = torch.tensor([[False, False, True, True], [False, False, False, False], [True, True, True, True]])
    pooled = masked_mean(tokens, padding)
    assert torch.allclose(pooled[0], tokens[0, :2].mean(0)) and torch.allclose(pooled[1], tokens[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="padding_mask"):
        masked_mean(tokens, padding[:, :3])


def test_head_gives_unit_vectors_and_a_clamped_learned_scale():
    head = ContrastiveHead(8, 4)
    text, image = head(torch.randn(3, 8), torch.randn(5, 8))
    assert text.shape == (3, 4) and image.shape == (5, 4)
    assert torch.allclose(text.norm(dim=-1), torch.ones(3)) and torch.allclose(image.norm(dim=-1), torch.ones(5))
    assert float(head.logit_scale.detach()) == pytest.approx(1 / INITIAL_TEMPERATURE, rel=1e-6)
    with torch.no_grad():
        head.log_logit_scale.fill_(10.0)
    assert float(head.logit_scale) == MAX_LOGIT_SCALE


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = get_preset("tiny", vocab_size=50, **SMALL_MODEL, contrastive_loss_weight=1.0, contrastive_dim=8)
    return E2EVLP(config).eval()


def batch(seed, size=3):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 64, 80, generator=generator)
    pixel_mask = torch.zeros(size, 64, 80, dtype=torch.bool)
    pixel_mask[0, :, 48:] = True  # one image narrower than the batch
    input_ids = torch.randint(5, 50, (size, 6), generator=generator)
    input_ids[:, 0] = 2
    mask = torch.ones(size, 6, dtype=torch.bool)
    mask[1, 4:] = False
    input_ids[1, 4:] = 0
    return images, pixel_mask, input_ids, mask


def test_text_only_pass_equals_a_joint_pass_whose_image_tokens_are_all_padding(model):
    images, pixel_mask, input_ids, mask = batch(1)
    with torch.no_grad():
        visual = model.extract_visual_tokens(images, pixel_mask)
        visual.padding_mask[:] = True
        joint = model.encode(None, None, input_ids, mask, visual_tokens=visual)
        alone = model.encode_text_only(input_ids, mask)
    assert alone.text_length == 6 and alone.memory.shape == (3, 6, model.config.d_model)
    real = mask.unsqueeze(-1).expand_as(alone.memory)
    assert torch.allclose(alone.memory[real], joint.text_hidden[real], atol=1e-5)
    with pytest.raises(TypeError, match="text_attention_mask"):
        model.encode_text_only(input_ids, mask.long())


def test_model_loss_is_the_head_and_loss_on_the_unimodal_passes(model):
    images, pixel_mask, input_ids, mask = batch(2)
    with torch.no_grad():
        visual = model.extract_visual_tokens(images, pixel_mask)
        loss = model.contrastive_loss(visual, input_ids, mask)
        image_only = model.encode_image_only(None, None, visual_tokens=visual)
        text_only = model.encode_text_only(input_ids, mask)
        text, image = model.contrastive_head(text_only.cls_hidden, masked_mean(image_only.memory, image_only.padding_mask))
    scale = float(model.contrastive_head.logit_scale)
    assert float(loss) == pytest.approx(reference_loss(image, text, scale), rel=1e-5)


def test_gradient_reaches_the_backbone_text_embeddings_and_scale(model):
    model.train()
    model.zero_grad(set_to_none=True)
    images, pixel_mask, input_ids, mask = batch(3)
    model.contrastive_loss(model.extract_visual_tokens(images, pixel_mask), input_ids, mask).backward()
    for name, parameter in (("backbone", model.backbone.body.conv1.weight), ("encoder", model.encoder.layers[0].linear1.weight),
                            ("text embeddings", model.text_embeddings.word_embeddings.weight),
                            ("scale", model.contrastive_head.log_logit_scale)):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)
    model.eval()


def test_without_the_weight_there_is_no_head_and_the_loss_is_refused():
    config = get_preset("tiny", vocab_size=50, **SMALL_MODEL)
    plain = E2EVLP(config)
    assert plain.contrastive_head is None
    images, pixel_mask, input_ids, mask = batch(4)
    with pytest.raises(ValueError, match="contrastive_loss_weight"):
        plain.contrastive_loss(plain.extract_visual_tokens(images, pixel_mask), input_ids, mask)


def test_pretraining_adds_the_loss_of_each_image_and_its_caption_with_its_weight():
    torch.manual_seed(1)
    config = get_preset("tiny", vocab_size=50, **SMALL_MODEL, contrastive_loss_weight=0.5, contrastive_dim=8)
    model = E2EVLP(config).eval()
    images, pixel_mask, input_ids, mask = batch(5, size=4)
    caption_ids, caption_mask = batch(6, size=4)[2:]
    output = model(PretrainingBatch(images=images, pixel_mask=pixel_mask, input_ids=input_ids, text_attention_mask=mask,
                                    caption_ids=caption_ids, caption_attention_mask=caption_mask))
    with torch.no_grad():
        visual = model.extract_visual_tokens(images, pixel_mask)
        expected = model.contrastive_loss(visual, caption_ids, caption_mask)  # the captions, not the encoder text
        other = model.contrastive_loss(visual, input_ids, mask)
    assert float(output.losses["loss_contrastive"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(other) != pytest.approx(float(expected), rel=1e-3)
    assert float(output.loss) == pytest.approx(float(output.losses["loss_cap"]) + 0.5 * float(expected), rel=1e-5)
    plain = E2EVLP(get_preset("tiny", vocab_size=50, **SMALL_MODEL))
    assert "loss_contrastive" not in plain(PretrainingBatch(images=images, pixel_mask=pixel_mask, input_ids=input_ids,
                                                            text_attention_mask=mask, caption_ids=caption_ids,
                                                            caption_attention_mask=caption_mask)).losses
