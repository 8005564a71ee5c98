"""fastvlp.eval.image_dependence: the caption-loss swap test and the cross-attention entropy."""
import pytest
import torch

from fastvlp.eval import image_dependence as script
from fastvlp.models.e2e_vlp import E2EVLP
from fastvlp.models.presets import get_preset


def test_swap_rows_points_every_caption_at_the_next_image():
    # Images with 2, 1 and 3 captions: rows 0-1, 2 and 3-5.
    assert script.swap_rows([2, 1, 3]).tolist() == [2, 2, 3, 0, 0, 0]
    assert script.swap_rows([1, 1]).tolist() == [1, 0]
    with pytest.raises(ValueError, match="captions_per_image"):
        script.swap_rows([4])
    with pytest.raises(ValueError, match="captions_per_image"):
        script.swap_rows([2, 0])


def tiny_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    model = E2EVLP(get_preset("tiny", vocab_size=40, num_classes=3, num_attributes=0)).eval()
    images = torch.randn(3, 3, 70, 90, generator=generator)
    pixel_mask = torch.zeros(3, 70, 90, dtype=torch.bool)
    pixel_mask[1, :, 60:] = True  # one padded image: its padding tokens must not count
    ids = torch.randint(5, 40, (3, 7), generator=generator)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 5:] = False
    return model, images, pixel_mask, ids, mask


def test_entropy_is_one_for_uniform_attention_and_below_otherwise():
    model, images, pixel_mask, ids, mask = tiny_inputs(0)
    with torch.inference_mode():
        random_init = script.cross_attention_entropy(model, images, pixel_mask, ids, mask)
    assert len(random_init) == model.config.num_decoder_layers
    assert all(0.0 < value < 1.0 for value in random_init)
    # Zero query and key projections: every real image token gets the same weight.
    d = model.config.d_model
    with torch.no_grad():
        for layer in model.decoder.layers:
            layer.multihead_attn.in_proj_weight[: 2 * d].zero_()
            layer.multihead_attn.in_proj_bias[: 2 * d].zero_()
    with torch.inference_mode():
        uniform = script.cross_attention_entropy(model, images, pixel_mask, ids, mask)
    assert uniform == pytest.approx([1.0] * len(uniform), abs=1e-6)


def test_caption_loss_matches_a_plain_cross_entropy():
    model, images, pixel_mask, ids, mask = tiny_inputs(1)
    with torch.inference_mode():
        loss = script.caption_loss(model, images, pixel_mask, ids, mask)
        logits = model.caption_logits(model.encode_image_only(images, pixel_mask), ids[:, :-1], mask[:, :-1]).double()
    log_probs = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    expected = -log_probs[mask[:, 1:]].mean()
    assert loss == pytest.approx(float(expected), rel=1e-5)
    # The swap changes the images, so a randomly initialised decoder's loss changes too.
    with torch.inference_mode():
        swapped = script.caption_loss(model, images.roll(1, 0), pixel_mask.roll(1, 0), ids, mask)
    assert swapped != pytest.approx(loss, abs=1e-7)


def test_masked_word_scores_mask_only_the_listed_words_and_score_them():
    model, images, pixel_mask, ids, mask = tiny_inputs(2)
    words, mask_id = [7, 11, 12], 4
    ids[0, 1], ids[1, 2], ids[2, 6] = 7, 11, 12  # row 2's position 6 is padding: never scored
    targets = torch.isin(ids, torch.tensor(words)) & mask
    with torch.inference_mode():
        accuracy, log_prob, scored = script.masked_word_scores(model, images, pixel_mask, ids, mask, words, mask_id)
        logits = model.mlm_logits(model.encode(images, pixel_mask, ids.masked_fill(targets, mask_id), mask))
    expected = logits[targets].double().log_softmax(-1).gather(1, ids[targets][:, None]).mean()
    assert scored == int(targets.sum()) >= 2 and not targets[2, 6]
    assert log_prob == pytest.approx(float(expected), rel=1e-9)
    assert 0.0 <= accuracy <= 1.0
    # A head that always answers 7 is right exactly on the 7s.
    with torch.no_grad():
        model.mlm_head.bias[7] = 1e4
    with torch.inference_mode():
        rigged, _, _ = script.masked_word_scores(model, images, pixel_mask, ids, mask, words, mask_id)
    assert rigged == pytest.approx(float((ids[targets] == 7).double().mean()))


def test_masked_word_scores_without_words_to_score():
    model, images, pixel_mask, ids, mask = tiny_inputs(3)
    with torch.inference_mode():
        accuracy, log_prob, scored = script.masked_word_scores(model, images, pixel_mask, ids, mask, [45], 4)
    assert scored == 0 and accuracy != accuracy and log_prob != log_prob  # nan: nothing to score
    with pytest.raises(ValueError, match="word_ids"):
        script.masked_word_scores(model, images, pixel_mask, ids, mask, [], 4)
