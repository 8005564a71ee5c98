"""The whole E2E-VLP model on hand-made tiny batches: losses, masks, caption isolation, backends."""
import pytest
import torch
import torch.nn.functional as F

from fastvlp.models import E2EVLP, E2EVLPConfig, PretrainingBatch, make_pretraining_batch
from fastvlp.models.masking import IGNORE_INDEX

VOCAB, SPECIAL = 50, (0, 1, 2, 3, 4)  # [PAD] [UNK] [CLS] [SEP] [MASK]
CLS, SEP, MASK = 2, 3, 4
NUM_CLASSES, NUM_ATTRIBUTES = 5, 4


def small_config(**overrides):
    values = dict(
        backbone="resnet18", frozen_batch_norm=False, backbone_frozen_stages=0, d_model=32, num_heads=4, ffn_dim=48,
        num_encoder_layers=2, num_decoder_layers=2, num_queries=6, vocab_size=VOCAB, max_text_len=12,
        num_classes=NUM_CLASSES, num_attributes=NUM_ATTRIBUTES, dropout=0.0,
    )
    values.update(overrides)
    return E2EVLPConfig(**values)


def token_rows(lengths, total, generator):
    ids = torch.randint(len(SPECIAL), VOCAB, (len(lengths), total), generator=generator)
    mask = torch.arange(total)[None] < torch.tensor(lengths)[:, None]
    ids[:, 0] = CLS
    for row, length in enumerate(lengths):
        ids[row, length - 1] = SEP
    return ids.masked_fill(~mask, 0), mask


def random_targets(counts, generator):
    """One detection target per count: that many random boxes (cxcywh inside the image), labels and attributes."""
    targets = []
    for count in counts:
        centers = torch.rand(count, 2, generator=generator) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=generator) * 0.3 + 0.05
        targets.append({
            "labels": torch.randint(NUM_CLASSES, (count,), generator=generator),
            "boxes": torch.cat((centers, sizes), 1),
            "attributes": torch.rand(count, NUM_ATTRIBUTES, generator=generator) < 0.5,
        })
    return targets


def synthetic_batch(seed=0, batch=4):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 64, 96, generator=generator)
    pixel_mask = torch.zeros(batch, 64, 96, dtype=torch.bool)
    pixel_mask[1, :, 70:] = True  # right padding
    pixel_mask[2, 40:, :] = True  # bottom padding
    pixel_mask[3, 50:, 33:] = True
    pixel_mask[3, :, 80:] = True
    images = images.masked_fill(pixel_mask[:, None], 0.0)
    text_ids, text_mask = token_rows([9, 6, 7, 9][:batch], 9, generator)
    caption_ids, caption_mask = token_rows([8, 5, 8, 6][:batch], 8, generator)
    targets = random_targets([3, 0, 2, 5][:batch], generator)
    return make_pretraining_batch(
        images, pixel_mask, text_ids, text_mask, special_token_ids=SPECIAL, mask_token_id=MASK, vocab_size=VOCAB,
        caption_ids=caption_ids, caption_attention_mask=caption_mask, targets=targets, generator=generator,
        mlm_probability=0.4,
    )


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return E2EVLP(small_config()).eval()


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch()


def test_forward_outputs_and_losses(model, batch):
    output = model(batch)
    B, T, Tc = 4, batch.input_ids.shape[1], batch.caption_ids.shape[1]
    assert output.mlm_logits.shape == (B, T, VOCAB)
    assert output.itm_logits.shape == (B, 2)
    assert output.caption_logits.shape == (B, Tc - 1, VOCAB)
    matched = batch.itm_labels.bool()
    assert output.detection_rows.tolist() == matched.nonzero().flatten().tolist()
    rows = len(output.detection_rows)
    assert output.detection.pred_logits.shape == (rows, 6, NUM_CLASSES + 1)
    assert output.detection.pred_boxes.shape == (rows, 6, 4)
    assert output.detection.pred_attributes.shape == (rows, 6, NUM_ATTRIBUTES)
    assert len(output.detection.aux_outputs) == 1
    assert ((output.detection.pred_boxes > 0) & (output.detection.pred_boxes < 1)).all()

    losses = output.losses
    # Each task loss recomputed from the returned logits.
    labels = batch.mlm_labels
    assert (labels[~matched] == IGNORE_INDEX).all() and (labels[matched] != IGNORE_INDEX).any()
    torch.testing.assert_close(losses["loss_mlm"], F.cross_entropy(output.mlm_logits[labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX]))
    torch.testing.assert_close(losses["loss_itm"], F.cross_entropy(output.itm_logits, batch.itm_labels))
    next_tokens = batch.caption_ids[:, 1:]
    real = batch.caption_attention_mask[:, 1:]
    torch.testing.assert_close(losses["loss_cap"], F.cross_entropy(output.caption_logits[real], next_tokens[real]))
    weights = model.criterion.weight_dict
    expected_det = sum(weights[name] * losses[name] for name in weights)
    torch.testing.assert_close(losses["loss_det"], expected_det)
    for name in ("loss_ce", "loss_bbox", "loss_giou", "loss_attr", "loss_ce_0", "class_error", "cardinality_error"):
        assert name in losses
    torch.testing.assert_close(output.loss, losses["loss_mlm"] + losses["loss_itm"] + losses["loss_det"] + losses["loss_cap"])
    assert set(output.detached_losses()) == {"loss", *losses}


def test_padding_never_leaks(model, batch):
    """Eval mode: new values in padded pixels, padded text tokens and padded caption tokens change nothing."""
    generator = torch.Generator().manual_seed(5)
    reference = model(batch)
    noisy_images = torch.where(batch.pixel_mask[:, None], torch.randn(batch.images.shape, generator=generator) * 10, batch.images)
    random_ids = torch.randint(len(SPECIAL), VOCAB, batch.input_ids.shape, generator=generator)
    random_caption = torch.randint(len(SPECIAL), VOCAB, batch.caption_ids.shape, generator=generator)
    changed = PretrainingBatch(
        images=noisy_images,
        pixel_mask=batch.pixel_mask,
        input_ids=torch.where(batch.text_attention_mask, batch.input_ids, random_ids),
        text_attention_mask=batch.text_attention_mask,
        mlm_labels=batch.mlm_labels,
        itm_labels=batch.itm_labels,
        caption_ids=torch.where(batch.caption_attention_mask, batch.caption_ids, random_caption),
        caption_attention_mask=batch.caption_attention_mask,
        targets=batch.targets,
    )
    assert not torch.equal(changed.images, batch.images) and not torch.equal(changed.input_ids, batch.input_ids)
    output = model(changed)
    tolerance = dict(rtol=1e-4, atol=1e-5)
    text_valid = batch.text_attention_mask
    torch.testing.assert_close(output.mlm_logits[text_valid], reference.mlm_logits[text_valid], **tolerance)
    torch.testing.assert_close(output.itm_logits, reference.itm_logits, **tolerance)
    torch.testing.assert_close(output.detection.pred_logits, reference.detection.pred_logits, **tolerance)
    torch.testing.assert_close(output.detection.pred_boxes, reference.detection.pred_boxes, **tolerance)
    caption_valid = batch.caption_attention_mask[:, :-1]
    torch.testing.assert_close(output.caption_logits[caption_valid], reference.caption_logits[caption_valid], **tolerance)
    for name, value in reference.losses.items():
        torch.testing.assert_close(output.losses[name], value, **tolerance, msg=name)


def test_caption_never_visible_to_encoder(model, batch):
    generator = torch.Generator().manual_seed(6)
    new_caption = batch.caption_ids.clone()
    new_caption[:, 1:] = torch.randint(len(SPECIAL), VOCAB, (4, batch.caption_ids.shape[1] - 1), generator=generator)
    reference = model(batch)
    changed = model(PretrainingBatch(**{**batch.__dict__, "caption_ids": new_caption}))
    torch.testing.assert_close(changed.mlm_logits, reference.mlm_logits, rtol=0, atol=0)
    torch.testing.assert_close(changed.itm_logits, reference.itm_logits, rtol=0, atol=0)
    torch.testing.assert_close(changed.detection.pred_logits, reference.detection.pred_logits, rtol=0, atol=0)
    assert not torch.allclose(changed.caption_logits, reference.caption_logits)

    # The encoder outputs themselves: the caption path reads only the image-only memory.
    with torch.no_grad():
        visual = model.extract_visual_tokens(batch.images, batch.pixel_mask)
        image_only = model.encode_image_only(None, None, visual_tokens=visual)
        again = model.encode_image_only(batch.images, batch.pixel_mask)
        torch.testing.assert_close(again.memory, image_only.memory, rtol=0, atol=0)
        # Causality: changing caption token k leaves the logits of positions < k alone.
        k = 4
        before = model.caption_logits(image_only, batch.caption_ids[:, :-1])
        edited = batch.caption_ids[:, :-1].clone()
        edited[:, k] = (edited[:, k] + 7) % (VOCAB - len(SPECIAL)) + len(SPECIAL)
        after = model.caption_logits(image_only, edited)
    torch.testing.assert_close(after[:, :k], before[:, :k], rtol=1e-5, atol=1e-6)
    assert (after[:, k:] - before[:, k:]).abs().amax() > 1e-4


def test_encoder_output_layout(model, batch):
    with torch.no_grad():
        encoded = model.encode(batch.images, batch.pixel_mask, batch.input_ids, batch.text_attention_mask)
        image_only = model.encode_image_only(batch.images, batch.pixel_mask)
    T = batch.input_ids.shape[1]
    height, width = encoded.spatial_shape
    assert (height, width) == (2, 3)  # 64 x 96 pixels at stride 32
    assert encoded.memory.shape == (4, T + height * width, 32) and encoded.text_length == T
    assert torch.equal(encoded.padding_mask[:, :T], ~batch.text_attention_mask)
    assert torch.equal(encoded.padding_mask[:, T:], image_only.padding_mask)
    assert torch.equal(image_only.padding_mask, batch.pixel_mask[:, ::32, ::32].flatten(1))
    assert (encoded.pos[:, :T] == 0).all() and torch.equal(encoded.pos[:, T:], image_only.pos)
    assert image_only.text_length == 0 and image_only.memory.shape == (4, height * width, 32)
    torch.testing.assert_close(model.itm_logits(encoded), model.itm_head(encoded.memory[:, 0]))
    with pytest.raises(ValueError, match="CLS"):
        image_only.cls_hidden


def test_backends_agree_on_losses_and_gradients(batch):
    """Same weights, same batch, dropout off: fastvlp attention + fastvlp matcher against
    torch.nn.MultiheadAttention + scipy."""
    models = {}
    for attention, matcher in (("torch", "scipy"), ("fastvlp", "fastvlp")):
        torch.manual_seed(1)
        models[attention] = E2EVLP(small_config(attention_backend=attention, matcher_backend=matcher)).train()
    assert list(models["torch"].state_dict()) == list(models["fastvlp"].state_dict())
    models["fastvlp"].load_state_dict(models["torch"].state_dict())
    results = {}
    for name, model in models.items():
        output = model(batch)
        output.loss.backward()
        grads = {key: p.grad for key, p in model.named_parameters() if p.grad is not None}
        results[name] = (output, grads)
    reference, fast = results["torch"], results["fastvlp"]
    for name, value in reference[0].losses.items():
        torch.testing.assert_close(fast[0].losses[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert reference[1].keys() == fast[1].keys() and len(reference[1]) > 50
    for name, grad in reference[1].items():
        torch.testing.assert_close(fast[1][name], grad, rtol=1e-3, atol=2e-5, msg=name)
    assert models["torch"].backend_report()["attention"] == "torch.nn.MultiheadAttention"
    assert models["torch"].backend_report()["matcher"] == "scipy"
    report = models["fastvlp"].backend_report()
    assert report["attention"] == "reference" and report["matcher"] == "fastvlp" and report["matcher_device"] == "cpu"
    assert set(report["attention_by_role"]) == {
        "encoder_self_attention", "decoder_self_attention", "decoder_causal_self_attention", "decoder_cross_attention"
    }


def test_tasks_run_only_with_their_inputs(model, batch):
    targets = list(batch.targets)
    targets[0] = None  # an image without detection annotations
    partial = PretrainingBatch(
        images=batch.images, pixel_mask=batch.pixel_mask, input_ids=batch.input_ids,
        text_attention_mask=batch.text_attention_mask, itm_labels=torch.tensor([1, 0, 1, 1]), targets=targets,
    )
    output = model(partial)
    assert output.detection_rows.tolist() == [2, 3]
    assert output.mlm_logits is None and output.caption_logits is None
    assert {"loss_itm", "loss_det"} <= set(output.losses) and "loss_mlm" not in output.losses and "loss_cap" not in output.losses
    torch.testing.assert_close(output.loss, output.losses["loss_itm"] + output.losses["loss_det"])
    # A dict with the field names works too, and extra keys are ignored.
    as_dict = model({**{k: v for k, v in partial.__dict__.items()}, "image_id": [1, 2, 3, 4]})
    torch.testing.assert_close(as_dict.loss, output.loss)


def test_backend_report_before_forward():
    torch.manual_seed(0)
    report = E2EVLP(small_config(num_encoder_layers=1, num_decoder_layers=1)).backend_report()
    assert report["attention"] == "not run yet" and report["attention_by_role"] == {} and report["matcher_device"] is None


def test_parameter_groups_and_frozen_stages():
    torch.manual_seed(0)
    model = E2EVLP(small_config(frozen_batch_norm=True, backbone_frozen_stages=1, lr=3e-4, lr_backbone=2e-5))
    main, backbone = model.parameter_groups()
    assert main["lr"] == 3e-4 and backbone["lr"] == 2e-5
    assert not model.backbone.body.conv1.weight.requires_grad and not any(p.requires_grad for p in model.backbone.body.layer1.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(main["params"]) + len(backbone["params"]) == len(trainable)
    backbone_ids = {id(p) for p in backbone["params"]}
    assert id(model.backbone.body.layer2[0].conv1.weight) in backbone_ids
    assert id(model.backbone.input_proj.weight) not in backbone_ids  # the projection learns at the Transformer's rate
    # Tied weights: the word embeddings and both token heads share one tensor.
    assert model.mlm_head.decoder.weight is model.text_embeddings.word_embeddings.weight
    assert model.caption_head.decoder.weight is model.text_embeddings.word_embeddings.weight


def test_replace_detection_heads(model, batch):
    torch.manual_seed(0)
    fresh = E2EVLP(small_config(num_encoder_layers=1, num_decoder_layers=1))
    fresh.replace_detection_heads(num_classes=3)
    assert fresh.config.num_classes == 3 and fresh.config.num_attributes == 0
    targets = [None if t is None else {"labels": t["labels"] % 3, "boxes": t["boxes"]} for t in batch.targets]
    output = fresh(PretrainingBatch(**{**batch.__dict__, "targets": targets}))
    assert output.detection.pred_logits.shape[-1] == 4 and output.detection.pred_attributes is None
    assert "loss_attr" not in output.losses and "loss_ce" in output.losses


def test_invalid_inputs(model, batch):
    with pytest.raises(TypeError, match="batch"):
        model([batch])
    with pytest.raises(ValueError, match="pixel_mask"):
        PretrainingBatch(**{**batch.__dict__, "pixel_mask": batch.pixel_mask[:, :10]})
    with pytest.raises(ValueError, match="max_len"):
        model.encode(batch.images, batch.pixel_mask, torch.ones(4, 13, dtype=torch.long), torch.ones(4, 13, dtype=torch.bool))
    with pytest.raises(TypeError, match="config"):
        E2EVLP({"d_model": 32})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_backends_agree_on_cuda(batch):
    """On a GPU the fastvlp backends run the Triton kernels and the CUDA solver, and agree with
    torch.nn.MultiheadAttention + scipy in float32."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    models = {}
    for attention, matcher in (("torch", "scipy"), ("fastvlp", "fastvlp")):
        torch.manual_seed(1)
        models[attention] = E2EVLP(small_config(attention_backend=attention, matcher_backend=matcher)).to(device).train()
    models["fastvlp"].load_state_dict(models["torch"].state_dict())
    on_device = batch.to(device)
    results = {}
    for name, model in models.items():
        output = model(on_device)
        output.loss.backward()
        results[name] = (output, {key: p.grad for key, p in model.named_parameters() if p.grad is not None})
    for name, value in results["torch"][0].losses.items():
        torch.testing.assert_close(results["fastvlp"][0].losses[name], value, rtol=1e-3, atol=1e-4, msg=name)
    for name, grad in results["torch"][1].items():
        torch.testing.assert_close(results["fastvlp"][1][name], grad, rtol=1e-2, atol=1e-4, msg=name)
    report = models["fastvlp"].backend_report()
    assert report["attention"] == "triton" and report["matcher_device"] == "cuda"
